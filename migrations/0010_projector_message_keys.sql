-- agent_messages without foreign keys. Each message row checked its tenant and its conversation
-- with a row-locking lookup per row (PostgreSQL's referential-integrity triggers): a third to a
-- half of the message insert's work, about a tenth of tally-projector's PostgreSQL time on a
-- loadgen backlog. The fold guarantees both references in the same transaction, before the
-- insert: it creates a placeholder tenant for every tenant of a batch and a placeholder conversation for
-- every conversation a message names (projections/README.md, "Out of order within a partition"),
-- and only tally-projector and the rebuild's swap (which replaces the tables together) write
-- these tables. tests/check_projector.c checks the references after loadgen traffic and kill -9.
-- The other projections keep theirs (few rows each per batch).

ALTER TABLE agent_messages
    DROP CONSTRAINT agent_messages_tenant_id_fkey,
    DROP CONSTRAINT agent_messages_conversation_id_fkey;
