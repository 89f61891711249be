-- The "seen" lookup (has this tenant an entry caused by this event id?) served by a smaller index.
-- tally-ledger asks for the first entry of a (tenant_id, cause_event_id); the full index on those
-- two columns took an index tuple for every entry (1.5 a record on a typical load, each at a
-- random place in the index: 17% of the writer's CPU). cause_first marks the first entry of each
-- input record for a tenant (the first of an input's entries in seq order); the first entry of a
-- (tenant_id, cause_event_id) is always one of those, so the partial index answers the same
-- question with one tuple per input record that yields entries. Rows stored before this migration
-- are marked here. tally-ledger always writes true or false; NULL (a row written by other means
-- with every column named) is "not first", as false. Runs in one transaction (the migration
-- runner's).

ALTER TABLE ledger_entries
    ADD COLUMN cause_first boolean DEFAULT false;

UPDATE ledger_entries e SET cause_first = true
FROM (SELECT DISTINCT ON (tenant_id, cause_partition, cause_offset) tenant_id, seq
      FROM ledger_entries ORDER BY tenant_id, cause_partition, cause_offset, seq) f
WHERE e.tenant_id = f.tenant_id AND e.seq = f.seq;

DROP INDEX ledger_entries_tenant_cause_idx;
CREATE INDEX ledger_entries_tenant_cause_first_idx ON ledger_entries (tenant_id, cause_event_id)
    WHERE cause_first;
