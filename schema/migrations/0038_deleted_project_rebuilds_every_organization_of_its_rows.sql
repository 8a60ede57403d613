-- Money rules (the aggregate): a deleted project rebuilds, at the commit that deletes it, every organization whose
-- rollups of it the cascade deleted, not only the organization it belonged to then.
--
-- Why: 0036 rebuilds a deleted project's organization after its cascade, because the cascade's deletions apply their
-- deltas against the coverage of the moment (a covered estimate taken out as if it had counted). A project moved to
-- another organization leaves its earlier rows in the one it left (README "What counts as spend", rule 4), and the
-- cascade deletes those too; that organization was not rebuilt: its 2 USD cost line covering its 1 USD estimate,
-- beside another project's 4 USD estimate, left it at 0 where the full computation said 4
-- (tests/test_spend_moves.py::test_a_moved_project_deleted_leaves_the_organization_it_left_equal).
--
-- How: the estimate trigger (0028), on a deletion, notes in a transaction-local setting
-- (cost_worker.spend_rebuild_at_commit) the organizations of deleted rollup rows whose project no longer exists
-- (to it: a row of a project it cannot see is noted too, which costs at most a rebuild at the next project
-- deletion of the transaction); 0036's deferred trigger rebuilds those with the project's own organization and
-- clears the setting. Same signatures.
-- Why expand: two trigger functions replaced; the previous release never deletes projects (the platform does).

CREATE OR REPLACE FUNCTION cost_worker_spend_on_estimates() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    delta cost_worker_spend_estimate[];
    saved text;
    gone uuid[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT coalesce(array_agg(ROW(organization_id, project_id, provider, hour, estimated_cost_usd, 1)
                                  ::cost_worker_spend_estimate), '{}') INTO delta
        FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT coalesce(array_agg(ROW(organization_id, project_id, provider, hour, amount, n)
                                  ::cost_worker_spend_estimate), '{}') INTO delta
        FROM (SELECT organization_id, project_id, provider, hour, estimated_cost_usd AS amount, 1 AS n FROM new_rows
              UNION ALL
              SELECT organization_id, project_id, provider, hour, -estimated_cost_usd, -1 FROM old_rows) x;
    ELSE
        SELECT coalesce(array_agg(ROW(organization_id, project_id, provider, hour, -estimated_cost_usd, -1)
                                  ::cost_worker_spend_estimate), '{}') INTO delta
        FROM old_rows;
    END IF;
    saved := cost_worker_spend_tenants_widen(ARRAY(SELECT DISTINCT x.organization_id FROM unnest(delta) AS x));
    PERFORM cost_worker_spend_estimates_changed(delta);
    IF TG_OP = 'DELETE' THEN  -- 0038: a cascade from a deleted project (its rows of every organization)
        SELECT array_agg(DISTINCT o.organization_id) INTO gone
        FROM (SELECT DISTINCT organization_id, project_id FROM old_rows WHERE project_id IS NOT NULL) o
        WHERE NOT EXISTS (SELECT FROM projects p WHERE p.id = o.project_id);
        IF gone IS NOT NULL THEN
            PERFORM set_config(
                'cost_worker.spend_rebuild_at_commit',
                array_to_string(ARRAY(
                    SELECT DISTINCT x FROM unnest(
                        gone || coalesce(string_to_array(
                            nullif(current_setting('cost_worker.spend_rebuild_at_commit', true), ''), ',')::uuid[],
                            '{}')) AS x
                    ORDER BY x), ','),
                true);
        END IF;
    END IF;
    PERFORM cost_worker_spend_tenants_restore(saved);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION cost_worker_spend_on_project_deleted() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    saved text;
    orgs uuid[];
BEGIN
    orgs := ARRAY(
        SELECT DISTINCT x FROM unnest(
            OLD.organization_id || coalesce(string_to_array(
                nullif(current_setting('cost_worker.spend_rebuild_at_commit', true), ''), ',')::uuid[], '{}')) AS x
        ORDER BY x);
    PERFORM set_config('cost_worker.spend_rebuild_at_commit', '', true);
    saved := cost_worker_spend_tenants_widen(orgs);
    PERFORM cost_worker_spend_rebuild(orgs);
    PERFORM cost_worker_spend_tenants_restore(saved);
    RETURN NULL;
END
$$;
