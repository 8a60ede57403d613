-- Money rules (the aggregate): the rows a deleted project takes with it (ON DELETE CASCADE of its ledger lines and
-- rollups) leave the spend aggregate too.
--
-- Why: PostgreSQL runs a foreign key's cascade as the owner of the referencing table (cost_worker_owner), to whom
-- row-level security applies (FORCE), in a transaction that names no tenant (the platform deleted the project, not
-- the worker). The triggers' reads then saw no organization (cost_worker_spend_estimates_changed joins
-- organizations, the recomputation of a provider line's hours reads nothing), so nothing was subtracted: after a
-- project was deleted its organization's budgets still counted its spend (16 USD where the full computation and a
-- rebuild said 1: tests/test_spend_aggregate.py::test_a_deleted_project_takes_its_rows_out_of_the_aggregate), kept
-- alerts open on it, and the figure changed whenever something else rebuilt the organization.
--
-- Now each of the three triggers widens the transaction's tenants to the organizations of the rows its statement
-- changed, for the length of its own work, and sets them back after it. A statement of the worker's (its tenants
-- are set, and its rows are of those tenants: the policies' WITH CHECK) changes nothing: the check is one array
-- comparison. The rows were changed by the statement already, so nothing else becomes visible to it. Same triggers,
-- same functions' signatures, same results for every statement that is not a cascade: expand.

-- The transaction's tenants (cost_worker.organization_ids) widened to `orgs`, when one of them is not in it: returns
-- the setting as it was (for cost_worker_spend_tenants_restore), NULL when nothing was changed.
CREATE FUNCTION cost_worker_spend_tenants_widen(orgs uuid[]) RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    saved text := current_setting('cost_worker.organization_ids', true);
    kept uuid[] := coalesce(cost_worker_tenant_ids(), '{}');
BEGIN
    IF orgs IS NULL OR orgs <@ kept THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('cost_worker.organization_ids',
                       array_to_string(ARRAY(SELECT DISTINCT x FROM unnest(kept || orgs) AS x WHERE x IS NOT NULL
                                             ORDER BY x), ','),
                       true);
    RETURN coalesce(saved, '');
END
$$;

CREATE FUNCTION cost_worker_spend_tenants_restore(saved text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF saved IS NOT NULL THEN
        PERFORM set_config('cost_worker.organization_ids', saved, true);
    END IF;
END
$$;

-- 0012's trigger, its work between the two.
CREATE OR REPLACE FUNCTION cost_worker_spend_on_lines() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    changed cost_worker_spend_line[];
    saved text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT coalesce(array_agg(DISTINCT ROW(organization_id, project_id, provider, ai_organization_id,
                                               api_version::text, bucket_start_time, bucket_end_time)
                                           ::cost_worker_spend_line), '{}') INTO changed
        FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT coalesce(array_agg(DISTINCT ROW(organization_id, project_id, provider, ai_organization_id,
                                               api_version::text, bucket_start_time, bucket_end_time)
                                           ::cost_worker_spend_line), '{}') INTO changed
        FROM (SELECT organization_id, project_id, provider, ai_organization_id, api_version, bucket_start_time,
                     bucket_end_time FROM old_rows
              UNION ALL
              SELECT organization_id, project_id, provider, ai_organization_id, api_version, bucket_start_time,
                     bucket_end_time FROM new_rows) x;
    ELSE
        SELECT coalesce(array_agg(DISTINCT ROW(organization_id, project_id, provider, ai_organization_id,
                                               api_version::text, bucket_start_time, bucket_end_time)
                                           ::cost_worker_spend_line), '{}') INTO changed
        FROM old_rows;
    END IF;
    saved := cost_worker_spend_tenants_widen(ARRAY(SELECT DISTINCT x.organization_id FROM unnest(changed) AS x));
    PERFORM cost_worker_spend_lines_changed(changed);
    PERFORM cost_worker_spend_tenants_restore(saved);
    RETURN NULL;
END
$$;

-- 0012's trigger, its work between the two.
CREATE OR REPLACE FUNCTION cost_worker_spend_on_estimates() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    delta cost_worker_spend_estimate[];
    saved text;
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
    PERFORM cost_worker_spend_tenants_restore(saved);
    RETURN NULL;
END
$$;

-- 0019's trigger, its work (from the registry check on) between the two.
CREATE OR REPLACE FUNCTION cost_worker_spend_on_users() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    orgs uuid[];
    delta cost_worker_spend_user[];
    saved text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT organization_id) INTO orgs FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT array_agg(DISTINCT organization_id) INTO orgs
        FROM (SELECT organization_id FROM new_rows UNION ALL SELECT organization_id FROM old_rows) x;
    ELSE
        SELECT array_agg(DISTINCT organization_id) INTO orgs FROM old_rows;
    END IF;
    IF orgs IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM cost_worker_spend_lock(orgs, false);
    saved := cost_worker_spend_tenants_widen(orgs);
    IF NOT EXISTS (SELECT FROM spend_subjects s WHERE s.organization_id = ANY (orgs)) THEN
        PERFORM cost_worker_spend_tenants_restore(saved);
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT coalesce(array_agg(ROW(organization_id, user_id, project_id, hour, estimated_cost_usd, 1)
                                  ::cost_worker_spend_user), '{}') INTO delta
        FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT coalesce(array_agg(ROW(organization_id, user_id, project_id, hour, amount, n)
                                  ::cost_worker_spend_user), '{}') INTO delta
        FROM (SELECT organization_id, user_id, project_id, hour, estimated_cost_usd AS amount, 1 AS n FROM new_rows
              UNION ALL
              SELECT organization_id, user_id, project_id, hour, -estimated_cost_usd, -1 FROM old_rows) x;
    ELSE
        SELECT coalesce(array_agg(ROW(organization_id, user_id, project_id, hour, -estimated_cost_usd, -1)
                                  ::cost_worker_spend_user), '{}') INTO delta
        FROM old_rows;
    END IF;
    PERFORM cost_worker_spend_users_changed(delta);
    PERFORM cost_worker_spend_tenants_restore(saved);
    RETURN NULL;
END
$$;

GRANT EXECUTE ON FUNCTION cost_worker_spend_tenants_widen(uuid[]), cost_worker_spend_tenants_restore(text)
    TO cost_worker_writer;
