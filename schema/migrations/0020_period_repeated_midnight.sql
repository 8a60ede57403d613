-- A budget period starts at the FIRST instant its local calendar boundary happens.
--
-- Why: where a zone turns its clocks back across midnight (America/Havana on 1 November 2026, Atlantic/Azores on
-- 25 October 2026: 01:00 -> 00:00), local midnight happens twice. PostgreSQL reads such a repeated local time as
-- the later instant (standard time), so 0005's cost_worker_period gave the period "containing" 00:30 of the first
-- midnight as starting at the second one, after the instant it was asked about, and made the day before 25 hours
-- long; the spend of that first hour was evaluated in a period no batch looked at, and no alert was raised. The
-- calendar (and Python's zoneinfo with fold=0, which the tests' model uses) means the first occurrence.
--
-- A local time that does not happen (a spring-forward gap at midnight) keeps PostgreSQL's reading, which is the
-- same as zoneinfo's fold=0: the offset before the change.

-- The first instant whose local time in `tz` is `local`; for a local time in a gap, PostgreSQL's reading of it.
-- The earlier candidate takes the offset in force a day before PostgreSQL's instant (before any change at it).
CREATE FUNCTION cost_worker_local_instant(local timestamp, tz text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN earlier < later AND earlier AT TIME ZONE tz = local THEN earlier ELSE later END
    FROM (
        SELECT later, (local - ((later - interval '1 day') AT TIME ZONE tz
                                - (later - interval '1 day') AT TIME ZONE 'UTC')) AT TIME ZONE 'UTC' AS earlier
        FROM (SELECT local AT TIME ZONE tz AS later) AS pg
    ) AS candidates
$$;

-- Same signature and calendar as 0005; only a repeated local boundary now means its first instant.
CREATE OR REPLACE FUNCTION cost_worker_period(
    kind budget_period, tz text, at timestamptz, OUT period_start timestamptz, OUT period_end timestamptz
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT cost_worker_local_instant(s, tz), cost_worker_local_instant(s + step, tz)
    FROM (
        SELECT date_trunc(unit, at AT TIME ZONE tz) AS s, step
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

GRANT EXECUTE ON FUNCTION cost_worker_local_instant(timestamp, text) TO cost_worker_writer, cost_worker_reader;
