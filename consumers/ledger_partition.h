/*
 * One assigned partition of tally.events inside tally-ledger: its tenants' wallets (loaded from
 * their snapshots), the records of its open batch, a bounded cache of recently committed event
 * ids, and the batch step: decode, quarantine bad input, look up "seen" exactly, decide, commit.
 * Single-threaded: owned by the consumer loop.
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
};

/* The outcome of a committed batch, owned by the partition until its next commit or free. */
struct tly_ledger_batch_out {
	const struct tly_event *entries; /* committed entries in decision order */
	size_t n_entries;
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

size_t tly_ledger_partition_pending(const struct tly_ledger_partition *p);
int64_t tly_ledger_partition_opened_ms(const struct tly_ledger_partition *p); /* first add */

/* One partition's share of a group commit. */
struct tly_ledger_group_item {
	struct tly_ledger_partition *part; /* borrowed */
	int64_t published_offset;          /* the delivered marker to store with it, -1 to leave it */
	struct tly_ledger_batch_out out;   /* out: on success, the committed batch */
	bool fenced;                       /* out: the stored offset moved (the partition was lost) */
};

/*
 * Decide the open batches of n partitions and commit them all in one transaction (one seen
 * lookup, one COPY of the entries, one snapshot upsert). On success each item's out describes
 * its batch and the batches are emptied. On failure nothing is committed and every partition's
 * in-memory wallets may have moved past the database: the caller must free and open each of
 * them again; fenced is set on the items whose stored offset moved (this process lost them).
 * Returns 0, TLY_E_PG (err filled), TLY_E_NOMEM.
 */
int tly_ledger_partition_commit(struct tly_ledger_group_item *items, size_t n,
				const struct tly_ledger_ctx *ctx,
				struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
