-- cost_worker_period and cost_worker_local_instant as PL/pgSQL: the same signatures and results as 0020, about
-- 20 times cheaper per call.
--
-- Why: 0020 wrote cost_worker_local_instant as a SQL function with a FROM clause, which PostgreSQL cannot inline,
-- and cost_worker_period (a record, not a set, so never inlined either) calls it twice: each call of
-- cost_worker_period ran three SQL-function executors, ~110 us where 0005's took ~5 us. A plan that called it per
-- matched row made a batch spread over 1,000 organizations spend ~700 ms in budget_candidates. The queries now
-- compute each distinct period once (worker/sql/queries.sql); this makes any other caller (the sweep, `budgets
-- status`, cost_worker_periods' loop over a provider window's periods) as cheap as before 0020 (~5 us a call).
-- The calendar is unchanged: tests/test_budgets.py compares every kind and zone around each clock change with
-- zoneinfo.

CREATE OR REPLACE FUNCTION cost_worker_local_instant(local timestamp, tz text) RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
    later timestamptz := local AT TIME ZONE tz;  -- PostgreSQL's reading: a repeated local time is the later one
    earlier timestamptz;
BEGIN
    -- The earlier candidate takes the offset in force a day before PostgreSQL's instant (before any change at it).
    earlier := (local - (((later - interval '1 day') AT TIME ZONE tz)
                         - ((later - interval '1 day') AT TIME ZONE 'UTC'))) AT TIME ZONE 'UTC';
    IF earlier < later AND earlier AT TIME ZONE tz = local THEN
        RETURN earlier;
    END IF;
    RETURN later;
END
$$;

CREATE OR REPLACE FUNCTION cost_worker_period(
    kind budget_period, tz text, at timestamptz, OUT period_start timestamptz, OUT period_end timestamptz
)
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
    local_start timestamp;
    step interval;
BEGIN
    CASE kind
        WHEN 'daily' THEN local_start := date_trunc('day', at AT TIME ZONE tz); step := interval '1 day';
        WHEN 'weekly' THEN local_start := date_trunc('week', at AT TIME ZONE tz); step := interval '1 week';
        WHEN 'monthly' THEN local_start := date_trunc('month', at AT TIME ZONE tz); step := interval '1 month';
        WHEN 'quarterly' THEN local_start := date_trunc('quarter', at AT TIME ZONE tz); step := interval '3 months';
        WHEN 'yearly' THEN local_start := date_trunc('year', at AT TIME ZONE tz); step := interval '1 year';
    END CASE;
    period_start := cost_worker_local_instant(local_start, tz);
    period_end := cost_worker_local_instant(local_start + step, tz);
END
$$;
