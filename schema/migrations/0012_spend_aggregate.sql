-- Budgets at platform scale (issue 18 item 6): budget evaluation reads an incrementally maintained spend
-- aggregate instead of every ledger line and rollup row of each budget's period.
--
-- spend_hourly holds, per scope (an organization, a project, a user, a user within a project), the spend that
-- counts there by the rules of 0006/0007 (cost_worker_spend_rows), already resolved (provider cost over priced
-- usage over estimates), summed per (instant it counts at, UTC date of its exchange rate, currency, authority):
--   at        a provider row's window midpoint, an estimate's hour: the instant whose budget period it counts in.
--             Not the UTC hour: periods start at local midnights (Asia/Kolkata at 18:30 UTC, Pacific/Chatham at
--             :15 or :45), and an hourly window's midpoint (:30) decides its period.
--   rate_day  the UTC date of a provider row's window start, of an estimate's hour: the rate that converts it.
--   rows      how many source rows (ledger lines, rollup rows) the sum holds: foreign_rows and missing_rates
--             count rows, and a conversion truncates per row.
-- spend_daily holds the same sums per UTC day: a period reads the days it holds whole from spend_daily and only
-- its edges (a local midnight is not a UTC one) from spend_hourly, about 30 rows per currency for a month instead of
-- every line, window and coverage hour; cost_worker_spend_many does it for all of a batch's candidates at once.
--
-- How it is kept equal to the full computation, in the writing transaction (statement-level triggers with
-- transition tables, so no writer can forget it: the worker, `cost-worker` commands, an operator's psql):
-- - rollups (project_metrics, user_metrics): the statement's changed rows net out per key (new minus old amount,
--   +1/-1 row) and each nonzero delta is added, one set-based upsert, to its organization's, project's and user's
--   scopes, unless a counted provider row covers it there (spend_cover: the hours a counted provider row covers,
--   per scope, kept by the recomputation below). Cost: the rows the statement changed.
-- - provider lines (cost_data): a line that appears, changes or is superseded changes what counts in its window
--   and, for a cost line, whether priced usage overlapping it counts (and what that usage covers). Those hours
--   (the window, plus the windows of usage lines of its account that overlap it) are collected for the whole
--   statement, merged per scope into disjoint areas, and recomputed at once by the full rules
--   (cost_worker_spend_regions, the body of cost_worker_spend_rows over a set of areas) for the organization's
--   scope and the line's project's scope, replacing their aggregate and coverage rows there. Every read is an index
--   range scan per merged range (cost_data by (organization_id | project_id, bucket_start_time), project_metrics
--   by its key): the cost is the rows near the changed windows (their density), never the size of the tables.
--   v1 of this migration (reverted before release) recomputed region by region, looked usage up per changed
--   window and called cost_worker_hour_ceil/cost_worker_midpoint per row (SQL functions that are never inlined).
-- - TRUNCATE of a source table, a project's provider mapping changed: the affected organizations are rebuilt.
-- Exchange rates are applied when a budget is evaluated, never stored: a rate import changes spend at once.
-- Prices are applied when a line is written (as before): a new price changes lines written after it.
--
-- Concurrency: recomputing an organization's provider hours takes an exclusive transaction-level advisory lock
-- on it; adding rollup deltas takes the shared one. Deltas commute, so event batches do not wait for each other;
-- a recomputation waits for in-flight deltas and reads them committed (READ COMMITTED: each statement of the
-- trigger functions takes a new snapshot). A deadlock between them is retried like any other (SQLSTATE 40P01).
--
-- Expand: new tables, functions and triggers; cost_worker_spend keeps its signature and its meaning (equal to the
-- full computation, which stays as cost_worker_spend_full). The previous release runs unchanged on it, and its
-- writes maintain the aggregate through the triggers.

-- ================================================================================================ tables

CREATE TABLE spend_hourly (
    organization_id uuid        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    scope           text        NOT NULL CHECK (scope IN ('organization', 'project', 'user', 'user_project')),
    subject         uuid        NOT NULL,  -- the organization, project or user
    subject_project uuid        NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',  -- user_project: project
    at              timestamptz NOT NULL,
    rate_day        date        NOT NULL,
    currency        char(3)     NOT NULL,
    authority       text        NOT NULL CHECK (authority IN ('cost', 'usage', 'estimate')),
    amount          numeric     NOT NULL,
    n_rows            bigint      NOT NULL,
    max_scale       integer     NOT NULL,  -- at least the largest scale of a row in the sum (exact conversion)
    CONSTRAINT spend_hourly_key PRIMARY KEY (scope, subject, subject_project, at, currency, authority, rate_day)
);
COMMENT ON TABLE spend_hourly IS
    'spend that counts per scope, resolved by the spend rules, per (instant, rate date, currency, authority)';

-- The same sums per UTC day (day: its midnight), so a month reads about 30 rows plus the hours at its edges that
-- do not fill a UTC day (a period starting at a local midnight). Kept next to spend_hourly by the same functions.
CREATE TABLE spend_daily (
    organization_id uuid        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    scope           text        NOT NULL,
    subject         uuid        NOT NULL,
    subject_project uuid        NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    day             timestamptz NOT NULL,
    rate_day        date        NOT NULL,
    currency        char(3)     NOT NULL,
    authority       text        NOT NULL,
    amount          numeric     NOT NULL,
    n_rows          bigint      NOT NULL,
    max_scale       integer     NOT NULL,
    CONSTRAINT spend_daily_key PRIMARY KEY (scope, subject, subject_project, day, currency, authority, rate_day)
);

-- The hours a counted provider row covers, per scope: an estimate of (provider, project, hour) does not count in
-- the scope when a row of its project covers it, or (organization scope) an ungrouped row (project_id NULL) of
-- the provider account its project is mapped to.
CREATE TABLE spend_cover (
    organization_id    uuid         NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    scope              text         NOT NULL CHECK (scope IN ('organization', 'project')),
    subject            uuid         NOT NULL,
    provider           varchar(32)  NOT NULL,
    project_id         uuid,
    hour               timestamptz  NOT NULL,
    ai_organization_id varchar(255) NOT NULL
);
-- hour third: a recomputation deletes a scope's coverage by hour range (an index range, not the scope's whole history).
CREATE UNIQUE INDEX spend_cover_key ON spend_cover (scope, subject, hour, provider, project_id, ai_organization_id)
    NULLS NOT DISTINCT;

-- The longest provider window an organization has had: how far around an interval the rows that decide it lie
-- (0006 assumed the longest possible, 31 days, on every read). It only grows.
CREATE TABLE spend_reach (
    organization_id uuid     NOT NULL PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
    window_max      interval NOT NULL
);

DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['spend_hourly', 'spend_daily', 'spend_cover', 'spend_reach'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I '
            'USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[])) '
            'WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))', t);
    END LOOP;
END
$rls$;

GRANT SELECT, INSERT, UPDATE, DELETE ON spend_hourly, spend_daily, spend_cover, spend_reach TO cost_worker_writer;
GRANT SELECT ON spend_hourly, spend_daily, spend_cover, spend_reach TO cost_worker_reader;

-- ================================================================================================ shapes

-- What the maintenance functions pass each other: arrays of these, read with unnest (no jsonb round trip).
-- A changed provider line's window (its old and its new version for an update).
CREATE TYPE cost_worker_spend_line AS (
    organization_id uuid, project_id uuid, provider text, ai_organization_id text, api_version text,
    s timestamptz, e timestamptz
);
-- A changed rollup row: its delta (+ the new version, - the old one), rows: +1 / -1.
CREATE TYPE cost_worker_spend_estimate AS (
    organization_id uuid, project_id uuid, provider text, hour timestamptz, amount numeric, n integer
);
CREATE TYPE cost_worker_spend_user AS (
    organization_id uuid, user_id uuid, project_id uuid, hour timestamptz, amount numeric, n integer
);
-- An area of an organization or project scope to recompute: `at` in [s, e), whole UTC hours. The areas of one
-- call never overlap within a scope (they are merged first).
CREATE TYPE cost_worker_spend_area AS (scope text, subject uuid, organization_id uuid, s timestamptz, e timestamptz);

-- ================================================================================================ the rules

-- The rows that count in each area (organization or project scope) with their instant (`at`) in [s, e), and the
-- hours in it that counted provider rows cover ('cover' rows: provider, account, project or NULL, hour in `at`):
-- the body of cost_worker_spend_rows (0006), with the reach around an area given by the longest window its
-- organization has (spend_reach; 0006 assumed 31 days on every read). Set-based over all the areas of a
-- statement: every source read is one index range scan per area (cost_data by (project_id, bucket_start_time) or
-- (organization_id, bucket_start_time), project_metrics by its key or (organization_id, hour)), so its cost is
-- the rows near the areas, never the size of the tables.
CREATE FUNCTION cost_worker_spend_regions(areas cost_worker_spend_area[])
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
        SELECT DISTINCT area, provider, ai_organization_id, project_id, h_from, h_until
        FROM near WHERE api_version = 'usage_v1' AND amount IS NOT NULL AND NOT outside_cost_report
    ),
    usage_hours AS MATERIALIZED (
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, h.hour
        FROM usage_windows u
        CROSS JOIN LATERAL generate_series(u.h_from, u.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    replaced AS (
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until
        FROM usage_hours u
        JOIN cost_hours k ON k.area = u.area AND k.provider = u.provider
                         AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
                         AND k.project_id = u.project_id
        UNION
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until
        FROM usage_hours u
        JOIN (SELECT * FROM cost_hours WHERE project_id IS NULL) k
          ON k.area = u.area AND k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
         AND k.hour = u.hour
        UNION
        SELECT u.area, u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until
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
                  AND r.h_from = n.h_from AND r.h_until = n.h_until))
    ),
    covered AS MATERIALIZED (
        SELECT DISTINCT w.area, w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT area, provider, ai_organization_id, project_id, h_from, h_until FROM counted
              WHERE api_version = 'costs_v1' OR quantity IS NULL OR quantity <> 0) w
        JOIN a ON a.area = w.area
        CROSS JOIN LATERAL generate_series(w.h_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
        WHERE w.h_until > a.ps AND w.h_from < a.pe
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

-- ================================================================================================ maintenance

-- Recompute the aggregate, the coverage and the daily sums of the given areas: whatever was there is replaced by
-- what the rules say now (exact for any areas). A fixed number of set-based statements whatever the number of
-- areas; areas of organizations that no longer exist (a cascaded delete) are skipped.
CREATE FUNCTION cost_worker_spend_recompute(areas cost_worker_spend_area[]) RETURNS void
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
            OFFSET 0  -- a fence: not pulled up into a join the planner may hash against a full scan
        ) x));
    DELETE FROM spend_cover c
    WHERE c.ctid = ANY (ARRAY(
        SELECT x.ctid FROM unnest(live) AS t
        CROSS JOIN LATERAL (
            SELECT v.ctid FROM spend_cover v
            WHERE v.scope = t.scope AND v.subject = t.subject AND v.hour >= t.s AND v.hour < t.e
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

-- Serialise recomputation (exclusive) against rollup deltas (shared) per organization, in one order.
CREATE FUNCTION cost_worker_spend_lock(orgs uuid[], exclusive boolean) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    o uuid;
BEGIN
    FOR o IN SELECT DISTINCT x FROM unnest(orgs) AS x ORDER BY x LOOP
        IF exclusive THEN
            PERFORM pg_advisory_xact_lock(hashtextextended('cost_worker.spend:' || o::text, 0));
        ELSE
            PERFORM pg_advisory_xact_lock_shared(hashtextextended('cost_worker.spend:' || o::text, 0));
        END IF;
    END LOOP;
END
$$;

-- Provider lines changed (one statement's, all at once): the hours they can change, per organization and project
-- scope (their windows, and for a cost line the windows of its account's usage lines that overlap it, found by
-- index range scans), merged into disjoint areas and recomputed in one cost_worker_spend_recompute call.
-- enable_bitmapscan off: with the range bounds known only at run time, the planner AND-ed the organization's whole
-- (organization_id) index range into the usage lookups (2M entries read per statement on a grown ledger); a plain
-- index scan takes the (organization_id | project_id, bucket_start_time) range.
CREATE FUNCTION cost_worker_spend_lines_changed(changed cost_worker_spend_line[]) RETURNS void
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
              FROM w WHERE w.api_version = 'costs_v1'
              UNION ALL
              SELECT 'project', w.organization_id, w.project_id, w.provider, w.ai_organization_id, w.s, w.e
              FROM w WHERE w.api_version = 'costs_v1' AND w.project_id IS NOT NULL) c
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
        UNION ALL  -- usage of the account overlapping a changed cost line may count or stop counting
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

-- Rollup rows changed (one statement's): add each (project, provider, hour)'s net delta (amount, rows) where no
-- counted provider row covers it (spend_cover); a change that nets to nothing (a request count only) adds nothing.
CREATE FUNCTION cost_worker_spend_estimates_changed(delta cost_worker_spend_estimate[]) RETURNS void
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
    scoped AS MATERIALIZED (
        SELECT d.organization_id, 'organization' AS scope, d.organization_id AS subject, d.hour, d.amount, d.n,
               d.max_scale
        FROM d LEFT JOIN projects p ON p.id = d.project_id
        WHERE NOT EXISTS (SELECT FROM spend_cover c
                          WHERE c.scope = 'organization' AND c.subject = d.organization_id
                            AND c.provider = d.provider AND c.project_id = d.project_id AND c.hour = d.hour)
          AND NOT EXISTS (SELECT FROM spend_cover c
                          WHERE c.scope = 'organization' AND c.subject = d.organization_id
                            AND c.provider = d.provider AND c.project_id IS NULL AND c.hour = d.hour
                            AND c.provider = p.ai_provider AND c.ai_organization_id = p.ai_organization_id)
        UNION ALL
        SELECT d.organization_id, 'project', d.project_id, d.hour, d.amount, d.n, d.max_scale
        FROM d
        WHERE d.project_id IS NOT NULL
          AND NOT EXISTS (SELECT FROM spend_cover c
                          WHERE c.scope = 'project' AND c.subject = d.project_id
                            AND c.provider = d.provider AND c.project_id = d.project_id AND c.hour = d.hour)
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

-- A user's rollup rows changed: add the net deltas to the user's scope and the user's scope within the project.
CREATE FUNCTION cost_worker_spend_users_changed(delta cost_worker_spend_user[]) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF cardinality(delta) = 0 THEN
        RETURN;
    END IF;
    WITH d AS (
        SELECT x.organization_id, x.user_id, x.project_id, x.hour, sum(x.amount) AS amount, sum(x.n) AS n,
               max(scale(x.amount)) AS max_scale
        FROM unnest(delta) AS x
        JOIN organizations o ON o.id = x.organization_id
        GROUP BY 1, 2, 3, 4
        HAVING sum(x.amount) <> 0 OR sum(x.n) <> 0
    ),
    scoped AS MATERIALIZED (
        SELECT organization_id, 'user' AS scope, user_id AS subject,
               '00000000-0000-0000-0000-000000000000'::uuid AS subject_project, hour, amount, n, max_scale
        FROM d
        UNION ALL
        SELECT organization_id, 'user_project', user_id, project_id, hour, amount, n, max_scale
        FROM d WHERE project_id IS NOT NULL
    ),
    hourly AS (
        INSERT INTO spend_hourly AS s (organization_id, scope, subject, subject_project, at, rate_day, currency,
                                       authority, amount, n_rows, max_scale)
        SELECT organization_id, scope, subject, subject_project, hour, (hour AT TIME ZONE 'UTC')::date, 'USD',
               'estimate', sum(amount), sum(n), max(max_scale)
        FROM scoped
        GROUP BY organization_id, scope, subject, subject_project, hour
        ORDER BY scope, subject, subject_project, hour
        ON CONFLICT ON CONSTRAINT spend_hourly_key DO UPDATE SET
            amount = s.amount + EXCLUDED.amount,
            n_rows = s.n_rows + EXCLUDED.n_rows,
            max_scale = greatest(s.max_scale, EXCLUDED.max_scale)
    )
    INSERT INTO spend_daily AS s (organization_id, scope, subject, subject_project, day, rate_day, currency,
                                  authority, amount, n_rows, max_scale)
    SELECT organization_id, scope, subject, subject_project, date_trunc('day', hour, 'UTC'),
           (hour AT TIME ZONE 'UTC')::date, 'USD', 'estimate', sum(amount), sum(n), max(max_scale)
    FROM scoped
    GROUP BY organization_id, scope, subject, subject_project, date_trunc('day', hour, 'UTC'),
             (hour AT TIME ZONE 'UTC')::date
    ORDER BY scope, subject, subject_project, 5
    ON CONFLICT ON CONSTRAINT spend_daily_key DO UPDATE SET
        amount = s.amount + EXCLUDED.amount,
        n_rows = s.n_rows + EXCLUDED.n_rows,
        max_scale = greatest(s.max_scale, EXCLUDED.max_scale);
END
$$;

-- Rebuild the aggregate of the given organizations (NULL: every organization) from the source tables: the
-- backfill, TRUNCATE of a source table, a project's provider mapping changed, and the operator's repair
-- (`cost-worker spend-rebuild`). Sees what the caller may see.
CREATE FUNCTION cost_worker_spend_rebuild(orgs uuid[] DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    areas cost_worker_spend_area[];
BEGIN
    IF orgs IS NULL THEN
        DELETE FROM spend_hourly;
        DELETE FROM spend_daily;
        DELETE FROM spend_cover;
        DELETE FROM spend_reach;
    ELSE
        PERFORM cost_worker_spend_lock(orgs, true);
        DELETE FROM spend_hourly WHERE organization_id = ANY (orgs);
        DELETE FROM spend_daily WHERE organization_id = ANY (orgs);
        DELETE FROM spend_cover WHERE organization_id = ANY (orgs);
        DELETE FROM spend_reach WHERE organization_id = ANY (orgs);
    END IF;
    INSERT INTO spend_reach (organization_id, window_max)
    SELECT c.organization_id, max(c.bucket_end_time - c.bucket_start_time)
    FROM cost_data c
    WHERE orgs IS NULL OR c.organization_id = ANY (orgs)
    GROUP BY c.organization_id;
    -- Organization and project scopes: the whole span of their rows, by the rules.
    WITH spans AS (
        SELECT organization_id, project_id, min(bucket_start_time) AS s, max(bucket_end_time) AS e
        FROM cost_data WHERE orgs IS NULL OR organization_id = ANY (orgs) GROUP BY 1, 2
        UNION ALL
        SELECT organization_id, project_id, min(hour), max(hour) + interval '1 hour'
        FROM project_metrics WHERE orgs IS NULL OR organization_id = ANY (orgs) GROUP BY 1, 2
    ),
    whole AS (
        SELECT 'organization' AS scope, organization_id AS subject, organization_id, min(s) AS s, max(e) AS e
        FROM spans GROUP BY organization_id
        UNION ALL
        SELECT 'project', project_id, organization_id, min(s), max(e)
        FROM spans WHERE project_id IS NOT NULL GROUP BY organization_id, project_id
    )
    SELECT coalesce(array_agg(ROW(w.scope, w.subject, w.organization_id, date_trunc('hour', w.s, 'UTC'),
                                  cost_worker_hour_ceil(w.e))::cost_worker_spend_area), '{}')
    INTO areas
    FROM whole w;
    PERFORM cost_worker_spend_recompute(areas);
    -- User scopes: their rollups as they are.
    INSERT INTO spend_hourly (organization_id, scope, subject, subject_project, at, rate_day, currency, authority,
                              amount, n_rows, max_scale)
    SELECT organization_id, 'user', user_id, '00000000-0000-0000-0000-000000000000', hour,
           (hour AT TIME ZONE 'UTC')::date, 'USD', 'estimate', sum(estimated_cost_usd), count(*),
           max(scale(estimated_cost_usd))
    FROM user_metrics WHERE orgs IS NULL OR organization_id = ANY (orgs)
    GROUP BY organization_id, user_id, hour
    UNION ALL
    SELECT organization_id, 'user_project', user_id, project_id, hour, (hour AT TIME ZONE 'UTC')::date, 'USD',
           'estimate', sum(estimated_cost_usd), count(*), max(scale(estimated_cost_usd))
    FROM user_metrics WHERE project_id IS NOT NULL AND (orgs IS NULL OR organization_id = ANY (orgs))
    GROUP BY organization_id, user_id, project_id, hour;
    INSERT INTO spend_daily (organization_id, scope, subject, subject_project, day, rate_day, currency, authority,
                             amount, n_rows, max_scale)
    SELECT h.organization_id, h.scope, h.subject, h.subject_project, date_trunc('day', h.at, 'UTC'), h.rate_day,
           h.currency, h.authority, sum(h.amount), sum(h.n_rows), max(h.max_scale)
    FROM spend_hourly h
    WHERE h.scope IN ('user', 'user_project') AND (orgs IS NULL OR h.organization_id = ANY (orgs))
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
END
$$;

-- ================================================================================================ triggers

-- Statement-level, with transition tables: one call per statement whatever its number of rows (the worker writes
-- a batch's lines in one upsert and its retirements in one update).
CREATE FUNCTION cost_worker_spend_on_lines() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    changed cost_worker_spend_line[];
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
    PERFORM cost_worker_spend_lines_changed(changed);
    RETURN NULL;
END
$$;

CREATE FUNCTION cost_worker_spend_on_estimates() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    delta cost_worker_spend_estimate[];
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
    PERFORM cost_worker_spend_estimates_changed(delta);
    RETURN NULL;
END
$$;

CREATE FUNCTION cost_worker_spend_on_users() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    delta cost_worker_spend_user[];
BEGIN
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

CREATE FUNCTION cost_worker_spend_on_truncate() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM cost_worker_spend_rebuild(NULL);
    RETURN NULL;
END
$$;

-- A project's provider mapping decides which ungrouped provider rows cover its estimates (organization scope).
CREATE FUNCTION cost_worker_spend_on_projects() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    orgs uuid[];
BEGIN
    SELECT array_agg(DISTINCT n.organization_id) INTO orgs
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE (n.ai_provider, n.ai_organization_id, n.organization_id)
          IS DISTINCT FROM (o.ai_provider, o.ai_organization_id, o.organization_id);
    IF orgs IS NOT NULL THEN
        PERFORM cost_worker_spend_rebuild(orgs);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER spend_lines_inserted AFTER INSERT ON cost_data
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_lines();
CREATE TRIGGER spend_lines_updated AFTER UPDATE ON cost_data
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_lines();
CREATE TRIGGER spend_lines_deleted AFTER DELETE ON cost_data
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_lines();

CREATE TRIGGER spend_estimates_inserted AFTER INSERT ON project_metrics
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_estimates();
CREATE TRIGGER spend_estimates_updated AFTER UPDATE ON project_metrics
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_estimates();
CREATE TRIGGER spend_estimates_deleted AFTER DELETE ON project_metrics
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_estimates();

CREATE TRIGGER spend_users_inserted AFTER INSERT ON user_metrics
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_users();
CREATE TRIGGER spend_users_updated AFTER UPDATE ON user_metrics
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_users();
CREATE TRIGGER spend_users_deleted AFTER DELETE ON user_metrics
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_users();

CREATE TRIGGER spend_sources_truncated AFTER TRUNCATE ON cost_data
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_truncate();
CREATE TRIGGER spend_sources_truncated AFTER TRUNCATE ON project_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_truncate();
CREATE TRIGGER spend_sources_truncated AFTER TRUNCATE ON user_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_truncate();

CREATE TRIGGER spend_project_mapping AFTER UPDATE ON projects
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_spend_on_projects();

-- ================================================================================================ evaluation

-- The full computation (0007), kept as the reference the aggregate is checked against, and as the way to
-- convert rows whose conversion truncates (below).
ALTER FUNCTION cost_worker_spend(text, uuid, uuid, uuid, timestamptz, timestamptz, text)
    RENAME TO cost_worker_spend_full;

-- Spend of many (scope, period) pairs in their budgets' currencies from the aggregate, in one statement (a batch's
-- candidates): per input position (ord), the same spend, foreign_rows and missing_rates as
-- cost_worker_spend_full. A period reads spend_daily for the UTC days it holds whole and spend_hourly for the rest
-- (its edges, when it starts at a local midnight). Sums in the budget's currency are taken as they are (a USD
-- budget on USD rows: to the digit). A foreign sum is converted whole when that equals converting its rows one by
-- one: a direct rate (amount * rate: nothing to truncate at 20 decimals for the scales held). A conversion that
-- divides (an inverse or cross rate truncates every row at 20 decimal places) is left to cost_worker_spend_full,
-- for that pair only.
CREATE FUNCTION cost_worker_spend_many(
    scopes text[], orgs uuid[], projects uuid[], users uuid[], starts timestamptz[], ends timestamptz[],
    currencies text[]
) RETURNS TABLE (ord bigint, spend numeric, foreign_rows jsonb, missing_rates jsonb)
LANGUAGE sql STABLE
AS $$
    WITH i AS MATERIALIZED (
        SELECT t.*,
               CASE WHEN t.scope IN ('organization', 'project') THEN t.scope
                    WHEN t.scope = 'user' AND t.project_id IS NULL THEN 'user'
                    WHEN t.scope = 'user' THEN 'user_project' END AS k_scope,
               CASE t.scope WHEN 'organization' THEN t.org WHEN 'project' THEN t.project_id ELSE t.user_id END
                   AS k_subject,
               CASE WHEN t.scope = 'user' AND t.project_id IS NOT NULL THEN t.project_id
                    ELSE '00000000-0000-0000-0000-000000000000'::uuid END AS k_project,
               date_trunc('day', t.period_start - interval '1 microsecond', 'UTC') + interval '1 day' AS d_from,
               date_trunc('day', t.period_end, 'UTC') AS d_until
        FROM unnest(scopes, orgs, projects, users, starts, ends, currencies)
            WITH ORDINALITY AS t(scope, org, project_id, user_id, period_start, period_end, currency, ord)
    ),
    parts AS (
        SELECT i.ord, i.currency AS to_code, d.currency, d.rate_day, d.amount, d.n_rows, d.max_scale
        FROM i JOIN spend_daily d
          ON d.scope = i.k_scope AND d.subject = i.k_subject AND d.subject_project = i.k_project
         AND d.day >= i.d_from AND d.day < i.d_until
        WHERE d.n_rows <> 0 AND (i.k_scope NOT IN ('organization', 'project') OR d.organization_id = i.org)
        UNION ALL
        SELECT i.ord, i.currency, h.currency, h.rate_day, h.amount, h.n_rows, h.max_scale
        FROM i JOIN spend_hourly h
          ON h.scope = i.k_scope AND h.subject = i.k_subject AND h.subject_project = i.k_project
         AND h.at >= i.period_start AND h.at < least(i.period_end, i.d_from)
        WHERE h.n_rows <> 0 AND (i.k_scope NOT IN ('organization', 'project') OR h.organization_id = i.org)
        UNION ALL
        SELECT i.ord, i.currency, h.currency, h.rate_day, h.amount, h.n_rows, h.max_scale
        FROM i JOIN spend_hourly h
          ON h.scope = i.k_scope AND h.subject = i.k_subject AND h.subject_project = i.k_project
         AND h.at >= greatest(i.d_until, i.d_from, i.period_start) AND h.at < i.period_end
        WHERE h.n_rows <> 0 AND (i.k_scope NOT IN ('organization', 'project') OR h.organization_id = i.org)
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
        SELECT i.ord, coalesce(c.by_row AND NOT c.missing, false) AS by_row,
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
    LEFT JOIN LATERAL (  -- only where a conversion truncates row by row (a one-time filter: not run otherwise)
        SELECT * FROM cost_worker_spend_full(r.scope, r.org, r.project_id, r.user_id, r.period_start, r.period_end,
                                             r.currency)
        WHERE r.by_row
        OFFSET 0  -- not pulled up into the join, so the filter gates the call
    ) f ON true
$$;

-- One (scope, period): cost_worker_spend_many for one pair.
CREATE FUNCTION cost_worker_spend(
    scope text, org uuid, project uuid, usr uuid, period_start timestamptz, period_end timestamptz,
    currency_code text, OUT spend numeric, OUT foreign_rows jsonb, OUT missing_rates jsonb
)
LANGUAGE sql STABLE
AS $$
    SELECT m.spend, m.foreign_rows, m.missing_rates
    FROM cost_worker_spend_many(ARRAY[scope], ARRAY[org], ARRAY[project], ARRAY[usr], ARRAY[period_start],
                                ARRAY[period_end], ARRAY[currency_code]) m
$$;

GRANT EXECUTE ON FUNCTION cost_worker_spend(text, uuid, uuid, uuid, timestamptz, timestamptz, text),
    cost_worker_spend_many(text[], uuid[], uuid[], uuid[], timestamptz[], timestamptz[], text[]),
    cost_worker_spend_full(text, uuid, uuid, uuid, timestamptz, timestamptz, text)
    TO cost_worker_writer, cost_worker_reader;

-- ================================================================================================ budgets

-- Every budget of the three scopes in one shape (issue 17 item 6: the batch's candidates and the sweep read it
-- instead of each repeating the three-table UNION). security_invoker: row-level security of the tables applies.
CREATE VIEW cost_worker_budgets WITH (security_invoker = true) AS
SELECT 'organization'::text AS scope, b.id, b.organization_id, NULL::uuid AS project_id, NULL::uuid AS user_id,
       b.name, b.amount, b.currency::text AS currency, b.period, b.timezone, b.thresholds, b.is_active
FROM ai_organization_budgets b
UNION ALL
SELECT 'project', b.id, b.organization_id, b.project_id, NULL, b.name, b.amount, b.currency, b.period, b.timezone,
       b.thresholds, b.is_active
FROM ai_project_budgets b
UNION ALL
SELECT 'user', b.id, b.organization_id, b.project_id, b.user_id, b.name, b.amount, b.currency, b.period,
       b.timezone, b.thresholds, b.is_active
FROM ai_budgets b;

-- A budget's alerts in a period at an amount and currency: per threshold (ascending), its latest crossing and
-- the id of that crossing while it is open (NULL once resolved). One row; NULL arrays when it has none.
CREATE FUNCTION cost_worker_alert_history(
    scope text, budget uuid, period_start timestamptz, amount numeric, currency text
) RETURNS TABLE (alert_thresholds numeric[], alert_crossings integer[], alert_open_ids uuid[])
LANGUAGE sql STABLE
AS $$
    SELECT array_agg(h.threshold ORDER BY h.threshold),
           array_agg(h.crossing ORDER BY h.threshold),
           array_agg(h.open_id ORDER BY h.threshold)
    FROM (SELECT a.threshold, max(a.crossing) AS crossing,
                 (array_agg(a.id ORDER BY a.crossing DESC) FILTER (WHERE a.resolved_at IS NULL))[1] AS open_id
          FROM budget_alerts a
          WHERE a.scope = $1 AND a.budget_id = $2 AND a.period_start = $3 AND a.amount = $4 AND a.currency = $5
          GROUP BY a.threshold) h
$$;

GRANT SELECT ON cost_worker_budgets TO cost_worker_writer, cost_worker_reader;
GRANT EXECUTE ON FUNCTION cost_worker_alert_history(text, uuid, timestamptz, numeric, text)
    TO cost_worker_writer, cost_worker_reader;

-- ================================================================================================ backfill

-- The backfill must see every tenant's rows: the owner lifts FORCE for the length of this transaction.
ALTER TABLE cost_data NO FORCE ROW LEVEL SECURITY;
ALTER TABLE project_metrics NO FORCE ROW LEVEL SECURITY;
ALTER TABLE user_metrics NO FORCE ROW LEVEL SECURITY;
ALTER TABLE projects NO FORCE ROW LEVEL SECURITY;
ALTER TABLE organizations NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_hourly NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_daily NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_cover NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_reach NO FORCE ROW LEVEL SECURITY;
SELECT cost_worker_spend_rebuild(NULL);
ALTER TABLE cost_data FORCE ROW LEVEL SECURITY;
ALTER TABLE project_metrics FORCE ROW LEVEL SECURITY;
ALTER TABLE user_metrics FORCE ROW LEVEL SECURITY;
ALTER TABLE projects FORCE ROW LEVEL SECURITY;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_hourly FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_daily FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_cover FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_reach FORCE ROW LEVEL SECURITY;
