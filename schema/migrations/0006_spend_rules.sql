-- Spend that is right on real provider data (issue 11): snapshots of reports, one coverage model by time,
-- estimates replaced per provider, provider rows in the period of their window's midpoint.
--
-- The rules (README "What counts as spend" has worked examples):
-- 1. A bucket is a snapshot of one REPORT (one provider endpoint: `openai.costs`, `openai.usage.completions`,
--    `anthropic.cost_report`, `anthropic.usage_report.messages`, ...). The newest collected_at of (provider,
--    provider account, report, bucket window) is the whole truth of that window of that report: lines absent from
--    it are kept but marked superseded (superseded_at) and stop counting. The same revision changes nothing; an
--    older one never overwrites (cost_windows holds each window's revision).
-- 2. Coverage by time. A row covers the whole UTC hours whose start lies in [bucket start, least(bucket end,
--    collected_at)): an open bucket covers only what had happened when it was collected. Unpriced usage (amount
--    NULL) and usage of zero quantity (a token type the line did not use) cover nothing. Authority per (provider account, scope, hour): cost rows > priced usage > estimate.
--    A scope sees the rows attributed to it: a project budget its project's rows; an organization budget all of
--    its rows, including those without a project (an ungrouped row stands for the whole provider account there).
--    - A priced usage row does not count when a cost row of its provider account in the scope covers one of its
--      hours for the same project, or either of them has no project. The exception is usage the cost report
--      omits (outside_cost_report: Anthropic's Priority Tier): it always counts.
--    - An hourly estimate (project_metrics, per provider of the events' models) does not count when a counted
--      provider row in the scope OF THAT PROVIDER covers its hour for its project, or (organization scope) an
--      ungrouped row of the provider account the project is mapped to does. Estimates of an unknown provider
--      (NULL) are never replaced.
-- 3. A provider row counts in the budget period containing the midpoint of its window; an estimate by its hour.
--
-- What happens to an existing database: every stored line gets its report (from provider and api_version); lines
-- older than the newest revision of their window are marked superseded now (never deleted); rollups get the
-- provider the old rule assumed (the project's mapped provider). Alerts already raised stay as they are: the new
-- rules only change what later evaluations see (a threshold not yet alerted alerts when new data or the sweep
-- evaluates its period; nothing already published is withdrawn or repeated).

-- ============================================================================================ ledger

ALTER TABLE cost_data
    ADD COLUMN report text,
    ADD COLUMN outside_cost_report boolean NOT NULL DEFAULT false,
    ADD COLUMN superseded_at timestamptz;
COMMENT ON COLUMN cost_data.report IS 'the provider endpoint this line is a snapshot of (openai.costs, ...)';
COMMENT ON COLUMN cost_data.outside_cost_report IS
    'usage the provider''s cost report omits (Anthropic Priority Tier): never replaced by cost rows';
COMMENT ON COLUMN cost_data.superseded_at IS 'when a newer revision of its window retired this line (NULL: current)';

-- The backfill must see every tenant's rows: the owner lifts FORCE for the length of this transaction.
ALTER TABLE cost_data NO FORCE ROW LEVEL SECURITY;
ALTER TABLE project_metrics NO FORCE ROW LEVEL SECURITY;
ALTER TABLE user_metrics NO FORCE ROW LEVEL SECURITY;
ALTER TABLE projects NO FORCE ROW LEVEL SECURITY;

-- The report a line of an api_version has when its writer does not say (rows written before this migration,
-- and direct inserts that predate reports): OpenAI usage meant the completions endpoint.
CREATE FUNCTION cost_worker_default_report(provider text, api_version cost_api_version) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN provider = 'openai' AND api_version = 'costs_v1' THEN 'openai.costs'
        WHEN provider = 'openai' THEN 'openai.usage.completions'
        WHEN api_version = 'costs_v1' THEN 'anthropic.cost_report'
        ELSE 'anthropic.usage_report.messages'
    END
$$;
UPDATE cost_data SET report = cost_worker_default_report(provider, api_version);

CREATE FUNCTION cost_worker_fill_report() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.report IS NULL THEN
        NEW.report := cost_worker_default_report(NEW.provider, NEW.api_version);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER cost_data_fill_report BEFORE INSERT ON cost_data
    FOR EACH ROW WHEN (NEW.report IS NULL) EXECUTE FUNCTION cost_worker_fill_report();
UPDATE cost_data SET outside_cost_report = true
WHERE provider = 'anthropic' AND api_version = 'usage_v1' AND lower(metadata->>'service_tier') = 'priority';
ALTER TABLE cost_data
    ALTER COLUMN report SET NOT NULL,
    ADD CONSTRAINT cost_data_report_check CHECK (report ~ '^(openai|anthropic)\.[a-z0-9_.]{1,100}$');

-- The line key now names the report (two usage endpoints may report the same line item).
DROP INDEX cost_data_dedupe_key;
CREATE UNIQUE INDEX cost_data_line_key ON cost_data
    (project_id, bucket_start_time, bucket_end_time, line_item, report,
     organization_id, provider, ai_organization_id) NULLS NOT DISTINCT;
-- The lines of one window of one report (retiring a snapshot's absent lines).
CREATE INDEX cost_data_window_idx ON cost_data
    (provider, ai_organization_id, report, bucket_start_time, bucket_end_time) WHERE superseded_at IS NULL;

-- The revision of each (provider, provider account, report, window). It holds no money and no tenant data
-- beyond the provider account id (which the worker already reads across tenants through projects), so it has
-- no organization column and no row-level security; only the writer reads it.
CREATE TABLE cost_windows (
    provider           varchar(32)  NOT NULL,
    ai_organization_id varchar(255) NOT NULL,
    report             text         NOT NULL,
    bucket_start_time  timestamptz  NOT NULL,
    bucket_end_time    timestamptz  NOT NULL,
    collected_at       timestamptz  NOT NULL,
    organization_ids   uuid[]       NOT NULL DEFAULT '{}',  -- every organization that had lines in the window
    updated_at         timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, ai_organization_id, report, bucket_start_time, bucket_end_time)
);
INSERT INTO cost_windows (provider, ai_organization_id, report, bucket_start_time, bucket_end_time, collected_at,
                          organization_ids)
SELECT provider, ai_organization_id, report, bucket_start_time, bucket_end_time, max(collected_at),
       array_agg(DISTINCT organization_id ORDER BY organization_id)
FROM cost_data
GROUP BY 1, 2, 3, 4, 5;

-- Lines an earlier version kept although a newer revision of their window no longer had them.
UPDATE cost_data c SET superseded_at = now()
FROM cost_windows w
WHERE w.provider = c.provider AND w.ai_organization_id = c.ai_organization_id AND w.report = c.report
  AND w.bucket_start_time = c.bucket_start_time AND w.bucket_end_time = c.bucket_end_time
  AND c.collected_at < w.collected_at;

GRANT SELECT, INSERT, UPDATE ON cost_windows TO cost_worker_writer;

-- ============================================================================================ rollups

-- The provider of the events' models (worker/model_providers.py; NULL: unknown). Rollups before this
-- migration take the provider of the project's mapping, which is what the old rule assumed of them.
ALTER TABLE api_usage ADD COLUMN provider varchar(64);
ALTER TABLE project_metrics ADD COLUMN provider varchar(64);
ALTER TABLE user_metrics ADD COLUMN provider varchar(64);

UPDATE project_metrics m
SET provider = coalesce(p.ai_provider, CASE WHEN p.openai_project_id IS NOT NULL THEN 'openai' END)
FROM projects p WHERE p.id = m.project_id;
UPDATE user_metrics m
SET provider = coalesce(p.ai_provider, CASE WHEN p.openai_project_id IS NOT NULL THEN 'openai' END)
FROM projects p WHERE p.id = m.project_id;

DROP INDEX project_metrics_key;
CREATE UNIQUE INDEX project_metrics_key ON project_metrics (organization_id, project_id, hour, provider)
    NULLS NOT DISTINCT;
DROP INDEX user_metrics_key;
CREATE UNIQUE INDEX user_metrics_key ON user_metrics (user_id, hour, project_id, provider) NULLS NOT DISTINCT;

ALTER TABLE cost_data FORCE ROW LEVEL SECURITY;
ALTER TABLE project_metrics FORCE ROW LEVEL SECURITY;
ALTER TABLE user_metrics FORCE ROW LEVEL SECURITY;
ALTER TABLE projects FORCE ROW LEVEL SECURITY;

-- ============================================================================================ spend

-- The first whole UTC hour starting at or after t.
CREATE FUNCTION cost_worker_hour_ceil(t timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT date_trunc('hour', t - interval '1 microsecond', 'UTC') + interval '1 hour'
$$;

-- The midpoint of a window (exact: seconds, never calendar days, so no time zone can move it).
CREATE FUNCTION cost_worker_midpoint(window_start timestamptz, window_end timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT window_start + make_interval(secs => extract(epoch FROM window_end - window_start)::float8 / 2)
$$;

-- The rows that count as spend of a scope in [period_start, period_end), unconverted: the seam currency
-- conversion (issue 12) builds on. rate_at is the instant whose exchange rate applies (a provider row's window
-- start, an estimate's hour); kind is 'cost', 'usage' or 'estimate'.
-- Reads are bounded by the period: provider windows are at most 31 days long, so every row that counts in the
-- period, covers one of its hours, or decides whether such a row counts starts in
-- [period_start - 62 days, period_end + 31 days) (after period_end: cost rows only).
CREATE FUNCTION cost_worker_spend_rows(
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
                   -- usage matters when it counts in the period or covers one of its hours
                   THEN c.bucket_start_time >= period_start - window_max AND c.bucket_start_time < period_end
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
        SELECT DISTINCT provider, ai_organization_id, project_id, h_from, h_until
        FROM near WHERE api_version = 'usage_v1' AND amount IS NOT NULL AND NOT outside_cost_report
    ),
    usage_hours AS MATERIALIZED (  -- expanded first, so that the join below hashes on (account, hour)
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, h.hour
        FROM usage_windows u
        CROSS JOIN LATERAL generate_series(u.h_from, u.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    replaced AS (  -- usage windows a cost row of their account covers for at least one hour: same project, or
                   -- either without one (three joins on equalities alone, so that each one hashes on every key)
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until
        FROM usage_hours u
        JOIN cost_hours k ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
                         AND k.hour = u.hour AND k.project_id = u.project_id
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until
        FROM usage_hours u
        JOIN (SELECT * FROM cost_hours WHERE project_id IS NULL) k
          ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until
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
                  AND r.h_from = n.h_from AND r.h_until = n.h_until))
    ),
    covered AS MATERIALIZED (  -- (provider, account, project or NULL, hour) a counted row covers (usage of zero
                               -- quantity reports nothing, so it covers nothing)
        SELECT DISTINCT w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT provider, ai_organization_id, project_id, h_from, h_until FROM counted
              WHERE api_version = 'costs_v1' OR quantity IS NULL OR quantity <> 0) w
        CROSS JOIN LATERAL generate_series(w.h_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
        WHERE w.h_until > period_start AND w.h_from < period_end
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

-- Spend in the budget's currency: a thin sum over cost_worker_spend_rows (issue 12 replaces it with a
-- converting version). Rows in another currency never count; they are reported as foreign_rows
-- ({currency: rows}) for the metric.
DROP FUNCTION cost_worker_spend(text, uuid, uuid, uuid, timestamptz, timestamptz, text);
DROP FUNCTION cost_worker_project_spend(uuid, uuid, timestamptz, timestamptz, text);
DROP FUNCTION cost_worker_organization_spend(uuid, timestamptz, timestamptz, text);
DROP FUNCTION cost_worker_user_spend(uuid, uuid, timestamptz, timestamptz, text);
DROP FUNCTION cost_worker_covered_hours(timestamptz, timestamptz);

CREATE FUNCTION cost_worker_spend(
    scope text, org uuid, project uuid, usr uuid, period_start timestamptz, period_end timestamptz,
    currency_code text, OUT spend numeric, OUT foreign_rows jsonb
)
LANGUAGE sql STABLE
AS $$
    WITH r AS (SELECT * FROM cost_worker_spend_rows(scope, org, project, usr, period_start, period_end))
    SELECT
        coalesce((SELECT sum(r.amount) FROM r WHERE r.currency = currency_code), 0),
        coalesce((SELECT jsonb_object_agg(f.currency, f.n) FROM (
            SELECT r.currency, count(*) AS n FROM r WHERE r.currency <> currency_code GROUP BY r.currency
        ) f), '{}')
$$;

-- Periods of a budget overlapping [from_at, until_at) (at least the one containing from_at): the periods an
-- evaluation triggered by a provider row looks at (its window's hours may fall in several).
CREATE FUNCTION cost_worker_periods(kind budget_period, tz text, from_at timestamptz, until_at timestamptz)
RETURNS TABLE (period_start timestamptz, period_end timestamptz)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    s timestamptz;
    e timestamptz;
BEGIN
    SELECT p.period_start, p.period_end INTO s, e FROM cost_worker_period(kind, tz, from_at) p;
    LOOP
        period_start := s;
        period_end := e;
        RETURN NEXT;
        EXIT WHEN e >= until_at;
        SELECT p.period_start, p.period_end INTO s, e FROM cost_worker_period(kind, tz, e) p;
    END LOOP;
END
$$;

-- Usage lines of a scope that could not be priced (amount NULL) among the current rows counting in the period:
-- they count nothing and cover nothing (their hours keep the estimate); `budgets status` shows how many.
CREATE FUNCTION cost_worker_unpriced_lines(
    scope text, org uuid, project uuid, period_start timestamptz, period_end timestamptz
) RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT count(*)
    FROM cost_data c
    WHERE scope IN ('organization', 'project') AND c.organization_id = org
      AND (scope = 'organization' OR c.project_id = project)
      AND c.superseded_at IS NULL AND c.amount IS NULL
      AND c.bucket_start_time >= period_start - interval '31 days' AND c.bucket_start_time < period_end
      AND cost_worker_midpoint(c.bucket_start_time, c.bucket_end_time) >= period_start
      AND cost_worker_midpoint(c.bucket_start_time, c.bucket_end_time) < period_end
$$;

GRANT EXECUTE ON FUNCTION cost_worker_unpriced_lines(text, uuid, uuid, timestamptz, timestamptz),
    cost_worker_spend_rows(text, uuid, uuid, uuid, timestamptz, timestamptz),
    cost_worker_spend(text, uuid, uuid, uuid, timestamptz, timestamptz, text),
    cost_worker_periods(budget_period, text, timestamptz, timestamptz),
    cost_worker_midpoint(timestamptz, timestamptz),
    cost_worker_hour_ceil(timestamptz)
    TO cost_worker_writer, cost_worker_reader;
