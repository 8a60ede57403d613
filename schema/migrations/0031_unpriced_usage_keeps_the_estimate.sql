-- Money rules (unpriced usage): where a usage line of nonzero quantity could not be priced (amount NULL), the
-- usage lines of its provider account, project and UTC hours neither count nor cover the estimates there: the
-- platform's estimate, which holds the calls of every model, counts instead. Cost rows still beat both.
--
-- Why: estimates are replaced per (project, provider, hour), not per model. A priced usage line of the hour covered
-- the whole hour's estimate, and the calls of the model whose line was unpriced counted nothing: gpt-4o calls
-- estimated at 3 + 6 USD, reported as 3 tokens of a priced model (3 USD) and 6 of an unpriced one, made 3 USD
-- where they cost about 9 (tests/test_spend_rules.py::
-- test_an_unpriced_model_beside_a_priced_one_keeps_the_estimate_of_its_hour; README "What counts as spend",
-- rule 2, had it as a known limit).
--
-- The rule (README rule 2; tests/spend_model.py):
-- - an unpriced usage line of nonzero quantity marks the UTC hours its window overlaps, up to its collection
--   (0025's overlap rule), for its provider account and project (or no project);
-- - a priced usage line (of any usage report of that account, Priority Tier too) whose window overlaps a marked
--   hour of the same project, or where either has no project (as for the replacement by cost, 0023), neither
--   counts nor covers, unless a cost row of its account covers that hour for it (same project or either without
--   one): there the cost row replaces the usage and the estimate as before, and the Priority Tier usage the cost
--   report leaves out counts as before;
-- - a project budget sees its own rows only (an ungrouped unpriced line marks nothing there, as an ungrouped cost
--   row replaces nothing there).
-- The full computation (cost_worker_spend_rows, 0025) and the aggregate's rules (cost_worker_spend_regions, 0025)
-- change alike and keep their signatures; both now read unpriced usage lines as far around as cost rows (they decide
-- usage rows that count in the period). The aggregate's trigger on cost_data (0028) tells an unpriced usage line of
-- nonzero quantity apart, and cost_worker_spend_lines_changed (0012) recomputes, for such a line as for a cost line,
-- the hours of the usage of its account that its window overlaps. The aggregate of organizations with such a line
-- is rebuilt.

-- What cost_worker_spend_lines_changed needs to know of a changed line: its api_version, or 'usage_v1/unpriced'
-- for a usage line of nonzero quantity without a price (it decides the usage of its account beside it).
CREATE FUNCTION cost_worker_spend_line_kind(api_version text, amount numeric, quantity numeric) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN api_version = 'usage_v1' AND amount IS NULL AND (quantity IS NULL OR quantity <> 0)
                THEN 'usage_v1/unpriced' ELSE api_version END
$$;

CREATE OR REPLACE FUNCTION cost_worker_spend_rows(
    scope text, org uuid, project uuid, usr uuid, period_start timestamptz, period_end timestamptz
)
RETURNS TABLE (currency char(3), rate_at timestamptz, amount numeric, kind text)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    window_max CONSTANT interval := interval '31 days';  -- the longest provider window (decode.py checks it)
    reach CONSTANT interval := interval '62 days';  -- back: counted rows (31 days), the costs they overlap (31)
    ahead CONSTANT interval := interval '31 days';  -- forward: cost rows overlapping a row that counts here
BEGIN
    IF scope = 'user' THEN
        RETURN QUERY
        SELECT 'USD'::char(3), m.hour, m.estimated_cost_usd, 'estimate'::text
        FROM user_metrics m
        WHERE m.user_id = usr AND m.hour >= period_start AND m.hour < period_end
          AND (project IS NULL OR m.project_id = project);
        RETURN;
    END IF;
    IF scope NOT IN ('project', 'organization') THEN
        RAISE EXCEPTION 'unknown budget scope %', scope;
    END IF;

    RETURN QUERY
    WITH near AS MATERIALIZED (  -- current rows of the scope that can matter for the period
        SELECT c.project_id, c.provider, c.ai_organization_id, c.api_version,
               c.bucket_start_time, c.bucket_end_time, c.currency, c.amount, c.quantity, c.outside_cost_report,
               cost_worker_hour_ceil(c.bucket_start_time) AS h_from,
               date_trunc('hour', c.bucket_start_time, 'UTC') AS r_from,  -- 0023: the hour the window starts in
               least(c.bucket_end_time, c.collected_at) AS h_until
        FROM (
            SELECT * FROM cost_data
            WHERE scope = 'project' AND project_id = project AND superseded_at IS NULL
              AND bucket_start_time >= period_start - reach AND bucket_start_time < period_end + ahead
            UNION ALL
            SELECT * FROM cost_data
            WHERE scope = 'organization' AND organization_id = org AND superseded_at IS NULL
              AND bucket_start_time >= period_start - reach AND bucket_start_time < period_end + ahead
        ) c
        WHERE CASE WHEN c.api_version = 'usage_v1' AND c.amount IS NOT NULL
                   -- usage matters when it counts in the period or covers one of its hours (0025: a row
                   -- starting after a period's end not on the hour, 18:40 after Kolkata's 18:30, covers the
                   -- estimate of 18:00, which is the period's)
                   THEN c.bucket_start_time >= period_start - window_max
                        AND c.bucket_start_time < cost_worker_hour_ceil(period_end)
                        AND c.bucket_end_time > period_start
                   -- costs, and unpriced usage (0031), also when they overlap such usage
                   ELSE c.bucket_end_time > period_start - window_max END
    ),
    cost_hours AS MATERIALIZED (  -- (account, project or NULL, hour) a cost row covers
        SELECT DISTINCT w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT provider, ai_organization_id, project_id, h_from, h_until
              FROM near WHERE api_version = 'costs_v1') w
        CROSS JOIN LATERAL generate_series(w.h_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    usage_windows AS (  -- (0031: also Priority Tier usage, which `counted` never replaces by cost)
        SELECT DISTINCT provider, ai_organization_id, project_id, h_from, h_until, r_from
        FROM near WHERE api_version = 'usage_v1' AND amount IS NOT NULL
    ),
    usage_hours AS MATERIALIZED (  -- expanded first, so that the join below hashes on (account, hour)
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, h.hour
        FROM usage_windows u
        CROSS JOIN LATERAL generate_series(u.r_from, u.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    replaced AS (  -- usage windows a cost row of their account covers for at least one hour: same project, or
                   -- either without one (three joins on equalities alone, so that each one hashes on every key)
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from
        FROM usage_hours u
        JOIN cost_hours k ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
                         AND k.hour = u.hour AND k.project_id = u.project_id
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from
        FROM usage_hours u
        JOIN (SELECT * FROM cost_hours WHERE project_id IS NULL) k
          ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from
        FROM (SELECT * FROM usage_hours WHERE project_id IS NULL) u
        JOIN cost_hours k ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
                         AND k.hour = u.hour
    ),
    unpriced_hours AS MATERIALIZED (  -- 0031: (account, project or NULL, hour) an unpriced usage line of nonzero
                                      -- quantity overlaps, up to its collection (the overlap rule of 0025)
        SELECT DISTINCT w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT provider, ai_organization_id, project_id, r_from, h_until FROM near
              WHERE api_version = 'usage_v1' AND amount IS NULL AND (quantity IS NULL OR quantity <> 0)) w
        CROSS JOIN LATERAL generate_series(w.r_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    unpriced_beside AS (  -- usage hours an unpriced line of their account overlaps: same project, or either
                          -- without one (as `replaced`)
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, u.hour
        FROM usage_hours u
        JOIN unpriced_hours k ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
                             AND k.hour = u.hour AND k.project_id = u.project_id
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, u.hour
        FROM usage_hours u
        JOIN (SELECT * FROM unpriced_hours WHERE project_id IS NULL) k
          ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, u.hour
        FROM (SELECT * FROM usage_hours WHERE project_id IS NULL) u
        JOIN unpriced_hours k ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
                             AND k.hour = u.hour
    ),
    spoiled AS (  -- 0031: usage windows with such an hour that no cost row of theirs covers (there the cost row
                  -- beats both, as before): they neither count nor cover, the estimate of the hour counts
        SELECT DISTINCT b.provider, b.ai_organization_id, b.project_id, b.h_from, b.h_until, b.r_from
        FROM unpriced_beside b
        WHERE NOT EXISTS (SELECT FROM cost_hours k
                          WHERE k.provider = b.provider AND k.ai_organization_id = b.ai_organization_id
                            AND k.hour = b.hour AND k.project_id = b.project_id)
          AND NOT EXISTS (SELECT FROM cost_hours k
                          WHERE k.project_id IS NULL AND k.provider = b.provider
                            AND k.ai_organization_id = b.ai_organization_id AND k.hour = b.hour)
          AND NOT (b.project_id IS NULL AND EXISTS (
                    SELECT FROM cost_hours k
                    WHERE k.provider = b.provider AND k.ai_organization_id = b.ai_organization_id
                      AND k.hour = b.hour))
    ),
    counted AS MATERIALIZED (  -- (every join below compares with `=` only, so it can hash: no quadratic scans)
        SELECT n.* FROM near n
        WHERE n.amount IS NOT NULL
          AND (n.api_version = 'costs_v1' OR n.outside_cost_report OR NOT EXISTS (
                SELECT FROM replaced r
                WHERE r.provider = n.provider AND r.ai_organization_id = n.ai_organization_id
                  AND coalesce(r.project_id, '00000000-0000-0000-0000-000000000000')
                      = coalesce(n.project_id, '00000000-0000-0000-0000-000000000000')
                  AND r.h_from = n.h_from AND r.h_until = n.h_until AND r.r_from = n.r_from))
          AND (n.api_version = 'costs_v1' OR NOT EXISTS (
                SELECT FROM spoiled s
                WHERE s.provider = n.provider AND s.ai_organization_id = n.ai_organization_id
                  AND coalesce(s.project_id, '00000000-0000-0000-0000-000000000000')
                      = coalesce(n.project_id, '00000000-0000-0000-0000-000000000000')
                  AND s.h_from = n.h_from AND s.h_until = n.h_until AND s.r_from = n.r_from))
    ),
    covered AS MATERIALIZED (  -- (provider, account, project or NULL, hour) a counted row covers: every hour its
                               -- window overlaps, up to its collection (0025; usage of zero quantity reports
                               -- nothing, so it covers nothing)
        SELECT DISTINCT w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT provider, ai_organization_id, project_id, r_from, h_until FROM counted
              WHERE api_version = 'costs_v1' OR quantity IS NULL OR quantity <> 0) w
        CROSS JOIN LATERAL generate_series(w.r_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
        WHERE w.h_until > period_start AND w.r_from < period_end
    ),
    estimates AS (
        SELECT m.project_id, m.hour, m.provider, m.estimated_cost_usd,
               p.ai_provider AS project_provider, p.ai_organization_id AS project_ai_org
        FROM project_metrics m
        LEFT JOIN projects p ON p.id = m.project_id
        WHERE m.organization_id = org AND m.hour >= period_start AND m.hour < period_end
          AND (scope = 'organization' OR m.project_id = project)
    )
    SELECT c.currency, c.bucket_start_time, c.amount,
           CASE WHEN c.api_version = 'costs_v1' THEN 'cost' ELSE 'usage' END
    FROM counted c
    WHERE c.project_id IS NOT DISTINCT FROM CASE WHEN scope = 'project' THEN project ELSE c.project_id END
      AND cost_worker_midpoint(c.bucket_start_time, c.bucket_end_time) >= period_start
      AND cost_worker_midpoint(c.bucket_start_time, c.bucket_end_time) < period_end
    UNION ALL
    SELECT 'USD'::char(3), e.hour, e.estimated_cost_usd, 'estimate'
    FROM estimates e
    WHERE NOT EXISTS (  -- a row of its project covers the hour
        SELECT FROM covered v WHERE v.provider = e.provider AND v.hour = e.hour AND v.project_id = e.project_id)
      AND NOT EXISTS (  -- an ungrouped row of the account its project is mapped to does
        SELECT FROM covered v
        WHERE v.project_id IS NULL AND v.provider = e.provider AND v.hour = e.hour
          AND v.provider = e.project_provider AND v.ai_organization_id = e.project_ai_org);
END
$$;


CREATE OR REPLACE FUNCTION cost_worker_spend_regions(areas cost_worker_spend_area[])
RETURNS TABLE (area integer, kind text, currency char(3), at timestamptz, rate_at timestamptz, amount numeric,
               provider text, ai_organization_id text, project_id uuid)
LANGUAGE sql STABLE
AS $$
    WITH a AS MATERIALIZED (
        SELECT t.ord::integer AS area, t.scope, t.organization_id AS org,
               CASE WHEN t.scope = 'project' THEN t.subject END AS project,
               t.s AS ps, t.e AS pe, coalesce(r.window_max, interval '1 hour') AS wmax
        FROM unnest(areas) WITH ORDINALITY AS t(scope, subject, organization_id, s, e, ord)
        LEFT JOIN spend_reach r ON r.organization_id = t.organization_id
    ),
    near AS MATERIALIZED (  -- current rows of each area's scope that can matter for it
        SELECT a.area, c.project_id, c.provider, c.ai_organization_id, c.api_version,
               c.bucket_start_time, c.bucket_end_time, c.currency, c.amount, c.quantity, c.outside_cost_report,
               date_trunc('hour', c.bucket_start_time - interval '1 microsecond', 'UTC') + interval '1 hour' AS h_from,
               date_trunc('hour', c.bucket_start_time, 'UTC') AS r_from,  -- 0023: the hour the window starts in
               least(c.bucket_end_time, c.collected_at) AS h_until,
               -- cost_worker_hour_ceil and cost_worker_midpoint (0006), written out: as IMMUTABLE functions of
               -- STABLE operators they are never inlined, and a call per row costs more than the rest of the row
               c.bucket_start_time
               + make_interval(secs => extract(epoch FROM c.bucket_end_time - c.bucket_start_time)::float8 / 2) AS mid
        FROM a
        CROSS JOIN LATERAL (
            -- back: counted rows (one window), the costs they overlap (one); forward: costs overlapping them
            SELECT x.project_id, x.provider, x.ai_organization_id, x.api_version, x.bucket_start_time,
                   x.bucket_end_time, x.currency, x.amount, x.quantity, x.outside_cost_report, x.collected_at
            FROM cost_data x
            WHERE a.scope = 'project' AND x.project_id = a.project AND x.superseded_at IS NULL
              AND x.bucket_start_time >= a.ps - 2 * a.wmax AND x.bucket_start_time < a.pe + a.wmax
            UNION ALL
            SELECT x.project_id, x.provider, x.ai_organization_id, x.api_version, x.bucket_start_time,
                   x.bucket_end_time, x.currency, x.amount, x.quantity, x.outside_cost_report, x.collected_at
            FROM cost_data x
            WHERE a.scope = 'organization' AND x.organization_id = a.org AND x.superseded_at IS NULL
              AND x.bucket_start_time >= a.ps - 2 * a.wmax AND x.bucket_start_time < a.pe + a.wmax
        ) c
        WHERE CASE WHEN c.api_version = 'usage_v1' AND c.amount IS NOT NULL  -- 0031: unpriced usage as costs
                   THEN c.bucket_start_time >= a.ps - a.wmax AND c.bucket_start_time < a.pe
                        AND c.bucket_end_time > a.ps
                   ELSE c.bucket_end_time > a.ps - a.wmax END
    ),
    cost_hours AS MATERIALIZED (
        SELECT DISTINCT w.area, w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT area, provider, ai_organization_id, project_id, h_from, h_until
              FROM near WHERE api_version = 'costs_v1') w
        CROSS JOIN LATERAL generate_series(w.h_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    usage_windows AS (  -- (0031: also Priority Tier usage, which `counted` never replaces by cost)
        SELECT DISTINCT area, provider, ai_organization_id, project_id, h_from, h_until, r_from
        FROM near WHERE api_version = 'usage_v1' AND amount IS NOT NULL
    ),
    usage_hours AS MATERIALIZED (
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, h.hour
        FROM usage_windows u
        CROSS JOIN LATERAL generate_series(u.r_from, u.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    replaced AS (
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from
        FROM usage_hours u
        JOIN cost_hours k ON k.area = u.area AND k.provider = u.provider
                         AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
                         AND k.project_id = u.project_id
        UNION
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from
        FROM usage_hours u
        JOIN (SELECT * FROM cost_hours WHERE project_id IS NULL) k
          ON k.area = u.area AND k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
         AND k.hour = u.hour
        UNION
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from
        FROM (SELECT * FROM usage_hours WHERE project_id IS NULL) u
        JOIN cost_hours k ON k.area = u.area AND k.provider = u.provider
                         AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
    ),
    unpriced_hours AS MATERIALIZED (  -- 0031, as in cost_worker_spend_rows
        SELECT DISTINCT w.area, w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT area, provider, ai_organization_id, project_id, r_from, h_until FROM near
              WHERE api_version = 'usage_v1' AND amount IS NULL AND (quantity IS NULL OR quantity <> 0)) w
        CROSS JOIN LATERAL generate_series(w.r_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    unpriced_beside AS (
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, u.hour
        FROM usage_hours u
        JOIN unpriced_hours k ON k.area = u.area AND k.provider = u.provider
                             AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
                             AND k.project_id = u.project_id
        UNION
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, u.hour
        FROM usage_hours u
        JOIN (SELECT * FROM unpriced_hours WHERE project_id IS NULL) k
          ON k.area = u.area AND k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
         AND k.hour = u.hour
        UNION
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, u.hour
        FROM (SELECT * FROM usage_hours WHERE project_id IS NULL) u
        JOIN unpriced_hours k ON k.area = u.area AND k.provider = u.provider
                             AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
    ),
    spoiled AS (
        SELECT DISTINCT b.area, b.provider, b.ai_organization_id, b.project_id, b.h_from, b.h_until, b.r_from
        FROM unpriced_beside b
        WHERE NOT EXISTS (SELECT FROM cost_hours k
                          WHERE k.area = b.area AND k.provider = b.provider
                            AND k.ai_organization_id = b.ai_organization_id AND k.hour = b.hour
                            AND k.project_id = b.project_id)
          AND NOT EXISTS (SELECT FROM cost_hours k
                          WHERE k.area = b.area AND k.project_id IS NULL AND k.provider = b.provider
                            AND k.ai_organization_id = b.ai_organization_id AND k.hour = b.hour)
          AND NOT (b.project_id IS NULL AND EXISTS (
                    SELECT FROM cost_hours k
                    WHERE k.area = b.area AND k.provider = b.provider
                      AND k.ai_organization_id = b.ai_organization_id AND k.hour = b.hour))
    ),
    counted AS MATERIALIZED (
        SELECT n.* FROM near n
        WHERE n.amount IS NOT NULL
          AND (n.api_version = 'costs_v1' OR n.outside_cost_report OR NOT EXISTS (
                SELECT FROM replaced r
                WHERE r.area = n.area AND r.provider = n.provider AND r.ai_organization_id = n.ai_organization_id
                  AND coalesce(r.project_id, '00000000-0000-0000-0000-000000000000')
                      = coalesce(n.project_id, '00000000-0000-0000-0000-000000000000')
                  AND r.h_from = n.h_from AND r.h_until = n.h_until AND r.r_from = n.r_from))
          AND (n.api_version = 'costs_v1' OR NOT EXISTS (
                SELECT FROM spoiled s
                WHERE s.area = n.area AND s.provider = n.provider AND s.ai_organization_id = n.ai_organization_id
                  AND coalesce(s.project_id, '00000000-0000-0000-0000-000000000000')
                      = coalesce(n.project_id, '00000000-0000-0000-0000-000000000000')
                  AND s.h_from = n.h_from AND s.h_until = n.h_until AND s.r_from = n.r_from))
    ),
    covered AS MATERIALIZED (  -- 0025: every hour the row's window overlaps, up to its collection
        SELECT DISTINCT w.area, w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT area, provider, ai_organization_id, project_id, r_from, h_until FROM counted
              WHERE api_version = 'costs_v1' OR quantity IS NULL OR quantity <> 0) w
        JOIN a ON a.area = w.area
        CROSS JOIN LATERAL generate_series(w.r_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
        WHERE w.h_until > a.ps AND w.r_from < a.pe
    ),
    estimates AS (
        SELECT a.area, m.project_id, m.hour, m.provider, m.estimated_cost_usd,
               p.ai_provider AS project_provider, p.ai_organization_id AS project_ai_org
        FROM a
        CROSS JOIN LATERAL (
            SELECT x.project_id, x.hour, x.provider, x.estimated_cost_usd
            FROM project_metrics x
            WHERE a.scope = 'organization' AND x.organization_id = a.org AND x.hour >= a.ps AND x.hour < a.pe
            UNION ALL
            SELECT x.project_id, x.hour, x.provider, x.estimated_cost_usd
            FROM project_metrics x
            WHERE a.scope = 'project' AND x.organization_id = a.org AND x.project_id = a.project
              AND x.hour >= a.ps AND x.hour < a.pe
        ) m
        LEFT JOIN projects p ON p.id = m.project_id
    )
    SELECT c.area, CASE WHEN c.api_version = 'costs_v1' THEN 'cost' ELSE 'usage' END, c.currency,
           c.mid, c.bucket_start_time, c.amount,
           NULL::text, NULL::text, NULL::uuid
    FROM counted c
    JOIN a ON a.area = c.area
    WHERE (a.scope = 'organization' OR c.project_id = a.project)
      AND c.mid >= a.ps
      AND c.mid < a.pe
    UNION ALL
    SELECT e.area, 'estimate', 'USD'::char(3), e.hour, e.hour, e.estimated_cost_usd, NULL, NULL, NULL
    FROM estimates e
    WHERE NOT EXISTS (
        SELECT FROM covered v
        WHERE v.area = e.area AND v.provider = e.provider AND v.hour = e.hour AND v.project_id = e.project_id)
      AND NOT EXISTS (
        SELECT FROM covered v
        WHERE v.area = e.area AND v.project_id IS NULL AND v.provider = e.provider AND v.hour = e.hour
          AND v.provider = e.project_provider AND v.ai_organization_id = e.project_ai_org)
    UNION ALL
    SELECT v.area, 'cover', NULL, v.hour, NULL, NULL, v.provider, v.ai_organization_id, v.project_id
    FROM covered v
    JOIN a ON a.area = v.area
    WHERE v.hour >= a.ps AND v.hour < a.pe
$$;


CREATE OR REPLACE FUNCTION cost_worker_spend_lines_changed(changed cost_worker_spend_line[]) RETURNS void
LANGUAGE plpgsql VOLATILE
SET enable_bitmapscan = off
AS $$
DECLARE
    areas cost_worker_spend_area[];
BEGIN
    IF cardinality(changed) = 0 THEN
        RETURN;
    END IF;
    PERFORM cost_worker_spend_lock(ARRAY(SELECT w.organization_id FROM unnest(changed) AS w), true);
    -- Only existing organizations (a cascaded delete of an organization leaves nothing to keep).
    INSERT INTO spend_reach AS r (organization_id, window_max)
    SELECT w.organization_id, max(w.e - w.s)
    FROM unnest(changed) AS w JOIN organizations o ON o.id = w.organization_id
    GROUP BY w.organization_id
    ORDER BY w.organization_id
    ON CONFLICT (organization_id) DO UPDATE SET window_max = greatest(r.window_max, EXCLUDED.window_max)
    WHERE r.window_max < EXCLUDED.window_max;

    WITH w AS MATERIALIZED (SELECT DISTINCT * FROM unnest(changed)),
    cost_marked AS (  -- changed cost windows per account and organization, and per account and project,
        SELECT c.*,     -- merged where they overlap or touch: one usage lookup per merged range
               CASE WHEN c.s <= max(c.e) OVER (PARTITION BY c.lvl, c.organization_id, c.project_id, c.provider,
                                                            c.ai_organization_id
                                               ORDER BY c.s, c.e ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                    THEN 0 ELSE 1 END AS starts
        FROM (SELECT 'organization' AS lvl, w.organization_id, NULL::uuid AS project_id, w.provider,
                     w.ai_organization_id, w.s, w.e
              FROM w WHERE w.api_version IN ('costs_v1', 'usage_v1/unpriced')
              UNION ALL
              SELECT 'project', w.organization_id, w.project_id, w.provider, w.ai_organization_id, w.s, w.e
              FROM w WHERE w.api_version IN ('costs_v1', 'usage_v1/unpriced') AND w.project_id IS NOT NULL) c
    ),
    cost_islands AS (
        SELECT *, sum(starts) OVER (PARTITION BY lvl, organization_id, project_id, provider, ai_organization_id
                                    ORDER BY s, e) AS island
        FROM cost_marked
    ),
    costs AS MATERIALIZED (  -- one range per island, with the reach of its organization
        SELECT i.lvl, i.organization_id, i.project_id, i.provider, i.ai_organization_id, min(i.s) AS s,
               max(i.e) AS e, r.window_max
        FROM cost_islands i JOIN spend_reach r ON r.organization_id = i.organization_id
        GROUP BY i.lvl, i.organization_id, i.project_id, i.provider, i.ai_organization_id, i.island, r.window_max
    ),
    raw AS (
        SELECT 'organization' AS scope, w.organization_id AS subject, w.organization_id, w.s, w.e
        FROM w
        UNION ALL
        SELECT 'project', w.project_id, w.organization_id, w.s, w.e
        FROM w WHERE w.project_id IS NOT NULL
        UNION ALL  -- usage of the account overlapping a changed cost line (0031: or unpriced usage line) may count
                   -- or stop counting
        SELECT 'organization', k.organization_id, k.organization_id, u.bucket_start_time, u.bucket_end_time
        FROM costs k
        CROSS JOIN LATERAL (
            SELECT x.bucket_start_time, x.bucket_end_time FROM cost_data x
            WHERE x.organization_id = k.organization_id
              AND x.bucket_start_time >= k.s - k.window_max AND x.bucket_start_time < k.e
              AND x.bucket_end_time > k.s AND x.provider = k.provider AND x.ai_organization_id = k.ai_organization_id
              AND x.api_version = 'usage_v1' AND x.superseded_at IS NULL
            OFFSET 0  -- a fence: not pulled up into a join the planner may hash against a full scan
        ) u
        WHERE k.lvl = 'organization'
        UNION ALL
        SELECT 'project', k.project_id, k.organization_id, u.bucket_start_time, u.bucket_end_time
        FROM costs k
        CROSS JOIN LATERAL (
            SELECT x.bucket_start_time, x.bucket_end_time FROM cost_data x
            WHERE x.project_id = k.project_id
              AND x.bucket_start_time >= k.s - k.window_max AND x.bucket_start_time < k.e
              AND x.bucket_end_time > k.s AND x.provider = k.provider AND x.ai_organization_id = k.ai_organization_id
              AND x.api_version = 'usage_v1' AND x.superseded_at IS NULL
            OFFSET 0  -- a fence: not pulled up into a join the planner may hash against a full scan
        ) u
        WHERE k.lvl = 'project'
    ),
    hours AS (  -- whole UTC hours (estimates and coverage are hourly)
        SELECT DISTINCT scope, subject, organization_id, date_trunc('hour', s, 'UTC') AS s,
               date_trunc('hour', e - interval '1 microsecond', 'UTC') + interval '1 hour' AS e
        FROM raw
    ),
    marked AS (
        SELECT *, CASE WHEN s <= max(e) OVER (PARTITION BY scope, subject ORDER BY s, e
                                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                       THEN 0 ELSE 1 END AS starts
        FROM hours
    ),
    islands AS (
        SELECT *, sum(starts) OVER (PARTITION BY scope, subject ORDER BY s, e) AS island FROM marked
    )
    SELECT coalesce(array_agg(ROW(m.scope, m.subject, m.organization_id, m.s, m.e)::cost_worker_spend_area), '{}')
    INTO areas
    FROM (SELECT scope, subject, organization_id, min(s) AS s, max(e) AS e
          FROM islands GROUP BY scope, subject, organization_id, island) m;
    PERFORM cost_worker_spend_recompute(areas);
END
$$;


CREATE OR REPLACE FUNCTION cost_worker_spend_on_lines() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    changed cost_worker_spend_line[];
    saved text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT coalesce(array_agg(DISTINCT ROW(organization_id, project_id, provider, ai_organization_id,
                                               cost_worker_spend_line_kind(api_version::text, amount, quantity),
                                               bucket_start_time, bucket_end_time)
                                           ::cost_worker_spend_line), '{}') INTO changed
        FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT coalesce(array_agg(DISTINCT ROW(organization_id, project_id, provider, ai_organization_id,
                                               cost_worker_spend_line_kind(api_version::text, amount, quantity),
                                               bucket_start_time, bucket_end_time)
                                           ::cost_worker_spend_line), '{}') INTO changed
        FROM (SELECT organization_id, project_id, provider, ai_organization_id, api_version, amount, quantity,
                     bucket_start_time, bucket_end_time FROM old_rows
              UNION ALL
              SELECT organization_id, project_id, provider, ai_organization_id, api_version, amount, quantity,
                     bucket_start_time, bucket_end_time FROM new_rows) x;
    ELSE
        SELECT coalesce(array_agg(DISTINCT ROW(organization_id, project_id, provider, ai_organization_id,
                                               cost_worker_spend_line_kind(api_version::text, amount, quantity),
                                               bucket_start_time, bucket_end_time)
                                           ::cost_worker_spend_line), '{}') INTO changed
        FROM old_rows;
    END IF;
    saved := cost_worker_spend_tenants_widen(ARRAY(SELECT DISTINCT x.organization_id FROM unnest(changed) AS x));
    PERFORM cost_worker_spend_lines_changed(changed);
    PERFORM cost_worker_spend_tenants_restore(saved);
    RETURN NULL;
END
$$;

GRANT EXECUTE ON FUNCTION cost_worker_spend_line_kind(text, numeric, numeric) TO cost_worker_writer;

-- The aggregate of organizations with an unpriced usage line of nonzero quantity (the only ones whose results
-- change), rebuilt by the rules above. The rebuild must see every tenant's rows.
ALTER TABLE cost_data NO FORCE ROW LEVEL SECURITY;
ALTER TABLE project_metrics NO FORCE ROW LEVEL SECURITY;
ALTER TABLE user_metrics NO FORCE ROW LEVEL SECURITY;
ALTER TABLE projects NO FORCE ROW LEVEL SECURITY;
ALTER TABLE organizations NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_hourly NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_daily NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_cover NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_reach NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_subjects NO FORCE ROW LEVEL SECURITY;
SELECT cost_worker_spend_rebuild(ARRAY(
    SELECT DISTINCT organization_id FROM cost_data
    WHERE api_version = 'usage_v1' AND amount IS NULL AND (quantity IS NULL OR quantity <> 0)
      AND superseded_at IS NULL
))
WHERE EXISTS (SELECT FROM cost_data
              WHERE api_version = 'usage_v1' AND amount IS NULL AND (quantity IS NULL OR quantity <> 0)
                AND superseded_at IS NULL);
ALTER TABLE cost_data FORCE ROW LEVEL SECURITY;
ALTER TABLE project_metrics FORCE ROW LEVEL SECURITY;
ALTER TABLE user_metrics FORCE ROW LEVEL SECURITY;
ALTER TABLE projects FORCE ROW LEVEL SECURITY;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_hourly FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_daily FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_cover FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_reach FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_subjects FORCE ROW LEVEL SECURITY;
