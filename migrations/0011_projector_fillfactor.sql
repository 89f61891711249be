-- Room on each page for the projector's updates. Every batch updates the rows of the tenants it
-- touches in place: a token balance twice (the ledger's last entry, then the month's API cost),
-- the applied seq once, a conversation once or twice (its start, its message counters), a
-- subscription once per ledger entry that names it. None of these updates changes an indexed
-- column, so each could be a heap-only (HOT) update, which writes no index tuple; but a full
-- page has no room for the new version, and at the default fill factor (100) the pages are full:
-- on the large loadgen backlog only 16% of the 20,000 updates a run were HOT, and the others
-- wrote a new tuple into every index of their table (two to three each), which also bloat
-- those indexes for as long as the projector runs. With the fill factors below, 73% were HOT in
-- the same run. The versions a batch leaves behind are dead once it commits, so the next batch's
-- page pruning makes the room again. Only new pages are filled to these factors (existing ones
-- keep their rows until rewritten); `tallyctl rebuild` gives its shadows the live tables'
-- storage parameters. Measured and justified in projections/README.md ("Speed", session 8).

ALTER TABLE token_balances SET (fillfactor = 50);
ALTER TABLE projector_ledger_applied SET (fillfactor = 50);
ALTER TABLE agent_conversations SET (fillfactor = 70);
ALTER TABLE tenant_subscriptions SET (fillfactor = 70);
