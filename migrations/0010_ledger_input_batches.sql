-- The applied input records packed: one row per partition and group commit instead of one row
-- per record. tally-ledger wrote a ledger_inputs row (and its primary-key tuple) for every record
-- it applied, the largest share of its writer's work after the entries. Now each partition's
-- batch of a group commit is one row of ledger_input_batches holding that batch's applied
-- records in offset order, as three arrays of equal length (element i of each is record i):
-- offsets, tenant_ids (NULL for a ClockTick: it reaches every tenant of the partition) and
-- record_values (the value as consumed, Avro single-object encoding). first_offset and
-- last_offset are the first and last of offsets; quarantined records are not in it (they stay in
-- quarantine), so offsets may skip some. Written by the same binary COPY in the same transaction
-- as before; batches of a partition never overlap (each starts past the stored offset its
-- compare-and-set advanced), and the audit reports an offset stored twice.
--
-- ledger_inputs stays, as a view with the old columns (one row per record), for the auditor's
-- and operator's own queries; tally-ledger and tallyctl audit read the batches themselves (the
-- view cannot use an offset range to skip batches). Existing rows are packed by ranges of 1,000
-- offsets of a partition. Same roles as 0006: the ledger writes and reads, the auditor reads,
-- nobody else. Runs in one transaction (the migration runner's).

CREATE TABLE ledger_input_batches (
    partition     integer  NOT NULL CHECK (partition >= 0),
    first_offset  bigint   NOT NULL CHECK (first_offset >= 0),
    last_offset   bigint   NOT NULL,
    offsets       bigint[] NOT NULL,
    tenant_ids    uuid[]   NOT NULL,
    record_values bytea[]  NOT NULL,
    CONSTRAINT ledger_input_batches_pkey PRIMARY KEY (partition, first_offset),
    CONSTRAINT ledger_input_batches_shape CHECK (
        cardinality(offsets) >= 1 AND array_ndims(offsets) = 1 AND array_lower(offsets, 1) = 1
        AND cardinality(tenant_ids) = cardinality(offsets)
        AND cardinality(record_values) = cardinality(offsets)
        AND offsets[1] = first_offset AND offsets[cardinality(offsets)] = last_offset)
);

-- Out of line but not compressed: pglz took a tenth of the writer's backend CPU in a profile
-- (the values are Avro with random ids; they hardly compress), and the rows of 0006 were not
-- compressed either.
ALTER TABLE ledger_input_batches
    ALTER COLUMN offsets SET STORAGE EXTERNAL,
    ALTER COLUMN tenant_ids SET STORAGE EXTERNAL,
    ALTER COLUMN record_values SET STORAGE EXTERNAL;

INSERT INTO ledger_input_batches (partition, first_offset, last_offset, offsets, tenant_ids,
                                  record_values)
SELECT partition, min("offset"), max("offset"), array_agg("offset" ORDER BY "offset"),
       array_agg(tenant_id ORDER BY "offset"), array_agg(value ORDER BY "offset")
FROM ledger_inputs
GROUP BY partition, "offset" / 1000;

DROP TABLE ledger_inputs;

CREATE VIEW ledger_inputs AS
SELECT b.partition, u."offset", u.tenant_id, u.value
FROM ledger_input_batches b
CROSS JOIN LATERAL unnest(b.offsets, b.tenant_ids, b.record_values) AS u ("offset", tenant_id, value);

ALTER TABLE ledger_input_batches OWNER TO tally_owner;
ALTER VIEW ledger_inputs OWNER TO tally_owner;
REVOKE ALL ON ledger_input_batches, ledger_inputs FROM PUBLIC;
GRANT SELECT, INSERT ON ledger_input_batches TO tally_ledger;
GRANT SELECT ON ledger_input_batches, ledger_inputs TO tally_ledger, tally_auditor;
