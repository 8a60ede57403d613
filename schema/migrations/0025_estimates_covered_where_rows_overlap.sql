-- Money rules (sub-hour and unaligned windows): what a counted provider row covers for the estimates is every UTC
-- hour its window OVERLAPS (up to its collection), as 0023 made it for the replacement of usage by cost.
--
-- Why: a row covered the estimates of the whole UTC hours whose START lies in its window. A usage bucket of
-- bucket_width=1m that does not start on the hour holds no hour start, so it covered nothing and the platform's
-- estimate of the same calls kept counting beside it: calls at 10:05 and 10:40 (estimates of 3 and 4 USD) reported
-- in the minute buckets 10:05 and 10:40 (3 and 4 USD, the bucket of 10:00 empty, as the usage APIs return it when
-- nothing was used then) made 14 USD instead of 7 (tests/test_spend_rules.py::
-- test_minute_usage_buckets_replace_the_estimate_of_their_hour). The provider's buckets are contiguous (an empty
-- one is "nothing used"), so the lines of the buckets overlapping an hour are the provider's whole report of it.
-- Windows that start on the hour (every hourly and daily bucket the collector reads) cover the same hours as before,
-- and so is every result. cost_worker_spend_rows and cost_worker_spend_regions keep their signatures; only their
-- `covered` step changes (r_from, the hour the window starts in, instead of h_from, the first hour starting in it),
-- and cost_worker_spend_rows reads the usage starting before the end of the hour its period ends in (a period ending
-- at 18:30, Asia/Kolkata's midnight, holds the estimate of 18:00, which a minute bucket at 18:40 now covers:
-- tests/test_spend_rules.py::test_a_minute_bucket_after_a_local_midnight_covers_the_estimate_before_it; the
-- aggregate's areas are whole hours already). The aggregate of organizations with a line that does not start on the
-- hour is rebuilt.

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
        WHERE CASE WHEN c.api_version = 'usage_v1'
                   -- usage matters when it counts in the period or covers one of its hours (0025: a row
                   -- starting after a period's end not on the hour, 18:40 after Kolkata's 18:30, covers the
                   -- estimate of 18:00, which is the period's)
                   THEN c.bucket_start_time >= period_start - window_max
                        AND c.bucket_start_time < cost_worker_hour_ceil(period_end)
                        AND c.bucket_end_time > period_start
                   -- costs also when they overlap such usage
                   ELSE c.bucket_end_time > period_start - window_max END
    ),
    cost_hours AS MATERIALIZED (  -- (account, project or NULL, hour) a cost row covers
        SELECT DISTINCT w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT provider, ai_organization_id, project_id, h_from, h_until
              FROM near WHERE api_version = 'costs_v1') w
        CROSS JOIN LATERAL generate_series(w.h_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    usage_windows AS (
        SELECT DISTINCT provider, ai_organization_id, project_id, h_from, h_until, r_from
        FROM near WHERE api_version = 'usage_v1' AND amount IS NOT NULL AND NOT outside_cost_report
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
    counted AS MATERIALIZED (  -- (every join below compares with `=` only, so it can hash: no quadratic scans)
        SELECT n.* FROM near n
        WHERE n.amount IS NOT NULL
          AND (n.api_version = 'costs_v1' OR n.outside_cost_report OR NOT EXISTS (
                SELECT FROM replaced r
                WHERE r.provider = n.provider AND r.ai_organization_id = n.ai_organization_id
                  AND coalesce(r.project_id, '00000000-0000-0000-0000-000000000000')
                      = coalesce(n.project_id, '00000000-0000-0000-0000-000000000000')
                  AND r.h_from = n.h_from AND r.h_until = n.h_until AND r.r_from = n.r_from))
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
        WHERE CASE WHEN c.api_version = 'usage_v1'
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
    usage_windows AS (
        SELECT DISTINCT area, provider, ai_organization_id, project_id, h_from, h_until, r_from
        FROM near WHERE api_version = 'usage_v1' AND amount IS NOT NULL AND NOT outside_cost_report
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
    counted AS MATERIALIZED (
        SELECT n.* FROM near n
        WHERE n.amount IS NOT NULL
          AND (n.api_version = 'costs_v1' OR n.outside_cost_report OR NOT EXISTS (
                SELECT FROM replaced r
                WHERE r.area = n.area AND r.provider = n.provider AND r.ai_organization_id = n.ai_organization_id
                  AND coalesce(r.project_id, '00000000-0000-0000-0000-000000000000')
                      = coalesce(n.project_id, '00000000-0000-0000-0000-000000000000')
                  AND r.h_from = n.h_from AND r.h_until = n.h_until AND r.r_from = n.r_from))
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

-- The aggregate of organizations with a line that does not start on the hour (the only ones whose results
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
    WHERE bucket_start_time <> date_trunc('hour', bucket_start_time, 'UTC')
))
WHERE EXISTS (SELECT FROM cost_data WHERE bucket_start_time <> date_trunc('hour', bucket_start_time, 'UTC'));
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
