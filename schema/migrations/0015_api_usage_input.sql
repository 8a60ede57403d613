-- Issue 18 (per-event cost): the row type insert_api_usage takes its events as, one array of these instead of
-- 19 arrays of columns. asyncpg checks and encodes every element of every array argument on its own (19 per
-- event); an array of rows is one element per event whose fields go straight to their encoders. Measured on 5,000
-- events (asyncpg 0.32, PostgreSQL on the same 2 cores): client CPU 7.1-8.1 -> 4.4-5.3 us per event, statement
-- wall time 51-62 -> 27-33 ms per batch (unnest of one array of rows against 19 arrays).
-- The attributes are the statement's columns in order (worker/rows.py UsageRows.EVENT_FIELDS, then what pricing
-- adds); tests/unit/test_batch.py checks the two agree. A new type only: expand (compat.toml).
CREATE TYPE cost_worker_api_usage_input AS (
    organization_id    uuid,
    event_id           text,
    project_id         uuid,
    user_id            uuid,
    endpoint           text,
    method             text,
    status_code        smallint,
    response_time_ms   integer,
    occurred_at        timestamptz,
    prompt_tokens      bigint,
    completion_tokens  bigint,
    total_tokens       bigint,
    model              text,
    cost_usd           numeric,
    source_partition   integer,
    source_offset      bigint,
    provider           text,
    catalogue_cost_usd numeric,
    price_source       text
);
COMMENT ON TYPE cost_worker_api_usage_input IS 'one API-usage event as insert_api_usage takes it (0015)';
GRANT USAGE ON TYPE cost_worker_api_usage_input TO cost_worker_writer;
