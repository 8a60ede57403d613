-- Money rules (a user moved to another organization): a user's hourly rollup is keyed by its organization too.
--
-- Why: every rollup row names its organization and counts there (README "What counts as spend", rule 4; 0045 made
-- a user's scope its rollups that name the organization). user_metrics' key was (user_id, hour, project_id,
-- provider), without the organization. A user moved from A to B (users.organization_id) whose events of the same
-- hour came before and after the move, without a project (or with a project that moved with it), had one row: the
-- worker's upsert added B's event to the row it had written for A. A's user budget read the money spent in B, B's
-- missed it, and the user's figures disagreed with the organizations' (project_metrics is keyed by organization):
-- 5 USD in A at 10:05 and 3 USD in B at 10:40 made one row of A of 8 and none of B
-- (tests/test_spend_moves.py::test_a_moved_users_events_of_the_same_hour_count_in_the_organization_each_names).
--
-- The key is now (user_id, hour, project_id, provider, organization_id): the organization last, so every lookup
-- by user and hour uses it as before (and a distributed PostgreSQL keyed by organization accepts it, README
-- "Past one PostgreSQL primary"). The old key's rows are unique on the new one, so the build cannot fail.
--
-- Online like 0014: the new index is built CONCURRENTLY first (writes go on); the transaction only drops the old key
-- and renames the new one. Contract (compat.toml): the previous release's upsert names the old key, which is gone
-- (SQLSTATE 42P10, a fatal error: its batch rolls back, nothing is committed, and on restart it refuses the database).
--
-- Rows merged before this migration stay as they were (one row of the organization the user had first that hour);
-- README "Upgrades" gives the query that finds them from the events still kept.

-- A concurrent build that failed leaves an invalid index behind: drop it, so that the next step builds it again.
-- migrate:online-each
SELECT 'DROP INDEX CONCURRENTLY IF EXISTS user_metrics_organization_key'
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE c.relname = 'user_metrics_organization_key' AND NOT i.indisvalid;

-- migrate:online
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS user_metrics_organization_key
    ON user_metrics (user_id, hour, project_id, provider, organization_id) NULLS NOT DISTINCT;

-- migrate:transaction
-- Queue at most this long behind in-flight batches (everyone else queues behind this transaction meanwhile).
SET LOCAL lock_timeout = '10s';

DROP INDEX user_metrics_key;
ALTER INDEX user_metrics_organization_key RENAME TO user_metrics_key;
