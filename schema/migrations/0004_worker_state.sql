-- The worker's own state: consumed offsets, quarantined input, and the outbox.

-- The consumed position of each partition, written in the same transaction as the data it covers.
-- next_offset is the offset of the next message to read. Updates compare-and-set on the previous value,
-- so a consumer that lost its partition (a zombie) cannot apply a batch twice.
CREATE TABLE consumer_offsets (
    group_id    varchar(255) NOT NULL,
    topic       varchar(255) NOT NULL,
    partition   integer      NOT NULL CHECK (partition >= 0),
    next_offset bigint       NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- Input that could not be applied, with why, and enough to replay it. One row per source message.
CREATE TABLE quarantine (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reason           varchar(64)  NOT NULL,
    detail           text         NOT NULL DEFAULT '',
    source_topic     varchar(255) NOT NULL,
    source_partition integer      NOT NULL,
    source_offset    bigint       NOT NULL,
    message_key      bytea,
    payload          bytea        NOT NULL,
    headers          jsonb        NOT NULL DEFAULT '{}',
    organization_id  uuid,  -- when the message named one; not a foreign key: it may not exist
    status           varchar(16)  NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'replayed')),
    replay_count     integer      NOT NULL DEFAULT 0,
    quarantined_at   timestamptz  NOT NULL DEFAULT now(),
    replayed_at      timestamptz,
    CONSTRAINT quarantine_source_key UNIQUE (source_topic, source_partition, source_offset)
);
CREATE INDEX quarantine_pending_idx ON quarantine (reason, id) WHERE status = 'pending';

-- Messages the worker must publish (budget alerts, dead letters), written in the batch's transaction and
-- drained to Kafka at least once by the publisher. Rows are deleted once the broker acknowledged them.
CREATE TABLE outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic      varchar(255) NOT NULL,
    key        bytea        NOT NULL,
    value      bytea        NOT NULL,
    headers    jsonb        NOT NULL DEFAULT '{}',
    created_at timestamptz  NOT NULL DEFAULT now(),
    attempts   integer      NOT NULL DEFAULT 0,
    last_error text
);

GRANT SELECT, INSERT, UPDATE ON consumer_offsets TO cost_worker_writer;
GRANT SELECT, INSERT, UPDATE ON quarantine TO cost_worker_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO cost_worker_writer;
