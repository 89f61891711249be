/*
 * tallyctl rebuild's reading of its inputs on threads of their own, while the caller folds:
 * tally.events and tally.catalog (rb_read: the assigned partitions polled up to each one's target,
 * ClockTicks skipped by their fingerprint, the rest decoded and handed over in partition order, in
 * blocks) and the rows of a COPY TO STDOUT (rb_rows: the ledger entries, read ahead on a second
 * connection while the events are folded, up to a memory bound).
 */
#ifndef TALLYCTL_REBUILD_READ_H
#define TALLYCTL_REBUILD_READ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>
#include <libpq-fe.h>

#include "codec.h"
#include "err.h"
#include "event.h"

/* One partition of tally.events or tally.catalog. */
struct rpart {
	const char *topic;
	int32_t partition;
	int64_t low;    /* low watermark at start */
	int64_t done;   /* next offset to fold into the shadows */
	int64_t target; /* fold up to here (exclusive) in this pass */
	bool active;
};

struct rb_read;

/*
 * Start the reading threads for the partitions with active set (read from done up to target);
 * call it before assigning them to rk (from done): each one's queue is forwarded to a thread's
 * (back to the consumer's queue at rb_read_end), so nothing fetched reaches the consumer's queue.
 * parts, codec and rk's queues belong to the threads until rb_read_end (the caller touches none
 * of them meanwhile; codec is the first thread's, the others make their own); tick_fp[0..n_tick)
 * are fingerprints skipped undecoded; stall_ms without a record while some are expected ends the
 * reading with an error. NULL with errstr filled.
 */
struct rb_read *rb_read_start(rd_kafka_t *rk, struct tly_codec *codec, struct rpart *parts,
			      size_t nparts, const uint64_t *tick_fp, size_t n_tick, int stall_ms,
			      char *errstr, size_t errlen);

/*
 * The next decoded record (borrowed until the next call): 1; 0 when every partition reached its
 * target; TLY_E_KAFKA or TLY_E_TIMEOUT with errstr filled. *records grows by the records read
 * (ClockTicks and undecodable ones included) as blocks arrive.
 */
int rb_read_next(struct rb_read *r, const struct tly_event **ev, int64_t *records, char *errstr,
		 size_t errlen) TLY_MUST_CHECK;

/*
 * Stop the threads (also before the end) and free r; parts[].done are then where the reading
 * stopped. *undecodable grows by the records that did not decode (skipped, as tally-projector
 * skips them). Accepts NULL.
 */
void rb_read_end(struct rb_read *r, uint64_t *undecodable);

struct rb_rows;

/*
 * Run sql (a "COPY (...) TO STDOUT (FORMAT binary)") on conn from a thread, which takes conn
 * until rb_rows_end, and keep its rows in memory, at most about max_bytes ahead of the caller.
 * NULL with errstr filled.
 */
struct rb_rows *rb_rows_start(PGconn *conn, const char *sql, size_t max_bytes, char *errstr,
			      size_t errlen);

/*
 * The next row, as lib/copyout gives it (values and lengths borrowed until the next call): 1; 0
 * after the last row (the COPY finished well); TLY_E_PG, TLY_E_CORRUPT or TLY_E_NOMEM with errstr
 * filled.
 */
int rb_rows_next(struct rb_rows *r, const char *const **values, const int **lengths, int *nfields,
		 char *errstr, size_t errlen) TLY_MUST_CHECK;

/* Stop reading (also before the end), join the thread and free r; conn is the caller's again. */
void rb_rows_end(struct rb_rows *r);

#endif
