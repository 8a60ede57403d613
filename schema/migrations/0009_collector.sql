-- The collector (`cost-worker collect`, issue 14): which provider accounts to poll with which admin key,
-- how far each (account, endpoint) has been collected, and the staged messages of complete windows.

-- Admin API keys of provider accounts (seed 004: multi-org admin keys, unique on (team, provider, provider
-- organization id), indexed on (provider, is_active)). The platform's "team" is an organization here.
-- A key is never stored in plain text: either envelope-encrypted (AES-256-GCM under a random data key, the
-- data key wrapped by the key-encryption key from a secret file) or a reference to a secret file.
CREATE TABLE IF NOT EXISTS organization_api_keys (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    team_id         uuid         NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    provider        varchar(32)  NOT NULL CHECK (provider IN ('openai', 'anthropic')),
    -- The provider's organization id (seed 004 calls it organization_id; named as projects.ai_organization_id
    -- here, since organization_id means a tenant uuid everywhere else in this schema and row-level security).
    ai_organization_id varchar(255) NOT NULL,
    name            varchar(255) NOT NULL DEFAULT '',
    key_ciphertext  bytea,                  -- AES-GCM(data key, admin key), nonce prepended
    wrapped_key     bytea,                  -- AES-GCM(key-encryption key, data key), nonce prepended
    kek_id          varchar(64),            -- fingerprint of the key-encryption key that wrapped it
    secret_file     text,                   -- or: a path to a file holding the key (a mounted secret)
    fingerprint     varchar(64)  NOT NULL,  -- shown to operators instead of the key
    is_active       boolean      NOT NULL DEFAULT true,
    created_at      timestamptz  NOT NULL DEFAULT now(),
    updated_at      timestamptz  NOT NULL DEFAULT now(),
    rotated_at      timestamptz,
    deactivated_at  timestamptz,
    CONSTRAINT organization_api_keys_account_key UNIQUE (team_id, provider, ai_organization_id),
    CONSTRAINT organization_api_keys_one_source CHECK (
        (key_ciphertext IS NOT NULL AND wrapped_key IS NOT NULL AND kek_id IS NOT NULL AND secret_file IS NULL)
        OR (key_ciphertext IS NULL AND wrapped_key IS NULL AND secret_file IS NOT NULL)
    )
);
CREATE INDEX IF NOT EXISTS organization_api_keys_team_id_idx ON organization_api_keys (team_id);
CREATE INDEX IF NOT EXISTS organization_api_keys_provider_active_idx ON organization_api_keys (provider, is_active);

-- The last successful poll of each (account, endpoint): where the next poll's window starts.
CREATE TABLE collector_state (
    account_id        uuid         NOT NULL REFERENCES organization_api_keys (id) ON DELETE CASCADE,
    report            varchar(64)  NOT NULL,  -- openai.costs, openai.usage.<endpoint>, anthropic.cost_report, ...
    collected_through timestamptz  NOT NULL,  -- end of the last complete window collected
    last_collected_at timestamptz  NOT NULL,  -- the collected_at of that poll
    last_success_at   timestamptz  NOT NULL DEFAULT now(),
    buckets           integer      NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, report)
);

-- Messages of complete windows, staged in the transaction that advances collector_state and drained to
-- Kafka at least once (rows are deleted after the broker acknowledged them).
CREATE TABLE collector_outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id uuid         NOT NULL,
    report     varchar(64)  NOT NULL,
    topic      varchar(255) NOT NULL,
    key        bytea        NOT NULL,
    message    bytea        NOT NULL,
    created_at timestamptz  NOT NULL DEFAULT now()
);

-- Only the collector reads keys: no grant to the writer or the reader.
REVOKE ALL ON organization_api_keys FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON organization_api_keys TO cost_worker_collector;
GRANT SELECT, INSERT, UPDATE ON collector_state TO cost_worker_collector;
GRANT SELECT, INSERT, UPDATE, DELETE ON collector_outbox TO cost_worker_collector;  -- UPDATE: FOR UPDATE claims
GRANT SELECT ON collector_state TO cost_worker_reader;
GRANT SELECT ON schema_migrations TO cost_worker_collector;
-- `keys add` names the organization that owns the provider account.
CREATE POLICY collector_accounts ON organizations FOR SELECT TO cost_worker_collector USING (true);
GRANT SELECT ON organizations TO cost_worker_collector;
