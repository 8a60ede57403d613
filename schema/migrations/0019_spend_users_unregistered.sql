-- Issue 18 (per-event cost): the user-scope trigger returns before it builds and groups its delta when no user of
-- the statement's organizations is registered in the spend aggregate (0016) - the usual case: a platform has few
-- user budgets, and the benchmark's main drain has none.
--
-- Why: 0016 made the user scopes kept only for registered subjects, but the trigger still built the statement's
-- whole delta (one row per changed user rollup row), locked, grouped it (~7,400 rows for a 5,000-event batch:
-- ~15 ms of the batch's ~125 ms of PostgreSQL time in the profile) and only then found nothing to add.
--
-- Correct for the same reason as 0016's trigger: the organizations' shared spend lock is taken first, so a
-- registration (exclusive lock) either committed before this check (READ COMMITTED: the check's snapshot is taken
-- after the lock, and sees it) or waits until this transaction commits and then builds from its rows.

CREATE INDEX spend_subjects_organization ON spend_subjects (organization_id);

CREATE OR REPLACE FUNCTION cost_worker_spend_on_users() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    orgs uuid[];
    delta cost_worker_spend_user[];
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
    IF NOT EXISTS (SELECT FROM spend_subjects s WHERE s.organization_id = ANY (orgs)) THEN
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
    RETURN NULL;
END
$$;
