-- agent_messages without its foreign key to tenant_accounts. Each message row checked its tenant
-- and its conversation with a row-locking lookup per row (PostgreSQL's referential-integrity
-- triggers): together half of the message insert's work on a loadgen backlog. The tenant key is
-- Tally's own addition (for row-level security), implied by the conversation: the conversation
-- row carries the same tenant and keeps its own key to tenant_accounts, and the fold creates a
-- placeholder tenant for every tenant of a batch before anything else (projections/README.md, "Out
-- of order within a partition"). The seeds' key, conversation_id -> agent_conversations, stays.
-- tests/check_projector.c checks both references after loadgen traffic and kill -9.

ALTER TABLE agent_messages DROP CONSTRAINT agent_messages_tenant_id_fkey;
