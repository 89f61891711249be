-- Drop ledger_entries_cause_offset_idx (cause_partition, cause_offset) from the baseline. Every
-- entry tally-ledger writes put a tuple at a random place in it: about 2 µs of the 9.6 µs an
-- entry costs its writer's backend in a microbenchmark (index inserts are half of that backend's
-- CPU). Its readers now do without it: `tallyctl audit` reads each tenant's entries through the
-- primary key (in seq order they are in offset order) and merges the tenants of a partition by
-- offset itself; tally-ledger's republish after a restart walks each of the partition's tenants
-- (ledger_wallets) back from its last entry to the publisher's marker, also through the primary
-- key. Runs in one transaction (the migration runner's).

DROP INDEX ledger_entries_cause_offset_idx;
