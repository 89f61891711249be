-- Wallet snapshots saved less often. tally-ledger used to rewrite a touched tenant's snapshot (and
-- its changed holds) in every batch: a third of its transaction's work. Now a snapshot is saved
-- when the tenant is new, every few batches that change it, and at the latest once its partition
-- has moved far past it; on assignment the ledger loads it and re-executes the tenant's applied
-- input records after it (ledger_inputs, the same records the audit re-executes), then checks
-- that it reached the last stored entry (seq and hash). as_of_offset: the snapshot holds the
-- effect of every input record of the partition below it; NULL (snapshots written before this
-- migration) means as of the partition's stored offset. Runs in one transaction (the migration
-- runner's).

ALTER TABLE ledger_wallets
    ADD COLUMN as_of_offset bigint CHECK (as_of_offset >= 0);
