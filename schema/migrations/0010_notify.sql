-- Notify (issue 15): where budget alerts are delivered, and every delivery's state.
--
-- A destination belongs to one organization (row-level security like every tenant table). Its URL and
-- signing secret are credentials (a Slack incoming-webhook URL is a bearer token), so both are stored
-- encrypted with AES-GCM under COST_WORKER_NOTIFY_SECRETS_KEY; `url_origin` (scheme://host[:port]) is kept
-- in clear for display only.
CREATE TABLE notify_destinations (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id  uuid         NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name             varchar(200) NOT NULL,
    kind             varchar(16)  NOT NULL CHECK (kind IN ('webhook', 'slack')),
    url_origin       varchar(300) NOT NULL,
    url_sealed       bytea        NOT NULL,
    secret_sealed    bytea,  -- webhooks only: the Standard Webhooks signing secret (whsec_...)
    -- Filters: the alert scopes delivered (empty: all), the lowest threshold delivered, resolved messages.
    scopes           text[]       NOT NULL DEFAULT '{}'
                     CHECK (scopes <@ ARRAY['organization', 'project', 'user']::text[]),
    min_threshold    numeric      NOT NULL DEFAULT 0 CHECK (min_threshold >= 0),
    include_resolved boolean      NOT NULL DEFAULT true,
    enabled          boolean      NOT NULL DEFAULT true,
    disabled_reason  varchar(500),
    created_at       timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT notify_destinations_name_key UNIQUE (organization_id, name),
    CONSTRAINT notify_destinations_secret_check CHECK ((kind = 'webhook') = (secret_sealed IS NOT NULL))
);

-- One row per (destination, alert message): created in the same transaction as the consumed offsets of
-- the alerts topic, so each alert becomes exactly one delivery per matching destination. `webhook_id` is
-- the stable Standard Webhooks id (alert_id, or <alert_id>:resolved); the unique key makes a replay of the
-- topic a no-op. The payload is the alert message exactly as consumed (the signed body).
CREATE TABLE notify_deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    organization_id  uuid         NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    destination_id   uuid         NOT NULL REFERENCES notify_destinations (id) ON DELETE CASCADE,
    webhook_id       varchar(200) NOT NULL,
    event_type       varchar(64)  NOT NULL,
    payload          text         NOT NULL,
    status           varchar(16)  NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer      NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz  NOT NULL DEFAULT now(),  -- also the lease of an attempt in flight
    created_at       timestamptz  NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    delivered_at     timestamptz,
    last_status      integer,
    last_error       varchar(500),  -- an excerpt: the error, or the start of the response body
    CONSTRAINT notify_deliveries_key UNIQUE (destination_id, webhook_id)
);
CREATE INDEX notify_deliveries_due_idx ON notify_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX notify_deliveries_organization_idx ON notify_deliveries (organization_id, created_at);

DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['notify_destinations', 'notify_deliveries'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I '
            'USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[])) '
            'WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))', t);
    END LOOP;
END
$rls$;

-- The dispatcher finds due deliveries across tenants (like the budget sweep finds budgets); it claims and
-- updates them inside the owning tenants' scope.
CREATE POLICY notify_dispatch ON notify_deliveries FOR SELECT TO cost_worker_writer USING (true);

GRANT SELECT, INSERT, UPDATE, DELETE ON notify_destinations TO cost_worker_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON notify_deliveries TO cost_worker_writer;
GRANT SELECT (id, organization_id, name, kind, url_origin, scopes, min_threshold, include_resolved, enabled,
              disabled_reason, created_at) ON notify_destinations TO cost_worker_reader;
GRANT SELECT ON notify_deliveries TO cost_worker_reader;
