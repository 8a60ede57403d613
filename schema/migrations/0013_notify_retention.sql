-- Issue 18: finished webhook/Slack deliveries age out. A delivery row is kept while it is pending (it is the work
-- queue) and for COST_WORKER_NOTIFY_RETENTION_DAYS after it finished (delivered, or failed for good), so an
-- operator can still see what was sent and why one failed; then retention deletes it in short chunks.
-- The replay guard of the alerts topic does not need old rows: the topic's consumed offsets (consumer_offsets,
-- same transaction) make a replay a no-op, and the unique key only guards a redelivery of an offset not yet stored.
--
-- The worker's role reads deliveries across organizations (policy notify_dispatch) but deletes only within its
-- tenant scope, so the cross-tenant delete is this SECURITY DEFINER function, like the quarantine's in 0011.

CREATE INDEX notify_deliveries_finished_idx ON notify_deliveries (coalesce(delivered_at, last_attempt_at, created_at))
    WHERE status <> 'pending';

