-- No deduplication in ledger_entries' two non-unique indexes. Before a full B-tree leaf page
-- splits, PostgreSQL (13+) first tries to merge equal keys into posting lists, walking the whole
-- page; tally-ledger's inserts fill a page every few dozen tuples, so that walk ran on nearly every
-- split. The "seen" index's keys (tenant_id, cause_event_id) WHERE cause_first are unique (one
-- first entry per input record), so the walk never merged anything; (cause_partition,
-- cause_offset) holds about 1.5 entries a key, so posting lists saved little room. The walks were
-- about 6% of the writer's backend (perf, tally-bench 1,000 tenants). The primary key is unique
-- and appended to, so PostgreSQL never deduplicates it. The option applies to every insert from
-- now on; tuples already merged stay valid and are read as before (nothing is rewritten).

ALTER INDEX ledger_entries_tenant_cause_first_idx SET (deduplicate_items = off);
ALTER INDEX ledger_entries_cause_offset_idx SET (deduplicate_items = off);
