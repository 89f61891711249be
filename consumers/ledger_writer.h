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
#include <stdint.h>

#include "err.h"
#include "ledger_store.h"
#include "pg.h"

struct tly_ledger_writer;

/* The writer connection's application_name (pg_stat_activity tells its backend apart). */
#define TLY_LEDGER_WRITER_APP "tally-ledger writer"

/* Transactions the writer holds at once: one running and one queued behind it. */
#define TLY_LEDGER_WRITER_DEPTH 2

/* What became of a transaction taken back. */
struct tly_ledger_writer_result {
	int rc;                   /* 0: committed */
	struct tly_pg_error err;  /* when rc != 0 */
	bool ran;                 /* false: not run, a transaction before it failed (rc != 0) */
	int64_t started_us;       /* tly_clock_us when it began to run (ran) */
	int64_t ended_us;         /* and when it ended */
};

/*
 * Connect (conninfo, application_name TLY_LEDGER_WRITER_APP) and start the thread. wake(ud), when not
 * NULL, is called on the writer's thread each time a transaction finished (to wake the consumer
 * loop). NULL with errstr filled on failure.
 */
struct tly_ledger_writer *tly_ledger_writer_new(const char *conninfo, void (*wake)(void *ud),
						void *ud, char *errstr, size_t errlen);

/* Stop the thread (after the running transaction) and close the connection; accepts NULL. */
void tly_ledger_writer_free(struct tly_ledger_writer *w);

/*
 * Run txn after the ones submitted before it (ownership moves to the writer until it is taken
 * back). Only while tly_ledger_writer_full is false. A transaction queued behind one that is still
 * running starts the moment that one committed, without waiting for the consumer thread; behind
 * one that failed it is not run at all (its compare-and-set would start from offsets that were
 * not stored) and comes back with ran false.
 */
void tly_ledger_writer_submit(struct tly_ledger_writer *w, struct tly_ledger_txn *txn);

/* A transaction was submitted and not taken back yet. */
bool tly_ledger_writer_busy(const struct tly_ledger_writer *w);

/* TLY_LEDGER_WRITER_DEPTH transactions were submitted and not taken back. */
bool tly_ledger_writer_full(const struct tly_ledger_writer *w);

/*
 * Take the oldest submitted transaction back once it ran (or was passed over), waiting up to
 * timeout_ms (-1: as long as it takes): the transaction (caller owns it again) with *res its
 * result, or NULL when it is still running or waiting. A lost connection is made again (once)
 * before the next transaction runs.
 */
struct tly_ledger_txn *tly_ledger_writer_take(struct tly_ledger_writer *w, int timeout_ms,
					     struct tly_ledger_writer_result *res);

#endif
