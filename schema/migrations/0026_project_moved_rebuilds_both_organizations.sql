-- Money rules (the aggregate): a project whose provider mapping changes together with its organization rebuilds
-- the aggregate of the organization it leaves as well as the one it joins.
--
-- Why: 0012's trigger rebuilt only the new organization. The organization the project leaves keeps the project's
-- ledger lines and rollups (each names its own organization), and whether an ungrouped provider row covers those
-- estimates depends on the project's mapping (organization scope): with the account changed in the same update, the
-- old organization's aggregate kept the estimate covered while the full computation counted it again (7 USD read
-- instead of 12: tests/test_spend_aggregate.py::
-- test_a_project_moved_to_another_organization_and_account_rebuilds_both). Same trigger, same signature.

CREATE OR REPLACE FUNCTION cost_worker_spend_on_projects() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    orgs uuid[];
BEGIN
    SELECT array_agg(DISTINCT x.organization_id) INTO orgs
    FROM new_rows n
    JOIN old_rows o ON o.id = n.id
    CROSS JOIN LATERAL (VALUES (n.organization_id), (o.organization_id)) AS x(organization_id)
    WHERE (n.ai_provider, n.ai_organization_id, n.organization_id)
          IS DISTINCT FROM (o.ai_provider, o.ai_organization_id, o.organization_id);
    IF orgs IS NOT NULL THEN
        PERFORM cost_worker_spend_rebuild(orgs);
    END IF;
    RETURN NULL;
END
$$;
