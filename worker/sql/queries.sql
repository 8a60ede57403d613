-- Every statement the worker runs. Executed only by worker/store.py.

-- =========================================================================================== migrations

-- name: migration_lock
-- One migrate at a time per database; two replicas racing wait here. Session-level, released explicitly.
SELECT pg_advisory_lock(hashtextextended('cost_worker.migrate', 0));

-- name: migration_try_lock
-- The same lock without waiting inside a statement: a migrate that waits polls this instead, so that it holds no
-- transaction open for the other one's CREATE INDEX CONCURRENTLY to wait for (that would deadlock).
SELECT pg_try_advisory_lock(hashtextextended('cost_worker.migrate', 0));

-- name: migration_unlock
SELECT pg_advisory_unlock(hashtextextended('cost_worker.migrate', 0));

-- name: migration_table_exists
SELECT to_regclass('public.schema_migrations') IS NOT NULL;

-- name: migration_table_create
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migration_table_grant
GRANT SELECT ON schema_migrations TO cost_worker_writer, cost_worker_reader;

-- name: migration_table_add_compat
-- Whether code one release older still runs with the migration applied (schema/migrations/compat.toml).
-- Recorded in the database, because the older code that reads it cannot know the newer manifest.
ALTER TABLE schema_migrations
    ADD COLUMN IF NOT EXISTS compat text CHECK (compat IN ('expand', 'contract'));

-- name: migrations_applied
-- to_jsonb: also reads a table from before the compat column existed (compat is then NULL).
SELECT version, name, checksum, to_jsonb(m) ->> 'compat' AS compat FROM schema_migrations m ORDER BY version;

-- name: migration_record
INSERT INTO schema_migrations (version, name, checksum, compat) VALUES ($1, $2, $3, $4);

-- name: migration_can_become_owner
-- Whether this login may act as the owner role (superusers and members may).
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cost_worker_owner')
   AND pg_has_role(current_user, 'cost_worker_owner', 'MEMBER');

-- name: migration_become_owner
-- Objects created by migrations belong to the owner role, whoever logged in.
SET ROLE cost_worker_owner;

-- ============================================================================================ offsets

-- name: offsets_load
-- The consumed position of the given partitions; partitions never consumed have no row.
SELECT topic, partition, next_offset
FROM consumer_offsets
WHERE group_id = $1 AND (topic, partition) IN (SELECT * FROM unnest($2::text[], $3::int[]));

-- name: offsets_advance
-- Compare-and-set: each partition moves from the offset this worker last saw (expected; NULL = never
-- stored) to the end of its batch. The UPDATE locks the row for the rest of the transaction, so a second
-- consumer of the same partition waits here and then fails the comparison. The caller checks that every
-- partition moved; if one did not, another consumer owns it now and the whole batch is rolled back.
WITH input AS (
    SELECT * FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS t(topic, partition, expected, next_offset)
),
advanced AS (
    UPDATE consumer_offsets o
    SET next_offset = i.next_offset, updated_at = now()
    FROM input i
    WHERE o.group_id = $1 AND o.topic = i.topic AND o.partition = i.partition AND o.next_offset = i.expected
    RETURNING o.topic
),
created AS (
    INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
    SELECT $1, topic, partition, next_offset FROM input WHERE expected IS NULL
    ON CONFLICT (group_id, topic, partition) DO NOTHING
    RETURNING topic
)
SELECT (SELECT count(*) FROM advanced) + (SELECT count(*) FROM created);

-- ============================================================================================ tenancy

-- name: set_tenants
-- Row-level security scope of this transaction: the organizations its rows belong to (comma-separated).
SELECT set_config('cost_worker.organization_ids', $1, true);

-- ============================================================================================ lookups

-- name: lookup_event_references
-- Which of the organizations, projects and users named by API-usage events exist, and whose they are.
SELECT 'organization' AS kind, id, id AS organization_id FROM organizations WHERE id = ANY($1::uuid[])
UNION ALL
SELECT 'project', id, organization_id FROM projects WHERE id = ANY($2::uuid[])
UNION ALL
SELECT 'user', id, organization_id FROM users WHERE id = ANY($3::uuid[]);

-- name: stored_event_keys
-- Which of these API-usage event keys (organization, occurred_at, event_id) api_usage holds, under the transaction's
-- tenant scope: an event whose project or user the platform now places elsewhere is still a redelivery when stored.
SELECT a.organization_id, a.occurred_at, a.event_id
FROM unnest($1::uuid[], $2::timestamptz[], $3::text[]) AS k(organization_id, occurred_at, event_id)
JOIN api_usage a ON a.organization_id = k.organization_id AND a.occurred_at = k.occurred_at
                AND a.event_id = k.event_id;

-- name: lookup_provider_projects
-- Every project of the given provider organizations, plus projects known by their legacy OpenAI id.
SELECT id, organization_id, ai_provider, ai_organization_id, ai_project_id, openai_project_id
FROM projects
WHERE (ai_provider, ai_organization_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
   OR openai_project_id = ANY($3::text[]);

-- name: lookup_prices
-- Every price version of the given (provider, model) pairs.
SELECT id, provider, model, token_type, price_per_million, currency, effective_from
FROM model_prices
WHERE (provider, model) IN (SELECT * FROM unnest($1::text[], $2::text[]));

-- ============================================================================================ ledger

-- name: overlapping_cost_windows
-- Per input window (ord), a stored window of the same (provider, provider account, report) that overlaps it without
-- being it: the same calls at another width (an hourly bucket inside a daily one), which would count twice (README
-- "What counts as spend", rule 1). One index probe per window on cost_windows' primary key: the stored window that
-- starts last before the input window ends. The stored windows of a report do not overlap one another (this check
-- keeps that true from the first window on), so it is the only one that can overlap, unless it is the input window
-- itself, whose stored neighbours then cannot.
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[])
        WITH ORDINALITY AS t(provider, ai_organization_id, report, bucket_start_time, bucket_end_time, ord)
)
SELECT i.ord, w.bucket_start_time, w.bucket_end_time
FROM input i
CROSS JOIN LATERAL (
    SELECT c.bucket_start_time, c.bucket_end_time
    FROM cost_windows c
    WHERE c.provider = i.provider AND c.ai_organization_id = i.ai_organization_id AND c.report = i.report
      AND c.bucket_start_time < i.bucket_end_time
    ORDER BY c.bucket_start_time DESC, c.bucket_end_time DESC
    LIMIT 1
) w
WHERE w.bucket_end_time > i.bucket_start_time
  AND (w.bucket_start_time, w.bucket_end_time) <> (i.bucket_start_time, i.bucket_end_time);

-- name: upsert_cost_windows
-- The revision of each (provider, provider account, report, window) a batch brings (one row per window, ordered
-- by key so concurrent writers lock in the same order). A newer collected_at advances the window; the same or an
-- older one leaves it. Returns per input row (ord): state = 'advanced' | 'same' | 'stale', and the
-- organizations that ever had lines in the window (the retirement of absent lines must see their rows).
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::timestamptz[],
                $7::text[])
        WITH ORDINALITY AS t(provider, ai_organization_id, report, bucket_start_time, bucket_end_time,
                             collected_at, organization_ids, ord)
),
written AS (
    INSERT INTO cost_windows AS w (
        provider, ai_organization_id, report, bucket_start_time, bucket_end_time, collected_at, organization_ids
    )
    SELECT provider, ai_organization_id, report, bucket_start_time, bucket_end_time, collected_at,
           organization_ids::uuid[]
    FROM input
    ORDER BY ord
    ON CONFLICT (provider, ai_organization_id, report, bucket_start_time, bucket_end_time)
    DO UPDATE SET
        collected_at = greatest(w.collected_at, EXCLUDED.collected_at),
        organization_ids = ARRAY(SELECT DISTINCT o FROM unnest(w.organization_ids || EXCLUDED.organization_ids) AS o
                                 ORDER BY o),
        updated_at = now()
    WHERE w.collected_at <= EXCLUDED.collected_at
    RETURNING w.provider, w.ai_organization_id, w.report, w.bucket_start_time, w.bucket_end_time,
              w.organization_ids, (w.xmax = 0) AS inserted
)
-- Not written: a newer revision is stored (possibly by a concurrent writer this statement waited for). Written:
-- 'same' when the revision before (this statement's snapshot) was this one, else 'advanced' (retiring older lines
-- of a window that was in fact already at this revision retires nothing, so a stale snapshot is harmless).
SELECT i.ord,
       CASE WHEN w.provider IS NULL THEN 'stale'
            WHEN k.collected_at = i.collected_at THEN 'same'
            ELSE 'advanced' END AS state,
       coalesce(w.organization_ids, '{}') AS organization_ids
FROM input i
LEFT JOIN written w
  ON w.provider = i.provider AND w.ai_organization_id = i.ai_organization_id AND w.report = i.report
 AND w.bucket_start_time = i.bucket_start_time AND w.bucket_end_time = i.bucket_end_time
LEFT JOIN LATERAL (  -- the revision before this statement (the statement's snapshot)
    SELECT c.collected_at FROM cost_windows c
    WHERE c.provider = i.provider AND c.ai_organization_id = i.ai_organization_id AND c.report = i.report
      AND c.bucket_start_time = i.bucket_start_time AND c.bucket_end_time = i.bucket_end_time
    LIMIT 1
) k ON true;

-- name: retire_cost_data
-- A window advanced to a new revision: its lines of earlier revisions stop counting (kept, marked superseded,
-- never deleted). Returns the retired lines' scopes and windows (their budgets are re-evaluated).
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::timestamptz[])
        AS t(provider, ai_organization_id, report, bucket_start_time, bucket_end_time, collected_at)
)
UPDATE cost_data c SET superseded_at = now(), updated_at = now()
FROM input i
WHERE c.provider = i.provider AND c.ai_organization_id = i.ai_organization_id AND c.report = i.report
  AND c.bucket_start_time = i.bucket_start_time AND c.bucket_end_time = i.bucket_end_time
  AND c.collected_at < i.collected_at AND c.superseded_at IS NULL
RETURNING c.organization_id, c.project_id, c.provider, c.ai_organization_id, c.report,
          c.api_version::text AS api_version, c.bucket_start_time, c.bucket_end_time;

-- name: usage_beside_costs
-- The counted usage lines a change of these cost lines (or unpriced usage lines, migration 0031) may replace or
-- release (README "What counts as spend", rule 2: a cost row or an unpriced usage line of the provider account
-- covering one of a usage line's hours for the same project, or either without a project). Each counts in the period of ITS window's midpoint, which may lie outside the cost
-- line's window (a daily usage bucket beside an hourly cost bucket), so budgets re-evaluate those periods too;
-- a usage window inside the cost line's window is left out (its periods are the cost line's own). A superset is
-- harmless (at worst a period is evaluated for nothing), so the project is not matched: one index range per
-- organization and provider account (its longest window from spend_reach, else the longest allowed, 31 days,
-- before the changed windows' span), then the distinct usage windows there against the distinct changed windows.
WITH changed AS (
    SELECT DISTINCT organization_id, provider, ai_organization_id, bucket_start_time, bucket_end_time
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[])
        AS t(organization_id, project_id, provider, ai_organization_id, bucket_start_time, bucket_end_time)
),
accounts AS (
    SELECT c.organization_id, c.provider, c.ai_organization_id,
           min(c.bucket_start_time) AS span_start, max(c.bucket_end_time) AS span_end
    FROM changed c
    GROUP BY c.organization_id, c.provider, c.ai_organization_id
),
usage_windows AS MATERIALIZED (
    SELECT DISTINCT u.organization_id, u.project_id, u.provider, u.ai_organization_id,
           u.bucket_start_time, u.bucket_end_time
    FROM accounts a
    LEFT JOIN spend_reach r ON r.organization_id = a.organization_id
    CROSS JOIN LATERAL (
        -- OFFSET 0 keeps this a probe per account: flattened into a join, the planner (which cannot count the
        -- tenants' rows under row-level security) hashed every row of the batch's organizations instead, 2.1
        -- million rows for 20 accounts in the benchmark's grown tables (1.4 s per batch).
        SELECT c.organization_id, c.project_id, c.provider, c.ai_organization_id, c.bucket_start_time,
               c.bucket_end_time
        FROM cost_data c
        WHERE c.organization_id = a.organization_id
          AND c.bucket_start_time >= a.span_start - coalesce(r.window_max, interval '31 days')
          AND c.bucket_start_time < a.span_end
          AND c.provider = a.provider AND c.ai_organization_id = a.ai_organization_id
          AND c.bucket_end_time > a.span_start
          AND c.api_version = 'usage_v1' AND c.superseded_at IS NULL AND c.amount IS NOT NULL
        OFFSET 0
    ) u
)
SELECT DISTINCT u.organization_id, u.project_id, u.bucket_start_time, u.bucket_end_time
FROM usage_windows u
JOIN changed c
  ON c.organization_id = u.organization_id AND c.provider = u.provider AND c.ai_organization_id = u.ai_organization_id
WHERE u.bucket_start_time < c.bucket_end_time AND u.bucket_end_time > c.bucket_start_time
  AND (u.bucket_start_time < c.bucket_start_time OR u.bucket_end_time > c.bucket_end_time);

-- name: upsert_cost_data
-- Set-based upsert of the lines of windows at their current revision (already one row per key, ordered by key
-- so concurrent writers lock rows in the same order). A line of a newer revision replaces the row (and revives
-- it if it was superseded); the same revision changes nothing. Returns, per input row (ord): written =
-- 'inserted' | 'updated' | NULL (not written), and for rows not written, the revision that stayed (a
-- primary-key-like probe each; LIMIT 1 keeps the planner from scanning the tenants' rows instead, which it
-- cannot count under row-level security).
WITH input AS (
    SELECT *
    FROM unnest(
        $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::cost_api_version[],
        $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::numeric[], $12::numeric[],
        $13::text[], $14::text[], $15::timestamptz[], $16::int[], $17::bigint[], $18::text[], $19::boolean[]
    ) WITH ORDINALITY AS t(
        organization_id, project_id, provider, ai_organization_id, ai_project_id, api_version,
        bucket_start_time, bucket_end_time, line_item, currency, amount, quantity,
        unit, metadata, collected_at, source_partition, source_offset, report, outside_cost_report, ord
    )
),
written AS (
    INSERT INTO cost_data AS c (
        organization_id, project_id, provider, ai_organization_id, ai_project_id, api_version,
        bucket_start_time, bucket_end_time, line_item, currency, amount, quantity, unit, metadata,
        collected_at, source_partition, source_offset, report, outside_cost_report
    )
    SELECT organization_id, project_id, provider, ai_organization_id, ai_project_id, api_version,
           bucket_start_time, bucket_end_time, line_item, currency, amount, quantity, unit, metadata::jsonb,
           collected_at, source_partition, source_offset, report, outside_cost_report
    FROM input
    ORDER BY ord
    ON CONFLICT (project_id, bucket_start_time, bucket_end_time, line_item, report,
                 organization_id, provider, ai_organization_id)
    DO UPDATE SET
        ai_project_id = EXCLUDED.ai_project_id,
        api_version = EXCLUDED.api_version,
        currency = EXCLUDED.currency,
        amount = EXCLUDED.amount,
        quantity = EXCLUDED.quantity,
        unit = EXCLUDED.unit,
        metadata = EXCLUDED.metadata,
        collected_at = EXCLUDED.collected_at,
        source_partition = EXCLUDED.source_partition,
        source_offset = EXCLUDED.source_offset,
        outside_cost_report = EXCLUDED.outside_cost_report,
        superseded_at = NULL,
        updated_at = now()
    WHERE c.collected_at < EXCLUDED.collected_at
    -- xmax is 0 on a freshly inserted row and set on a row that ON CONFLICT updated.
    RETURNING c.organization_id, c.project_id, c.provider, c.ai_organization_id, c.report,
              c.bucket_start_time, c.bucket_end_time, c.line_item, (c.xmax = 0) AS inserted
),
outcome AS (
    SELECT i.*, CASE WHEN w.inserted THEN 'inserted' WHEN w.inserted IS NOT NULL THEN 'updated' END AS result
    FROM input i
    LEFT JOIN written w
      ON coalesce(w.project_id, '00000000-0000-0000-0000-000000000000'::uuid)
         = coalesce(i.project_id, '00000000-0000-0000-0000-000000000000'::uuid)
     AND w.bucket_start_time = i.bucket_start_time AND w.bucket_end_time = i.bucket_end_time
     AND w.line_item = i.line_item AND w.report = i.report
     AND w.organization_id = i.organization_id AND w.provider = i.provider
     AND w.ai_organization_id = i.ai_organization_id
)
SELECT o.ord, o.result, kept.collected_at AS kept_revision
FROM outcome o
LEFT JOIN LATERAL (
    (SELECT c.collected_at FROM cost_data c
     WHERE o.result IS NULL AND c.project_id = o.project_id
       AND c.bucket_start_time = o.bucket_start_time AND c.bucket_end_time = o.bucket_end_time
       AND c.line_item = o.line_item AND c.report = o.report
       AND c.organization_id = o.organization_id AND c.provider = o.provider
       AND c.ai_organization_id = o.ai_organization_id
     LIMIT 1)
    UNION ALL
    (SELECT c.collected_at FROM cost_data c
     WHERE o.result IS NULL AND o.project_id IS NULL AND c.project_id IS NULL
       AND c.bucket_start_time = o.bucket_start_time AND c.bucket_end_time = o.bucket_end_time
       AND c.line_item = o.line_item AND c.report = o.report
       AND c.organization_id = o.organization_id AND c.provider = o.provider
       AND c.ai_organization_id = o.ai_organization_id
     LIMIT 1)
    LIMIT 1
) kept ON true;

-- name: insert_api_usage
-- Set-based insert of API-usage events (one per (organization, occurred_at, event_id), ordered by key). First write
-- wins. Only rows this statement inserted add into the hourly rollups, in the same statement, so a
-- replayed event changes nothing. Returns the ids whose stored content differs (conflicting duplicates), how many
-- events were inserted, and the (organization, project, user, hour) scopes budgets may have to evaluate.
-- api_usage is partitioned by month (0011): its key is (organization, occurred_at, event_id), so a redelivery
-- (same occurred_at) conflicts and the same id at another instant is another event (README "Partitions and
-- retention" says why). Time leads the key within an organization (0014): inserts go to the right edge of the
-- index, not to a random page of it.
-- Stored content is looked up only for the rows the insert did not take (none, usually), one primary-key
-- probe each (LIMIT 1 keeps the planner from turning the probes into a scan of the tenants' rows: under
-- row-level security it cannot see how many rows that is).
-- The events come as one array of rows (cost_worker_api_usage_input, 0015), not an array per column: asyncpg
-- encodes a row's fields directly, while every element of an array argument is checked and encoded on its own.
WITH input AS (
    SELECT * FROM unnest($1::cost_worker_api_usage_input[])
),
inserted AS (
    INSERT INTO api_usage (
        organization_id, event_id, project_id, user_id, endpoint, method, status_code, response_time_ms,
        occurred_at, prompt_tokens, completion_tokens, total_tokens, model, cost_usd,
        source_partition, source_offset, provider, catalogue_cost_usd, price_source
    )
    SELECT * FROM input
    ON CONFLICT (organization_id, occurred_at, event_id) DO NOTHING
    RETURNING organization_id, event_id, project_id, user_id, status_code, response_time_ms, occurred_at,
              prompt_tokens, completion_tokens, total_tokens, cost_usd, provider, catalogue_cost_usd
),
conflicts AS (
    SELECT i.organization_id, i.event_id, i.occurred_at
    FROM (SELECT * FROM input i
          WHERE NOT EXISTS (SELECT FROM inserted n
                            WHERE n.organization_id = i.organization_id AND n.event_id = i.event_id
                              AND n.occurred_at = i.occurred_at)) i
    CROSS JOIN LATERAL (
        SELECT a.project_id, a.user_id, a.endpoint, a.method, a.status_code, a.response_time_ms, a.occurred_at,
               a.prompt_tokens, a.completion_tokens, a.total_tokens, a.model, a.cost_usd
        FROM api_usage a
        WHERE a.organization_id = i.organization_id AND a.event_id = i.event_id AND a.occurred_at = i.occurred_at
        LIMIT 1
    ) a
    WHERE (a.project_id, a.user_id, a.endpoint, a.method, a.status_code, a.response_time_ms, a.occurred_at,
           a.prompt_tokens, a.completion_tokens, a.total_tokens, a.model, a.cost_usd)
          IS DISTINCT FROM
          (i.project_id, i.user_id, i.endpoint, i.method, i.status_code, i.response_time_ms, i.occurred_at,
           i.prompt_tokens, i.completion_tokens, i.total_tokens, i.model, i.cost_usd)
),
hourly AS (  -- per provider of the events' models (NULL: unknown), which decides what replaces the estimate
    SELECT organization_id, project_id, user_id, provider,
           date_trunc('hour', occurred_at, 'UTC') AS hour,
           count(*) AS requests,
           count(*) FILTER (WHERE status_code >= 400) AS errors,
           coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
           coalesce(sum(completion_tokens), 0) AS completion_tokens,
           coalesce(sum(total_tokens), 0) AS total_tokens,
           -- the platform's cost_usd, else the catalogue's estimate (events carry one or the other, or none)
           coalesce(sum(coalesce(cost_usd, catalogue_cost_usd)), 0) AS cost,
           coalesce(sum(cost_usd), 0) AS platform_cost,
           coalesce(sum(catalogue_cost_usd) FILTER (WHERE cost_usd IS NULL), 0) AS catalogue_cost,
           coalesce(sum(response_time_ms), 0) AS latency_sum,
           coalesce(max(response_time_ms), 0) AS latency_max
    FROM inserted
    GROUP BY 1, 2, 3, 4, 5
),
project_rollup AS (
    INSERT INTO project_metrics AS m (
        organization_id, project_id, hour, provider, request_count, error_count, prompt_tokens, completion_tokens,
        total_tokens, estimated_cost_usd, latency_sum_ms, latency_max_ms, platform_cost_usd, catalogue_cost_usd
    )
    SELECT organization_id, project_id, hour, provider, sum(requests), sum(errors), sum(prompt_tokens),
           sum(completion_tokens), sum(total_tokens), sum(cost), sum(latency_sum), max(latency_max),
           sum(platform_cost), sum(catalogue_cost)
    FROM hourly
    GROUP BY organization_id, project_id, hour, provider
    ORDER BY organization_id, project_id, hour, provider
    ON CONFLICT (organization_id, project_id, hour, provider) DO UPDATE SET
        request_count = m.request_count + EXCLUDED.request_count,
        error_count = m.error_count + EXCLUDED.error_count,
        prompt_tokens = m.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = m.completion_tokens + EXCLUDED.completion_tokens,
        total_tokens = m.total_tokens + EXCLUDED.total_tokens,
        estimated_cost_usd = m.estimated_cost_usd + EXCLUDED.estimated_cost_usd,
        platform_cost_usd = m.platform_cost_usd + EXCLUDED.platform_cost_usd,
        catalogue_cost_usd = m.catalogue_cost_usd + EXCLUDED.catalogue_cost_usd,
        latency_sum_ms = m.latency_sum_ms + EXCLUDED.latency_sum_ms,
        latency_max_ms = greatest(m.latency_max_ms, EXCLUDED.latency_max_ms),
        updated_at = now()
),
user_rollup AS (
    INSERT INTO user_metrics AS m (
        organization_id, user_id, project_id, hour, provider, request_count, total_tokens, estimated_cost_usd,
        platform_cost_usd, catalogue_cost_usd
    )
    SELECT organization_id, user_id, project_id, hour, provider, requests, total_tokens, cost, platform_cost,
           catalogue_cost
    FROM hourly
    WHERE user_id IS NOT NULL
    ORDER BY user_id, hour, project_id, provider, organization_id
    ON CONFLICT (user_id, hour, project_id, provider, organization_id) DO UPDATE SET
        request_count = m.request_count + EXCLUDED.request_count,
        total_tokens = m.total_tokens + EXCLUDED.total_tokens,
        estimated_cost_usd = m.estimated_cost_usd + EXCLUDED.estimated_cost_usd,
        platform_cost_usd = m.platform_cost_usd + EXCLUDED.platform_cost_usd,
        catalogue_cost_usd = m.catalogue_cost_usd + EXCLUDED.catalogue_cost_usd,
        updated_at = now()
)
SELECT 'conflict' AS kind, organization_id, event_id, NULL::uuid AS project_id, NULL::uuid AS user_id,
       occurred_at AS at, 0::bigint AS requests  -- at: the conflicting event's occurred_at; the touched hour below
FROM conflicts
UNION ALL
SELECT 'inserted', NULL, NULL, NULL, NULL, NULL, count(*) FROM inserted
UNION ALL
-- The touched (organization, project, user, hour) scopes, only of organizations with an active budget of any scope:
-- budget_candidates finds nothing for the others, and most organizations have none (a batch inserts one row per
-- user and hour, ~4,600 per 5,000 events in the benchmark, each built, hashed and sent back by the worker). A budget
-- committed after this statement is evaluated when its scope is next touched or swept, as if created after it.
SELECT 'touched', h.organization_id, NULL, h.project_id, h.user_id, h.hour, 0
FROM (SELECT DISTINCT organization_id, project_id, user_id, hour FROM hourly) h
WHERE h.organization_id IN (
    SELECT o.organization_id FROM (SELECT DISTINCT organization_id FROM hourly) o
    WHERE EXISTS (SELECT FROM cost_worker_budgets b WHERE b.organization_id = o.organization_id AND b.is_active)
);

-- ============================================================================================ quarantine

-- name: insert_quarantine
-- Quarantine rows (one per source message: a redelivered bad message is not stored twice) and, for each
-- newly quarantined message, a dead-letter copy in the outbox: key = source coordinates, value = the raw
-- payload (truncated to $11 bytes; the full payload stays in the quarantine table).
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::bytea[], $7::bytea[],
                $8::text[], $9::uuid[])
      AS t(reason, detail, source_topic, source_partition, source_offset, message_key, payload, headers,
           organization_id)
),
quarantined AS (
    INSERT INTO quarantine (
        reason, detail, source_topic, source_partition, source_offset, message_key, payload, headers,
        organization_id
    )
    SELECT reason, detail, source_topic, source_partition, source_offset, message_key, payload,
           headers::jsonb, organization_id
    FROM input
    ON CONFLICT (source_topic, source_partition, source_offset) DO NOTHING
    RETURNING id, reason, detail, source_topic, source_partition, source_offset, payload
)
INSERT INTO outbox (topic, key, value, headers)
SELECT $10,
       convert_to(source_topic || ':' || source_partition || ':' || source_offset, 'UTF8'),
       substring(payload FROM 1 FOR $11),
       jsonb_build_object(
           'source_topic', source_topic,
           'source_partition', source_partition::text,
           'source_offset', source_offset::text,
           'reason', reason,
           'detail', left(detail, 500),
           'quarantine_id', id::text,
           'truncated', (length(payload) > $11)::text
       )
FROM quarantined
ORDER BY id
RETURNING id;

-- name: quarantine_list
SELECT id, reason, detail, source_topic, source_partition, source_offset, length(payload) AS size,
       status, replay_count, quarantined_at, replayed_at
FROM quarantine
WHERE ($1::text IS NULL OR reason = $1) AND ($2::text IS NULL OR status = $2)
ORDER BY id DESC
LIMIT $3;

-- name: quarantine_pending
-- Pending quarantined messages to replay, oldest first, locked so two replays never take the same rows. Only those
-- of the input topics $3 (the kind of a message is its topic's: another topic's would be decoded as the wrong kind).
SELECT id, reason, source_topic, source_partition, source_offset, message_key, payload, headers
FROM quarantine
WHERE status = 'pending' AND ($1::text IS NULL OR reason = $1) AND source_topic = ANY($3::text[])
ORDER BY id
LIMIT $2
FOR UPDATE SKIP LOCKED;

-- name: quarantine_pending_elsewhere
-- Pending quarantined messages of topics other than the input topics $2 (replay leaves them), per topic.
SELECT source_topic, count(*) AS messages
FROM quarantine
WHERE status = 'pending' AND ($1::text IS NULL OR reason = $1) AND NOT (source_topic = ANY($2::text[]))
GROUP BY source_topic
ORDER BY source_topic;

-- name: quarantine_mark_replayed
UPDATE quarantine SET status = 'replayed', replayed_at = now(), replay_count = replay_count + 1
WHERE id = ANY($1::bigint[]);

-- name: quarantine_requarantine
-- A replayed message that is still bad keeps its row, with the reason it fails for now.
UPDATE quarantine q SET reason = i.reason, detail = i.detail, replay_count = q.replay_count + 1
FROM unnest($1::bigint[], $2::text[], $3::text[]) AS i(id, reason, detail)
WHERE q.id = i.id;

-- ============================================================================================ outbox

-- name: outbox_claim
-- The oldest unpublished rows, locked so several replicas split the backlog instead of racing on it.
-- Rows that failed before go last, so one poison message cannot hold up the rest of the outbox.
-- Ordering guarantee, enforced here: the rows of one (topic, key) reach the topic in the order they were written.
-- A row is claimed only when no earlier row of its key is left (failed, or locked by another replica publishing
-- it; index outbox_key_order, 0027): a resolved alert never overtakes its triggered one. A poison row holds up
-- its own key only. Rows of one key are written in commit order (an organization's alerts are written under its
-- lock), so a smaller id is never committed after a larger one of the same key.
SELECT o.id, o.topic, o.key, o.value, o.headers
FROM outbox o
WHERE NOT EXISTS (SELECT 1 FROM outbox e WHERE e.topic = o.topic AND e.key = o.key AND e.id < o.id)
ORDER BY o.attempts, o.id
LIMIT $1
FOR UPDATE OF o SKIP LOCKED;

-- name: outbox_delete
DELETE FROM outbox WHERE id = ANY($1::bigint[]);

-- name: outbox_failed
UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1::bigint[]);

-- name: outbox_stats
SELECT count(*) AS backlog, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age
FROM outbox;

-- ============================================================================================ budgets

-- name: budget_candidates
-- The (budget, period) pairs a batch touched: active budgets (cost_worker_budgets, 0012) whose scope matches a
-- touched row, for the period containing the touched time (late data re-evaluates the period it belongs to),
-- each with its alert history in that period (start and end, 0024) at the amount and currency that judge it
-- (cost_worker_alert_history: per threshold, the latest crossing and its id while it is open). Every pair is
-- evaluated, also when all its thresholds alerted: spend may have fallen.
-- Each scope's active budgets are found through that scope's own index (organization, project, user) from the
-- distinct touched ids, so the cost follows the touched scopes, not the number of budgets an organization has.
WITH touched AS (
    SELECT DISTINCT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[], $5::timestamptz[],
                                  $6::timestamptz[])
        AS t(organization_id, project_id, user_id, at, span_start, span_end)
),
budgets AS (
    SELECT b.* FROM cost_worker_budgets b
    WHERE b.scope = 'organization' AND b.is_active
      AND b.organization_id = ANY (ARRAY(SELECT DISTINCT t.organization_id FROM touched t))
    UNION ALL
    SELECT b.* FROM cost_worker_budgets b
    WHERE b.scope = 'project' AND b.is_active
      AND b.project_id = ANY (ARRAY(SELECT DISTINCT t.project_id FROM touched t WHERE t.project_id IS NOT NULL))
    UNION ALL
    SELECT b.* FROM cost_worker_budgets b
    WHERE b.scope = 'user' AND b.is_active
      AND b.user_id = ANY (ARRAY(SELECT DISTINCT t.user_id FROM touched t WHERE t.user_id IS NOT NULL))
),
matched AS (
    SELECT b.*, t.at, t.span_start, t.span_end
    FROM touched t
    JOIN budgets b
      ON b.organization_id = t.organization_id
     AND CASE b.scope WHEN 'organization' THEN true
                      WHEN 'project' THEN b.project_id = t.project_id
                      ELSE b.user_id = t.user_id AND (b.project_id IS NULL OR b.project_id = t.project_id) END
),
-- The period of every distinct (kind, time zone, instant) and the periods of every distinct provider span, computed
-- once each and joined back: a batch's touched rows share a few hours and its budgets a few (kind, zone) pairs, so
-- this is tens of period computations where one per (budget, touched row) was thousands (cost_worker_period is a
-- SQL function called per row: ~9,000 calls, ~60 ms, for a batch spread over 1,000 organizations).
instants AS MATERIALIZED (
    SELECT x.period, x.timezone, x.at, p.period_start, p.period_end
    FROM (SELECT DISTINCT m.period, m.timezone, m.at FROM matched m) x
    CROSS JOIN LATERAL cost_worker_period(x.period, x.timezone, x.at) p
),
spans AS MATERIALIZED (
    SELECT x.period, x.timezone, x.span_start, x.span_end, p.period_start, p.period_end
    FROM (SELECT DISTINCT m.period, m.timezone, m.span_start, m.span_end FROM matched m
          WHERE m.span_start IS NOT NULL) x
    CROSS JOIN LATERAL cost_worker_periods(x.period, x.timezone, x.span_start, x.span_end) p
),
periods AS (
    -- The period containing `at` (a provider row's window midpoint, an estimate's hour) and, for a provider row,
    -- every other period its window overlaps (its coverage of estimate hours reaches them).
    SELECT DISTINCT p.scope, p.id, p.organization_id, p.project_id, p.user_id, p.name, p.amount, p.currency,
           p.period::text AS period, p.timezone, p.thresholds, p.period_start, p.period_end
    FROM (SELECT m.*, i.period_start, i.period_end
          FROM matched m
          JOIN instants i ON i.period = m.period AND i.timezone = m.timezone AND i.at = m.at
          UNION ALL
          SELECT m.*, s.period_start, s.period_end
          FROM matched m
          JOIN spans s ON s.period = m.period AND s.timezone = m.timezone AND s.span_start = m.span_start
                      AND s.span_end = m.span_end) p
),
-- A period that has ended is judged by the version of the budget's terms in force when it ended (0033: one index
-- probe each; none for an open period, judged by today's terms).
judged AS MATERIALIZED (
    SELECT p.*, t.amount AS then_amount, t.currency AS then_currency, t.thresholds AS then_thresholds,
           t.period AS then_period, t.timezone AS then_timezone,
           t.period IS NOT NULL AND (t.period, t.timezone) IS DISTINCT FROM (p.period, p.timezone::text) AS moved
    FROM periods p
    LEFT JOIN LATERAL cost_worker_budget_terms_at(p.scope, p.id, p.period_end) t ON true
),
-- Rare: the version at an ended period's end had another kind or zone, so that period was no period of the budget
-- then. The periods the touched data had under that kind and zone instead (each distinct kind, zone and instant or
-- span computed once, as above), each judged by the version at its end when that has the same kind and zone.
moved_from AS MATERIALIZED (
    SELECT DISTINCT j.scope, j.id, j.organization_id, j.project_id, j.user_id, j.name, j.period_start AS was_start,
           j.then_period AS period, j.then_timezone AS timezone, m.at, m.span_start, m.span_end
    FROM judged j
    JOIN matched m
      ON m.scope = j.scope AND m.id = j.id
     AND ((m.at >= j.period_start AND m.at < j.period_end)
          OR (m.span_start < j.period_end AND m.span_end > j.period_start))
    WHERE j.moved
),
moved_periods AS MATERIALIZED (
    SELECT k.period, k.timezone, k.at, k.span_start, k.span_end, q.period_start, q.period_end
    FROM (SELECT DISTINCT f.period, f.timezone, f.at, f.span_start, f.span_end FROM moved_from f) k
    CROSS JOIN LATERAL (
        SELECT c.period_start, c.period_end FROM cost_worker_period(k.period::budget_period, k.timezone, k.at) c
        UNION
        SELECT c.period_start, c.period_end
        FROM cost_worker_periods(k.period::budget_period, k.timezone, k.span_start, k.span_end) c
        WHERE k.span_start IS NOT NULL) q
),
moved AS (
    SELECT x.*, w.amount AS then_amount, w.currency AS then_currency, w.thresholds AS then_thresholds
    FROM (SELECT DISTINCT f.scope, f.id, f.organization_id, f.project_id, f.user_id, f.name, f.was_start, f.period,
                 f.timezone, p.period_start, p.period_end
          FROM moved_from f
          JOIN moved_periods p
            ON p.period = f.period AND p.timezone = f.timezone AND p.at = f.at
           AND p.span_start IS NOT DISTINCT FROM f.span_start AND p.span_end IS NOT DISTINCT FROM f.span_end) x
    JOIN LATERAL cost_worker_budget_terms_at(x.scope, x.id, x.period_end) w
      ON w.period = x.period AND w.timezone = x.timezone
),
candidates AS (
    SELECT j.scope, j.id, j.organization_id, j.project_id, j.user_id, j.name,
           CASE WHEN j.then_period IS NULL THEN j.amount ELSE j.then_amount END AS amount,
           CASE WHEN j.then_period IS NULL THEN j.currency ELSE j.then_currency END AS currency,
           j.period, j.timezone,
           CASE WHEN j.then_period IS NULL THEN j.thresholds ELSE j.then_thresholds END AS thresholds,
           j.period_start, j.period_end
    FROM judged j
    WHERE NOT j.moved
    UNION
    SELECT v.scope, v.id, v.organization_id, v.project_id, v.user_id, v.name, v.then_amount, v.then_currency,
           v.period, v.timezone, v.then_thresholds, v.period_start, v.period_end
    FROM moved v
    UNION
    -- Neither (the kind or zone changed back and forth): today's terms judge the period computed today, as before.
    SELECT j.scope, j.id, j.organization_id, j.project_id, j.user_id, j.name, j.amount, j.currency, j.period,
           j.timezone, j.thresholds, j.period_start, j.period_end
    FROM judged j
    WHERE j.moved AND (j.scope, j.id, j.period_start) NOT IN (SELECT v.scope, v.id, v.was_start FROM moved v)
)
SELECT c.*, a.alert_thresholds, a.alert_crossings, a.alert_open_ids
FROM candidates c
CROSS JOIN LATERAL cost_worker_alert_history(c.scope, c.id, c.period_start, c.period_end, c.amount, c.currency) a;

-- name: budget_sweep_organizations
-- Organizations with at least one active budget (the sweep evaluates them a chunk at a time).
SELECT organization_id FROM ai_organization_budgets WHERE is_active
UNION
SELECT organization_id FROM ai_project_budgets WHERE is_active
UNION
SELECT organization_id FROM ai_budgets WHERE is_active
ORDER BY 1;

-- name: budget_active
-- Every active budget of the given organizations in the period containing $2 (the sweep; `budgets status`),
-- with its alert history at its current amount and currency (as in budget_candidates: a period containing $2 that
-- has ended, a sweep at a past instant, by the terms in force when it ended if they had today's kind and zone).
-- The period of each distinct (kind, time zone) is computed once and joined back (as in budget_candidates).
WITH active AS (
    SELECT * FROM cost_worker_budgets WHERE is_active AND organization_id = ANY($1::uuid[])
),
periods AS MATERIALIZED (
    SELECT k.period, k.timezone, p.period_start, p.period_end
    FROM (SELECT DISTINCT period, timezone FROM active) k
    CROSS JOIN LATERAL cost_worker_period(k.period, k.timezone, $2::timestamptz) p
)
SELECT b.scope, b.id, b.organization_id, b.project_id, b.user_id, b.name, j.amount, j.currency,
       b.period::text AS period, b.timezone, j.thresholds, p.period_start, p.period_end,
       a.alert_thresholds, a.alert_crossings, a.alert_open_ids
FROM active b
JOIN periods p ON p.period = b.period AND p.timezone = b.timezone
LEFT JOIN LATERAL cost_worker_budget_terms_at(b.scope, b.id, p.period_end) t
       ON t.period = b.period::text AND t.timezone = b.timezone
CROSS JOIN LATERAL (SELECT coalesce(t.amount, b.amount) AS amount, coalesce(t.currency, b.currency) AS currency,
                           coalesce(t.thresholds, b.thresholds) AS thresholds) j
CROSS JOIN LATERAL cost_worker_alert_history(b.scope, b.id, p.period_start, p.period_end, j.amount, j.currency) a
ORDER BY b.organization_id, b.scope, b.name, b.id;

-- name: budget_lock_organizations
-- Serialises budget evaluation per organization across workers until this transaction ends, so the
-- second of two concurrent batches sees the first one's committed spend (no threshold slips between
-- them). Taken in one order (sorted) by everyone, so the locks cannot deadlock among themselves.
SELECT count(pg_advisory_xact_lock(hashtextextended('cost_worker.budgets:' || o::text, 0)))
FROM (SELECT o FROM unnest($1::uuid[]) AS o ORDER BY o) AS sorted;

-- name: spend_track
-- Register the scopes of these user budgets (scope, organization, project, user) in the spend aggregate (0016: a
-- user's scopes are kept once a budget names them), building a new one in this transaction; returns how many were
-- new (usually none: one index probe each); at most $5 new ones per call.
SELECT cost_worker_spend_track($1::text[], $2::uuid[], $3::uuid[], $4::uuid[], $5::integer);

-- name: budget_spend
-- Spend of each (scope, period) in the budget's currency, by the rule in cost_worker_spend(), read from the spend
-- aggregate for all of them in one statement (cost_worker_spend_many, 0012; NULL spend: unconvertible, a rate is
-- missing; missing_rates says which).
SELECT s.ord, s.spend, s.foreign_rows, s.missing_rates
FROM cost_worker_spend_many($1::text[], $2::uuid[], $3::uuid[], $4::uuid[], $5::timestamptz[], $6::timestamptz[],
                            $7::text[]) s;

-- name: spend_rebuild
-- Rebuild one organization's spend aggregate (0012) from its ledger lines and rollups: after rows were loaded with
-- the triggers off (pg_restore --disable-triggers, session_replication_role = replica, logical replication).
SELECT cost_worker_spend_rebuild(ARRAY[$1::uuid]);

-- name: spend_rebuilds_queued
-- Organizations whose spend aggregate a migration queued for a rebuild (0044), oldest first (across tenants: the
-- writer's worker_sweep policy).
SELECT organization_id FROM spend_rebuilds ORDER BY queued_at, organization_id;

-- name: spend_rebuild_dequeue
-- Take one organization off the queue (inside its own scope), in the transaction that rebuilds it: the row lock
-- makes a second rebuilder wait for this commit and then find nothing to do.
DELETE FROM spend_rebuilds WHERE organization_id = $1 RETURNING reason;

-- name: budget_unpriced
-- Unpriced usage lines counting in each (scope, period): they count nothing and keep the estimate of their
-- hours, and the priced usage beside them counts nothing there either (migration 0031).
SELECT i.ord, cost_worker_unpriced_lines(i.scope, i.organization_id, i.project_id, i.period_start, i.period_end) AS n
FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::timestamptz[], $5::timestamptz[])
    WITH ORDINALITY AS i(scope, organization_id, project_id, period_start, period_end, ord);

-- name: insert_alerts
-- One alert per (budget, period start, threshold, amount, currency, crossing): ON CONFLICT DO NOTHING makes a
-- second evaluation of the same crossing (a replay, a concurrent worker, the sweep) a no-op. Only alerts
-- inserted here get an outbox row, so each alert is published once (at least once, keyed by the stable
-- alert id).
WITH input AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::uuid[], $7::timestamptz[],
                $8::timestamptz[], $9::numeric[], $10::numeric[], $11::numeric[], $12::text[], $13::numeric[],
                $14::bytea[], $15::bytea[], $18::int[])
      AS t(id, scope, budget_id, organization_id, project_id, user_id, period_start, period_end, threshold,
           spend, amount, currency, percent_used, message, message_key, crossing)
),
inserted AS (
    INSERT INTO budget_alerts (
        id, scope, budget_id, organization_id, project_id, user_id, period_start, period_end, threshold,
        spend, amount, currency, percent_used, raised_at, crossing
    )
    SELECT id, scope, budget_id, organization_id, project_id, user_id, period_start, period_end, threshold,
           spend, amount, currency, percent_used, $17, crossing
    FROM input
    ORDER BY scope, budget_id, period_start, threshold
    ON CONFLICT DO NOTHING
    RETURNING id
)
INSERT INTO outbox (topic, key, value, headers)
SELECT $16, i.message_key, i.message,
       jsonb_build_object('alert_id', i.id::text, 'scope', i.scope, 'type', 'budget.alert.triggered',
                          'delivery_id', i.id::text)
FROM input i JOIN inserted USING (id)
RETURNING headers->>'alert_id' AS alert_id;

-- name: resolve_alerts
-- Resolve open alerts (spend fell below their level). `resolved_at IS NULL` is the exactly-once guard: an
-- alert already resolved is not returned again, so its resolved message is written to the outbox once.
UPDATE budget_alerts a
SET resolved_at = $3, resolved_spend = i.spend
FROM unnest($1::uuid[], $2::numeric[]) AS i(id, spend)
WHERE a.id = i.id AND a.resolved_at IS NULL
RETURNING a.id, a.crossing, a.raised_at;

-- name: insert_alert_messages
-- Outbox rows for alert messages built by the worker (resolved alerts), in one statement.
INSERT INTO outbox (topic, key, value, headers)
SELECT $1, key, value,
       jsonb_build_object('alert_id', alert_id, 'scope', scope, 'type', 'budget.alert.resolved',
                          'delivery_id', delivery_id)
FROM unnest($2::bytea[], $3::bytea[], $4::text[], $5::text[], $6::text[])
    WITH ORDINALITY AS t(key, value, delivery_id, alert_id, scope, ord)
ORDER BY ord;

-- name: sweep_try_lock
-- Only one replica sweeps at a time (session-level; released right after the sweep).
SELECT pg_try_advisory_lock(hashtextextended('cost_worker.sweep', 0));

-- name: sweep_unlock
SELECT pg_advisory_unlock(hashtextextended('cost_worker.sweep', 0));

-- ============================================================================================ exchange rates

-- name: upsert_exchange_rates
-- Load rates (one row per (base, quote, date)): a new date is inserted, a corrected rate replaces the old
-- one, the same rate again changes nothing. Returns the outcome of each input row.
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::numeric[])
        AS t(base, quote, effective_date, rate)
),
written AS (
    INSERT INTO exchange_rates AS r (base, quote, effective_date, rate, source)
    SELECT base, quote, effective_date, rate, $5 FROM input
    ORDER BY base, quote, effective_date
    ON CONFLICT (base, quote, effective_date) DO UPDATE
        SET rate = EXCLUDED.rate, source = EXCLUDED.source, imported_at = now()
        WHERE r.rate <> EXCLUDED.rate
    RETURNING (r.xmax = 0) AS inserted
)
SELECT CASE WHEN inserted THEN 'inserted' ELSE 'updated' END AS outcome, count(*) AS n FROM written GROUP BY 1
UNION ALL
SELECT 'unchanged', (SELECT count(*) FROM input) - (SELECT count(*) FROM written);

-- name: exchange_rate_pairs
-- Every loaded pair (optionally one base / quote): its date range, number of days, newest rate and source.
SELECT DISTINCT ON (base, quote) base, quote,
       min(effective_date) OVER w AS first_date, max(effective_date) OVER w AS latest_date,
       count(*) OVER w AS days, rate AS latest_rate, source
FROM exchange_rates
WHERE ($1::text IS NULL OR base = $1) AND ($2::text IS NULL OR quote = $2)
WINDOW w AS (PARTITION BY base, quote)
ORDER BY base, quote, effective_date DESC;

-- ============================================================================================ reports

-- name: report_table_counts
-- Rows per table the worker writes (visible in the current tenant scope).
SELECT 'cost_data' AS table_name, count(*) AS rows FROM cost_data
UNION ALL SELECT 'api_usage', count(*) FROM api_usage
UNION ALL SELECT 'project_metrics', count(*) FROM project_metrics
UNION ALL SELECT 'user_metrics', count(*) FROM user_metrics
UNION ALL SELECT 'budget_alerts', count(*) FROM budget_alerts
UNION ALL SELECT 'quarantine', count(*) FROM quarantine
UNION ALL SELECT 'outbox', count(*) FROM outbox;

-- name: report_project_spend
-- Ledger and estimate per project (visible in the current tenant scope), all time.
SELECT p.name AS project,
       coalesce((SELECT sum(amount) FROM cost_data c
                 WHERE c.project_id = p.id AND c.api_version = 'costs_v1' AND c.superseded_at IS NULL), 0)
           AS provider_costs,
       coalesce((SELECT sum(amount) FROM cost_data c
                 WHERE c.project_id = p.id AND c.api_version = 'usage_v1' AND c.superseded_at IS NULL), 0)
           AS priced_usage,
       coalesce((SELECT sum(estimated_cost_usd) FROM project_metrics m WHERE m.project_id = p.id), 0) AS estimate,
       coalesce((SELECT sum(request_count) FROM project_metrics m WHERE m.project_id = p.id), 0) AS requests
FROM projects p
WHERE p.organization_id = ANY($1::uuid[])
ORDER BY p.name;

-- name: report_quarantine_reasons
SELECT reason, count(*) AS messages FROM quarantine WHERE status = 'pending' GROUP BY reason ORDER BY 2 DESC, 1;

-- name: report_alerts
SELECT a.scope, a.threshold, a.spend, a.amount, a.currency, a.period_start, a.percent_used,
       coalesce(o.name, p.name, u.name) AS budget_name
FROM budget_alerts a
LEFT JOIN ai_organization_budgets o ON a.scope = 'organization' AND o.id = a.budget_id
LEFT JOIN ai_project_budgets p ON a.scope = 'project' AND p.id = a.budget_id
LEFT JOIN ai_budgets u ON a.scope = 'user' AND u.id = a.budget_id
ORDER BY a.raised_at, a.scope, a.threshold;

-- name: organization_exists
-- Whether an organization named on the command line exists (read in its tenant scope: any role that may see it).
SELECT EXISTS (SELECT FROM organizations WHERE id = $1);

-- name: report_organizations
-- Every organization, or just the one asked for.
SELECT id FROM organizations WHERE $1::uuid IS NULL OR id = $1
ORDER BY id;

-- ============================================================================================ prices (issue 13)

-- name: report_price_overrides
-- The operator's price overrides (model_prices), optionally of one provider and/or model.
SELECT id, provider, model, token_type, price_per_million, currency, effective_from, note
FROM model_prices
WHERE ($1::text IS NULL OR provider = $1) AND ($2::text IS NULL OR model = $2)
ORDER BY provider, model, token_type, effective_from;

-- name: report_unpriced_models
-- Current usage lines stored without a price (visible in the current tenant scope), by the price key they lacked.
SELECT provider, metadata->'unpriced'->>'model' AS model, metadata->'unpriced'->>'token_type' AS token_type,
       unit, count(*) AS lines, sum(quantity) AS quantity,
       min(bucket_start_time) AS first_seen, max(bucket_end_time) AS last_seen
FROM cost_data
WHERE amount IS NULL AND api_version = 'usage_v1' AND metadata ? 'unpriced' AND superseded_at IS NULL
  AND ($1::timestamptz IS NULL OR bucket_start_time >= $1)
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4;

-- name: prices_existing
-- Overrides already stored under the given keys (provider, model, token_type, effective_from).
SELECT provider, model, token_type, effective_from, price_per_million, currency
FROM model_prices
WHERE (provider, model, token_type, effective_from)
      IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]));

-- name: prices_import
-- New overrides; a key already stored is skipped (the caller has checked that it holds the same price).
INSERT INTO model_prices (provider, model, token_type, price_per_million, currency, effective_from, note)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[], $5::text[], $6::timestamptz[], $7::text[])
ON CONFLICT ON CONSTRAINT model_prices_key DO NOTHING
RETURNING id;

-- name: report_usage_pricing
-- Usage lines by price source (visible in the current tenant scope): overrides, the catalogue, none.
SELECT CASE WHEN amount IS NULL THEN 'unpriced'
            WHEN metadata->>'price_source' LIKE 'override:%' THEN 'override'
            WHEN metadata ? 'price_source' THEN 'catalogue'
            ELSE 'zero quantity' END AS source,
       count(*) AS lines, coalesce(sum(amount), 0) AS amount
FROM cost_data
WHERE api_version = 'usage_v1' AND superseded_at IS NULL
GROUP BY 1
ORDER BY 1;
