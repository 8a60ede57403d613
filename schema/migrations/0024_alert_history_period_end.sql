-- The alert history of a budget's period is the alerts of that period: its start and its end.
--
-- Why: cost_worker_alert_history (0007) found a period's alerts by their start alone. Periods of different kinds
-- start at the same instant (1 November is a daily, a weekly, a monthly... period's start), so a budget changed
-- from daily to monthly took the 80 % alert of its 1 November day for the month's: the month's spend reached 500 %
-- and the monthly budget never alerted (tests/test_budgets.py::test_a_budget_changed_to_a_longer_period_alerts_in_it).
-- An alert is open for the period it was raised in (its start and end). The crossing number still counts every
-- alert at that start, threshold, amount and currency, whatever its end: the alert id and budget_alerts' unique key
-- do not name the end, so the month's alert is the next crossing (another id) rather than the day's id again (which
-- ON CONFLICT DO NOTHING would have dropped).
--
-- A new function beside 0007's (same name, one argument more): the previous release keeps calling the old one.

CREATE FUNCTION cost_worker_alert_history(
    scope text, budget uuid, period_start timestamptz, period_end timestamptz, amount numeric, currency text
) RETURNS TABLE (alert_thresholds numeric[], alert_crossings integer[], alert_open_ids uuid[])
LANGUAGE sql STABLE
AS $$
    SELECT array_agg(h.threshold ORDER BY h.threshold),
           array_agg(h.crossing ORDER BY h.threshold),
           array_agg(h.open_id ORDER BY h.threshold)
    FROM (SELECT a.threshold, max(a.crossing) AS crossing,
                 (array_agg(a.id ORDER BY a.crossing DESC)
                      FILTER (WHERE a.resolved_at IS NULL AND a.period_end = $4))[1] AS open_id
          FROM budget_alerts a
          WHERE a.scope = $1 AND a.budget_id = $2 AND a.period_start = $3 AND a.amount = $5 AND a.currency = $6
          GROUP BY a.threshold) h
$$;

GRANT EXECUTE ON FUNCTION cost_worker_alert_history(text, uuid, timestamptz, timestamptz, numeric, text)
    TO cost_worker_writer, cost_worker_reader;
