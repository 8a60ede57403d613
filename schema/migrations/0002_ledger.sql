-- The cost ledger, per-request API usage, and the hourly rollups budgets and dashboards read.

CREATE TYPE cost_api_version AS ENUM ('usage_v1', 'costs_v1');

-- One row per (project, bucket window, line item, api_version): the provider's cost, or its usage priced
-- from model_prices. Rows without a project belong to the organization; the provider account is part of
-- the key so that org-level rows of two providers (or two provider organizations) never collide.
-- The newest revision (collected_at) of a key wins; an older or equal revision changes nothing.
CREATE TABLE cost_data (
    organization_id    uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id         uuid REFERENCES projects (id) ON DELETE CASCADE,
    provider           varchar(32)  NOT NULL CHECK (provider IN ('openai', 'anthropic')),
    ai_organization_id varchar(255) NOT NULL,
    ai_project_id      varchar(255),  -- the provider's project or workspace id, as reported
    api_version        cost_api_version NOT NULL,
    bucket_start_time  timestamptz  NOT NULL,
    bucket_end_time    timestamptz  NOT NULL,
    line_item          text         NOT NULL,
    currency           char(3)      NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- NULL when a usage line has no price. The bounds also reject NaN and infinities.
    amount             numeric      CHECK (amount > -1e12 AND amount < 1e12),
    quantity           numeric      CHECK (quantity >= 0 AND quantity < 1e18),
    unit               varchar(32),
    metadata           jsonb        NOT NULL DEFAULT '{}',
    collected_at       timestamptz  NOT NULL,  -- the revision
    source_partition   integer,                -- the message that wrote this revision
    source_offset      bigint,
    created_at         timestamptz  NOT NULL DEFAULT now(),
    updated_at         timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT cost_data_window_check CHECK (bucket_end_time > bucket_start_time),
    CONSTRAINT cost_data_line_item_check CHECK (length(line_item) BETWEEN 1 AND 512)
);
-- The dedupe key. Its leading columns also serve "rows of a project whose window starts in a period".
CREATE UNIQUE INDEX cost_data_dedupe_key ON cost_data
    (project_id, bucket_start_time, bucket_end_time, line_item, api_version,
     organization_id, provider, ai_organization_id) NULLS NOT DISTINCT;
-- Organization-level budget queries: an organization's rows in a period.
CREATE INDEX cost_data_organization_window_idx ON cost_data (organization_id, bucket_start_time);

-- One row per request through the platform's API. First write wins.
CREATE TABLE api_usage (
    organization_id   uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    event_id          varchar(128) NOT NULL,
    project_id        uuid,
    user_id           uuid,
    endpoint          varchar(255) NOT NULL,
    method            varchar(10)  NOT NULL,
    status_code       smallint     NOT NULL CHECK (status_code BETWEEN 100 AND 599),
    response_time_ms  integer      CHECK (response_time_ms >= 0),
    occurred_at       timestamptz  NOT NULL,
    prompt_tokens     bigint       CHECK (prompt_tokens >= 0),
    completion_tokens bigint       CHECK (completion_tokens >= 0),
    total_tokens      bigint       CHECK (total_tokens >= 0),
    model             varchar(255),
    cost_usd          numeric      CHECK (cost_usd >= 0 AND cost_usd < 1e9),
    source_partition  integer,
    source_offset     bigint,
    created_at        timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, event_id)
);

-- Hourly rollups per project (project_id NULL: requests outside any project). Only newly inserted
-- api_usage rows add into them, in the same statement, so a replay adds nothing.
CREATE TABLE project_metrics (
    organization_id    uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id         uuid REFERENCES projects (id) ON DELETE CASCADE,
    hour               timestamptz NOT NULL CHECK (extract(epoch FROM hour)::numeric % 3600 = 0),
    request_count      bigint  NOT NULL DEFAULT 0,
    error_count        bigint  NOT NULL DEFAULT 0,  -- status_code >= 400
    prompt_tokens      bigint  NOT NULL DEFAULT 0,
    completion_tokens  bigint  NOT NULL DEFAULT 0,
    total_tokens       bigint  NOT NULL DEFAULT 0,
    estimated_cost_usd numeric NOT NULL DEFAULT 0,
    latency_sum_ms     bigint  NOT NULL DEFAULT 0,
    latency_max_ms     integer NOT NULL DEFAULT 0,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX project_metrics_key ON project_metrics (organization_id, project_id, hour) NULLS NOT DISTINCT;
-- Organization budgets: all of an organization's rollups in a period, without reading its history.
CREATE INDEX project_metrics_organization_hour_idx ON project_metrics (organization_id, hour);

-- Hourly spend per user (and project), so a user budget never scans raw events.
CREATE TABLE user_metrics (
    organization_id    uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id            uuid NOT NULL,
    project_id         uuid,
    hour               timestamptz NOT NULL CHECK (extract(epoch FROM hour)::numeric % 3600 = 0),
    request_count      bigint  NOT NULL DEFAULT 0,
    total_tokens       bigint  NOT NULL DEFAULT 0,
    estimated_cost_usd numeric NOT NULL DEFAULT 0,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX user_metrics_key ON user_metrics (user_id, hour, project_id) NULLS NOT DISTINCT;

-- Prices for usage buckets: the row with the latest effective_from at or before the bucket start applies.
CREATE TABLE model_prices (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider          varchar(32)  NOT NULL CHECK (provider IN ('openai', 'anthropic')),
    model             varchar(255) NOT NULL,
    token_type        varchar(64)  NOT NULL,
    price_per_million numeric      NOT NULL CHECK (price_per_million >= 0 AND price_per_million < 1e9),
    currency          char(3)      NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    effective_from    timestamptz  NOT NULL,
    created_at        timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT model_prices_key UNIQUE (provider, model, token_type, effective_from)
);

DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['cost_data', 'api_usage', 'project_metrics', 'user_metrics'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I '
            'USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[])) '
            'WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))', t);
    END LOOP;
END
$rls$;

GRANT SELECT, INSERT, UPDATE ON cost_data, api_usage, project_metrics, user_metrics TO cost_worker_writer;
GRANT SELECT ON cost_data, api_usage, project_metrics, user_metrics, model_prices TO cost_worker_reader;
GRANT SELECT ON model_prices TO cost_worker_writer;
