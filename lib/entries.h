/*
 * Ledger entries read back from PostgreSQL (ledger_entries) as decoded struct tly_event values,
 * the same shape tally.ledger carries: for folds that read the ledger from the database (tallyctl
 * rebuild) rather than from a topic whose retention may be shorter than history.
 */
#ifndef TLY_ENTRIES_H
#define TLY_ENTRIES_H

#include <libpq-fe.h>

#include "err.h"
#include "event.h"
#include "pg.h"

/*
 * The select list a query must return, in this order, for tly_entries_each (columns of
 * ledger_entries, alias e; timestamps as µs since the epoch). Use it as
 *   "SELECT " TLY_ENTRIES_SELECT " FROM ledger_entries e WHERE ... ORDER BY e.tenant_id, e.seq"
 * A result fetched in binary format may use TLY_ENTRIES_SELECT_BINARY instead: the timestamps as
 * stored (tly_entries_each reads a binary timestamptz), which spares the server a numeric
 * computation per timestamp and row.
 */
#define TLY_ENTRIES_COLUMNS_(period_start, period_end, ledger_time)                               \
	"e.tenant_id, e.seq, e.kind, e.cause_event_id, e.cause_type, e.cause_partition, "          \
	"e.cause_offset, e.cause_digest, e.ref_id, e.subscription_id, e.allowance_delta, "         \
	"e.credits_delta, e.held_delta, e.overage_delta, e.allowance_remaining, "                  \
	"e.credits_remaining, e.held, e.overage_tokens, " period_start ", " period_end ", "         \
	"e.amount_cents, e.currency, e.lines::text, e.reason, " ledger_time ", e.prev_hash, e.hash"
#define TLY_ENTRIES_SELECT                                                                         \
	TLY_ENTRIES_COLUMNS_("(extract(epoch FROM e.period_start) * 1000000)::bigint",              \
			     "(extract(epoch FROM e.period_end) * 1000000)::bigint",                \
			     "(extract(epoch FROM e.ledger_time) * 1000000)::bigint")
#define TLY_ENTRIES_SELECT_BINARY                                                                  \
	TLY_ENTRIES_COLUMNS_("e.period_start", "e.period_end", "e.ledger_time")

#define TLY_ENTRIES_NFIELDS 27

/*
 * Call fn for each row of res (a result of a TLY_ENTRIES_SELECT query, text or binary format)
 * as a
 * LedgerEntry event, borrowed for the call only. Stops at the first non-zero return of fn and
 * returns it; TLY_E_CORRUPT for a row that does not read back as an entry, TLY_E_NOMEM.
 */
int tly_entries_each(const PGresult *res, int (*fn)(const struct tly_event *entry, void *ud),
		     void *ud) TLY_MUST_CHECK;

/*
 * One row of a COPY (SELECT TLY_ENTRIES_SELECT_BINARY ...) TO STDOUT (FORMAT binary) (values and
 * lengths as lib/copyout gives them) as a LedgerEntry into ev (reset first; strings into its
 * arena). 0, TLY_E_CORRUPT (not such a row) or TLY_E_NOMEM.
 */
int tly_entries_from_copy(const char *const *values, const int *lengths, int nfields,
			  struct tly_event *ev) TLY_MUST_CHECK;

#endif
