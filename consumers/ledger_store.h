/*
 * tally-ledger's PostgreSQL side: the partition guard, stored offsets, wallet snapshots, the
 * exact "seen" lookup, the one-transaction batch commit (fenced by a compare-and-set on the
 * offset), and the entries to republish to tally.ledger. Every statement is parameterised.
 */
#ifndef TLY_LEDGER_STORE_H
#define TLY_LEDGER_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "decide.h"
#include "err.h"
#include "event.h"
#include "pg.h"

struct tly_wallet;

#define TLY_LEDGER_CONSUMER "tally-ledger" /* consumer_offsets.consumer */
/*
 * lock_timeout of a group's transaction until its compare-and-set (ledger_store.c, STMT_START),
 * in ms: ledger.lock.timeout.ms, whose default this is
 */
#define TLY_LEDGER_KEYS_LOCK_TIMEOUT_MS 5000

/*
 * Record count as topic's partition count the first time; afterwards compare. On a change,
 * TLY_E_CONFIG with a multi-line explanation (why it is refused, what to do) in errstr;
 * TLY_E_PG on a database failure (errstr holds it).
 */
int tly_ledger_store_check_partitions(PGconn *conn, const char *topic, int32_t count,
				      char *errstr, size_t errlen) TLY_MUST_CHECK;

/* The stored next offset of (topic, partition) for tally-ledger, or -1 when none is stored. */
int tly_ledger_store_load_offset(PGconn *conn, const char *topic, int32_t partition,
				 int64_t *next_offset, struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * Every wallet snapshot of partition: fn is called once per wallet and takes ownership of it
 * (also when it fails; a non-zero return stops and is returned). A snapshot that does not parse
 * is TLY_E_CORRUPT (logged with its tenant): the ledger cannot go on without it.
 */
int tly_ledger_store_load_wallets(PGconn *conn, int32_t partition,
				  int (*fn)(struct tly_wallet *w, void *ud), void *ud,
				  struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * The applied input records of partition at offsets [from, to), in offset order, that are
 * ClockTicks or belong to one of the n tenants: fn gets each (value borrowed for the call); a
 * non-zero return stops the walk and is returned. 0 or TLY_E_PG (err filled).
 */
int tly_ledger_store_load_inputs(PGconn *conn, int32_t partition, int64_t from, int64_t to,
				 const tly_uuid *tenants, size_t n,
				 int (*fn)(int64_t offset, const void *value, size_t len, void *ud),
				 void *ud, struct tly_pg_error *err) TLY_MUST_CHECK;

/* The last stored entry of each of n tenants: seq (0 when it has none) and hash. */
int tly_ledger_store_load_heads(PGconn *conn, const tly_uuid *tenants, size_t n, int64_t *seq,
				unsigned char (*hash)[32], struct tly_pg_error *err) TLY_MUST_CHECK;

/* One (tenant, event id) pair to look up; seen is filled by tly_ledger_store_lookup_seen. */
struct tly_ledger_seen_key {
	tly_uuid tenant_id;
	tly_uuid event_id;
	struct tly_seen seen; /* out: committed entry with this cause, and its first digest */
	int64_t first_offset; /* out, when seen: that first entry's cause offset */
};

/* Fill seen for n keys (one query per 1000 keys): exact, from the committed entries. */
int tly_ledger_store_lookup_seen(PGconn *conn, struct tly_ledger_seen_key *keys, size_t n,
				 struct tly_pg_error *err) TLY_MUST_CHECK;

/* An input record kept in quarantine: raw bytes, why, where it came from. Borrowed. */
struct tly_ledger_quarantined {
	const char *topic;
	int32_t partition;
	int64_t offset;
	const void *key; /* may be NULL */
	size_t keylen;
	const void *value; /* may be NULL */
	size_t valuelen;
	const char *reason; /* short stable name: "corrupt", "wrong_partition"… */
	const char *detail; /* one line, may be NULL */
};

/* An input record the batch applied (not quarantined), kept for re-execution. Borrowed. */
struct tly_ledger_input {
	int64_t offset;
	const tly_uuid *tenant_id; /* NULL for a ClockTick */
	const void *value;
	size_t valuelen;
};

/* Everything one batch of one partition commits. Every pointer is borrowed. */
struct tly_ledger_commit {
	const char *topic;        /* the input topic (tally.events) */
	int32_t partition;
	int64_t old_offset;       /* stored next offset the batch started from; -1: none stored */
	int64_t new_offset;       /* next offset after the batch */
	const struct tly_event *entries; /* TLY_EV_LEDGER_ENTRY, tenant_id set */
	size_t n_entries;
	struct tly_wallet *const *wallets; /* wallets saved as snapshots, as of new_offset */
	size_t n_wallets;
	const struct tly_ledger_quarantined *quarantined;
	size_t n_quarantined;
	const struct tly_ledger_input *inputs; /* in offset order */
	size_t n_inputs;
	const char *ledger_topic; /* the output topic (tally.ledger) */
	int64_t published_offset; /* entries below it delivered; -1: leave the marker */
};

/*
 * A group's transaction, built in memory: the n batches of c (one per partition) as what only
 * adds new keys first (every applied input, one row per partition packed in binary array
 * parameters, and every entry in one binary COPY), then each partition's offset
 * compare-and-set (old_offset -> new_offset), then the holds and wallet snapshots, the
 * quarantine rows and the published markers.
 * Building reads the commits and their wallets (on the thread that owns them); the transaction
 * then owns copies of everything except the quarantined records' bytes, which stay borrowed
 * until it is run. lock_timeout_ms (> 0) bounds each of its lock waits until the
 * compare-and-set (ledger.lock.timeout.ms). NULL (err filled, fatal) when out of memory.
 */
struct tly_ledger_txn;
struct tly_ledger_txn *tly_ledger_store_build(const struct tly_ledger_commit *c, size_t n,
					      int64_t lock_timeout_ms, struct tly_pg_error *err);
void tly_ledger_store_txn_free(struct tly_ledger_txn *t); /* accepts NULL */

/*
 * Run t in one transaction on conn (any thread: it reads nothing but t). When a partition's
 * stored offset is no longer its old_offset, rolls back, marks it fenced and returns TLY_E_PG
 * with err->errclass permanent: this process lost that partition. Any other failure rolls back
 * and returns TLY_E_PG with err filled (switch on err->errclass), or TLY_E_NOMEM.
 */
int tly_ledger_store_run(PGconn *conn, struct tly_ledger_txn *t,
			 struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * How a transaction started while the one before it (another connection) still runs waits for
 * it: before_cas is called before the compare-and-set, the rest and the COMMIT are sent (one
 * pipeline) and returns when they may be (0; non-zero: the one before failed, so this one is
 * rolled back unrun, TLY_E_PG). When both share a partition, it may return once the one before
 * ran its compare-and-set: that holds the offsets' rows locked until it ends, and this one's
 * compare-and-set waits for that end in PostgreSQL, then sees its offsets (or, if it failed,
 * fails too), so nothing of this one commits before it. Otherwise it must return only once the
 * one before ended (transactions commit in order also when they share no partition). after_cas
 * is called once this one's compare-and-set succeeded, unless it inserted a partition's first
 * row (a transaction behind would not see that row before it commits, so it waits for the end
 * instead). Any may be NULL.
 */
struct tly_ledger_store_gate {
	int (*before_cas)(void *ud);
	void (*after_cas)(void *ud);
	void *ud;
};

/* Whether a and b (either may be NULL) commit a partition in common. */
bool tly_ledger_store_txn_shares(const struct tly_ledger_txn *a, const struct tly_ledger_txn *b);

/*
 * tly_ledger_store_run with gate (NULL: none). A failure before the compare-and-set succeeded
 * (its own: a partition did not advance; or a stale owner's COPY meeting the new owner's rows)
 * is a fenced one when a partition's stored offset moved meanwhile: err->errclass permanent,
 * err->sqlstate the failure's own (TL001, 23505, 55P03…) and its message after the fencing's.
 */
int tly_ledger_store_run_gated(PGconn *conn, struct tly_ledger_txn *t,
			       const struct tly_ledger_store_gate *gate,
			       struct tly_pg_error *err) TLY_MUST_CHECK;

/* After a run: whether the i-th commit's partition was fenced. */
void tly_ledger_store_txn_unfence(struct tly_ledger_txn *t); /* none was (the run is not counted) */
bool tly_ledger_store_txn_fenced(const struct tly_ledger_txn *t, size_t i);

/*
 * Build (lock waits bounded by TLY_LEDGER_KEYS_LOCK_TIMEOUT_MS) and run in one go: fenced (n
 * elements) says which partitions were fenced.
 */
int tly_ledger_store_commit(PGconn *conn, const struct tly_ledger_commit *c, size_t n,
			    bool *fenced, struct tly_pg_error *err) TLY_MUST_CHECK;

/* Advance (never move back) the published marker of (ledger_topic, partition) to next_offset. */
int tly_ledger_store_save_published(PGconn *conn, const char *ledger_topic, int32_t partition,
				    int64_t next_offset, struct tly_pg_error *err) TLY_MUST_CHECK;

/* The published marker of (ledger_topic, partition), 0 when none is stored. */
int tly_ledger_store_load_published(PGconn *conn, const char *ledger_topic, int32_t partition,
				    int64_t *next_offset, struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * The committed entries caused by input records of partition at offset from_offset and above,
 * in (cause offset, tenant, seq) order: fn gets each (borrowed for the call) and a non-zero
 * return stops the walk and is returned. The entry's strings live in arena until it is reset.
 */
int tly_ledger_store_load_entries(PGconn *conn, int32_t partition, int64_t from_offset,
				  int (*fn)(const struct tly_event *entry, void *ud), void *ud,
				  struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
