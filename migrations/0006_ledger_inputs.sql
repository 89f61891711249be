-- The input records tally-ledger applied, kept beside the entries they caused (written in the same
-- transaction, by the same binary COPY path). An auditor re-executes the decision core from them
-- (tallyctl audit): a decision depends on every applied record of the tenant's partition, also
-- the ones that yield no entry (they still move ledger time), and tally.events' retention is
-- shorter than the ledger's life. Quarantined records stay in quarantine, not here: together the
-- two tables give every consumed offset its outcome. Runs in one transaction (the migration
-- runner's); ledger_entries is empty in every deployment when this runs.

CREATE TABLE ledger_inputs (
    partition integer NOT NULL CHECK (partition >= 0),
    "offset"  bigint  NOT NULL CHECK ("offset" >= 0),
    tenant_id uuid,             -- NULL for a ClockTick (it reaches every tenant of the partition)
    value     bytea   NOT NULL, -- the record's value as consumed (Avro single-object encoding)
    CONSTRAINT ledger_inputs_pkey PRIMARY KEY (partition, "offset")
);

ALTER TABLE ledger_inputs OWNER TO tally_owner;
REVOKE ALL ON ledger_inputs FROM PUBLIC;
GRANT SELECT, INSERT ON ledger_inputs TO tally_ledger;
GRANT SELECT ON ledger_inputs TO tally_auditor;
