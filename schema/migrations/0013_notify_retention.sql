-- Issue 18: finished webhook/Slack deliveries age out. A delivery row is kept while it is pending (it is the work
-- queue) and for COST_WORKER_NOTIFY_RETENTION_DAYS after it finished (delivered, or failed for good), so an
-- operator can still see what was sent and why one failed; then retention deletes it in short chunks.
-- The replay guard of the alerts topic does not need old rows: the topic's consumed offsets (consumer_offsets,
-- same transaction) make a replay a no-op, and the unique key only guards a redelivery of an offset not yet stored.
--
-- The worker's role reads deliveries across organizations (policy notify_dispatch) but deletes only within its
-- tenant scope, so the cross-tenant delete is a SECURITY DEFINER function, like the quarantine's in 0011. It runs
-- as the owner, to whom row-level security applies too (FORCE): two policies let the owner see and delete finished
-- deliveries of every organization, and nothing pending.
CREATE POLICY notify_retention_read ON notify_deliveries FOR SELECT TO cost_worker_owner USING (status <> 'pending');
CREATE POLICY notify_retention_delete ON notify_deliveries FOR DELETE TO cost_worker_owner USING (status <> 'pending');

CREATE INDEX notify_deliveries_finished_idx ON notify_deliveries (coalesce(delivered_at, last_attempt_at, created_at))
    WHERE status <> 'pending';


-- When a finished delivery finished is coalesce(delivered_at, last_attempt_at, created_at): delivered, else its last
-- attempt, else (its destination was disabled before any attempt) its creation; the index above is on it.
CREATE FUNCTION cost_worker_retention_deliveries(cutoff timestamptz, max_rows integer) RETURNS bigint
LANGUAGE sql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM notify_deliveries
        WHERE id IN (SELECT id FROM notify_deliveries
                     WHERE status <> 'pending' AND coalesce(delivered_at, last_attempt_at, created_at) < cutoff
                     ORDER BY coalesce(delivered_at, last_attempt_at, created_at) LIMIT max_rows)
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

CREATE FUNCTION cost_worker_retention_deliveries_due(cutoff timestamptz) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    SELECT count(*) FROM notify_deliveries
    WHERE status <> 'pending' AND coalesce(delivered_at, last_attempt_at, created_at) < cutoff
$$;

REVOKE EXECUTE ON FUNCTION cost_worker_retention_deliveries(timestamptz, integer),
    cost_worker_retention_deliveries_due(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cost_worker_retention_deliveries(timestamptz, integer),
    cost_worker_retention_deliveries_due(timestamptz) TO cost_worker_writer;
