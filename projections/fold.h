/*
 * The projection fold: decoded tally.events, tally.ledger and tally.catalog messages -> the rows
 * of the projection tables (tenant_accounts … api_usage, see migrations/0001_baseline.sql).
 *
 * A batch collects messages in feed order (in memory, as binary COPY rows with one typed column
 * per message field the fold reads; messages of which the statements need less, such as a run of
 * a tenant's hold entries, are held per tenant and staged as one row when the batch is sent:
 * projections/README.md "How a flush works"), then flush writes them in one COPY into a
 * temporary staging table and folds them into the projections with at most a fixed number of
 * set-based statements (those whose input types are in the batch), inside a transaction the
 * caller owns (so the caller commits the rows together with its consumed offsets, or with a
 * table swap when rebuilding).
 *
 * The fold is idempotent and depends only on the messages: event ids seen before are skipped
 * (projector_seen_events, for the types tly_fold_keeps_event_id names), ledger entries at or
 * below the last applied seq of their tenant are skipped (projector_ledger_applied), timestamps
 * come from occurred_at / ledger_time, never now(). Feeding the same messages again, in any
 * number of batches, gives the same rows.
 *
 * Not thread-safe: one batch per thread and connection.
 */
#ifndef TLY_FOLD_H
#define TLY_FOLD_H

#include <stdbool.h>
#include <stddef.h>

#include <libpq-fe.h>

#include "err.h"
#include "event.h"
#include "pg.h"

struct tly_fold;

/* The tables the fold writes, by their default names (tly_fold_set_table renames them). */
extern const char *const tly_fold_tables[];
extern const size_t tly_fold_n_tables;

/* An empty batch writing the default tables. NULL on OOM (or lib/event's descriptors lack a
 * field the fold stages: a build error the projector and rebuild suites catch). */
struct tly_fold *tly_fold_new(void);
void tly_fold_free(struct tly_fold *fold); /* accepts NULL */

/*
 * Write table (one of tly_fold_tables, e.g. "token_balances") under another name, e.g. a shadow
 * table "token_balances_rebuild" or "shadow.token_balances" (letters, digits, '_' and one '.').
 * TLY_E_NOT_FOUND for an unknown table, TLY_E_INVALID for a bad name.
 */
int tly_fold_set_table(struct tly_fold *fold, const char *table, const char *name) TLY_MUST_CHECK;

/*
 * Whether an event of type changes a projection row by itself, so that its id is recorded in
 * projector_seen_events and a repeat of it is dropped. False for the wallet's events
 * (SubscriptionCancelled, -Paused, -Resumed, CreditsGranted, TokensReserved, ReservationReleased,
 * TokensDebited): they reach the projections only through the ledger's entries, a repeat of one
 * changes nothing, and the fold keeps of them only their tenant (its placeholder row). The live
 * fold and the rebuild's in-memory fold (memfold.c) both follow it.
 */
bool tly_fold_keeps_event_id(enum tly_event_type type);

/*
 * Add one decoded message (borrowed for the call: what the fold needs is copied). Every event type
 * of tally.events, PlanPublished and LedgerEntry (tenant_id set) are folded; ClockTick is ignored.
 * 0 or TLY_E_NOMEM.
 */
int tly_fold_add(struct tly_fold *fold, const struct tly_event *ev) TLY_MUST_CHECK;

/*
 * Empty every table of tly_fold_tables (default names) but the plan catalog (billing_plans,
 * plan_features: the migrations seed it), in one TRUNCATE ... CASCADE over conn: the projections
 * as before any message, for tests and benchmarks. 0 or TLY_E_PG.
 */
int tly_fold_truncate(PGconn *conn, struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * Set conn's session up for the fold (temp_buffers, so that a batch's staging table stays in
 * memory; PostgreSQL lets a session change it only before its first temporary table; jit off, as
 * the batch's statements each run once).
 * tly_fold_flush does it when it creates the staging table; a caller whose session uses
 * temporary tables of its own first calls it right after connecting. 0 or TLY_E_PG.
 */
int tly_fold_prepare_session(PGconn *conn, struct tly_pg_error *err) TLY_MUST_CHECK;

/* Messages added since the last flush or clear. */
size_t tly_fold_pending(const struct tly_fold *fold);

/* Forget the messages added since the last flush (after a rolled back transaction). */
void tly_fold_clear(struct tly_fold *fold);

/*
 * Fold the batch into the tables over conn, which must be inside a transaction (BEGIN done, by
 * the caller, who commits or rolls back). The batch is cleared on success. TLY_E_PG with err
 * filled (switch on err->errclass); then roll back, and add the messages again or clear.
 */
int tly_fold_flush(struct tly_fold *fold, PGconn *conn, struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * tly_fold_flush in two halves, so that the caller reads its next batch while the server folds
 * this one. send stages the batch (COPY, a seq gap's entries read back: round trips) and sends
 * the fold's statements and then tail (e.g. "COMMIT"; NULL: none) in one pipeline without
 * waiting; with no messages pending only tail is sent. 0 (poll until done), or TLY_E_PG /
 * TLY_E_NOMEM with err filled (nothing left to poll). Until poll says done, the fold takes no
 * messages and conn takes no other statement.
 * poll reads what has arrived (wait: blocks until done): 1 while results are outstanding, 0 once
 * all arrived and succeeded (the batch is cleared), TLY_E_PG with err filled (roll back and clear,
 * as after tly_fold_flush; a unique violation is retriable: another session wrote a key of the
 * batch after its checks, and the next attempt's see it). 0 when nothing was sent.
 */
int tly_fold_flush_send(struct tly_fold *fold, PGconn *conn, const char *tail,
			struct tly_pg_error *err) TLY_MUST_CHECK;
int tly_fold_flush_poll(struct tly_fold *fold, PGconn *conn, bool wait,
			struct tly_pg_error *err) TLY_MUST_CHECK;

/* Sent by tly_fold_flush_send, results not all read by tly_fold_flush_poll yet. */
bool tly_fold_in_flight(const struct tly_fold *fold);

/*
 * A map or record-list field of ev (by its descriptor name) as JSON text, as lib/event_json renders
 * it. malloc'd, caller frees; NULL on OOM (or no such field).
 */
char *tly_fold_field_json(const struct tly_event *ev, const char *name);

#endif
