-- Issue 18 (per-event cost): the estimate trigger asks spend_cover "is this (scope, project, provider, hour)
-- covered?" with two index probes per changed rollup key, instead of an anti join the planner is free to choose.
--
-- Why: 0012 wrote the two checks as NOT EXISTS, which PostgreSQL plans as anti joins. Their inner side is every
-- coverage row of the scope kind for the batch's organizations (row-level security filters by organization, not
-- the index), so the plan's cost grew with the coverage history, and on a table whose statistics are stale (a
-- table filled since the last ANALYZE: the usual case right after a backfill or a busy hour) it chose a nested
-- loop over the materialised coverage: 4.85 million comparisons for one 5,000-event batch in the profile
-- (bench/PROFILE.md). A scalar subquery with LIMIT 1 in the select list is a correlated subplan, run per row with
-- its parameters as index conditions on spend_cover_key (scope, subject, hour, provider, ...), which PostgreSQL
-- neither turns into a join nor hashes (it does hash an EXISTS there: every coverage row of the scope kind
-- again). The work is two index probes per changed key, whatever the table holds and its statistics say.
--
-- Same result as 0012's: a key counts in the organization's scope unless a row of its project, or an ungrouped
-- row of the provider account its project is mapped to, covers the hour; in the project's scope unless a row of
-- its project covers it.

CREATE OR REPLACE FUNCTION cost_worker_spend_estimates_changed(delta cost_worker_spend_estimate[]) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF cardinality(delta) = 0 THEN
        RETURN;
    END IF;
    PERFORM cost_worker_spend_lock(ARRAY(SELECT x.organization_id FROM unnest(delta) AS x), false);
    WITH d AS MATERIALIZED (
        SELECT x.organization_id, x.project_id, x.provider, x.hour, sum(x.amount) AS amount, sum(x.n) AS n,
               max(scale(x.amount)) AS max_scale
        FROM unnest(delta) AS x
        JOIN organizations o ON o.id = x.organization_id
        GROUP BY 1, 2, 3, 4
        HAVING sum(x.amount) <> 0 OR sum(x.n) <> 0
    ),
    marked AS MATERIALIZED (
        SELECT d.organization_id, d.project_id, d.hour, d.amount, d.n, d.max_scale,
               (SELECT true FROM spend_cover c
                WHERE c.scope = 'organization' AND c.subject = d.organization_id AND c.hour = d.hour
                  AND c.provider = d.provider
                  AND (c.project_id = d.project_id
                       OR (c.project_id IS NULL AND c.provider = p.ai_provider
                           AND c.ai_organization_id = p.ai_organization_id))
                LIMIT 1) AS organization_covered,
               (SELECT true FROM spend_cover c
                WHERE c.scope = 'project' AND c.subject = d.project_id AND c.hour = d.hour
                  AND c.provider = d.provider AND c.project_id = d.project_id
                LIMIT 1) AS project_covered
        FROM d LEFT JOIN projects p ON p.id = d.project_id
    ),
    scoped AS MATERIALIZED (
        SELECT organization_id, 'organization' AS scope, organization_id AS subject, hour, amount, n, max_scale
        FROM marked
        WHERE organization_covered IS NULL
        UNION ALL
        SELECT organization_id, 'project', project_id, hour, amount, n, max_scale
        FROM marked
        WHERE project_id IS NOT NULL AND project_covered IS NULL
    ),
    hourly AS (
        INSERT INTO spend_hourly AS s (organization_id, scope, subject, at, rate_day, currency, authority, amount,
                                       n_rows, max_scale)
        SELECT organization_id, scope, subject, hour, (hour AT TIME ZONE 'UTC')::date, 'USD', 'estimate', sum(amount),
               sum(n), max(max_scale)
        FROM scoped
        GROUP BY organization_id, scope, subject, hour
        ORDER BY scope, subject, hour
        ON CONFLICT ON CONSTRAINT spend_hourly_key DO UPDATE SET
            amount = s.amount + EXCLUDED.amount,
            n_rows = s.n_rows + EXCLUDED.n_rows,
            max_scale = greatest(s.max_scale, EXCLUDED.max_scale)
    )
    INSERT INTO spend_daily AS s (organization_id, scope, subject, day, rate_day, currency, authority, amount, n_rows,
                                  max_scale)
    SELECT organization_id, scope, subject, date_trunc('day', hour, 'UTC'), (hour AT TIME ZONE 'UTC')::date, 'USD',
           'estimate', sum(amount), sum(n), max(max_scale)
    FROM scoped
    GROUP BY organization_id, scope, subject, date_trunc('day', hour, 'UTC'), (hour AT TIME ZONE 'UTC')::date
    ORDER BY scope, subject, 4
    ON CONFLICT ON CONSTRAINT spend_daily_key DO UPDATE SET
        amount = s.amount + EXCLUDED.amount,
        n_rows = s.n_rows + EXCLUDED.n_rows,
        max_scale = greatest(s.max_scale, EXCLUDED.max_scale);
END
$$;
