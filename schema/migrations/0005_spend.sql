-- What counts as spend: defined once, here, and used by every budget evaluation (batch, sweep, CLI).
--
-- Project spend in [period_start, period_end), in the budget's currency:
--   the provider's rows of the project whose window STARTS in the period (when one window has both
--   costs_v1 and usage_v1 rows, only costs_v1 counts: the provider's cost is authoritative, usage priced
--   from model_prices is the fallback), PLUS the platform's estimate (API-usage cost, in USD) from the
--   project's hourly rollups for the hours of the period that no provider window of the project covers.
--   So the estimate fills the time the provider has not reported yet, and never both for the same hour.
-- Organization spend: the same over all its projects, plus its provider rows that belong to no project.
--   A provider window without a project (the provider did not group by project) covers every project of
--   that provider organization, so their estimates for those hours are not added on top.
-- User spend: the user's API-usage cost in the period (within the budget's project when it has one).
-- Rows in another currency never count; they are reported as `foreign` ({currency: rows}) for the metric.
-- A window covers an hour when the hour's start lies inside it. Windows are at most 31 days long.

-- The calendar period containing `at`, in the budget's time zone (weeks start on Monday). PostgreSQL's
-- time zone arithmetic makes days 23 or 25 hours long across DST changes, as they are.
CREATE FUNCTION cost_worker_period(
    kind budget_period, tz text, at timestamptz, OUT period_start timestamptz, OUT period_end timestamptz
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT s, ((s AT TIME ZONE tz) + step) AT TIME ZONE tz
    FROM (
        SELECT date_trunc(unit, at, tz) AS s, step
        FROM (VALUES
            ('daily'::budget_period, 'day', interval '1 day'),
            ('weekly', 'week', interval '1 week'),
            ('monthly', 'month', interval '1 month'),
            ('quarterly', 'quarter', interval '3 months'),
            ('yearly', 'year', interval '1 year')
        ) AS units(k, unit, step)
        WHERE k = kind
    ) AS truncated
$$;

-- Whole UTC hours whose start lies in [window_start, window_end).
CREATE FUNCTION cost_worker_covered_hours(window_start timestamptz, window_end timestamptz)
RETURNS SETOF timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT generate_series(
        date_trunc('hour', window_start - interval '1 microsecond', 'UTC') + interval '1 hour',
        window_end - interval '1 microsecond',
        interval '1 hour'
    )
$$;

CREATE FUNCTION cost_worker_project_spend(
    org uuid, project uuid, period_start timestamptz, period_end timestamptz, currency_code text,
    OUT spend numeric, OUT foreign_rows jsonb
)
LANGUAGE sql STABLE
AS $$
    WITH in_period AS (
        SELECT api_version, currency, amount,
               -- One pass (a window over the window): does this bucket window have costs_v1 rows?
               bool_or(api_version = 'costs_v1') OVER (PARTITION BY bucket_start_time, bucket_end_time) AS costed
        FROM cost_data
        WHERE project_id = project AND bucket_start_time >= period_start AND bucket_start_time < period_end
    ),
    counted AS (
        SELECT currency, amount FROM in_period WHERE api_version = 'costs_v1' OR NOT costed
    ),
    covered AS (
        SELECT DISTINCT h.hour
        FROM (SELECT DISTINCT bucket_start_time, bucket_end_time
              FROM cost_data
              WHERE project_id = project
                AND bucket_start_time < period_end
                AND bucket_start_time >= period_start - interval '31 days'
                AND bucket_end_time > period_start) w
        CROSS JOIN LATERAL cost_worker_covered_hours(w.bucket_start_time, w.bucket_end_time) AS h(hour)
    ),
    estimate AS (
        SELECT coalesce(sum(m.estimated_cost_usd), 0) AS amount
        FROM project_metrics m
        WHERE m.organization_id = org AND m.project_id = project
          AND m.hour >= period_start AND m.hour < period_end
          AND NOT EXISTS (SELECT FROM covered c WHERE c.hour = m.hour)
    )
    SELECT
        coalesce((SELECT sum(amount) FROM counted WHERE currency = currency_code), 0)
          + CASE WHEN currency_code = 'USD' THEN (SELECT amount FROM estimate) ELSE 0 END,
        coalesce((SELECT jsonb_object_agg(currency, n) FROM (
            SELECT currency, count(*) AS n FROM counted WHERE currency <> currency_code AND amount IS NOT NULL
            GROUP BY currency
        ) f), '{}')
$$;

CREATE FUNCTION cost_worker_organization_spend(
    org uuid, period_start timestamptz, period_end timestamptz, currency_code text,
    OUT spend numeric, OUT foreign_rows jsonb
)
LANGUAGE sql STABLE
AS $$
    WITH in_period AS (
        SELECT api_version, currency, amount,
               -- One pass (a window function), linear in the rows: does this key's bucket window have costs_v1
               -- rows? (PARTITION BY groups NULL projects together, as the dedupe key does.)
               bool_or(api_version = 'costs_v1') OVER (
                   PARTITION BY project_id, provider, ai_organization_id, bucket_start_time, bucket_end_time
               ) AS costed
        FROM cost_data
        WHERE organization_id = org AND bucket_start_time >= period_start AND bucket_start_time < period_end
    ),
    counted AS (
        SELECT currency, amount FROM in_period WHERE api_version = 'costs_v1' OR NOT costed
    ),
    windows AS (
        SELECT DISTINCT project_id, provider, ai_organization_id, bucket_start_time, bucket_end_time
        FROM cost_data
        WHERE organization_id = org
          AND bucket_start_time < period_end
          AND bucket_start_time >= period_start - interval '31 days'
          AND bucket_end_time > period_start
    ),
    covered_projects AS (  -- (project, hour) pairs a provider window of the project covers
        SELECT DISTINCT w.project_id, h.hour
        FROM windows w CROSS JOIN LATERAL cost_worker_covered_hours(w.bucket_start_time, w.bucket_end_time) AS h(hour)
        WHERE w.project_id IS NOT NULL
    ),
    covered_accounts AS (  -- (provider organization, hour) pairs covered by rows without a project
        SELECT DISTINCT w.provider, w.ai_organization_id, h.hour
        FROM windows w CROSS JOIN LATERAL cost_worker_covered_hours(w.bucket_start_time, w.bucket_end_time) AS h(hour)
        WHERE w.project_id IS NULL
    ),
    estimate AS (
        SELECT coalesce(sum(m.estimated_cost_usd), 0) AS amount
        FROM project_metrics m
        LEFT JOIN projects p ON p.id = m.project_id
        WHERE m.organization_id = org AND m.hour >= period_start AND m.hour < period_end
          AND NOT EXISTS (SELECT FROM covered_projects c WHERE c.project_id = m.project_id AND c.hour = m.hour)
          AND NOT EXISTS (SELECT FROM covered_accounts a
                          WHERE a.provider = p.ai_provider AND a.ai_organization_id = p.ai_organization_id
                            AND a.hour = m.hour)
    )
    SELECT
        coalesce((SELECT sum(amount) FROM counted WHERE currency = currency_code), 0)
          + CASE WHEN currency_code = 'USD' THEN (SELECT amount FROM estimate) ELSE 0 END,
        coalesce((SELECT jsonb_object_agg(currency, n) FROM (
            SELECT currency, count(*) AS n FROM counted WHERE currency <> currency_code AND amount IS NOT NULL
            GROUP BY currency
        ) f), '{}')
$$;

CREATE FUNCTION cost_worker_user_spend(
    usr uuid, project uuid, period_start timestamptz, period_end timestamptz, currency_code text,
    OUT spend numeric, OUT foreign_rows jsonb
)
LANGUAGE sql STABLE
AS $$
    SELECT
        CASE WHEN currency_code = 'USD' THEN coalesce(sum(estimated_cost_usd), 0) ELSE 0 END,
        '{}'::jsonb
    FROM user_metrics
    WHERE user_id = usr AND hour >= period_start AND hour < period_end
      AND (project IS NULL OR project_id = project)
$$;

-- One entry point for every scope.
CREATE FUNCTION cost_worker_spend(
    scope text, org uuid, project uuid, usr uuid, period_start timestamptz, period_end timestamptz,
    currency_code text, OUT spend numeric, OUT foreign_rows jsonb
)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF scope = 'organization' THEN
        SELECT s.spend, s.foreign_rows INTO spend, foreign_rows
        FROM cost_worker_organization_spend(org, period_start, period_end, currency_code) s;
    ELSIF scope = 'project' THEN
        SELECT s.spend, s.foreign_rows INTO spend, foreign_rows
        FROM cost_worker_project_spend(org, project, period_start, period_end, currency_code) s;
    ELSIF scope = 'user' THEN
        SELECT s.spend, s.foreign_rows INTO spend, foreign_rows
        FROM cost_worker_user_spend(usr, project, period_start, period_end, currency_code) s;
    ELSE
        RAISE EXCEPTION 'unknown budget scope %', scope;
    END IF;
END
$$;

GRANT EXECUTE ON FUNCTION cost_worker_period(budget_period, text, timestamptz),
    cost_worker_spend(text, uuid, uuid, uuid, timestamptz, timestamptz, text)
    TO cost_worker_writer, cost_worker_reader;
