/*
 * tally-ledger's writer: a thread with its own PostgreSQL connection that runs one group's
 * transaction at a time, so the consumer loop decides the next group while this one commits.
 * The consumer thread submits a built transaction and later takes it back with its result; the
 * writer touches nothing but the transaction and its connection.
 */
#ifndef TLY_LEDGER_WRITER_H
#define TLY_LEDGER_WRITER_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"
#include "ledger_store.h"
#include "pg.h"

struct tly_ledger_writer;

/* The writer connection's application_name (pg_stat_activity tells its backend apart). */
#define TLY_LEDGER_WRITER_APP "tally-ledger writer"

/*
 * Connect (conninfo, application_name TLY_LEDGER_WRITER_APP) and start the thread. wake(ud), when not
 * NULL, is called on the writer's thread each time a transaction finished (to wake the consumer
 * loop). NULL with errstr filled on failure.
 */
struct tly_ledger_writer *tly_ledger_writer_new(const char *conninfo, void (*wake)(void *ud),
						void *ud, char *errstr, size_t errlen);

/* Stop the thread (after the running transaction) and close the connection; accepts NULL. */
void tly_ledger_writer_free(struct tly_ledger_writer *w);

/* Run txn (ownership moves to the writer until it is taken back). Only when not busy. */
void tly_ledger_writer_submit(struct tly_ledger_writer *w, struct tly_ledger_txn *txn);

/* A transaction was submitted and not taken back yet. */
bool tly_ledger_writer_busy(const struct tly_ledger_writer *w);

/*
 * Take the submitted transaction back once it ran, waiting up to timeout_ms (-1: as long as it
 * takes): the transaction (caller owns it again) with *rc and *err its result, or NULL when it
 * is still running. A lost connection is made again (once) before the next transaction runs.
 */
struct tly_ledger_txn *tly_ledger_writer_take(struct tly_ledger_writer *w, int timeout_ms, int *rc,
					     struct tly_pg_error *err);

#endif
