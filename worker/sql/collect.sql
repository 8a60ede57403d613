-- The collector's SQL (`cost-worker collect` and `cost-worker keys`). Executed by worker/collect/store.py.

-- name: collect_try_lock
-- One active poller among the replicas: a session-level lock held by the poller's own connection for as long
-- as it polls (the staging transactions run on that same connection, so losing it stops the staging too).
SELECT pg_try_advisory_lock(hashtextextended('cost_worker.collector', 0));

-- name: collect_unlock
SELECT pg_advisory_unlock(hashtextextended('cost_worker.collector', 0));

-- name: collect_accounts
-- Every active provider account, with what is needed to read its admin key.
SELECT id, team_id, provider, ai_organization_id, key_ciphertext, wrapped_key, kek_id, secret_file, fingerprint
FROM organization_api_keys
WHERE is_active
ORDER BY provider, ai_organization_id, id;

-- name: collect_state
SELECT report, collected_through, last_collected_at, last_success_at
FROM collector_state
WHERE account_id = $1;

-- name: collect_newest_revision
-- The latest collected_at already staged for any account and report (NULL before the first poll).
SELECT max(last_collected_at) FROM collector_state;

-- name: collect_state_all
-- Every active account, with when it got its current key (keys add or rotate), and the state of each report
-- it has polled successfully (one row with NULLs when it has none yet).
SELECT k.id AS account_id, k.provider, k.ai_organization_id, greatest(k.created_at, k.rotated_at) AS key_set_at,
       s.report, s.collected_through, s.last_success_at
FROM organization_api_keys k LEFT JOIN collector_state s ON s.account_id = k.id
WHERE k.is_active;

-- name: collect_state_advance
-- $1 account, $2 report, $3 collected_through, $4 collected_at, $5 buckets
INSERT INTO collector_state (account_id, report, collected_through, last_collected_at, last_success_at, buckets)
VALUES ($1, $2, $3, $4, now(), $5)
ON CONFLICT (account_id, report) DO UPDATE
SET collected_through = greatest(collector_state.collected_through, EXCLUDED.collected_through),
    last_collected_at = EXCLUDED.last_collected_at,
    last_success_at = now(),
    buckets = EXCLUDED.buckets;

-- name: collect_stage
-- $1 account, $2 report, $3 topic, $4 keys, $5 messages (one row per bucket, in order)
INSERT INTO collector_outbox (account_id, report, topic, key, message)
SELECT $1, $2, $3, k, m
FROM unnest($4::bytea[], $5::bytea[]) WITH ORDINALITY AS t (k, m, n)
ORDER BY n;

-- name: collect_outbox_claim
-- Oldest first; SKIP LOCKED so a publisher of another replica never sends the same rows at the same time.
SELECT id, report, topic, key, message, (SELECT provider FROM organization_api_keys WHERE id = account_id) AS provider
FROM collector_outbox
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: collect_outbox_delete
DELETE FROM collector_outbox WHERE id = ANY ($1::bigint[]);

-- name: collect_outbox_count
SELECT count(*) FROM collector_outbox;

-- name: keys_insert
INSERT INTO organization_api_keys
    (team_id, provider, ai_organization_id, name, key_ciphertext, wrapped_key, kek_id, secret_file, fingerprint)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id;

-- name: keys_rotate
-- A new key replaces the old one (and reactivates the account).
UPDATE organization_api_keys
SET key_ciphertext = $2, wrapped_key = $3, kek_id = $4, secret_file = $5, fingerprint = $6,
    is_active = true, deactivated_at = NULL, rotated_at = now(), updated_at = now()
WHERE id = $1
RETURNING id;

-- name: keys_sealed
-- The sealed keys whose data key another KEK than $1 wrapped (`keys rewrap`), locked against a concurrent rotate.
SELECT id, provider, ai_organization_id, key_ciphertext, wrapped_key, kek_id
FROM organization_api_keys
WHERE key_ciphertext IS NOT NULL AND kek_id IS DISTINCT FROM $1
ORDER BY provider, ai_organization_id, team_id
FOR UPDATE;

-- name: keys_rewrap
-- The data key wrapped again under another KEK: the admin key, its fingerprint and the account are unchanged.
UPDATE organization_api_keys
SET wrapped_key = $2, kek_id = $3, updated_at = now()
WHERE id = $1
RETURNING id;

-- name: keys_deactivate
UPDATE organization_api_keys
SET is_active = false, deactivated_at = now(), updated_at = now()
WHERE id = $1 AND is_active
RETURNING id;

-- name: keys_get
SELECT id, provider, ai_organization_id FROM organization_api_keys WHERE id = $1;

-- name: keys_list
-- Never the key material: its fingerprint only.
SELECT k.id, k.team_id, k.provider, k.ai_organization_id, k.name, k.fingerprint, k.is_active,
       (k.secret_file IS NOT NULL) AS in_secret_file, k.created_at, k.rotated_at,
       (SELECT max(s.last_success_at) FROM collector_state s WHERE s.account_id = k.id) AS last_success_at
FROM organization_api_keys k
ORDER BY k.provider, k.ai_organization_id, k.team_id;
