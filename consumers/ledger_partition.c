/* One partition's in-memory ledger state and its batch step (decode, quarantine, seen, decide, commit). */
#include "ledger_partition.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "codec.h"
#include "kafka.h"
#include "log.h"
#include "uuidmap.h"
#include "wallet.h"

#define CACHE_SLOTS 8192 /* recently committed (tenant, event id) pairs, direct-mapped */

/*
 * When a wallet's snapshot is saved (with its changed holds): when the wallet is new, once
 * SAVE_EVERY_BATCHES batches changed it and SAVE_MIN_RECORDS of its input records were applied
 * since the last save, and once its partition moved SAVE_LAG_INPUTS input records past it (at
 * most SAVE_LAG_PER_BATCH such wallets a batch). Loading brings a wallet forward from its
 * snapshot by re-executing its input records since, so these bound that work. The record
 * count matters at moderate rates on many tenants, where batches are small and 16 of a tenant's
 * batches were often 16 records: every sixteenth record then cost a JSON snapshot and a row of
 * the wallets upsert.
 */
#define SAVE_EVERY_BATCHES 16
#define SAVE_MIN_RECORDS 256
#define SAVE_LAG_INPUTS 100000
#define SAVE_LAG_PER_BATCH 256
#define REPLAY_CHUNK 1000 /* input records re-executed per "seen" lookup when loading */
#define SEEN_BITS 32768   /* a batch's filter of the (tenant, event id) pairs in its batch_seen */

/* A record of the open batch; its bytes are in the partition's byte buffer. */
struct record {
	int64_t offset;
	size_t key_at, keylen, value_at, valuelen;
	bool has_key, has_value;
	/* filled while deciding */
	const char *reason;       /* quarantine reason (static), NULL when good */
	const char *detail;       /* in the batch arena, may be NULL */
	struct tly_seen seen;     /* committed knowledge before the batch */
	bool lookup;              /* seen comes from the database lookup (index in keys) */
	size_t key_index;
	uint64_t pair;            /* pair_hash of its (tenant, event id), when it is not quarantined */
	tly_uuid tenant_id, event_id; /* the event's, when it is not quarantined nor a ClockTick */
	bool first;               /* the first record of its pair with entries in the batch */
	unsigned char digest[32]; /* SHA-256 of the event's current encoding */
};

struct cache_slot {
	tly_uuid tenant, event_id;
	unsigned char digest[32];
};

/*
 * The records of one batch and what deciding them produced. A batch is open (records are added),
 * then decided (its transaction built: waiting for or running on the writer), then done (its
 * outcome handed over; reused as the next open batch).
 */
struct batch {
	struct record *recs;
	size_t n_recs, cap_recs;
	struct tly_buf bytes;
	int64_t opened_ms;
	struct tly_entries entries;
	struct tly_uuidmap *batch_seen;    /* (tenant, event id) -> struct record * (first with entries) */
	uint64_t seen_bits[SEEN_BITS / 64]; /* bit pair % SEEN_BITS of each pair in batch_seen */
	uint64_t serial;                   /* this decision of it, unique in the partition (never 0) */
	struct tly_wallet **touched_list;  /* each wallet it changed, once (see touch) */
	size_t n_touched, cap_touched;
	struct tly_wallet **saved_list;    /* the wallets whose snapshots its transaction saves */
	size_t n_saved, cap_saved;
	struct tly_ledger_quarantined *quarantined;
	size_t n_quarantined, cap_quarantined;
	struct tly_ledger_input *inputs;   /* applied records, kept for re-execution */
	size_t n_inputs;
	struct tly_arena *arena;           /* details */
	int64_t new_offset;                /* after its last record */
};

/* One open batch and at most two decided ones: one committing, the next waiting for it. */
#define BATCHES 3

struct tly_ledger_partition {
	int32_t partition;
	int64_t decided_offset;  /* next offset once every decided batch is stored; -1: none yet */
	int64_t next_offset;     /* after the last record added */
	struct tly_uuidmap *wallets; /* tenant -> struct tly_wallet * (owned) */
	struct cache_slot *cache;    /* CACHE_SLOTS, committed pairs only */
	uint16_t *cache_tags;        /* CACHE_SLOTS: 0 unused, else bits of the slot's key's hash */
	struct batch batches[BATCHES];
	/*
	 * The decoded events of the batch being decided or replayed, each with its arena: needed only
	 * while it is, so one set a partition (not one a batch: its three batches' sets were a third
	 * of tally-ledger's memory under a backlog).
	 */
	struct tly_event *events;
	size_t cap_events;
	struct batch *open;
	struct batch *decided[BATCHES - 1]; /* oldest first */
	size_t n_decided;
	int64_t lag_check_at;        /* offset from which a wallet's snapshot may lag too far */
	uint64_t serial;             /* the last batch serial handed out */
	struct tly_wallet *last;     /* the wallet wallet_for found last (wallets live as long as p) */
};

/* ---- lifecycle ---------------------------------------------------------------------------- */

static int adopt_wallet(struct tly_wallet *w, void *ud)
{
	struct tly_ledger_partition *p = ud;
	if (tly_uuidmap_put(p->wallets, tly_wallet_tenant(w), NULL, w) != 0) {
		tly_wallet_free(w);
		return TLY_E_NOMEM;
	}
	return 0;
}

static int catch_up(struct tly_ledger_partition *p, const struct tly_ledger_ctx *ctx,
		    struct tly_pg_error *err);

static void free_wallets(struct tly_uuidmap *map)
{
	if (!map)
		return;
	for (size_t i = 0; i < tly_uuidmap_capacity(map); i++)
		tly_wallet_free(tly_uuidmap_slot(map, i));
	tly_uuidmap_free(map);
}

struct tly_ledger_partition *tly_ledger_partition_open(const struct tly_ledger_ctx *ctx,
						       int32_t partition, struct tly_pg_error *err)
{
	struct tly_ledger_partition *p = calloc(1, sizeof(*p));
	bool ok = p && (p->wallets = tly_uuidmap_new()) &&
		  (p->cache = calloc(CACHE_SLOTS, sizeof(*p->cache))) &&
		  (p->cache_tags = calloc(CACHE_SLOTS, sizeof(*p->cache_tags)));
	for (int i = 0; ok && i < BATCHES; i++) {
		struct batch *b = &p->batches[i];
		ok = (b->batch_seen = tly_uuidmap_new()) && (b->arena = tly_arena_new());
	}
	if (!ok) {
		if (err) {
			err->errclass = TLY_ERRCLASS_FATAL;
			err->sqlstate[0] = '\0';
			snprintf(err->message, sizeof(err->message), "out of memory");
		}
		goto fail;
	}
	p->partition = partition;
	p->open = &p->batches[0];
	if (tly_ledger_store_load_offset(ctx->conn, ctx->events_topic, partition, &p->decided_offset,
					 err) != 0 ||
	    tly_ledger_store_load_wallets(ctx->conn, partition, adopt_wallet, p, err) != 0)
		goto fail;
	p->next_offset = p->decided_offset < 0 ? 0 : p->decided_offset;
	if (catch_up(p, ctx, err) != 0)
		goto fail;
	return p;
fail:
	tly_ledger_partition_free(p);
	return NULL;
}

void tly_ledger_partition_free(struct tly_ledger_partition *p)
{
	if (!p)
		return;
	free_wallets(p->wallets);
	free(p->cache);
	free(p->cache_tags);
	for (int k = 0; k < BATCHES; k++) {
		struct batch *b = &p->batches[k];
		tly_uuidmap_free(b->batch_seen);
		free(b->recs);
		tly_buf_free(&b->bytes);
		tly_entries_free(&b->entries);
		free(b->touched_list);
		free(b->saved_list);
		free(b->quarantined);
		free(b->inputs);
		tly_arena_free(b->arena);
	}
	for (size_t i = 0; i < p->cap_events; i++)
		tly_event_free(&p->events[i]);
	free(p->events);
	free(p);
}

int32_t tly_ledger_partition_id(const struct tly_ledger_partition *p)
{
	return p->partition;
}

int64_t tly_ledger_partition_next_offset(const struct tly_ledger_partition *p)
{
	return p->next_offset;
}

size_t tly_ledger_partition_tenants(const struct tly_ledger_partition *p)
{
	return tly_uuidmap_count(p->wallets);
}

int64_t tly_ledger_partition_open_holds(const struct tly_ledger_partition *p)
{
	int64_t sum = 0;
	for (size_t i = 0; i < tly_uuidmap_capacity(p->wallets); i++) {
		const struct tly_wallet *w = tly_uuidmap_slot(p->wallets, i);
		struct tly_balance b;
		if (!w)
			continue;
		tly_wallet_balance(w, &b);
		sum += b.open_holds;
	}
	return sum;
}

size_t tly_ledger_partition_pending(const struct tly_ledger_partition *p)
{
	return p->open->n_recs;
}

size_t tly_ledger_partition_decided(const struct tly_ledger_partition *p)
{
	return p->n_decided;
}

int64_t tly_ledger_partition_opened_ms(const struct tly_ledger_partition *p)
{
	return p->open->opened_ms;
}

size_t tly_ledger_partition_slots(const struct tly_ledger_partition *p)
{
	size_t n = p->cap_events;
	for (int k = 0; k < BATCHES; k++)
		n += p->batches[k].cap_recs;
	return n;
}

/* ---- adding records ----------------------------------------------------------------------- */

static int buf_append(struct tly_buf *buf, const void *data, size_t len, size_t *at)
{
	if (buf->len + len > buf->cap) {
		size_t cap = buf->cap ? buf->cap : 4096;
		while (cap < buf->len + len)
			cap *= 2;
		unsigned char *d = realloc(buf->data, cap);
		if (!d)
			return TLY_E_NOMEM;
		buf->data = d;
		buf->cap = cap;
	}
	*at = buf->len;
	if (len)
		memcpy(buf->data + buf->len, data, len);
	buf->len += len;
	return 0;
}

static int grow_records(struct batch *b)
{
	size_t cap = b->cap_recs ? b->cap_recs * 2 : 256;
	struct record *recs = realloc(b->recs, cap * sizeof(*recs));
	if (!recs)
		return TLY_E_NOMEM;
	b->recs = recs;
	struct tly_ledger_input *in = realloc(b->inputs, cap * sizeof(*in));
	if (!in)
		return TLY_E_NOMEM;
	b->inputs = in;
	b->cap_recs = cap;
	return 0;
}

/* Room in p->events for the n records of the batch to decode. 0 or TLY_E_NOMEM. */
static int ensure_events(struct tly_ledger_partition *p, size_t n)
{
	if (n <= p->cap_events)
		return 0;
	size_t cap = p->cap_events ? p->cap_events : 256;
	while (cap < n)
		cap *= 2;
	struct tly_event *events = realloc(p->events, cap * sizeof(*events));
	if (!events)
		return TLY_E_NOMEM;
	memset(events + p->cap_events, 0, (cap - p->cap_events) * sizeof(*events));
	p->events = events;
	p->cap_events = cap;
	return 0;
}

int tly_ledger_partition_add(struct tly_ledger_partition *p, int64_t offset, const void *key,
			     size_t keylen, const void *value, size_t valuelen, int64_t now_ms,
			     bool *added)
{
	struct batch *b = p->open;
	*added = false;
	if (offset < p->next_offset)
		return 0;
	if (b->n_recs == b->cap_recs && grow_records(b) != 0)
		return TLY_E_NOMEM;
	struct record *r = &b->recs[b->n_recs];
	memset(r, 0, sizeof(*r));
	r->offset = offset;
	r->has_key = key != NULL;
	r->has_value = value != NULL;
	r->keylen = key ? keylen : 0;
	r->valuelen = value ? valuelen : 0;
	if (buf_append(&b->bytes, key, r->keylen, &r->key_at) != 0 ||
	    buf_append(&b->bytes, value, r->valuelen, &r->value_at) != 0)
		return TLY_E_NOMEM;
	if (b->n_recs == 0)
		b->opened_ms = now_ms;
	b->n_recs++;
	p->next_offset = offset + 1;
	*added = true;
	return 0;
}

/* ---- deciding ----------------------------------------------------------------------------- */

/* A hash of (tenant, event id): its slot and tag in the cache, its bit in a batch's filter. */
static uint64_t pair_hash(const tly_uuid *tenant, const tly_uuid *event_id)
{
	uint64_t h = 0;
	for (int i = 0; i < 16; i++)
		h = h * 131 + tenant->b[i] + 7u * event_id->b[i];
	return h;
}

/*
 * A pair's slot, and its tag (never 0). Most pairs asked for are new, so the tags, 16 KiB a
 * partition, are read first: a slot (6.5 MiB of them on 12 partitions, a cache miss each) is read
 * only when its tag matches.
 */
static size_t cache_index(uint64_t h, uint16_t *tag)
{
	*tag = (uint16_t)((h / CACHE_SLOTS) | 1u);
	return (size_t)(h % CACHE_SLOTS);
}

static const struct cache_slot *cache_get(const struct tly_ledger_partition *p, uint64_t h,
					  const tly_uuid *tenant, const tly_uuid *event_id)
{
	uint16_t tag;
	size_t i = cache_index(h, &tag);
	const struct cache_slot *s = &p->cache[i];
	if (p->cache_tags[i] == tag && memcmp(&s->tenant, tenant, 16) == 0 &&
	    memcmp(&s->event_id, event_id, 16) == 0)
		return s;
	return NULL;
}

static void cache_put(struct tly_ledger_partition *p, uint64_t h, const tly_uuid *tenant,
		      const tly_uuid *event_id, const unsigned char digest[32])
{
	uint16_t tag;
	size_t i = cache_index(h, &tag);
	struct cache_slot *s = &p->cache[i];
	s->tenant = *tenant;
	s->event_id = *event_id;
	memcpy(s->digest, digest, 32);
	p->cache_tags[i] = tag;
}

/*
 * The first record with entries of r's pair in batch b, if any. Most pairs are in no batch: the
 * filter answers those without a lookup in the map.
 */
static const struct record *batch_seen_get(const struct batch *b, const struct record *r,
					   const struct tly_event *ev)
{
	uint64_t bit = r->pair % SEEN_BITS;
	if (!(b->seen_bits[bit / 64] & (UINT64_C(1) << (bit % 64))))
		return NULL;
	return tly_uuidmap_get(b->batch_seen, &ev->tenant_id, &ev->event_id);
}

static int batch_seen_put(struct batch *b, struct record *r, const struct tly_event *ev)
{
	uint64_t bit = r->pair % SEEN_BITS;
	if (tly_uuidmap_put(b->batch_seen, &ev->tenant_id, &ev->event_id, r) != 0)
		return TLY_E_NOMEM;
	b->seen_bits[bit / 64] |= UINT64_C(1) << (bit % 64);
	r->first = true;
	return 0;
}

static const void *rec_key(const struct batch *b, const struct record *r)
{
	return r->has_key ? b->bytes.data + r->key_at : NULL;
}

static const void *rec_value(const struct batch *b, const struct record *r)
{
	return r->has_value ? b->bytes.data + r->value_at : NULL;
}

static void quarantine(struct tly_ledger_partition *p, struct record *r, const char *reason,
		       const char *detail)
{
	r->reason = reason;
	r->detail = detail ? tly_arena_strndup(p->open->arena, detail, strlen(detail)) : NULL;
	tly_warn("quarantining input record", "partition=%d offset=%" PRId64 " reason=%s detail=\"%s\"",
		 (int)p->partition, r->offset, reason, detail ? detail : "");
}

/* Decode and check one record: its event in ev, or r->reason set. NOMEM is the only error. */
static int classify(struct tly_ledger_partition *p, const struct tly_ledger_ctx *ctx,
		    struct record *r, struct tly_event *ev)
{
	char errstr[256], keytext[37];
	const struct batch *b = p->open;
	/* The cause digest: of the event's encoding with the current schema, so writers agree (bytes
	 * already in that encoding are hashed as they are, the rest re-encoded first). */
	int rc = tly_codec_decode_digest(ctx->codec, rec_value(b, r), r->valuelen, ev, r->digest,
					 errstr, sizeof(errstr));
	if (rc == TLY_E_NOMEM)
		return rc;
	if (rc != 0) {
		quarantine(p, r, tly_err_name(rc), errstr);
		return 0;
	}
	const struct tly_event_desc *desc = tly_event_desc(ev->type);
	if (!desc || strcmp(desc->topic, "tally.events") != 0) {
		snprintf(errstr, sizeof(errstr), "%s does not belong on %s", desc ? desc->name : "?",
			 ctx->events_topic);
		quarantine(p, r, "wrong_topic", errstr);
		return 0;
	}
	if (ev->type != TLY_EV_CLOCK_TICK) {
		tly_uuid key;
		if (!r->has_key || r->keylen == 0) {
			quarantine(p, r, "missing_key", "the record has no key (the tenant id)");
			return 0;
		}
		if (r->keylen != 36) {
			quarantine(p, r, "bad_key", "the key is not a 36-character UUID");
			return 0;
		}
		memcpy(keytext, rec_key(b, r), 36);
		keytext[36] = '\0';
		/* the usual key is the tenant id as the producer formats it: no parse needed */
		char tenant[37];
		tly_uuid_format(&ev->tenant_id, tenant);
		if (memcmp(keytext, tenant, 36) != 0) {
			if (tly_uuid_parse(keytext, &key) != 0) {
				quarantine(p, r, "bad_key", "the key is not a UUID");
				return 0;
			}
			if (memcmp(&key, &ev->tenant_id, sizeof(key)) != 0) {
				quarantine(p, r, "key_mismatch", "the key is not the event's tenant_id");
				return 0;
			}
		}
		int32_t want = tly_kafka_partition_for_key(rec_key(b, r), r->keylen, ctx->partition_count);
		if (want != p->partition) {
			snprintf(errstr, sizeof(errstr), "murmur2 of key %s gives partition %d of %d",
				 keytext, (int)want, (int)ctx->partition_count);
			quarantine(p, r, "wrong_partition", errstr);
			return 0;
		}
	}
	return 0;
}

/*
 * A record of batch b applied to w: counted toward w's next snapshot, w listed once in b (the
 * wallet remembers b's serial: no map lookup a record).
 */
static int touch(struct batch *b, struct tly_wallet *w)
{
	struct tly_wallet_saving *sv = tly_wallet_saving(w);
	sv->records++;
	if (sv->batch == b->serial)
		return 0;
	if (b->n_touched == b->cap_touched) {
		size_t cap = b->cap_touched ? b->cap_touched * 2 : 64;
		struct tly_wallet **l = realloc(b->touched_list, cap * sizeof(*l));
		if (!l)
			return TLY_E_NOMEM;
		b->touched_list = l;
		b->cap_touched = cap;
	}
	b->touched_list[b->n_touched++] = w;
	sv->batch = b->serial;
	return 0;
}

static int wallet_for(struct tly_ledger_partition *p, const tly_uuid *tenant,
		      struct tly_wallet **out)
{
	struct tly_wallet *w = p->last;
	if (w && memcmp(tly_wallet_tenant(w), tenant, sizeof(*tenant)) == 0) {
		*out = w; /* consecutive records of one tenant (a hot tenant's partition) */
		return 0;
	}
	w = tly_uuidmap_get(p->wallets, tenant, NULL);
	if (!w) {
		if (!(w = tly_wallet_new(tenant)))
			return TLY_E_NOMEM;
		if (tly_uuidmap_put(p->wallets, tenant, NULL, w) != 0) {
			tly_wallet_free(w);
			return TLY_E_NOMEM;
		}
	}
	*out = p->last = w;
	return 0;
}

/* A ClockTick: advance every wallet of the partition; save the ones that moved. */
static int tick_all(struct tly_ledger_partition *p, const struct tly_ledger_ctx *ctx,
		    const struct tly_event *ev, const struct tly_cause *cause)
{
	char errstr[256];
	for (size_t i = 0; i < tly_uuidmap_capacity(p->wallets); i++) {
		struct tly_wallet *w = tly_uuidmap_slot(p->wallets, i);
		struct tly_balance before, after;
		if (!w)
			continue;
		tly_wallet_balance(w, &before);
		int rc = tly_ledger_tick(&ctx->decide, w, ev->occurred_at, cause, &p->open->entries, errstr,
					 sizeof(errstr));
		if (rc != 0) {
			tly_error("could not apply a clock tick", "partition=%d reason=\"%s\"",
				  (int)p->partition, errstr);
			return rc;
		}
		tly_wallet_balance(w, &after);
		if (before.seq == after.seq && before.ledger_time == after.ledger_time)
			continue;
		if (touch(p->open, w) != 0)
			return TLY_E_NOMEM;
	}
	return 0;
}

static struct tly_cause cause_of(const struct tly_ledger_partition *p, const struct record *r,
				  const struct tly_event *ev)
{
	struct tly_cause cause = {ev->event_id, tly_event_desc(ev->type)->name, p->partition,
				  r->offset, {0}};
	memcpy(cause.digest, r->digest, 32);
	return cause;
}

static int apply_one(struct tly_ledger_partition *p, const struct tly_ledger_ctx *ctx,
		     struct record *r, const struct tly_event *ev)
{
	char errstr[256];
	struct batch *b = p->open;
	struct tly_cause cause = cause_of(p, r, ev);
	if (ev->type == TLY_EV_CLOCK_TICK)
		return tick_all(p, ctx, ev, &cause);

	struct tly_wallet *w;
	if (wallet_for(p, &ev->tenant_id, &w) != 0)
		return TLY_E_NOMEM;
	struct tly_seen seen = r->seen;
	const struct record *earlier = batch_seen_get(b, r, ev);
	if (!seen.seen && earlier) {
		seen.seen = true;
		memcpy(seen.digest, earlier->digest, 32);
	}
	size_t before = b->entries.n;
	int rc = tly_ledger_apply(&ctx->decide, w, ev, &cause, &seen, &b->entries, errstr,
				  sizeof(errstr));
	if (rc == TLY_E_NOMEM)
		return rc;
	if (rc != 0) {
		b->entries.n = before;
		quarantine(p, r, "not_applicable", errstr);
		return 0;
	}
	if (touch(b, w) != 0)
		return TLY_E_NOMEM;
	if (b->entries.n > before && !seen.seen && batch_seen_put(b, r, ev) != 0)
		return TLY_E_NOMEM;
	return 0;
}

static void reset_batch_scratch(struct tly_ledger_partition *p, struct batch *b)
{
	tly_entries_clear(&b->entries);
	tly_uuidmap_clear(b->batch_seen);
	memset(b->seen_bits, 0, sizeof(b->seen_bits));
	b->serial = ++p->serial;
	b->n_touched = 0;
	b->n_quarantined = 0;
	b->n_inputs = 0;
	tly_arena_reset(b->arena);
}

static void set_fatal(struct tly_pg_error *err, const char *msg)
{
	if (!err)
		return;
	err->errclass = TLY_ERRCLASS_FATAL;
	err->sqlstate[0] = '\0';
	snprintf(err->message, sizeof(err->message), "%s", msg);
}

/*
 * What this process already knows of (tenant, event id) without asking the database: a
 * recently committed pair (the cache), or one of a decided batch not yet committed (exact).
 */
static bool known(const struct tly_ledger_partition *p, const struct record *rec,
		  const struct tly_event *ev, struct tly_seen *seen)
{
	const struct cache_slot *hit = cache_get(p, rec->pair, &ev->tenant_id, &ev->event_id);
	if (hit) {
		seen->seen = true;
		memcpy(seen->digest, hit->digest, 32);
		return true;
	}
	for (size_t k = 0; k < p->n_decided; k++) {
		const struct record *r = batch_seen_get(p->decided[k], rec, ev);
		if (r) {
			seen->seen = true;
			memcpy(seen->digest, r->digest, 32);
			return true;
		}
	}
	return false;
}

/* ---- loading: wallets brought forward from their snapshots ------------------------------- */

static void set_corrupt(struct tly_ledger_partition *p, struct tly_pg_error *err, int64_t offset,
			const char *why)
{
	tly_error("could not bring a wallet forward from its snapshot",
		  "partition=%d offset=%" PRId64 " reason=\"%s\"", (int)p->partition, offset, why);
	set_fatal(err, "a wallet does not re-execute to the stored ledger");
}

/* Is w's snapshot older than the input record at offset (its effect not in the snapshot)? */
static bool stale_at(struct tly_wallet *w, int64_t offset)
{
	int64_t as_of = tly_wallet_saving(w)->as_of;
	return as_of >= 0 && as_of <= offset;
}

/* Re-execute the records of the open batch (applied input records, loaded): 0, TLY_E_CORRUPT... */
static int replay_chunk(struct tly_ledger_partition *p, const struct tly_ledger_ctx *ctx,
			struct tly_pg_error *err)
{
	struct batch *b = p->open;
	char errstr[256];
	size_t n_keys = 0;
	int rc = 0;
	struct tly_ledger_seen_key *keys = calloc(b->n_recs ? b->n_recs : 1, sizeof(*keys));
	if (!keys || ensure_events(p, b->n_recs) != 0) {
		free(keys);
		set_fatal(err, "out of memory");
		return TLY_E_NOMEM;
	}
	for (size_t i = 0; i < b->n_recs && rc == 0; i++) {
		struct record *r = &b->recs[i];
		struct tly_event *ev = &p->events[i];
		rc = tly_codec_decode_digest(ctx->codec, rec_value(b, r), r->valuelen, ev, r->digest,
					     errstr, sizeof(errstr));
		if (rc != 0) {
			set_corrupt(p, err, r->offset, errstr);
			rc = TLY_E_CORRUPT;
			break;
		}
		struct tly_wallet *w = ev->type == TLY_EV_CLOCK_TICK
					       ? NULL
					       : tly_uuidmap_get(p->wallets, &ev->tenant_id, NULL);
		r->lookup = w && stale_at(w, r->offset);
		if (!r->lookup)
			continue;
		r->key_index = n_keys;
		keys[n_keys].tenant_id = ev->tenant_id;
		keys[n_keys++].event_id = ev->event_id;
	}
	if (rc == 0 && n_keys)
		rc = tly_ledger_store_lookup_seen(ctx->conn, keys, n_keys, err);
	for (size_t i = 0; i < b->n_recs && rc == 0; i++) {
		struct record *r = &b->recs[i];
		const struct tly_event *ev = &p->events[i];
		struct tly_cause cause = cause_of(p, r, ev);
		if (ev->type == TLY_EV_CLOCK_TICK) {
			for (size_t k = 0; k < tly_uuidmap_capacity(p->wallets) && rc == 0; k++) {
				struct tly_wallet *w = tly_uuidmap_slot(p->wallets, k);
				if (w && stale_at(w, r->offset))
					rc = tly_ledger_tick(&ctx->decide, w, ev->occurred_at, &cause,
							     &b->entries, errstr, sizeof(errstr));
			}
		} else if (r->lookup) {
			/* seen as the decision saw it: an entry caused by an earlier record */
			const struct tly_ledger_seen_key *key = &keys[r->key_index];
			struct tly_seen seen = key->seen;
			seen.seen = seen.seen && key->first_offset < r->offset;
			rc = tly_ledger_apply(&ctx->decide,
					      tly_uuidmap_get(p->wallets, &ev->tenant_id, NULL), ev,
					      &cause, &seen, &b->entries, errstr, sizeof(errstr));
		}
		if (rc != 0 && rc != TLY_E_NOMEM) {
			set_corrupt(p, err, r->offset, errstr);
			rc = TLY_E_CORRUPT;
		}
		tly_entries_clear(&b->entries);
	}
	if (rc == TLY_E_NOMEM)
		set_fatal(err, "out of memory");
	free(keys);
	b->n_recs = 0;
	b->bytes.len = 0;
	return rc;
}

struct replay {
	struct tly_ledger_partition *p;
	const struct tly_ledger_ctx *ctx;
	struct tly_pg_error *err;
	size_t n;
};

static int replay_add(int64_t offset, const void *value, size_t len, void *ud)
{
	struct replay *rp = ud;
	struct batch *b = rp->p->open;
	if (b->n_recs == b->cap_recs && grow_records(b) != 0) {
		set_fatal(rp->err, "out of memory");
		return TLY_E_NOMEM;
	}
	struct record *r = &b->recs[b->n_recs];
	memset(r, 0, sizeof(*r));
	r->offset = offset;
	r->has_value = true;
	r->valuelen = len;
	if (buf_append(&b->bytes, value, len, &r->value_at) != 0) {
		set_fatal(rp->err, "out of memory");
		return TLY_E_NOMEM;
	}
	b->n_recs++;
	rp->n++;
	return b->n_recs == REPLAY_CHUNK ? replay_chunk(rp->p, rp->ctx, rp->err) : 0;
}

/*
 * Bring every wallet whose snapshot is older than the partition's stored offset forward: re-execute
 * its applied input records since (and the partition's ClockTicks), then check that it reached
 * its last stored entry (seq and hash). Snapshots saved before as_of was kept are current.
 */
static int catch_up(struct tly_ledger_partition *p, const struct tly_ledger_ctx *ctx,
		    struct tly_pg_error *err)
{
	tly_uuid *stale = NULL;
	int64_t *seq = NULL;
	unsigned char(*hash)[32] = NULL;
	size_t n = 0, cap = tly_uuidmap_count(p->wallets);
	int64_t from = p->decided_offset;
	int rc = TLY_E_NOMEM;
	if (!(stale = calloc(cap ? cap : 1, sizeof(*stale))))
		goto oom;
	for (size_t k = 0; k < tly_uuidmap_capacity(p->wallets); k++) {
		struct tly_wallet *w = tly_uuidmap_slot(p->wallets, k);
		if (!w)
			continue;
		struct tly_wallet_saving *sv = tly_wallet_saving(w);
		if (sv->as_of < 0 || sv->as_of > p->decided_offset)
			sv->as_of = p->decided_offset < 0 ? 0 : p->decided_offset;
		if (sv->as_of >= p->decided_offset)
			continue;
		stale[n++] = *tly_wallet_tenant(w);
		sv->batches = SAVE_EVERY_BATCHES - 1; /* saved again at its next change */
		sv->records = SAVE_MIN_RECORDS;
		if (sv->as_of < from)
			from = sv->as_of;
	}
	p->lag_check_at = n ? from + SAVE_LAG_INPUTS : p->decided_offset + SAVE_LAG_INPUTS;
	if (n == 0) {
		free(stale);
		return 0;
	}
	struct replay rp = {p, ctx, err, 0};
	rc = tly_ledger_store_load_inputs(ctx->conn, p->partition, from, p->decided_offset, stale, n,
					  replay_add, &rp, err);
	if (rc == 0 && p->open->n_recs)
		rc = replay_chunk(p, ctx, err);
	reset_batch_scratch(p, p->open);
	p->open->n_recs = 0;
	p->open->bytes.len = 0;
	if (rc != 0)
		goto out;
	rc = TLY_E_NOMEM;
	if (!(seq = calloc(n, sizeof(*seq))) || !(hash = calloc(n, sizeof(*hash))))
		goto oom;
	if ((rc = tly_ledger_store_load_heads(ctx->conn, stale, n, seq, hash, err)) != 0)
		goto out;
	for (size_t i = 0; i < n; i++) {
		struct tly_wallet *w = tly_uuidmap_get(p->wallets, &stale[i], NULL);
		struct tly_balance bal;
		tly_wallet_balance(w, &bal);
		if (bal.seq != seq[i] || (seq[i] && memcmp(tly_wallet_last_hash(w), hash[i], 32) != 0)) {
			char tenant[37], why[160];
			tly_uuid_format(&stale[i], tenant);
			snprintf(why, sizeof(why), "tenant %s re-executes to seq %" PRId64
				 ", the ledger ends at seq %" PRId64 " (or its hash differs)",
				 tenant, bal.seq, seq[i]);
			set_corrupt(p, err, p->decided_offset, why);
			rc = TLY_E_CORRUPT;
			goto out;
		}
	}
	tly_info("wallets brought forward from their snapshots",
		 "partition=%d wallets=%zu from_offset=%" PRId64 " to_offset=%" PRId64 " inputs=%zu",
		 (int)p->partition, n, from, p->decided_offset, rp.n);
	rc = 0;
	goto out;
oom:
	set_fatal(err, "out of memory");
out:
	free(stale);
	free(seq);
	free(hash);
	return rc;
}

/* Step 1: decode and check the open batch; add what is not known in memory to keys. */
static int prepare(struct tly_ledger_partition *p, const struct tly_ledger_ctx *ctx,
		   struct tly_ledger_seen_key *keys, size_t *n_keys)
{
	struct batch *b = p->open;
	reset_batch_scratch(p, b);
	if (ensure_events(p, b->n_recs) != 0)
		return TLY_E_NOMEM;
	for (size_t i = 0; i < b->n_recs; i++) {
		struct record *r = &b->recs[i];
		struct tly_event *ev = &p->events[i];
		int rc = classify(p, ctx, r, ev);
		if (rc != 0)
			return rc;
		r->lookup = false;
		r->first = false;
		if (r->reason || ev->type == TLY_EV_CLOCK_TICK)
			continue;
		r->tenant_id = ev->tenant_id;
		r->event_id = ev->event_id;
		r->pair = pair_hash(&ev->tenant_id, &ev->event_id);
		if (known(p, r, ev, &r->seen))
			continue;
		r->lookup = true;
		r->key_index = *n_keys;
		keys[*n_keys].tenant_id = ev->tenant_id;
		keys[*n_keys].event_id = ev->event_id;
		(*n_keys)++;
	}
	return 0;
}

static int save_wallet(struct batch *b, struct tly_wallet *w)
{
	if (b->n_saved == b->cap_saved) {
		size_t cap = b->cap_saved ? b->cap_saved * 2 : 64;
		struct tly_wallet **l = realloc(b->saved_list, cap * sizeof(*l));
		if (!l)
			return TLY_E_NOMEM;
		b->saved_list = l;
		b->cap_saved = cap;
	}
	b->saved_list[b->n_saved++] = w;
	return 0;
}

/*
 * The wallets whose snapshots the open batch saves (see SAVE_EVERY_BATCHES): the ones it changed
 * that are due, and, once in a while, any whose snapshot lags too far behind the partition.
 */
static int choose_saved(struct tly_ledger_partition *p)
{
	struct batch *b = p->open;
	int64_t lag_limit = b->new_offset - SAVE_LAG_INPUTS;
	b->n_saved = 0;
	for (size_t i = 0; i < b->n_touched; i++) {
		struct tly_wallet *w = b->touched_list[i];
		const struct tly_wallet_saving *sv = tly_wallet_saving(w);
		bool due = sv->batches + 1 >= SAVE_EVERY_BATCHES && sv->records >= SAVE_MIN_RECORDS;
		if ((sv->as_of < 0 || due || sv->as_of <= lag_limit) &&
		    save_wallet(b, w) != 0)
			return TLY_E_NOMEM;
	}
	if (b->new_offset < p->lag_check_at)
		return 0;
	int64_t oldest = b->new_offset;
	size_t lagging = 0;
	for (size_t k = 0; k < tly_uuidmap_capacity(p->wallets); k++) {
		struct tly_wallet *w = tly_uuidmap_slot(p->wallets, k);
		if (!w || tly_wallet_saving(w)->batch == b->serial)
			continue;
		int64_t as_of = tly_wallet_saving(w)->as_of;
		if (as_of >= 0 && as_of <= lag_limit && lagging < SAVE_LAG_PER_BATCH) {
			lagging++;
			if (save_wallet(b, w) != 0)
				return TLY_E_NOMEM;
		} else if (as_of >= 0 && as_of < oldest) {
			oldest = as_of;
		}
	}
	/* look again when the oldest snapshot left lags too far (next batch if some had to wait) */
	p->lag_check_at = lagging == SAVE_LAG_PER_BATCH ? b->new_offset + 1 : oldest + SAVE_LAG_INPUTS;
	return 0;
}

/* Room for one more quarantined record (rare: not sized with the records). */
static int grow_quarantined(struct batch *b)
{
	size_t cap = b->cap_quarantined ? b->cap_quarantined * 2 : 16;
	struct tly_ledger_quarantined *q = realloc(b->quarantined, cap * sizeof(*q));
	if (!q)
		return TLY_E_NOMEM;
	b->quarantined = q;
	b->cap_quarantined = cap;
	return 0;
}

/* Step 3: decide the open batch in offset order; fill c with what the transaction writes. */
static int decide(struct tly_ledger_partition *p, const struct tly_ledger_ctx *ctx,
		  const struct tly_ledger_seen_key *keys, int64_t published_offset,
		  struct tly_ledger_commit *c, struct tly_pg_error *err)
{
	struct batch *b = p->open;
	for (size_t i = 0; i < b->n_recs; i++) {
		struct record *r = &b->recs[i];
		if (r->lookup)
			r->seen = keys[r->key_index].seen;
		int rc = r->reason ? 0 : apply_one(p, ctx, r, &p->events[i]);
		if (rc == TLY_E_NOMEM)
			return rc;
		if (rc != 0) {
			char msg[96];
			snprintf(msg, sizeof(msg), "the decision core failed at offset %" PRId64,
				 r->offset);
			set_fatal(err, msg);
			return TLY_E_PG;
		}
	}
	for (size_t i = 0; i < b->n_recs; i++) {
		struct record *r = &b->recs[i];
		if (r->reason) {
			if (b->n_quarantined == b->cap_quarantined && grow_quarantined(b) != 0)
				return TLY_E_NOMEM;
			b->quarantined[b->n_quarantined++] = (struct tly_ledger_quarantined){
				ctx->events_topic, p->partition, r->offset, rec_key(b, r), r->keylen,
				rec_value(b, r), r->valuelen, r->reason, r->detail};
		} else {
			b->inputs[b->n_inputs++] = (struct tly_ledger_input){
				r->offset,
				p->events[i].type == TLY_EV_CLOCK_TICK ? NULL : &r->tenant_id,
				rec_value(b, r), r->valuelen};
		}
	}
	b->new_offset = b->recs[b->n_recs - 1].offset + 1;
	if (choose_saved(p) != 0)
		return TLY_E_NOMEM;
	*c = (struct tly_ledger_commit){
		.topic = ctx->events_topic,
		.partition = p->partition,
		.old_offset = p->decided_offset,
		.new_offset = b->new_offset,
		.entries = b->entries.items,
		.n_entries = b->entries.n,
		.wallets = b->saved_list,
		.n_wallets = b->n_saved,
		.quarantined = b->quarantined,
		.n_quarantined = b->n_quarantined,
		.inputs = b->inputs,
		.n_inputs = b->n_inputs,
		.ledger_topic = ctx->ledger_topic,
		.published_offset = published_offset,
	};
	return 0;
}

/* Smallest power of two at least n, from the records' first capacity. */
static size_t fit(size_t n)
{
	size_t cap = 256;
	while (cap < n)
		cap *= 2;
	return cap;
}

/*
 * Batch f opens again (its outcome was handed over) after its partition decided b: what f grew to
 * beyond four times b's needs (a larger group in a backlog) goes back to malloc, which gives it to
 * whatever batch grows next. Kept, each of the three batches of every partition (and each
 * partition's decoded events) would hold its largest size ever, tally-ledger's memory the sum of
 * those maxima instead of the most the batches in flight ever hold together.
 */
static void trim(struct tly_ledger_partition *p, struct batch *f, const struct batch *b)
{
	size_t keep = fit(b->n_recs);
	if (f->cap_recs > 2 * keep) {
		/* shrinking: a failure leaves the larger block, which holds keep records too */
		struct record *recs = realloc(f->recs, keep * sizeof(*recs));
		struct tly_ledger_input *in = realloc(f->inputs, keep * sizeof(*in));
		f->recs = recs ? recs : f->recs;
		f->inputs = in ? in : f->inputs;
		f->cap_recs = keep;
	}
	if (p->cap_events > 2 * keep) {
		for (size_t i = keep; i < p->cap_events; i++)
			tly_event_free(&p->events[i]);
		struct tly_event *events = realloc(p->events, keep * sizeof(*events));
		p->events = events ? events : p->events;
		p->cap_events = keep;
	}
	size_t keep_bytes = 4096; /* buf_append's first size */
	while (keep_bytes < b->bytes.len)
		keep_bytes *= 2;
	if (f->bytes.cap > 4 * keep_bytes)
		tly_buf_free(&f->bytes);
	if (f->entries.cap > 2 * fit(b->entries.n))
		tly_entries_free(&f->entries);
	if (f->cap_quarantined > 2 * fit(b->n_quarantined)) {
		free(f->quarantined);
		f->quarantined = NULL;
		f->cap_quarantined = 0;
	}
}

/* Step 4, once its transaction is built: the open batch is decided, a free one opens. */
static void close_open(struct tly_ledger_partition *p)
{
	struct batch *b = p->open;
	for (size_t i = 0; i < b->n_saved; i++) { /* their snapshots are in the transaction */
		tly_wallet_mark_saved(b->saved_list[i]);
		struct tly_wallet_saving *sv = tly_wallet_saving(b->saved_list[i]);
		sv->as_of = b->new_offset;
		sv->batches = 0;
		sv->records = 0;
	}
	for (size_t i = 0; i < b->n_touched; i++) {
		struct tly_wallet_saving *sv = tly_wallet_saving(b->touched_list[i]);
		if (sv->as_of != b->new_offset)
			sv->batches++;
	}
	p->decided_offset = b->new_offset;
	p->decided[p->n_decided++] = b;
	for (int k = 0; k < BATCHES; k++) {
		struct batch *f = &p->batches[k];
		bool busy = false;
		for (size_t d = 0; d < p->n_decided; d++)
			busy |= p->decided[d] == f;
		if (!busy) {
			p->open = f;
			break;
		}
	}
	trim(p, p->open, b);
	p->open->n_recs = 0;
	p->open->bytes.len = 0;
}

/* Step 5, once committed: remember the oldest decided batch's ids, hand its outcome over. */
static void committed(struct tly_ledger_partition *p, struct tly_ledger_batch_out *out)
{
	struct batch *b = p->decided[0];
	for (size_t i = 0; i < b->n_recs; i++) {
		const struct record *r = &b->recs[i];
		if (r->first)
			cache_put(p, r->pair, &r->tenant_id, &r->event_id, r->digest);
	}
	/* b's memory stays as it is until it opens again, after the caller used out */
	*out = (struct tly_ledger_batch_out){b->entries.items, b->entries.n, &b->entries,
					     b->quarantined, b->n_quarantined, b->recs[0].offset,
					     b->new_offset};
	p->n_decided--;
	memmove(p->decided, p->decided + 1, p->n_decided * sizeof(*p->decided));
}

int tly_ledger_partition_decide(struct tly_ledger_group_item *items, size_t n,
				const struct tly_ledger_ctx *ctx, struct tly_ledger_txn **txn,
				struct tly_pg_error *err)
{
	int rc = TLY_E_NOMEM;
	struct tly_ledger_seen_key *keys = NULL;
	struct tly_ledger_commit *commits = NULL;
	size_t n_recs = 0, n_keys = 0;
	*txn = NULL;
	for (size_t i = 0; i < n; i++) {
		items[i].fenced = false;
		memset(&items[i].out, 0, sizeof(items[i].out));
		if (items[i].part->open->n_recs == 0 || items[i].part->n_decided == BATCHES - 1) {
			set_fatal(err, "a partition of the group has no open batch to decide");
			return TLY_E_PG;
		}
		n_recs += items[i].part->open->n_recs;
	}
	if (!(keys = calloc(n_recs ? n_recs : 1, sizeof(*keys))) ||
	    !(commits = calloc(n ? n : 1, sizeof(*commits))))
		goto fail;
	/* 1. decode and check; what is left needs to know whether its event id was seen */
	for (size_t i = 0; i < n; i++)
		if ((rc = prepare(items[i].part, ctx, keys, &n_keys)) != 0)
			goto fail;
	/* 2. one lookup for every pair not known in memory (committed ones only: exact) */
	if (n_keys && (rc = tly_ledger_store_lookup_seen(ctx->conn, keys, n_keys, err)) != 0)
		goto fail_quiet;
	/* 3. decide each partition in offset order */
	for (size_t i = 0; i < n; i++)
		if ((rc = decide(items[i].part, ctx, keys, items[i].published_offset, &commits[i],
				 err)) != 0)
			goto fail;
	/* 4. the transaction, with copies of what the consumer goes on changing */
	if (!(*txn = tly_ledger_store_build(commits, n,
					    ctx->lock_timeout_ms > 0 ? ctx->lock_timeout_ms
								     : TLY_LEDGER_KEYS_LOCK_TIMEOUT_MS,
					    err))) {
		rc = TLY_E_NOMEM;
		goto fail_quiet;
	}
	for (size_t i = 0; i < n; i++)
		close_open(items[i].part);
	rc = 0;
	goto out;
fail:
	if (rc == TLY_E_NOMEM)
		set_fatal(err, "out of memory");
fail_quiet:
	rc = rc == TLY_E_NOMEM ? rc : TLY_E_PG;
out:
	free(keys);
	free(commits);
	return rc;
}

void tly_ledger_partition_finish(struct tly_ledger_group_item *items, size_t n,
				 const struct tly_ledger_txn *txn, int rc)
{
	for (size_t i = 0; i < n; i++) {
		if (rc == 0)
			committed(items[i].part, &items[i].out);
		else
			items[i].fenced = tly_ledger_store_txn_fenced(txn, i);
	}
}

int tly_ledger_partition_commit(struct tly_ledger_group_item *items, size_t n,
				const struct tly_ledger_ctx *ctx, struct tly_pg_error *err)
{
	struct tly_ledger_txn *txn;
	size_t pending = 0;
	for (size_t i = 0; i < n; i++)
		pending += items[i].part->open->n_recs;
	if (pending == 0)
		return 0;
	int rc = tly_ledger_partition_decide(items, n, ctx, &txn, err);
	if (rc != 0)
		return rc;
	rc = tly_ledger_store_run(ctx->conn, txn, err);
	tly_ledger_partition_finish(items, n, txn, rc);
	tly_ledger_store_txn_free(txn);
	return rc;
}
