/*
 * Comparing projections: a canonical digest of the projection tables (two states are equal when
 * their digests are), and the token balances held against the ledger's entries. Used by the
 * projector and rebuild suites and by tally-chaos.
 */
#ifndef TLY_COMPARE_H
#define TLY_COMPARE_H

#include <stdint.h>

#include <libpq-fe.h>

#include "err.h"
#include "pg.h"

/*
 * One line per table of tly_fold_tables, "table=ROWS:MD5" over the rows in a canonical order
 * (as JSON, without the surrogate bigserial ids, which a rebuild numbers anew). Returns the text
 * (malloc'd, caller frees), or NULL with err filled.
 */
char *tly_compare_digest(PGconn *conn, struct tly_pg_error *err);

/*
 * Tenants whose token_balances row is not their last ledger entry (seq, held, credits, tokens
 * remaining, overage) into *mismatched. 0, or TLY_E_PG with err filled.
 */
int tly_compare_balances(PGconn *conn, int64_t *mismatched, struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
