/*
 * One assigned partition of tally.events inside tally-ledger: its tenants' wallets (loaded from
 * their snapshots), the records of its open batch, up to two decided batches whose transaction
 * is not finished yet, a bounded cache of recently committed event ids, and the batch step:
 * decode, quarantine bad input, look up "seen" exactly, decide, build the transaction; then,
 * once it ran, hand the committed batch over. Single-threaded: owned by the consumer loop (only
 * a built transaction goes to another thread).
 */
#ifndef TLY_LEDGER_PARTITION_H
#define TLY_LEDGER_PARTITION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "decide.h"
#include "err.h"
#include "ledger_store.h"
#include "pg.h"

struct tly_codec;

/* What every partition borrows from the program for the duration of a call. */
struct tly_ledger_ctx {
	PGconn *conn;
	struct tly_codec *codec;
	struct tly_ledger_config decide;
	const char *events_topic;
	const char *ledger_topic;
	int32_t partition_count;
	int64_t lock_timeout_ms; /* ledger.lock.timeout.ms; 0: TLY_LEDGER_KEYS_LOCK_TIMEOUT_MS */
};

/* The outcome of a committed batch, owned by the partition until its next decide or free. */
struct tly_ledger_batch_out {
	const struct tly_event *entries; /* committed entries in decision order */
	size_t n_entries;
	const struct tly_entries *encoded; /* their encodings (tly_entries_encoded), NULL: encode */
	const struct tly_ledger_quarantined *quarantined;
	size_t n_quarantined;
	int64_t first_offset, end_offset; /* input offsets [first, end) the batch covered */
};

struct tly_ledger_partition;

/*
 * Load partition's stored offset and wallet snapshots. NULL with err filled on failure (switch
 * on err->errclass: retriable means try again later).
 */
struct tly_ledger_partition *tly_ledger_partition_open(const struct tly_ledger_ctx *ctx,
						       int32_t partition, struct tly_pg_error *err);
void tly_ledger_partition_free(struct tly_ledger_partition *p); /* accepts NULL */

int32_t tly_ledger_partition_id(const struct tly_ledger_partition *p);
/* Where consuming resumes: the stored offset (0 when none), or after the open batch. */
int64_t tly_ledger_partition_next_offset(const struct tly_ledger_partition *p);
size_t tly_ledger_partition_tenants(const struct tly_ledger_partition *p);
/* Open holds of every wallet: one pass over the tenants, for when the partition is loaded. */
int64_t tly_ledger_partition_open_holds(const struct tly_ledger_partition *p);

/*
 * Add one record (copied) to the open batch. Records below next_offset are already applied and
 * are ignored (returns 0, *added false). 0 or TLY_E_NOMEM.
 */
int tly_ledger_partition_add(struct tly_ledger_partition *p, int64_t offset, const void *key,
			     size_t keylen, const void *value, size_t valuelen, int64_t now_ms,
			     bool *added) TLY_MUST_CHECK;

size_t tly_ledger_partition_pending(const struct tly_ledger_partition *p); /* open batch's records */
/* Decided batches whose transaction is not finished (0, 1 or 2). */
size_t tly_ledger_partition_decided(const struct tly_ledger_partition *p);
int64_t tly_ledger_partition_opened_ms(const struct tly_ledger_partition *p); /* first add */
/* Record slots p holds allocated: its batches' and its decoded events' (for tests). */
size_t tly_ledger_partition_slots(const struct tly_ledger_partition *p);

/* One partition's share of a group commit. */
struct tly_ledger_group_item {
	struct tly_ledger_partition *part; /* borrowed */
	int64_t published_offset;          /* the delivered marker to store with it, -1 to leave it */
	struct tly_ledger_batch_out out;   /* out: on success, the committed batch */
	bool fenced;                       /* out: the stored offset moved (the partition was lost) */
};

/*
 * Step one of a group commit: decide the open batches of n partitions (each with records and at
 * most one batch decided before) and build their transaction, *txn (caller owns it: run it with
 * tly_ledger_store_run, on any thread, then pass it to tly_ledger_partition_finish). The open
 * batches become decided and new ones open, so records can be added and the next group
 * decided while this one commits: the event ids of a decided batch count as seen, and its
 * partition's next compare-and-set starts from its new offset. Transactions must run and
 * finish in the order they were decided. On failure the partitions' in-memory wallets may have
 * moved past the database: the caller must free and open each of them again (and those of a
 * group decided before whose transaction did not commit). 0, TLY_E_PG (err filled), TLY_E_NOMEM.
 */
int tly_ledger_partition_decide(struct tly_ledger_group_item *items, size_t n,
				const struct tly_ledger_ctx *ctx, struct tly_ledger_txn **txn,
				struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * Step two, after txn (the oldest unfinished group of these items) ran with result rc: on
 * success each item's out describes its committed batch (valid until the partition's next
 * decide or free); on failure fenced is set on the items whose stored offset moved, and the
 * caller must free and open every partition of this group and of any group decided after it,
 * and free the later transactions unrun: they were decided on wallets the database never got
 * (their compare-and-set could even match an offset another owner reached since).
 */
void tly_ledger_partition_finish(struct tly_ledger_group_item *items, size_t n,
				 const struct tly_ledger_txn *txn, int rc);

/*
 * Decide, run on ctx->conn and finish in one go (a group of one commit in flight). On success
 * each item's out describes its batch. On failure nothing is committed and the caller must free
 * and open each partition again; fenced is set on the items whose stored offset moved.
 * Returns 0, TLY_E_PG (err filled), TLY_E_NOMEM.
 */
int tly_ledger_partition_commit(struct tly_ledger_group_item *items, size_t n,
				const struct tly_ledger_ctx *ctx,
				struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
