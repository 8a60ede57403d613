-- Retention that was interrupted is finished by the next run (README "Partitions and retention").
--
-- Dropping a partition as the owner is two statements: `DETACH PARTITION ... CONCURRENTLY` (itself two
-- transactions) and `DROP TABLE`. A run whose connection dies in between leaves either a partition "detach pending"
-- (every later `DETACH ... CONCURRENTLY` of the table fails until it is finalized) or a standalone table that no
-- later run saw (the month's detail stayed for ever). So, before its first detach, a run records the table it is
-- about to drop, by oid, here; the DROP deletes the record in the same transaction. Every run first finishes:
--   * a partition of api_usage detach pending and wholly before the first month kept (only retention moves that
--     month, and it moves it before it detaches anything): DROP (as cost_worker_retention_drop does: not FINALIZE,
--     which waits for every older snapshot in the database, whatever it reads, and failed at lock_timeout);
--   * a standalone table recorded here under the same oid and name, no longer a partition: DROP.
-- A standalone table named like a partition that is not recorded here (a human's copy, a restore, or one left by a
-- release before this one) is never dropped: it is reported, for a human to decide.
CREATE TABLE api_usage_retention_drops (
    relid          oid PRIMARY KEY,
    partition_name text        NOT NULL,
    until_at       timestamptz NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE api_usage_retention_drops IS
    'api_usage partitions retention started to drop and has not dropped yet (0032); read by the next run';

-- What an earlier interrupted run left, and what this run would do about it (changes nothing).
--   'detach pending'                          finished: DROP
--   'detached, not dropped'                   finished: DROP
--   'detach pending, not started by retention' left alone: not before the first month kept
--   'not detached by retention: left alone'   left alone: named like a partition, not recorded
CREATE FUNCTION cost_worker_retention_leftovers()
RETURNS TABLE (partition_name text, state text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    SELECT p.partition_name,
           CASE WHEN r.kept_from IS NOT NULL AND p.until_at <= r.kept_from::timestamp AT TIME ZONE 'UTC'
                THEN 'detach pending' ELSE 'detach pending, not started by retention' END
    FROM cost_worker_api_usage_partitions() p CROSS JOIN api_usage_retention r
    WHERE p.detach_pending
    UNION ALL
    SELECT c.relname::text,
           CASE WHEN d.relid IS NOT NULL THEN 'detached, not dropped' ELSE 'not detached by retention: left alone' END
    FROM pg_class c
    LEFT JOIN api_usage_retention_drops d ON d.relid = c.oid AND d.partition_name = c.relname::text
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND NOT c.relispartition
      AND c.relname ~ '^api_usage_(legacy|y[0-9]{4}m[0-9]{2})$'
    ORDER BY 1
$$;

-- Retention, step 0 of every run: finish what an interrupted run left (see above). Returns the tables it dropped and
-- the state each was left in.
CREATE FUNCTION cost_worker_retention_resume()
RETURNS TABLE (partition_name text, state text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp SET lock_timeout = '5s'
AS $$
DECLARE
    left_over record;
BEGIN
    FOR left_over IN SELECT * FROM cost_worker_retention_leftovers() LOOP
        IF left_over.state IN ('detach pending', 'detached, not dropped') THEN
            EXECUTE format('DROP TABLE %I', left_over.partition_name);
            partition_name := left_over.partition_name;
            state := left_over.state;
            RETURN NEXT;
        END IF;
    END LOOP;
    -- Records of tables gone (dropped) or attached again are done with.
    DELETE FROM api_usage_retention_drops d
    WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = d.relid AND c.relname::text = d.partition_name
                      AND NOT c.relispartition);
END
$$;

-- The owner's way, before DETACH ... CONCURRENTLY: record the partition (wholly before the first month kept).
CREATE FUNCTION cost_worker_retention_begin_drop(target text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
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
    INSERT INTO api_usage_retention_drops (relid, partition_name, until_at)
    VALUES (format('%I', target)::regclass::oid, target, part.until_at)
    ON CONFLICT (relid) DO NOTHING;
END
$$;

-- ... and after it: drop the table it detached and its record, in one transaction.
CREATE FUNCTION cost_worker_retention_finish_drop(target text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp SET lock_timeout = '5s'
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM api_usage_retention_drops d JOIN pg_class c ON c.oid = d.relid
                   WHERE d.partition_name = target AND c.relname::text = target AND NOT c.relispartition) THEN
        RAISE EXCEPTION 'refusing to drop %: not a table retention detached', target;
    END IF;
    EXECUTE format('DROP TABLE %I', target);
    DELETE FROM api_usage_retention_drops WHERE partition_name = target;
END
$$;

REVOKE ALL ON api_usage_retention_drops FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION cost_worker_retention_leftovers(), cost_worker_retention_resume(),
    cost_worker_retention_begin_drop(text), cost_worker_retention_finish_drop(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cost_worker_retention_leftovers(), cost_worker_retention_resume() TO cost_worker_writer;
