-- Notify (webhook signing secrets rotate with an overlap): `notify destinations rotate-secret` issues a new signing
-- secret and keeps the one before it until previous_secret_until. While it is kept, every delivery carries two
-- signatures in its one `webhook-signature` header (Standard Webhooks: space-separated, any one valid is enough), so
-- a receiver verifying with either secret accepts it and its owner can switch without losing a delivery.
-- Sealed like the secret itself (AES-256-GCM under COST_WORKER_NOTIFY_SECRETS_KEY, bound to the destination id).
-- Why expand: two nullable columns and a check between them; the previous release neither reads nor writes them
-- (it signs with the current secret only, which a receiver also accepts).
ALTER TABLE notify_destinations
    ADD COLUMN previous_secret_sealed bytea,
    ADD COLUMN previous_secret_until timestamptz,
    ADD CONSTRAINT notify_destinations_previous_secret_until
        CHECK ((previous_secret_sealed IS NULL) = (previous_secret_until IS NULL));
