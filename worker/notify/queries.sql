-- The notify service's SQL (issue 15), in named blocks read by worker.sql.parse; worker/notify/store.py
-- is the only module that executes them. Tables: schema/migrations/0010_notify.sql.

-- name: notify_organization_exists
SELECT EXISTS (SELECT FROM organizations WHERE id = $1);

-- name: notify_destination_insert
INSERT INTO notify_destinations
    (id, organization_id, name, kind, url_origin, url_sealed, secret_sealed, scopes, min_threshold, include_resolved)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (organization_id, name) DO NOTHING
RETURNING id;

-- name: notify_destination_list
SELECT d.id, d.name, d.kind, d.url_origin, d.scopes, d.min_threshold, d.include_resolved, d.enabled,
       d.disabled_reason, d.created_at
FROM notify_destinations d
WHERE d.organization_id = $1
ORDER BY d.name;

-- name: notify_destination_get
SELECT id, organization_id, name, kind, url_sealed, secret_sealed, enabled
FROM notify_destinations
WHERE id = $1 AND organization_id = $2;

-- name: notify_organizations
-- Every organization (the worker's role reads them across tenants), in pages after $1: `notify reseal` visits
-- each one's destinations in its own scope.
SELECT id FROM organizations WHERE id > $1 ORDER BY id LIMIT $2;

-- name: notify_destinations_sealed
-- The sealed values of the destinations in the transaction's scope, locked until they are sealed again.
SELECT id, organization_id, url_sealed, secret_sealed, previous_secret_sealed
FROM notify_destinations
ORDER BY id
FOR UPDATE;

-- name: notify_destination_reseal
UPDATE notify_destinations SET url_sealed = $2, secret_sealed = $3, previous_secret_sealed = $4 WHERE id = $1;

-- name: notify_destination_rotate_secret
-- A new signing secret; the one it replaces keeps signing for $4 seconds (a rotation during another's overlap
-- replaces the older secret: two at most).
UPDATE notify_destinations
SET previous_secret_sealed = secret_sealed, previous_secret_until = now() + make_interval(secs => $4),
    secret_sealed = $3
WHERE id = $1 AND organization_id = $2 AND kind = 'webhook'
RETURNING previous_secret_until;

-- name: notify_destination_delete
DELETE FROM notify_destinations WHERE id = $1 AND organization_id = $2 RETURNING id;

-- name: notify_destinations_for
-- The enabled destinations of some organizations, with their filters (the consumer matches alerts). Locked
-- FOR KEY SHARE until the batch commits: a `destinations remove` waits for it (and its cascade takes the new
-- deliveries) instead of committing in between and failing the batch's insert on the foreign key.
SELECT id, organization_id, scopes, min_threshold, include_resolved
FROM notify_destinations
WHERE enabled AND organization_id = ANY($1::uuid[])
ORDER BY id
FOR KEY SHARE;

-- name: notify_deliveries_insert
-- One delivery per (destination, webhook id); a replayed alert finds its row and adds nothing.
INSERT INTO notify_deliveries (organization_id, destination_id, webhook_id, event_type, payload)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[])
ORDER BY 2, 3
ON CONFLICT (destination_id, webhook_id) DO NOTHING
RETURNING id;

-- name: notify_due_organizations
-- Organizations with deliveries due now (read across tenants: policy notify_dispatch); a resolved delivery
-- waiting for its triggered one (notify_claim) is not due.
SELECT DISTINCT d.organization_id
FROM notify_deliveries d
WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND NOT (d.destination_id = ANY($1::uuid[]))
  AND NOT (d.webhook_id LIKE '%:resolved' AND EXISTS (
      SELECT FROM notify_deliveries a
      WHERE a.destination_id = d.destination_id AND a.status = 'pending'
        AND a.webhook_id = left(d.webhook_id, -length(':resolved'))
  ))
LIMIT $2;

-- name: notify_claim
-- Claim due deliveries (at most $2 per destination, $3 in all, none of the destinations in $1 that this
-- dispatcher is already busy with). The claim is a lease: next_attempt_at moves $4 seconds ahead, so a
-- dispatcher that dies mid-attempt leaves the delivery due again after the lease; `attempts` counts
-- started attempts and fences the result (a late answer of an expired lease does not overwrite).
-- A resolved delivery waits while the triggered delivery of its alert to the same destination is pending
-- (backing off or in flight): a receiver never gets an alert's resolution before the alert. A due delivery
-- of a disabled destination (inserted by the consumer while a 410 disabled it, or disabled by an operator)
-- is failed here, as the 410 fails the others, instead of staying pending and filling the claim's window.
WITH due AS (
    SELECT d.id, d.destination_id, t.enabled, t.disabled_reason
    FROM notify_deliveries d
    JOIN notify_destinations t ON t.id = d.destination_id
    WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND NOT (d.destination_id = ANY($1::uuid[]))
      AND NOT (d.webhook_id LIKE '%:resolved' AND EXISTS (
          SELECT FROM notify_deliveries a
          WHERE a.destination_id = d.destination_id AND a.status = 'pending'
            AND a.webhook_id = left(d.webhook_id, -length(':resolved'))
      ))
    ORDER BY d.next_attempt_at, d.id
    LIMIT $3 * 4
    FOR UPDATE OF d SKIP LOCKED
),
off AS (
    UPDATE notify_deliveries d
    SET status = 'failed', last_error = left('destination disabled: ' || coalesce(due.disabled_reason, ''), 500)
    FROM due
    WHERE d.id = due.id AND NOT due.enabled
),
picked AS (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY destination_id ORDER BY id) AS n FROM due WHERE enabled
    ) ranked
    WHERE n <= $2
    ORDER BY id
    LIMIT $3
)
UPDATE notify_deliveries d
SET next_attempt_at = now() + make_interval(secs => $4), attempts = d.attempts + 1, last_attempt_at = now()
FROM picked p, notify_destinations t
WHERE d.id = p.id AND t.id = d.destination_id AND t.enabled
RETURNING d.id, d.organization_id, d.destination_id, d.webhook_id, d.event_type, d.payload, d.attempts,
          d.created_at, t.kind, t.url_sealed, t.secret_sealed,
          -- the secret before a rotation signs too until its overlap ends (0034)
          CASE WHEN t.previous_secret_until > now() THEN t.previous_secret_sealed END AS previous_secret_sealed;

-- name: notify_record_delivered
UPDATE notify_deliveries
SET status = 'delivered', delivered_at = now(), last_status = $3, last_error = NULL
WHERE id = $1 AND attempts = $2 AND status = 'pending'
RETURNING id;

-- name: notify_record_retry
UPDATE notify_deliveries
SET next_attempt_at = $3, last_status = $4, last_error = $5
WHERE id = $1 AND attempts = $2 AND status = 'pending'
RETURNING id;

-- name: notify_record_failed
UPDATE notify_deliveries
SET status = 'failed', last_status = $3, last_error = $4
WHERE id = $1 AND attempts = $2 AND status = 'pending'
RETURNING id;

-- name: notify_destination_backoff
-- Per-destination backoff: the destination's other pending deliveries wait at least as long. Rows locked
-- by a concurrent attempt's record are skipped (waiting for them could deadlock; that attempt sets its own).
UPDATE notify_deliveries
SET next_attempt_at = greatest(next_attempt_at, $2)
WHERE id IN (
    SELECT id FROM notify_deliveries
    WHERE destination_id = $1 AND status = 'pending'
    ORDER BY id
    FOR UPDATE SKIP LOCKED
);

-- name: notify_destination_disable
-- 410 Gone: the receiver says this URL is gone for good. Disable it and fail what was waiting for it.
WITH off AS (
    UPDATE notify_destinations SET enabled = false, disabled_reason = $2 WHERE id = $1 RETURNING id
)
UPDATE notify_deliveries d
SET status = 'failed', last_error = 'destination disabled: ' || $2
FROM off
WHERE d.destination_id = off.id AND d.status = 'pending';

-- name: notify_stats
-- The backlog (pending deliveries) and the age of the oldest one, in seconds (0 when none).
SELECT count(*) AS backlog,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age
FROM notify_deliveries
WHERE status = 'pending';

-- name: notify_status_organizations
-- Every organization (the tenancy table is read across tenants): a destination without any delivery yet is listed too.
SELECT id AS organization_id FROM organizations;

-- name: notify_status
-- Per destination: counts by status, the oldest pending delivery's age, the latest error.
SELECT t.organization_id, t.id, t.name, t.kind, t.url_origin, t.enabled,
       count(*) FILTER (WHERE d.status = 'pending') AS pending,
       count(*) FILTER (WHERE d.status = 'delivered') AS delivered,
       count(*) FILTER (WHERE d.status = 'failed') AS failed,
       coalesce(extract(epoch FROM now() - min(d.created_at) FILTER (WHERE d.status = 'pending')), 0)::float8
           AS oldest_pending_age,
       (SELECT last_error FROM notify_deliveries e
        WHERE e.destination_id = t.id AND e.last_error IS NOT NULL
        ORDER BY e.last_attempt_at DESC NULLS LAST LIMIT 1) AS last_error
FROM notify_destinations t
LEFT JOIN notify_deliveries d ON d.destination_id = t.id
WHERE $1::uuid IS NULL OR t.organization_id = $1
GROUP BY t.organization_id, t.id
ORDER BY t.organization_id, t.name;
