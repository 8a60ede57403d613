-- Money rules (the aggregate): a deleted project rebuilds its organization's spend aggregate at commit, after its
-- cascade.
--
-- Why: the cascade deletes the project's ledger lines and rollups one table after another, and each deletion's
-- trigger (0028) applies its delta against what is left at that moment. A project whose 2 USD cost line covered its
-- 1 USD estimate left its organization's spend 1 lower than the full computation once deleted (4 where it said 5;
-- found by tests/test_spend_shapes.py::test_lines_of_two_accounts_of_one_provider_equal_the_model): the covered
-- estimate was taken out as if it had counted.
--
-- A trigger on projects itself cannot run after the cascade within the statement: the cascade's own deletions queue
-- their triggers behind it. So a constraint trigger, deferred to the commit, rebuilds each deleted project's
-- organization from what is left, exactly as `budgets rebuild-spend` does, with the transaction's tenants widened to
-- it for its own work (a cascade names no tenant, 0028). Deleting a project is rare; the rebuild reads one
-- organization's rows (once per deleted project).
-- Why expand: a new trigger and function; the previous release writes projects never (the platform does) and
-- reads the aggregate as before.
CREATE FUNCTION cost_worker_spend_on_project_deleted() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    saved text;
BEGIN
    saved := cost_worker_spend_tenants_widen(ARRAY[OLD.organization_id]);
    PERFORM cost_worker_spend_rebuild(ARRAY[OLD.organization_id]);
    PERFORM cost_worker_spend_tenants_restore(saved);
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER spend_project_deleted AFTER DELETE ON projects
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION cost_worker_spend_on_project_deleted();
