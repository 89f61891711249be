/*
 * tally-ledger's writer: lanes of two threads, each with its own PostgreSQL connection, that run
 * a group's transactions (one per lane: the lane's partitions) at once, so two commits use two
 * cores while the consumer loop decides the next group. Partition p belongs to lane p % lanes.
 * A lane's consecutive transactions take turns on its two connections: the one queued behind a
 * running one starts at once (its inputs and COPY), sends its compare-and-sets once the one
 * before ran its own (they wait in PostgreSQL for its end) and commits after it.
 * The consumer thread submits a group's built transactions and later takes them back with their
 * results; the writer touches nothing but the transactions and its connections.
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

/* The writer connections' application_name (pg_stat_activity tells their backends apart). */
#define TLY_LEDGER_WRITER_APP "tally-ledger writer"

/* Groups the writer holds at once: one running and one queued behind it (in every lane). */
#define TLY_LEDGER_WRITER_DEPTH 2

/* Most lanes (ledger.writers). */
#define TLY_LEDGER_WRITER_LANES_MAX 16

/* What became of one lane's transaction taken back. */
struct tly_ledger_writer_result {
	int rc;                   /* 0: committed (or nothing to run) */
	struct tly_pg_error err;  /* when rc != 0 */
	bool ran;                 /* false: not run, the lane's transaction before it failed (rc != 0) */
	int64_t started_us;       /* tly_clock_us when it began to run (ran, a transaction), or when
				     the lane's one before it ended if that was later: its own time */
	int64_t ended_us;         /* and when it ended */
};

/*
 * Connect lanes times (conninfo, application_name TLY_LEDGER_WRITER_APP) and start a thread per
 * connection. wake(ud), when not NULL, is called on a writer thread each time a group finished
 * in every lane (to wake the consumer loop). NULL with errstr filled on failure.
 */
struct tly_ledger_writer *tly_ledger_writer_new(const char *conninfo, size_t lanes,
						void (*wake)(void *ud), void *ud, char *errstr,
						size_t errlen);

/* Stop the threads (after their running transactions) and close the connections; accepts NULL. */
void tly_ledger_writer_free(struct tly_ledger_writer *w);

size_t tly_ledger_writer_lanes(const struct tly_ledger_writer *w);

/* The lane that commits partition's batches. */
size_t tly_ledger_writer_lane(const struct tly_ledger_writer *w, int32_t partition);

/*
 * The lane of partition's next batch with active lanes in use (1 to tly_ledger_writer_lanes):
 * partition % active, unless a batch of it is still with the writer (held: that batch's lane,
 * -1 when none), whose lane it keeps. A partition's batches commit in order on one connection
 * behind its own compare-and-set, so it changes lanes only when nothing of it is queued or
 * running; in another lane its batch could start before the one it was decided on top of
 * committed, and would fail its compare-and-set.
 */
size_t tly_ledger_writer_lane_for(int32_t partition, size_t active, int held);

/*
 * Run a group: txns[k] (NULL: nothing in lane k) on lane k, after that lane's transactions
 * submitted before (ownership of each moves to the writer until it is taken back). Only while
 * tly_ledger_writer_full is false. A transaction queued behind one of its lane that is still
 * running starts at once on the lane's other connection and commits only after that one
 * committed, without waiting for the consumer thread or the other lanes; behind one of its
 * lane that failed it is not run, or rolled back before its COMMIT, and comes back with ran
 * false (its compare-and-sets would start from offsets that were not stored; it is never
 * counted as fenced). That holds for every transaction of the lane submitted before the failed
 * one was taken back, even if the failure had ended first. A failure in one lane does not stop
 * the others.
 */
void tly_ledger_writer_submit(struct tly_ledger_writer *w, struct tly_ledger_txn *const *txns);

/* A group was submitted and not taken back yet. */
bool tly_ledger_writer_busy(const struct tly_ledger_writer *w);

/* TLY_LEDGER_WRITER_DEPTH groups were submitted and not taken back. */
bool tly_ledger_writer_full(const struct tly_ledger_writer *w);

/*
 * Take the oldest submitted group back once every lane ran (or passed over) its transaction,
 * waiting up to timeout_ms (-1: as long as it takes): true with txns[k] (caller owns them
 * again) and res[k] for each lane, false when one still runs or waits. A lost connection is
 * made again (once) before its lane's next transaction runs.
 */
bool tly_ledger_writer_take(struct tly_ledger_writer *w, int timeout_ms,
			    struct tly_ledger_txn **txns, struct tly_ledger_writer_result *res);

#endif
