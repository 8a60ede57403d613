-- Issue 18 (growth): api_usage's key leads with time within an organization.
--
-- The key was (organization_id, event_id, occurred_at). Event ids are random (uuid4-like), so every insert went to
-- a random leaf of the key index: on a partition of millions of rows each batch touched thousands of pages that
-- were not in memory, and the first change of each page after a checkpoint wrote the whole 8 KB page to the WAL
-- (the benchmark: 9.6 KB of WAL per event into 10M existing rows, 0.66x of the empty-table rate). The key is now
-- (organization_id, occurred_at, event_id): events arrive roughly in time order, so inserts go to the right edge
-- of each organization's range, the same few pages batch after batch.
--
-- Same columns, so the same rows are duplicates: a redelivery (same organization, event_id and occurred_at) still
-- conflicts. ON CONFLICT infers its unique index from the set of columns, not their order, so the previous
-- release's `ON CONFLICT (organization_id, event_id, occurred_at)` still finds this key: expand (compat.toml).
-- Every lookup of a stored event gives all three columns (worker/sql/queries.sql insert_api_usage).
--
-- Online, like 0011: each partition's new index is built CONCURRENTLY first (writes go on); the transaction then
-- only swaps constraints: it drops the old key and makes each built index its partition's primary key (no scan, no
-- build), and adds the table's key, which attaches them. A partition created between the two parts (the worker
-- creates months ahead; they are empty) has its index built in the transaction.

-- migrate:online-each
-- A concurrent build that failed leaves an invalid index behind: drop it, so that the next step builds it again.
SELECT format('DROP INDEX CONCURRENTLY IF EXISTS %I.%I', n.nspname, c.relname)
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_inherits h ON h.inhrelid = i.indrelid AND h.inhparent = 'public.api_usage'::regclass
WHERE c.relname = left(i.indrelid::regclass::text, 54) || '_time_key' AND NOT i.indisvalid
ORDER BY c.relname;

-- migrate:online-each
SELECT format('CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS %I ON %I.%I (organization_id, occurred_at, event_id)',
              left(c.relname, 54) || '_time_key', n.nspname, c.relname)
FROM pg_inherits h
JOIN pg_class c ON c.oid = h.inhrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE h.inhparent = 'public.api_usage'::regclass
ORDER BY c.relname;

-- migrate:transaction
-- Queue at most this long behind in-flight batches (everyone else queues behind this transaction meanwhile).
SET LOCAL lock_timeout = '10s';

LOCK TABLE api_usage IN ACCESS EXCLUSIVE MODE;

DO $swap$
DECLARE
    part record;
BEGIN
    FOR part IN
        SELECT c.oid, c.relname, left(c.relname, 54) || '_time_key' AS key_index
        FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
        WHERE h.inhparent = 'public.api_usage'::regclass
        ORDER BY c.relname
    LOOP
        IF NOT EXISTS (SELECT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                       WHERE i.indrelid = part.oid AND c.relname = part.key_index AND i.indisvalid
                         AND i.indisunique) THEN
            -- A partition attached after the online steps: one of the empty months ahead.
            EXECUTE format('CREATE UNIQUE INDEX %I ON %I (organization_id, occurred_at, event_id)',
                           part.key_index, part.relname);
        END IF;
    END LOOP;

    ALTER TABLE api_usage DROP CONSTRAINT api_usage_pkey;  -- and each partition's, which it owns

    FOR part IN
        SELECT c.relname, left(c.relname, 54) || '_time_key' AS key_index, left(c.relname, 58) || '_pkey' AS pkey
        FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
        WHERE h.inhparent = 'public.api_usage'::regclass
        ORDER BY c.relname
    LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', part.key_index, part.pkey);
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY USING INDEX %I', part.relname, part.pkey,
                       part.pkey);
    END LOOP;
END
$swap$;

-- Attaches every partition's primary key made above (nothing is built: the columns are NOT NULL already).
ALTER TABLE api_usage ADD CONSTRAINT api_usage_pkey PRIMARY KEY (organization_id, occurred_at, event_id);
