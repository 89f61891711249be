-- tally-ledger's compare-and-set of a group's offsets as one statement that fails the transaction
-- when a partition did not advance. The group's transaction sends it, the rest of its statements
-- and its COMMIT in one pipeline (one round trip), so the client cannot look at the partitions
-- advanced before the COMMIT runs: an error is what keeps a fenced group (another owner moved
-- the offset) from committing. SQLSTATE TL001 (a class of its own, not PostgreSQL's) says which
-- error it is; the client then reads the stored offsets back to tell which partitions moved.
--
-- old_offsets[i] < 0: partition i has no row yet (it is inserted). The group's rows are locked
-- first (its own new rows are its already; the insert waited for another's), in a statement of
-- their own: behind a transaction of the same lane that still holds them this waits for its
-- end, and the UPDATE, a later statement with a newer snapshot (a
-- volatile function's statements each take one under READ COMMITTED), sees its committed
-- offsets. The UPDATE alone would skip such a row: the version its snapshot sees holds the older
-- offset, fails the WHERE, and is never waited for.
--
-- lock_timeout: none here. The transaction bounds its lock waits before this call (a wait for
-- another owner's new keys; consumers/ledger_store.c, STMT_START); this call's wait for the
-- transaction before it on the same rows is ordinary and unbounded.
--
-- plan_cache_mode: the joins of unnest() with consumer_offsets are planned for each call's arrays
-- (the session's generic plans are made for the table's size at their first use).

CREATE FUNCTION tly_ledger_offsets_advance(consumer_name text, topic_name text, partitions int[],
                                           old_offsets bigint[], new_offsets bigint[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET plan_cache_mode = force_custom_plan
SET lock_timeout = 0
AS $fn$
DECLARE
    advanced bigint := 0;
    n bigint;
BEGIN
    IF 0 > ANY (old_offsets) THEN
        INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)
        SELECT consumer_name, topic_name, k.partition, k.new_offset
        FROM unnest(partitions, old_offsets, new_offsets) AS k (partition, old_offset, new_offset)
        WHERE k.old_offset < 0
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS advanced = ROW_COUNT;
    END IF;
    IF advanced < cardinality(partitions) THEN
        PERFORM FROM consumer_offsets o
        WHERE o.consumer = consumer_name AND o.topic = topic_name AND o.partition = ANY (partitions)
        FOR UPDATE;
        UPDATE consumer_offsets o SET next_offset = k.new_offset, updated_at = now()
        FROM unnest(partitions, old_offsets, new_offsets) AS k (partition, old_offset, new_offset)
        WHERE o.consumer = consumer_name AND o.topic = topic_name AND o.partition = k.partition
          AND k.old_offset >= 0 AND o.next_offset = k.old_offset;
        GET DIAGNOSTICS n = ROW_COUNT;
        advanced := advanced + n;
    END IF;
    IF advanced <> cardinality(partitions) THEN
        RAISE EXCEPTION 'could not advance the offsets of % of % partitions of "%"',
            cardinality(partitions) - advanced, cardinality(partitions), topic_name
            USING DETAIL = 'The stored offset moved: another process committed the partition.',
                  ERRCODE = 'TL001';
    END IF;
END
$fn$;

ALTER FUNCTION tly_ledger_offsets_advance(text, text, int[], bigint[], bigint[]) OWNER TO tally_owner;
REVOKE ALL ON FUNCTION tly_ledger_offsets_advance(text, text, int[], bigint[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tly_ledger_offsets_advance(text, text, int[], bigint[], bigint[])
    TO tally_ledger;
