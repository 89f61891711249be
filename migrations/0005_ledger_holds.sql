-- Holds saved apart from the wallet snapshots. A tenant's wallet remembers every hold of the
-- last hour of ledger time (open, or ended and still refused a second settle), so with the holds
-- inside the snapshot its size grew with the traffic and every batch rewrote it whole. Now a
-- batch writes one row per hold it placed or ended, deletes the ones it forgot, and the snapshot
-- keeps only the small rest. Runs in one transaction (the migration runner's); ledger_wallets is
-- empty in every deployment when this runs (no snapshot with holds inside needs moving: a
-- snapshot that still has them loads them and saves them here on its next batch).

CREATE TABLE ledger_holds (
    tenant_id      uuid   NOT NULL,
    ord            bigint NOT NULL CHECK (ord >= 0), -- placement order in the wallet
    reservation_id uuid   NOT NULL,
    tokens         bigint NOT NULL CHECK (tokens >= 0),
    expires_at     bigint NOT NULL,                  -- ledger time, µs since the epoch
    ended_at       bigint,                           -- NULL while open
    CONSTRAINT ledger_holds_pkey PRIMARY KEY (tenant_id, ord)
);

-- Snapshots are rewritten in place at every batch that touches the tenant: leave room on each
-- page for a heap-only update.
ALTER TABLE ledger_wallets SET (fillfactor = 50);

ALTER TABLE ledger_holds OWNER TO tally_owner;
REVOKE ALL ON ledger_holds FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON ledger_holds TO tally_ledger;
GRANT SELECT ON ledger_holds TO tally_auditor;
