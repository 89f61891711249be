/*
 * The projection fold in memory, for a rebuild from empty tables: every input of a rebuild is
 * folded into C structs (the same rules as fold.c's statements, projections/README.md
 * "Semantics"), then the final rows of every table are sent by binary COPY, one per table, into
 * tables that need no index while they load. fold.c stays the fold of the incremental path (the
 * projector, a rebuild's catch-up passes), which continues from the rows written here.
 *
 * Plans are not folded here: PlanPublished only teaches the fold a plan code's id (for
 * tenant_subscriptions.plan_id); the caller folds the plans themselves with fold.c after the copy,
 * and registers the plans already in the tables (the migrations' seed) with tly_memfold_plan.
 *
 * Not thread-safe; memory grows with the inputs until tly_memfold_free.
 */
#ifndef TLY_MEMFOLD_H
#define TLY_MEMFOLD_H

#include <stddef.h>

#include <libpq-fe.h>

#include "err.h"
#include "event.h"
#include "pg.h"
#include "pgcopy.h"

struct tly_memfold;

struct tly_memfold *tly_memfold_new(void); /* NULL on OOM */
void tly_memfold_free(struct tly_memfold *mf); /* accepts NULL */

/* A plan that exists before any input (code borrowed for the call). 0 or TLY_E_NOMEM. */
int tly_memfold_plan(struct tly_memfold *mf, const char *code, const tly_uuid *plan_id) TLY_MUST_CHECK;

/*
 * Fold one decoded message (borrowed for the call). Events of each tenant in partition order, then
 * ledger entries of each tenant in seq order: every event before the first entry (TLY_E_INVALID
 * for an event after an entry, or any after tly_memfold_finish). ClockTick is ignored. 0,
 * TLY_E_NOMEM or TLY_E_INVALID.
 */
int tly_memfold_add(struct tly_memfold *mf, const struct tly_event *ev) TLY_MUST_CHECK;

/* Rows folded, over every table (the copy writes at most as many). */
size_t tly_memfold_rows(const struct tly_memfold *mf);

/*
 * Stream table (an index into tly_fold_tables: projector_seen_events or agent_messages, whose rows
 * never change once folded): each of its rows, as it is folded, is added to c (binary COPY rows of
 * the columns tly_memfold_columns(table)) and added(ud, c) is called from tly_memfold_add (the
 * caller sends c's rows when it likes); tly_memfold_copy then does not write that table. Before
 * the first tly_memfold_add; c is borrowed until tly_memfold_free. 0, or TLY_E_INVALID for
 * another table.
 */
typedef void tly_memfold_added_fn(void *ud, struct tly_pgcopy *c);
int tly_memfold_stream(struct tly_memfold *mf, size_t table, struct tly_pgcopy *c,
		       tly_memfold_added_fn *added, void *ud) TLY_MUST_CHECK;

/* The columns the fold writes of table (an index into tly_fold_tables), "a, b, ..."; NULL if none. */
const char *tly_memfold_columns(size_t table);

/*
 * The end of the input: settles what depends on every input (which usage row of an external
 * event id is kept). After it, tly_memfold_add must not be called and tly_memfold_copy only reads
 * mf, so that two threads may copy at once (disjoint tables, each on its own connection).
 * 0 or TLY_E_NOMEM (the fold ran out of memory at some point).
 */
int tly_memfold_finish(struct tly_memfold *mf) TLY_MUST_CHECK;

/*
 * COPY the final rows into the tables named by names[i] for tly_fold_tables[i] (unquoted; NULL:
 * that table is not written, nor ever the plan tables), over conn, inside the caller's
 * transaction; calls tly_memfold_finish first if the caller has not. 0, TLY_E_NOMEM, or TLY_E_PG
 * with err filled.
 */
int tly_memfold_copy(struct tly_memfold *mf, PGconn *conn, const char *const names[],
		     struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
