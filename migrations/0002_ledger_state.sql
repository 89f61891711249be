-- tally-ledger's own state beside the ledger: the cause digest of every entry (exact duplicate and
-- conflict detection), wallet snapshots (a restart loads them instead of replaying history) and how
-- far each partition's entries are known to be delivered to tally.ledger (republished on restart).
-- Runs in one transaction (the migration runner's). ledger_entries is empty in every deployment
-- when this runs, so the new NOT NULL column needs no default.

ALTER TABLE ledger_entries
    ADD COLUMN cause_digest bytea NOT NULL CHECK (octet_length(cause_digest) = 32);

-- Each tenant's wallet as of its last committed batch, written in the same transaction as the
-- entries and the consumed offset of that batch.
CREATE TABLE ledger_wallets (
    tenant_id  uuid        PRIMARY KEY,
    partition  integer     NOT NULL CHECK (partition >= 0),
    seq        bigint      NOT NULL CHECK (seq >= 0),
    state      jsonb       NOT NULL CHECK (jsonb_typeof(state) = 'object'),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_wallets_partition_idx ON ledger_wallets (partition);

-- Per partition of tally.ledger: every entry caused by an input record below next_offset has
-- been delivered to the topic. On assignment the ledger republishes the entries from there on.
CREATE TABLE ledger_published (
    topic       text        NOT NULL CHECK (topic <> ''),
    partition   integer     NOT NULL CHECK (partition >= 0),
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_published_pkey PRIMARY KEY (topic, partition)
);
