-- Money rules (upgrades): a queue of organizations whose spend aggregate must be rebuilt, filled with every
-- organization by this migration and drained by the worker's budget sweep (one organization per transaction).
--
-- Why: 0035 and 0036 corrected how the aggregate is kept, not what it already held; aggregates written before them
-- kept their error until someone ran `cost-worker budgets rebuild-spend`, which only README asked for. Budgets read
-- the aggregate, so until then they read too much (0035) or too little (0036). Rebuilding inside the migration would
-- be one transaction over the whole ledger, holding every organization's spend lock for its length. Queued, each
-- organization is rebuilt in its own short transaction, by whichever replica holds the sweep lock, right after the
-- new release starts; `cost-worker budgets rebuild-spend` drains the queue as well. A later migration that changes
-- how the aggregate is kept queues the organizations it affects the same way (INSERT ... ON CONFLICT DO NOTHING).
-- Why expand: a new table; the previous release neither reads nor writes it.
CREATE TABLE spend_rebuilds (
    organization_id uuid PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
    reason          text NOT NULL,
    queued_at       timestamptz NOT NULL DEFAULT now()
);

-- Every organization (whatever its budgets: one created later reads the same aggregate). The owner lifts FORCE on
-- organizations for the length of this transaction to see every tenant (as 0016 did on ai_budgets); the queue gets
-- its row-level security after the backfill.
ALTER TABLE organizations NO FORCE ROW LEVEL SECURITY;
INSERT INTO spend_rebuilds (organization_id, reason)
SELECT id, 'migration 0044: aggregates kept before 0035 and 0036' FROM organizations
ON CONFLICT DO NOTHING;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;

ALTER TABLE spend_rebuilds ENABLE ROW LEVEL SECURITY;
ALTER TABLE spend_rebuilds FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON spend_rebuilds
    USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))
    WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]));
-- The sweep finds the queued organizations across tenants; it rebuilds and dequeues each inside its own scope.
CREATE POLICY worker_sweep ON spend_rebuilds FOR SELECT TO cost_worker_writer USING (true);
GRANT SELECT, DELETE ON spend_rebuilds TO cost_worker_writer;
GRANT SELECT ON spend_rebuilds TO cost_worker_reader;
