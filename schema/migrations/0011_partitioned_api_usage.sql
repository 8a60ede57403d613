-- Per-request data partitioned by month (issue 18): api_usage becomes a table partitioned by RANGE (occurred_at),
-- one partition per UTC month, created ahead (and on demand by the batch path); retention drops whole partitions.
--
-- What a duplicate is now. PostgreSQL's unique keys on a partitioned table must include the partition key, so
-- the key is (organization_id, event_id, occurred_at). A redelivery carries the same occurred_at: it hits that key
-- and changes nothing; the same key with other content is a conflicting duplicate (quarantined), as before. The
-- same (organization, event_id) at another instant, in this month or another, is another event: no index spans
-- partitions, and a probe per event for it cost about half again the insert's time (README "Partitions and
-- retention"). Within one batch the worker still refuses any reuse of an id.
--
-- Online: the table of today (possibly billions of rows) becomes the partition api_usage_legacy for every instant
-- before the first month boundary after the migration (B) without a scan or an index build under an exclusive
-- lock. The `-- migrate:online` steps run first, each on its own outside a transaction, while the previous release
-- keeps writing (worker/migrate.py): a unique index (organization_id, event_id, occurred_at) built CONCURRENTLY and
-- a CHECK (occurred_at < B) added NOT VALID, then VALIDATEd (SHARE UPDATE EXCLUSIVE: reads and writes go on). The
-- transaction after `-- migrate:transaction` only renames, swaps the key to that index, creates the parent and
-- ATTACHes the old table: the validated CHECK proves the partition bound, so the attach does not scan, and the
-- matching unique index is attached instead of built. Its ACCESS EXCLUSIVE lock lasts milliseconds (measured by
-- tests/test_partition_migration.py); lock_timeout bounds how long it queues behind in-flight batches.

-- migrate:online
-- A concurrent build that failed leaves an invalid index behind: drop it, so that the next step builds it again.
DO $invalid$
BEGIN
    IF EXISTS (SELECT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE c.relname = 'api_usage_legacy_key' AND c.relnamespace = 'public'::regnamespace
                 AND NOT i.indisvalid) THEN
        DROP INDEX api_usage_legacy_key;
    END IF;
END
$invalid$;

-- migrate:online
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS api_usage_legacy_key ON api_usage (organization_id, event_id, occurred_at);

-- migrate:online
-- B: the first month boundary after every event the previous release can still write (decode accepts up to two
-- days ahead), plus a month of slack. A bound left by an earlier attempt that is about to be reached is replaced.
DO $bound$
DECLARE
    wanted timestamptz := (date_trunc('month', (now() + interval '2 days') AT TIME ZONE 'UTC') + interval '1 month')
                          AT TIME ZONE 'UTC';
    existing text;
BEGIN
    SELECT pg_get_constraintdef(oid) INTO existing FROM pg_constraint
    WHERE conrelid = 'public.api_usage'::regclass AND conname = 'api_usage_legacy_range';
    IF existing IS NOT NULL THEN
        IF (regexp_match(existing, '''([^'']+)'''))[1]::timestamptz > now() + interval '7 days' THEN
            RETURN;
        END IF;
        ALTER TABLE api_usage DROP CONSTRAINT api_usage_legacy_range;
    END IF;
    EXECUTE format('ALTER TABLE api_usage ADD CONSTRAINT api_usage_legacy_range CHECK (occurred_at < %L::timestamptz) '
                   'NOT VALID', wanted);
END
$bound$;

-- migrate:online
ALTER TABLE api_usage VALIDATE CONSTRAINT api_usage_legacy_range;

-- migrate:transaction
-- Queue at most this long behind in-flight batches (everyone else queues behind this transaction meanwhile).
SET LOCAL lock_timeout = '10s';

DO $ready$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                   WHERE c.relname = 'api_usage_legacy_key' AND i.indisvalid AND i.indisunique)
       OR NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'public.api_usage'::regclass
                      AND conname = 'api_usage_legacy_range' AND convalidated) THEN
        RAISE EXCEPTION 'the online steps of 0011 did not complete (index api_usage_legacy_key, constraint '
                        'api_usage_legacy_range): run `cost-worker migrate` again';
    END IF;
END
$ready$;

LOCK TABLE api_usage IN ACCESS EXCLUSIVE MODE;
ALTER TABLE api_usage RENAME TO api_usage_legacy;
ALTER TABLE api_usage_legacy DROP CONSTRAINT api_usage_pkey;
ALTER TABLE api_usage_legacy ADD CONSTRAINT api_usage_legacy_pkey PRIMARY KEY USING INDEX api_usage_legacy_key;

-- The parent: the same columns in the same order (no tuple conversion when rows are routed to the old table).
CREATE TABLE api_usage (
    LIKE api_usage_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS
) PARTITION BY RANGE (occurred_at);
ALTER TABLE api_usage DROP CONSTRAINT api_usage_legacy_range;
ALTER TABLE api_usage ADD CONSTRAINT api_usage_pkey PRIMARY KEY (organization_id, event_id, occurred_at);
ALTER TABLE api_usage ADD CONSTRAINT api_usage_organization_id_fkey
    FOREIGN KEY (organization_id) REFERENCES organizations (id) ON DELETE CASCADE;
COMMENT ON TABLE api_usage IS 'one row per API request; partitioned by UTC month of occurred_at (0011)';

DO $attach$
DECLARE
    bound timestamptz;
BEGIN
    SELECT (regexp_match(pg_get_constraintdef(oid), '''([^'']+)'''))[1]::timestamptz INTO bound
    FROM pg_constraint WHERE conrelid = 'public.api_usage_legacy'::regclass AND conname = 'api_usage_legacy_range';
    -- No scan: the validated CHECK proves the bound. The unique index and the foreign key are attached, not made.
    EXECUTE format('ALTER TABLE api_usage ATTACH PARTITION api_usage_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
                   bound);
END
$attach$;
ALTER TABLE api_usage_legacy DROP CONSTRAINT api_usage_legacy_range;  -- the partition bound says it now

ALTER TABLE api_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_usage FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_usage
    USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))
    WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]));
GRANT SELECT, INSERT, UPDATE ON api_usage TO cost_worker_writer;
GRANT SELECT ON api_usage TO cost_worker_reader;
-- Partitions are reached through the parent only (its policies apply there); none has a grant of its own.
REVOKE ALL ON api_usage_legacy FROM cost_worker_writer, cost_worker_reader;

-- ============================================================================================ retention state

-- The first month whose per-request detail is kept: retention dropped everything before it (NULL: nothing was
-- dropped). Events before it are not inserted again (the rollups already hold them): the batch quarantines them.
CREATE TABLE api_usage_retention (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    kept_from  date CHECK (kept_from = date_trunc('month', kept_from)),
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO api_usage_retention DEFAULT VALUES;
GRANT SELECT ON api_usage_retention TO cost_worker_writer, cost_worker_reader;

-- Replayed quarantine rows age out by replayed_at.
CREATE INDEX quarantine_replayed_idx ON quarantine (replayed_at) WHERE status = 'replayed';

-- Retention keeps what an open budget period needs, so it reads every active budget, as the owner too.
CREATE POLICY retention_guard ON ai_organization_budgets FOR SELECT TO cost_worker_owner USING (true);
CREATE POLICY retention_guard ON ai_project_budgets FOR SELECT TO cost_worker_owner USING (true);
CREATE POLICY retention_guard ON ai_budgets FOR SELECT TO cost_worker_owner USING (true);

-- ============================================================================================ functions

-- The partitions of api_usage and their bounds ([from_at, until_at); MINVALUE is -infinity), read from the catalog.
CREATE FUNCTION cost_worker_api_usage_partitions()
RETURNS TABLE (partition_name text, from_at timestamptz, until_at timestamptz, detach_pending boolean)
LANGUAGE sql STABLE
SET "TimeZone" = 'UTC' SET "DateStyle" = 'ISO, YMD'
AS $$
    SELECT c.relname::text,
           CASE WHEN b[1] = 'MINVALUE' THEN '-infinity' ELSE btrim(b[1], '''') END::timestamptz,
           CASE WHEN b[2] = 'MAXVALUE' THEN 'infinity' ELSE btrim(b[2], '''') END::timestamptz,
           i.inhdetachpending
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), '^FOR VALUES FROM \((.+)\) TO \((.+)\)$') b
    WHERE i.inhparent = 'public.api_usage'::regclass
    ORDER BY 2
$$;

-- The partition of one UTC month, if no partition covers the month yet. Created standalone and ATTACHed (SHARE
-- UPDATE EXCLUSIVE on the parent: batches of other workers keep inserting). One creator at a time: a concurrent
-- one waits for the first one's transaction, then finds the partition there. Returns its name (NULL: covered).
CREATE FUNCTION cost_worker_api_usage_create_partition(target_month date) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp SET "TimeZone" = 'UTC' SET "DateStyle" = 'ISO, YMD'
AS $$
DECLARE
    month_start timestamp := date_trunc('month', target_month);
    part_name text := 'api_usage_y' || to_char(month_start, 'YYYY') || 'm' || to_char(month_start, 'MM');
BEGIN
    IF month_start < '2015-01-01' OR month_start > now() AT TIME ZONE 'UTC' + interval '1 year' THEN
        RAISE EXCEPTION 'no api_usage partition for %: outside the months events can have', month_start::date;
    END IF;
    IF to_regclass(part_name) IS NOT NULL OR EXISTS (
        SELECT FROM cost_worker_api_usage_partitions() p
        WHERE p.from_at <= month_start AT TIME ZONE 'UTC' AND p.until_at > month_start AT TIME ZONE 'UTC') THEN
        RETURN NULL;  -- covered (the usual case: no lock taken)
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('cost_worker.api_usage_partitions', 0));
    IF EXISTS (SELECT FROM cost_worker_api_usage_partitions() p
               WHERE p.from_at <= month_start AT TIME ZONE 'UTC' AND p.until_at > month_start AT TIME ZONE 'UTC') THEN
        RETURN NULL;  -- a concurrent creator made it while this one waited
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE api_usage INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)',
                   part_name);
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY', part_name);
    EXECUTE format('ALTER TABLE api_usage ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part_name, month_start::text || '+00', (month_start + interval '1 month')::text || '+00');
    RETURN part_name;
END
$$;

-- Every month in [from_month, through_month] has a partition (the migration, and the worker's periodic run, which
-- creates the coming months ahead). Returns the partitions created.
CREATE FUNCTION cost_worker_api_usage_ensure(from_month date, through_month date) RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    m date := date_trunc('month', from_month)::date;
    made text[] := '{}';
    made_name text;
BEGIN
    WHILE m <= through_month LOOP
        made_name := cost_worker_api_usage_create_partition(m);
        IF made_name IS NOT NULL THEN
            made := made || made_name;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN made;
END
$$;

-- The batch path, first thing it does with API-usage events: the months of its events get a partition if they
-- have none, unless retention dropped them. Returns the first month kept (NULL: nothing dropped); the batch
-- quarantines its events before it. The shared lock, held until the batch commits, orders it with retention
-- moving that month (exclusive): a batch that read the old month has committed before any partition is dropped.
CREATE FUNCTION cost_worker_api_usage_admit(months date[]) RETURNS date
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    kept date;
    m date;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('cost_worker.api_usage_retention', 0));
    SELECT r.kept_from INTO kept FROM api_usage_retention r;
    FOREACH m IN ARRAY coalesce(months, '{}') LOOP
        IF kept IS NULL OR m >= kept THEN
            PERFORM cost_worker_api_usage_create_partition(m);
        END IF;
    END LOOP;
    RETURN kept;
END
$$;

-- Retention, step 1: from now on events before `kept_from` are refused (never moves back, never past the current
-- month). Waits for the batches in flight (they hold the shared lock) and holds new ones until it commits.
CREATE FUNCTION cost_worker_retention_advance(new_kept_from date) RETURNS date
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    result date;
BEGIN
    IF new_kept_from <> date_trunc('month', new_kept_from)
       OR new_kept_from > date_trunc('month', now() AT TIME ZONE 'UTC') THEN
        RAISE EXCEPTION 'retention cannot keep from % (the first day of a month up to the current one)', new_kept_from;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('cost_worker.api_usage_retention', 0));
    UPDATE api_usage_retention r SET kept_from = greatest(r.kept_from, new_kept_from), updated_at = now()
    RETURNING r.kept_from INTO result;
    RETURN result;
END
$$;

-- Retention, step 2 (for logins that cannot act as the owner; the owner detaches CONCURRENTLY instead): detach and
-- drop one partition wholly before the first month kept. A plain DETACH takes ACCESS EXCLUSIVE on the parent for
-- a moment; lock_timeout bounds how long batches queue behind it (the next run tries again).
CREATE FUNCTION cost_worker_retention_drop(target text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp SET lock_timeout = '5s'
AS $$
DECLARE
    kept date;
    part record;
BEGIN
    SELECT r.kept_from INTO kept FROM api_usage_retention r;
    SELECT * INTO part FROM cost_worker_api_usage_partitions() p WHERE p.partition_name = target;
    IF NOT FOUND OR kept IS NULL OR part.until_at > kept::timestamp AT TIME ZONE 'UTC' THEN
        RAISE EXCEPTION 'refusing to drop %: not a partition of api_usage wholly before the first month kept (%)',
                        target, kept;
    END IF;
    IF NOT part.detach_pending THEN
        EXECUTE format('ALTER TABLE api_usage DETACH PARTITION %I', target);
    END IF;
    EXECUTE format('DROP TABLE %I', target);
END
$$;

-- Replayed quarantine rows replayed before `cutoff`, at most max_rows per call (pending ones are never touched).
CREATE FUNCTION cost_worker_retention_quarantine(cutoff timestamptz, max_rows integer) RETURNS bigint
LANGUAGE sql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM quarantine
        WHERE id IN (SELECT id FROM quarantine WHERE status = 'replayed' AND replayed_at < cutoff
                     ORDER BY replayed_at LIMIT max_rows)
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

REVOKE EXECUTE ON FUNCTION cost_worker_api_usage_create_partition(date), cost_worker_api_usage_ensure(date, date),
    cost_worker_api_usage_admit(date[]), cost_worker_retention_advance(date), cost_worker_retention_drop(text),
    cost_worker_retention_quarantine(timestamptz, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cost_worker_api_usage_ensure(date, date), cost_worker_api_usage_admit(date[]),
    cost_worker_retention_advance(date), cost_worker_retention_drop(text),
    cost_worker_retention_quarantine(timestamptz, integer)
    TO cost_worker_writer;
GRANT EXECUTE ON FUNCTION cost_worker_api_usage_partitions() TO cost_worker_writer, cost_worker_reader;

-- The months from the old table's bound through two months after the current one.
SELECT cost_worker_api_usage_ensure(
    (SELECT until_at AT TIME ZONE 'UTC' FROM cost_worker_api_usage_partitions() WHERE partition_name = 'api_usage_legacy')::date,
    (date_trunc('month', (now() + interval '2 days') AT TIME ZONE 'UTC') + interval '2 months')::date
);
