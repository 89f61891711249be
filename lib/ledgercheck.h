/*
 * Invariant checks over a database's ledger (ledger_entries), for drivers that verify a run from
 * the outside (tally-chaos): per tenant a gap-free seq and a valid hash chain, no entry below the
 * overdraft limit, tokens conserved, and each input record's entries in one contiguous run. Each
 * check reads only committed rows and reports how much it examined and the first violation.
 */
#ifndef TLY_LEDGERCHECK_H
#define TLY_LEDGERCHECK_H

#include <stdint.h>

#include <libpq-fe.h>

#include "err.h"
#include "pg.h"

struct tly_codec;

/* The result of one check. */
struct tly_ledgercheck {
	int64_t checked;    /* entries (or tenants, records) examined */
	int64_t violations; /* 0: the invariant holds */
	char first[512];    /* the first violation, described; "" when none */
};

/*
 * Per tenant, seq runs 1, 2, 3 … without a gap, the first prev_hash is 32 zero bytes, each
 * prev_hash is the previous entry's hash and each hash is SHA-256(prev_hash || canonical bytes)
 * recomputed with the core's tly_ledger_entry_hash (codec borrowed for the call).
 */
int tly_ledgercheck_chain(PGconn *conn, struct tly_codec *codec, struct tly_ledgercheck *out,
			  struct tly_pg_error *err) TLY_MUST_CHECK;

/* After every entry, allowance_remaining + credits_remaining - held >= -overdraft_limit. */
int tly_ledgercheck_limit(PGconn *conn, int64_t overdraft_limit, struct tly_ledgercheck *out,
			  struct tly_pg_error *err) TLY_MUST_CHECK;

/* Token totals over all entries (deltas) and over each tenant's last entry (balances). */
struct tly_ledgercheck_totals {
	int64_t granted;  /* sum of the positive allowance and credits deltas */
	int64_t spent;    /* minus the sum of the negative ones */
	int64_t held;     /* sum of held_delta: tokens held now */
	int64_t balances; /* sum over tenants of allowance_remaining + credits_remaining - held */
};

/*
 * Conservation: per tenant, the deltas of its entries sum to its last balances (allowance plus
 * credits, and held), so over all tenants granted - spent - held = balances; a tenant where they
 * do not is a violation. totals is filled.
 */
int tly_ledgercheck_conservation(PGconn *conn, struct tly_ledgercheck *out,
				 struct tly_ledgercheck_totals *totals,
				 struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * Applied once: the entries one input record (cause partition, offset) caused for a tenant are
 * one contiguous run of seq; a record applied twice leaves two runs.
 */
int tly_ledgercheck_causes(PGconn *conn, struct tly_ledgercheck *out,
			   struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
