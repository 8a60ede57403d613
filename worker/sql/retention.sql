-- Partitions of api_usage and retention (issue 18). The functions are in
-- schema/migrations/0011_partitioned_api_usage.sql; executed by worker/partitions.py and worker/retention.py.

-- =========================================================================================== batch path

-- name: api_usage_admit
-- Partitions for the months of a batch's events (created if missing, unless retention dropped the month), and the
-- first month kept (NULL: nothing dropped). Takes the retention lock shared until the batch commits.
SELECT cost_worker_api_usage_admit($1::date[]);

-- ============================================================================================ retention

-- name: api_usage_ensure
-- Partitions for every month in [$1, $2]; returns the names of those created.
SELECT cost_worker_api_usage_ensure($1::date, $2::date);

-- name: api_usage_partitions
-- Every partition of api_usage, oldest first, with its planner estimate of rows and its size on disk.
SELECT p.partition_name, p.from_at, p.until_at, p.detach_pending,
       greatest(c.reltuples, 0)::bigint AS estimated_rows, pg_total_relation_size(c.oid) AS bytes
FROM cost_worker_api_usage_partitions() p
JOIN pg_class c ON c.relname = p.partition_name AND c.relnamespace = 'public'::regnamespace
ORDER BY p.from_at;

-- name: retention_kept_from
SELECT kept_from FROM api_usage_retention;

-- name: retention_oldest_open_period
-- The start of the oldest budget period still open at $1, over every active budget (NULL: no budget). Budgets read
-- only rollups and the ledger (cost_worker_spend_rows), never api_usage; retention keeps these months anyway.
SELECT min(p.period_start)
FROM (SELECT DISTINCT period, timezone FROM ai_organization_budgets WHERE is_active
      UNION
      SELECT DISTINCT period, timezone FROM ai_project_budgets WHERE is_active
      UNION
      SELECT DISTINCT period, timezone FROM ai_budgets WHERE is_active) b
CROSS JOIN LATERAL cost_worker_period(b.period, b.timezone, $1::timestamptz) p;

-- name: retention_quarantine_due
-- Replayed quarantine rows replayed before $1 (what a run would delete).
SELECT count(*) FROM quarantine WHERE status = 'replayed' AND replayed_at < $1;

-- name: retention_deliveries_due
-- Finished notify deliveries (delivered, or failed for good) that finished before $1 (what a run would delete).
SELECT cost_worker_retention_deliveries_due($1::timestamptz);

-- name: retention_deliveries
-- Delete up to $2 finished notify deliveries that finished before $1 (schema/migrations/0013); returns how many.
SELECT cost_worker_retention_deliveries($1::timestamptz, $2::integer);

-- name: retention_advance
-- From now on, events before month $1 are refused; waits for the batches in flight.
SELECT cost_worker_retention_advance($1::date);

-- name: retention_drop
-- Detach (plain, a moment of ACCESS EXCLUSIVE) and drop one partition wholly before the first month kept.
SELECT cost_worker_retention_drop($1::text);

-- name: retention_leftovers
-- What an interrupted run (or a human) left: partitions detach pending, standalone tables named like partitions
-- (schema/migrations/0032), and whether the next run finishes them.
SELECT partition_name, state FROM cost_worker_retention_leftovers();

-- name: retention_resume
-- Finish what an interrupted run left (DROP a partition detach pending before the first month kept, DROP a table it
-- recorded detaching); returns the tables dropped and the state each was left in.
SELECT partition_name, state FROM cost_worker_retention_resume();

-- name: retention_begin_drop
-- The owner's way, before the detach: record the partition (by oid), so that the next run drops it if this one dies.
SELECT cost_worker_retention_begin_drop($1::text);

-- name: retention_finish_drop
-- ... and after it: drop the detached table and its record, in one transaction.
SELECT cost_worker_retention_finish_drop($1::text);

-- name: retention_detach_concurrently
-- The owner's way: no ACCESS EXCLUSIVE lock on the parent. Outside a transaction. {partition}: a checked name.
ALTER TABLE api_usage DETACH PARTITION {partition} CONCURRENTLY;

-- name: retention_quarantine
-- Delete up to $2 replayed quarantine rows replayed before $1; returns how many.
SELECT cost_worker_retention_quarantine($1::timestamptz, $2::integer);

-- name: retention_try_lock
-- One retention run at a time across replicas and the CLI (session-level; released right after the run).
SELECT pg_try_advisory_lock(hashtextextended('cost_worker.retention_run', 0));

-- name: retention_unlock
SELECT pg_advisory_unlock(hashtextextended('cost_worker.retention_run', 0));
