-- Every statement the worker runs. Executed only by worker/store.py.

-- =========================================================================================== migrations

-- name: migration_lock
-- One migrate at a time per database; two replicas racing wait here. Session-level, released explicitly.
SELECT pg_advisory_lock(hashtextextended('cost_worker.migrate', 0));

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

-- name: migrations_applied
SELECT version, name, checksum FROM schema_migrations ORDER BY version;

-- name: migration_record
INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: migration_can_become_owner
-- Whether this login may act as the owner role (superusers and members may).
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cost_worker_owner')
   AND pg_has_role(current_user, 'cost_worker_owner', 'MEMBER');

-- name: migration_become_owner
-- Objects created by migrations belong to the owner role, whoever logged in.
SET ROLE cost_worker_owner;
