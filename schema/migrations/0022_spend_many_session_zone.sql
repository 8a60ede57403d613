-- cost_worker_spend_many reads a period's whole UTC days whatever the session's time zone.
--
-- Why: the first UTC midnight of a period (where its whole days in spend_daily start) was the UTC midnight before
-- period_start + interval '1 day'. PostgreSQL adds a day to a timestamptz in the session's TimeZone, which the
-- worker does not set: its sessions take the database's default (postgresql.conf `timezone`, often the host's zone,
-- or ALTER DATABASE ... SET TimeZone). Where that zone changes its clocks during the day, the "midnight" was an hour
-- off: with America/New_York (DST ends on 1 November 2026), a November budget in America/Los_Angeles (starting at
-- 07:00 UTC on the 1st) read its whole days from 01:00 UTC on the 2nd, so the 2nd's daily row was never read (its
-- first hour came from spend_hourly) and a day of spend was missing from the month: 61 USD read as 1 USD
-- (tests/test_budgets.py::test_spend_does_not_depend_on_the_session_time_zone). interval '24 hours' is 86,400
-- seconds in every zone. Same signature; the same results in a UTC session.

-- Spend of many (scope, period) pairs (0012): an unregistered user scope is computed in full.
CREATE OR REPLACE FUNCTION cost_worker_spend_many(
    scopes text[], orgs uuid[], projects uuid[], users uuid[], starts timestamptz[], ends timestamptz[],
    currencies text[]
) RETURNS TABLE (ord bigint, spend numeric, foreign_rows jsonb, missing_rates jsonb)
LANGUAGE sql STABLE
AS $$
    WITH k AS (
        SELECT t.*,
               CASE WHEN t.scope IN ('organization', 'project') THEN t.scope
                    WHEN t.scope = 'user' AND t.project_id IS NULL THEN 'user'
                    WHEN t.scope = 'user' THEN 'user_project' END AS k_scope,
               CASE t.scope WHEN 'organization' THEN t.org WHEN 'project' THEN t.project_id ELSE t.user_id END
                   AS k_subject,
               CASE WHEN t.scope = 'user' AND t.project_id IS NOT NULL THEN t.project_id
                    ELSE '00000000-0000-0000-0000-000000000000'::uuid END AS k_project,
               date_trunc('day', t.period_start - interval '1 microsecond', 'UTC') + interval '24 hours' AS d_from,
               date_trunc('day', t.period_end, 'UTC') AS d_until
        FROM unnest(scopes, orgs, projects, users, starts, ends, currencies)
            WITH ORDINALITY AS t(scope, org, project_id, user_id, period_start, period_end, currency, ord)
    ),
    i AS MATERIALIZED (  -- user scopes are kept for the subjects in spend_subjects only (0016)
        SELECT k.*,
               k.k_scope IN ('organization', 'project')
               OR EXISTS (SELECT FROM spend_subjects s
                          WHERE s.scope = k.k_scope AND s.subject = k.k_subject AND s.subject_project = k.k_project)
                   AS tracked
        FROM k
    ),
    -- One index range scan per candidate and level (LATERAL behind OFFSET 0), and none for an edge that is empty (a
    -- period starting and ending at UTC midnights has none). 0012 joined the candidates to spend_hourly and
    -- spend_daily, and with many candidates the planner chose to sort all of spend_hourly for a merge join (0.8 s per
    -- edge for 3,000 candidates on 336,000 hourly rows, and growing with the table).
    parts AS (
        SELECT i.ord, i.currency AS to_code, d.currency, d.rate_day, d.amount, d.n_rows, d.max_scale
        FROM i CROSS JOIN LATERAL (
            SELECT v.currency, v.rate_day, v.amount, v.n_rows, v.max_scale FROM spend_daily v
            WHERE v.scope = i.k_scope AND v.subject = i.k_subject AND v.subject_project = i.k_project
              AND v.day >= i.d_from AND v.day < i.d_until AND v.n_rows <> 0
              AND (i.k_scope NOT IN ('organization', 'project') OR v.organization_id = i.org)
            OFFSET 0
        ) d
        WHERE i.tracked AND i.d_from < i.d_until
        UNION ALL
        SELECT i.ord, i.currency, h.currency, h.rate_day, h.amount, h.n_rows, h.max_scale
        FROM i CROSS JOIN LATERAL (
            SELECT v.currency, v.rate_day, v.amount, v.n_rows, v.max_scale FROM spend_hourly v
            WHERE v.scope = i.k_scope AND v.subject = i.k_subject AND v.subject_project = i.k_project
              AND v.at >= i.period_start AND v.at < least(i.period_end, i.d_from) AND v.n_rows <> 0
              AND (i.k_scope NOT IN ('organization', 'project') OR v.organization_id = i.org)
            OFFSET 0
        ) h
        WHERE i.tracked AND i.period_start < least(i.period_end, i.d_from)
        UNION ALL
        SELECT i.ord, i.currency, h.currency, h.rate_day, h.amount, h.n_rows, h.max_scale
        FROM i CROSS JOIN LATERAL (
            SELECT v.currency, v.rate_day, v.amount, v.n_rows, v.max_scale FROM spend_hourly v
            WHERE v.scope = i.k_scope AND v.subject = i.k_subject AND v.subject_project = i.k_project
              AND v.at >= greatest(i.d_until, i.d_from, i.period_start) AND v.at < i.period_end AND v.n_rows <> 0
              AND (i.k_scope NOT IN ('organization', 'project') OR v.organization_id = i.org)
            OFFSET 0
        ) h
        WHERE i.tracked AND greatest(i.d_until, i.d_from, i.period_start) < i.period_end
    ),
    p AS MATERIALIZED (SELECT * FROM parts),
    same AS (  -- rows in the budget's currency: summed as they are
        SELECT p.ord, sum(p.amount) AS amount FROM p WHERE p.currency = p.to_code GROUP BY p.ord
    ),
    g AS MATERIALIZED (  -- rows in another currency, per (currency, rate date): what a rate converts
        SELECT p.ord, p.to_code, p.currency::text AS currency, p.rate_day AS day, sum(p.amount) AS amount,
               sum(p.n_rows) AS n, max(p.max_scale) AS max_scale
        FROM p WHERE p.currency <> p.to_code
        GROUP BY 1, 2, 3, 4
    ),
    factors AS MATERIALIZED (  -- one rate lookup per (row currency, day, budget currency)
        SELECT pairs.*, f.num, f.den
        FROM (SELECT DISTINCT g.currency, g.day, g.to_code FROM g) pairs
        LEFT JOIN LATERAL cost_worker_rate_factor(pairs.currency, pairs.to_code, pairs.day) f ON true
    ),
    gf AS MATERIALIZED (
        SELECT g.*, f.num, f.den
        FROM g LEFT JOIN factors f ON f.currency = g.currency AND f.day = g.day AND f.to_code = g.to_code
    ),
    conv AS (
        SELECT gf.ord, bool_or(gf.num IS NULL) AS missing,
               bool_or(gf.num IS NOT NULL AND (gf.den <> 1 OR gf.max_scale + scale(gf.num) > 20)) AS by_row,
               sum(cost_worker_convert(gf.amount, gf.num, gf.den)) AS total
        FROM gf GROUP BY gf.ord
    ),
    foreign_counts AS (
        SELECT c.ord, jsonb_object_agg(c.currency, c.n) AS rows
        FROM (SELECT gf.ord, gf.currency, sum(gf.n) AS n FROM gf GROUP BY 1, 2) c
        GROUP BY c.ord
    ),
    missing AS (
        SELECT m.ord, jsonb_object_agg(m.currency, jsonb_build_object('rows', m.n, 'first', m.first, 'last', m.last))
                   AS rates
        FROM (SELECT gf.ord, gf.currency, sum(gf.n) AS n, min(gf.day) AS first, max(gf.day) AS last
              FROM gf WHERE gf.num IS NULL GROUP BY 1, 2) m
        GROUP BY m.ord
    ),
    result AS (
        SELECT i.ord, NOT i.tracked OR coalesce(c.by_row AND NOT c.missing, false) AS by_row,
               CASE WHEN c.missing THEN NULL
                    WHEN c.ord IS NULL THEN coalesce(sm.amount, 0)
                    ELSE trim_scale(coalesce(sm.amount, 0) + c.total) END AS spend,
               coalesce(fc.rows, '{}') AS foreign_rows,
               coalesce(m.rates, '{}') AS missing_rates,
               i.scope, i.org, i.project_id, i.user_id, i.period_start, i.period_end, i.currency
        FROM i
        LEFT JOIN same sm ON sm.ord = i.ord
        LEFT JOIN conv c ON c.ord = i.ord
        LEFT JOIN foreign_counts fc ON fc.ord = i.ord
        LEFT JOIN missing m ON m.ord = i.ord
    )
    SELECT r.ord,
           CASE WHEN r.by_row THEN f.spend ELSE r.spend END,
           CASE WHEN r.by_row THEN f.foreign_rows ELSE r.foreign_rows END,
           CASE WHEN r.by_row THEN f.missing_rates ELSE r.missing_rates END
    FROM result r
    LEFT JOIN LATERAL (  -- only where a conversion truncates row by row, or the scope is not kept (untracked)
        SELECT * FROM cost_worker_spend_full(r.scope, r.org, r.project_id, r.user_id, r.period_start, r.period_end,
                                             r.currency)
        WHERE r.by_row
        OFFSET 0  -- not pulled up into the join, so the filter gates the call
    ) f ON true
$$;
