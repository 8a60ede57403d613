-- Money rules (a project moved to another organization): a project's scope is its rows that name the
-- organization, in the full computation and in the aggregate alike; the aggregate keeps a project's scope per
-- organization.
--
-- Why: every ledger line and rollup row names its organization, and counts there (README "What counts as spend",
-- rule 4): a project moved to another organization leaves its earlier lines and estimates in the one it left
-- (0026). The full computation (cost_worker_spend_rows) read a project's ledger lines whatever organization they
-- name, its estimates only in the budget's: a project budget of the organization a project had left counted the
-- lines of the organization it had joined, and the other way round (25 USD where A's own rows made 18, 20 where
-- B's made 7; tests/test_spend_moves.py::test_a_project_moved_to_another_organization_keeps_its_rows_where_they_name), and
-- under row-level security that figure depended on which organizations a transaction named. The aggregate's rules
-- (cost_worker_spend_regions) read the lines the same way, and its tables kept one project scope per project, keyed
-- without the organization: recomputing the project's hours in one organization deleted what the other had there
-- (the same test: 8 and 17 where 18 and 7 count).
--
-- Changes (same signatures): cost_worker_spend_rows and cost_worker_spend_regions read a project scope's lines of
-- the area's organization only; spend_hourly's and spend_daily's primary keys and spend_cover's unique index end with
-- the organization; cost_worker_spend_recompute deletes only the recomputed organization's rows; the estimate
-- trigger's probe of a project's coverage names the organization. The aggregate of every organization holding rows
-- of a project whose rows name more than one organization is rebuilt (the only ones whose figures change).

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
              AND organization_id = org  -- 0037: a project's rows that name the organization
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
              AND x.organization_id = a.org  -- 0037: a project's rows that name the organization
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


CREATE OR REPLACE FUNCTION cost_worker_spend_recompute(areas cost_worker_spend_area[]) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    live cost_worker_spend_area[];
BEGIN
    SELECT coalesce(array_agg(t ORDER BY t.scope, t.subject, t.s), '{}') INTO live
    FROM unnest(areas) AS t
    WHERE EXISTS (SELECT FROM organizations o WHERE o.id = t.organization_id);
    IF cardinality(live) = 0 THEN
        RETURN;
    END IF;
    -- Every read and delete below goes through one index range scan per area or day (LATERAL: a nested loop by
    -- construction), never a join the planner could answer with a scan of the whole aggregate.
    DELETE FROM spend_hourly h
    WHERE h.ctid = ANY (ARRAY(
        SELECT x.ctid FROM unnest(live) AS t
        CROSS JOIN LATERAL (
            SELECT s.ctid FROM spend_hourly s
            WHERE s.scope = t.scope AND s.subject = t.subject
              AND s.subject_project = '00000000-0000-0000-0000-000000000000' AND s.at >= t.s AND s.at < t.e
              AND s.organization_id = t.organization_id  -- 0037: not the project's scope in another organization
            OFFSET 0  -- a fence: not pulled up into a join the planner may hash against a full scan
        ) x));
    DELETE FROM spend_cover c
    WHERE c.ctid = ANY (ARRAY(
        SELECT x.ctid FROM unnest(live) AS t
        CROSS JOIN LATERAL (
            SELECT v.ctid FROM spend_cover v
            WHERE v.scope = t.scope AND v.subject = t.subject AND v.hour >= t.s AND v.hour < t.e
              AND v.organization_id = t.organization_id  -- 0037
            OFFSET 0  -- a fence: not pulled up into a join the planner may hash against a full scan
        ) x));
    WITH a AS (
        SELECT t.ord::integer AS area, t.scope, t.subject, t.organization_id
        FROM unnest(live) WITH ORDINALITY AS t(scope, subject, organization_id, s, e, ord)
    ),
    r AS MATERIALIZED (
        SELECT a.organization_id, a.scope, a.subject, x.*
        FROM cost_worker_spend_regions(live) x JOIN a ON a.area = x.area
    ),
    cover AS (
        INSERT INTO spend_cover (organization_id, scope, subject, provider, project_id, hour, ai_organization_id)
        SELECT DISTINCT r.organization_id, r.scope, r.subject, r.provider, r.project_id, r.at, r.ai_organization_id
        FROM r WHERE r.kind = 'cover'
    )
    INSERT INTO spend_hourly (organization_id, scope, subject, at, rate_day, currency, authority, amount, n_rows,
                              max_scale)
    SELECT r.organization_id, r.scope, r.subject, r.at, (r.rate_at AT TIME ZONE 'UTC')::date, r.currency, r.kind,
           sum(r.amount), count(*), max(scale(r.amount))
    FROM r
    WHERE r.kind <> 'cover' AND r.amount IS NOT NULL
    GROUP BY r.organization_id, r.scope, r.subject, r.at, (r.rate_at AT TIME ZONE 'UTC')::date, r.currency, r.kind;
    -- The UTC days the areas touch, recomputed from spend_hourly.
    DELETE FROM spend_daily d
    WHERE d.ctid = ANY (ARRAY(
        SELECT y.ctid
        FROM (SELECT DISTINCT t.scope, t.subject, date_trunc('day', t.s, 'UTC') + interval '24 hours' * n AS day
              FROM unnest(live) AS t
              CROSS JOIN LATERAL generate_series(
                  0, (extract(epoch FROM t.e - date_trunc('day', t.s, 'UTC'))::bigint - 1) / 86400) AS n) x
        CROSS JOIN LATERAL (
            SELECT v.ctid FROM spend_daily v
            WHERE v.scope = x.scope AND v.subject = x.subject
              AND v.subject_project = '00000000-0000-0000-0000-000000000000' AND v.day = x.day
            OFFSET 0  -- a fence: not pulled up into a join the planner may hash against a full scan
        ) y));
    INSERT INTO spend_daily (organization_id, scope, subject, subject_project, day, rate_day, currency, authority,
                             amount, n_rows, max_scale)
    SELECT h.organization_id, h.scope, h.subject, h.subject_project, x.day, h.rate_day, h.currency, h.authority,
           sum(h.amount), sum(h.n_rows), max(h.max_scale)
    FROM (SELECT DISTINCT t.scope, t.subject, date_trunc('day', t.s, 'UTC') + interval '24 hours' * n AS day
          FROM unnest(live) AS t
          CROSS JOIN LATERAL generate_series(0, (extract(epoch FROM t.e - date_trunc('day', t.s, 'UTC'))::bigint - 1)
                                                / 86400) AS n) x
    CROSS JOIN LATERAL (
        SELECT s.* FROM spend_hourly s
        WHERE s.scope = x.scope AND s.subject = x.subject
          AND s.subject_project = '00000000-0000-0000-0000-000000000000'
          AND s.at >= x.day AND s.at < x.day + interval '24 hours' AND s.n_rows <> 0
        OFFSET 0  -- a fence: not pulled up into a join the planner may hash against a full scan
    ) h
    GROUP BY h.organization_id, h.scope, h.subject, h.subject_project, x.day, h.rate_day, h.currency, h.authority;
END
$$;


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
                  AND c.organization_id = d.organization_id  -- 0037
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


ALTER TABLE spend_hourly DROP CONSTRAINT spend_hourly_key,
    ADD CONSTRAINT spend_hourly_key
        PRIMARY KEY (scope, subject, subject_project, at, currency, authority, rate_day, organization_id);
ALTER TABLE spend_daily DROP CONSTRAINT spend_daily_key,
    ADD CONSTRAINT spend_daily_key
        PRIMARY KEY (scope, subject, subject_project, day, currency, authority, rate_day, organization_id);
DROP INDEX spend_cover_key;
CREATE UNIQUE INDEX spend_cover_key
    ON spend_cover (scope, subject, hour, provider, project_id, ai_organization_id, organization_id)
    NULLS NOT DISTINCT;

-- The organizations holding rows of a project whose rows name more than one organization, rebuilt by the rules
-- above. The rebuild must see every tenant's rows.
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
WITH named AS (
    SELECT DISTINCT project_id, organization_id FROM cost_data WHERE project_id IS NOT NULL
    UNION
    SELECT DISTINCT project_id, organization_id FROM project_metrics WHERE project_id IS NOT NULL
),
moved AS (SELECT project_id FROM named GROUP BY project_id HAVING count(*) > 1)
SELECT cost_worker_spend_rebuild(orgs)
FROM (SELECT array_agg(DISTINCT organization_id) AS orgs FROM named JOIN moved USING (project_id)) x
WHERE x.orgs IS NOT NULL;
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
