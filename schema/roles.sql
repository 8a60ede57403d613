-- Cluster-wide roles and per-database schema rights. Applied by `cost-worker migrate` before the versioned
-- migrations, on every run: it is idempotent, and it needs CREATEROLE only while a role is still missing
-- (a DBA can create the three roles up front instead).
--
--   cost_worker_owner   owns every object; migrations run as this role (SET ROLE)
--   cost_worker_writer  the worker: reads the platform tables, writes the ledger; no DDL, no BYPASSRLS
--   cost_worker_reader  dashboards: read-only, and row-level security shows one organization at a time
--   cost_worker_collector  `cost-worker collect` and `keys`: the only role that reads provider admin keys
--
-- Login roles are granted membership: CREATE ROLE app LOGIN PASSWORD '...' IN ROLE cost_worker_writer;
DO $roles$
DECLARE
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY ARRAY['cost_worker_owner', 'cost_worker_writer', 'cost_worker_reader', 'cost_worker_collector'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = wanted) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS', wanted);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another migrate created it concurrently (roles are cluster-wide)
            END;
        END IF;
    END LOOP;
END
$roles$;

DO $grants$
BEGIN
    -- The owner creates the schema objects. Granting needs the schema's owner: skip if that is not us
    -- and the right is already there.
    IF NOT has_schema_privilege('cost_worker_owner', 'public', 'CREATE') THEN
        GRANT USAGE, CREATE ON SCHEMA public TO cost_worker_owner;
    END IF;
    IF NOT has_schema_privilege('cost_worker_writer', 'public', 'USAGE') THEN
        GRANT USAGE ON SCHEMA public TO cost_worker_writer;
    END IF;
    IF NOT has_schema_privilege('cost_worker_reader', 'public', 'USAGE') THEN
        GRANT USAGE ON SCHEMA public TO cost_worker_reader;
    END IF;
    IF NOT has_schema_privilege('cost_worker_collector', 'public', 'USAGE') THEN
        GRANT USAGE ON SCHEMA public TO cost_worker_collector;
    END IF;
END
$grants$;
