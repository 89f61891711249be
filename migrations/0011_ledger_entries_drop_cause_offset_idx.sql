-- ledger_entries without the (cause_partition, cause_offset) index. tally-ledger's writer inserts
-- every entry into each index of ledger_entries (1.5 entries a record), and those inserts were
-- nearly half of its backend's CPU; this index was about a fifth of that, for two readers that
-- do not need it:
--   * the republish on assignment (the entries of a partition from its delivered marker on) now
--     goes through the primary key: for each tenant of the partition (ledger_wallets, whose
--     partition index it uses), one backward probe finds its last entry caused below the marker,
--     and its entries after that one are the ones to republish (a tenant's entries follow its
--     partition's offsets in seq order). The start-up already reads every wallet snapshot of the
--     partition, so this adds one index probe per wallet it loads;
--   * tallyctl audit reads a range of partitions in (cause_partition, cause_offset) order with a
--     sequential scan and a sort (the planner's choice with or without the index: a group commit
--     interleaves every partition's entries in the heap, so the index order is not the heap's).
-- The primary key (tenant_id, seq) and the "seen" lookup's partial index stay. Operators' own
-- queries by cause offset still work, as scans. Runs in one transaction (the migration runner's).

DROP INDEX ledger_entries_cause_offset_idx;
