-- Money rules (the spend aggregate): a cost line or an unpriced usage line written after a usage line of its account
-- that overlaps one of the hours it decides, but not its window, left that usage line counted in the aggregate.
--
-- Why: a cost line covers the whole UTC hours that start in its window (0006), so up to an hour past its end, and an
-- unpriced usage line marks every hour its window overlaps (0031), so from the start of the hour it starts in. A
-- usage line overlapping such an hour stops counting (0023, 0031) by the full rules, but
-- cost_worker_spend_lines_changed (0031) looked the usage up by the changed line's window only, and recomputed the
-- hours around the changed line, which need not hold the usage line's midpoint: an unpriced 10:05 minute line
-- after a priced 10:30-11:30 line (midpoint 11:00) left 3 USD counted where the full computation counts 0; a
-- 10:30-11:30 cost line (it covers the hour 11:00) after an 11:40-12:40 usage line (midpoint 12:10) counted 7 + 4
-- where it is 7 (tests/test_spend_aggregate.py::
-- test_a_line_deciding_usage_in_the_hour_beyond_its_window_recomputes_that_usage; found by the two-account
-- property test in tests/test_spend_shapes.py).
--
-- The fix: the usage of the account is looked up over the whole UTC hours the changed cost or unpriced line
-- overlaps. Same signature; the aggregates already wrong are rebuilt by `cost-worker budgets rebuild-spend` (README).

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
        -- 0035: the whole UTC hours the window overlaps, not the window: a cost line covers the hours that start
        -- in it (up to an hour past its end), an unpriced line marks every hour it overlaps (from the hour's start),
        -- and a usage line of those hours whose window misses this one's is decided by it all the same
        FROM (SELECT 'organization' AS lvl, w.organization_id, NULL::uuid AS project_id, w.provider,
                     w.ai_organization_id, date_trunc('hour', w.s, 'UTC') AS s,
                     date_trunc('hour', w.e - interval '1 microsecond', 'UTC') + interval '1 hour' AS e
              FROM w WHERE w.api_version IN ('costs_v1', 'usage_v1/unpriced')
              UNION ALL
              SELECT 'project', w.organization_id, w.project_id, w.provider, w.ai_organization_id,
                     date_trunc('hour', w.s, 'UTC'),
                     date_trunc('hour', w.e - interval '1 microsecond', 'UTC') + interval '1 hour'
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
