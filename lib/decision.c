/* Waiting for the ledger's decision on a reservation (see decision.h): tickets, their matching and the waiter's thread. */
#include "decision.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#include "codec.h"
#include "decide.h"
#include "kafka.h"
#include "log.h"
#include "producer.h"

#define WATERMARK_TIMEOUT_MS 5000
#define SEEK_TIMEOUT_MS 5000
#define POLL_MS 20
#define FLUSH_ON_FREE_MS 5000

/* One ticket being waited on, or reserved and not yet waited on. */
struct pending {
	struct pending *next;  /* in its table bucket */
	struct tly_decision_ticket ticket;
	bool waiting;          /* a thread is in tly_decision_wait for it */
	bool resolved;         /* result holds the first matching entry */
	bool failed;           /* published by this waiter and not delivered (result.reason) */
	struct tly_decision result;
};

/* Pendings by event id: chained hash with removal, doubling as it fills. */
struct table {
	struct pending **buckets;
	size_t n_buckets, count;
};

static size_t table_slot(const struct table *t, const tly_uuid *id)
{
	uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a; event ids are random, this only spreads them */
	for (int i = 0; i < 16; i++)
		h = (h ^ id->b[i]) * 0x100000001b3ULL;
	return (size_t)(h & (t->n_buckets - 1));
}

static struct pending *table_get(const struct table *t, const tly_uuid *id)
{
	if (!t->n_buckets)
		return NULL;
	for (struct pending *pd = t->buckets[table_slot(t, id)]; pd; pd = pd->next)
		if (memcmp(&pd->ticket.event_id, id, sizeof(*id)) == 0)
			return pd;
	return NULL;
}

/* Takes ownership of pd (not already in t). 0 or TLY_E_NOMEM (pd stays the caller's). */
static int table_put(struct table *t, struct pending *pd)
{
	if (t->count >= t->n_buckets) {
		struct table bigger = {calloc(t->n_buckets ? t->n_buckets * 2 : 64, sizeof(struct pending *)),
				       t->n_buckets ? t->n_buckets * 2 : 64, t->count};
		if (!bigger.buckets)
			return TLY_E_NOMEM;
		for (size_t i = 0; i < t->n_buckets; i++) {
			while (t->buckets[i]) {
				struct pending *x = t->buckets[i];
				t->buckets[i] = x->next;
				size_t s = table_slot(&bigger, &x->ticket.event_id);
				x->next = bigger.buckets[s];
				bigger.buckets[s] = x;
			}
		}
		free(t->buckets);
		*t = bigger;
	}
	size_t s = table_slot(t, &pd->ticket.event_id);
	pd->next = t->buckets[s];
	t->buckets[s] = pd;
	t->count++;
	return 0;
}

/* Unlink pd from t; the caller owns it again. */
static void table_remove(struct table *t, struct pending *pd)
{
	for (struct pending **at = &t->buckets[table_slot(t, &pd->ticket.event_id)]; *at; at = &(*at)->next) {
		if (*at == pd) {
			*at = pd->next;
			t->count--;
			return;
		}
	}
}

static void table_free(struct table *t)
{
	for (size_t i = 0; i < t->n_buckets; i++) {
		while (t->buckets[i]) {
			struct pending *x = t->buckets[i];
			t->buckets[i] = x->next;
			free(x);
		}
	}
	free(t->buckets);
	*t = (struct table){0};
}

struct lane {                  /* one partition of the ledger topic */
	bool assigned;
	int64_t next;          /* offset after the last entry read (or the assigned start) */
};

struct tly_decision_waiter {
	pthread_mutex_t mu;        /* guards everything below but codec, ev and the handles' insides */
	pthread_cond_t cond;       /* broadcast when a pending resolves or fails */
	struct tly_producer *prod; /* owned; not thread-safe, used under mu */
	rd_kafka_t *rk;            /* owned consumer of ledger_topic (assigned partitions only) */
	char *ledger_topic;
	int32_t partitions;
	struct lane *lanes;
	struct table pending;      /* by ticket.event_id, owned */
	struct table undelivered;  /* events this waiter published that were not delivered, owned */
	pthread_t thread;
	bool thread_started, stop;
	struct tly_codec *codec;   /* thread only */
	struct tly_event ev;       /* thread only */
};

const char *tly_decision_outcome_name(enum tly_decision_outcome outcome)
{
	switch (outcome) {
	case TLY_DECISION_ACCEPTED: return "accepted";
	case TLY_DECISION_REJECTED: return "rejected";
	case TLY_DECISION_DUPLICATE: return "duplicate";
	case TLY_DECISION_CONFLICT: return "conflict";
	}
	return "unknown";
}

static int64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Called under mu (inside publish and poll): remember events that will never reach the ledger. */
static void on_delivery(const struct tly_delivery *d, void *ud)
{
	struct tly_decision_waiter *w = ud;
	if (d->err == 0)
		return;
	struct pending *pd = table_get(&w->pending, &d->event_id);
	if (pd) {
		pd->failed = true;
		snprintf(pd->result.reason, sizeof(pd->result.reason), "%s", d->reason);
		pthread_cond_broadcast(&w->cond);
		return;
	}
	/* Nobody waits for it now: remember it for a later wait on the same ticket. */
	struct pending *u = calloc(1, sizeof(*u));
	if (u) {
		u->ticket.event_id = d->event_id;
		u->failed = true;
		snprintf(u->result.reason, sizeof(u->result.reason), "%s", d->reason);
	}
	if (!u || table_put(&w->undelivered, u) != 0) {
		tly_error("could not record an undelivered reservation", "event_id=%s reason=\"%s\"",
			  d->event_id_text, d->reason);
		free(u);
	}
}

/* The outcome an entry gives the ticket it names, or false if it is not one. */
static bool entry_outcome(const struct tly_ledger_entry *e, const struct tly_decision_ticket *t,
			  enum tly_decision_outcome *outcome)
{
	if (strcmp(e->kind, TLY_KIND_HOLD_PLACED) == 0)
		*outcome = TLY_DECISION_ACCEPTED;
	else if (strcmp(e->kind, TLY_KIND_REJECTED) == 0)
		*outcome = TLY_DECISION_REJECTED;
	else if (strcmp(e->kind, TLY_KIND_DUPLICATE) == 0)
		return (*outcome = TLY_DECISION_DUPLICATE), true;
	else if (strcmp(e->kind, TLY_KIND_CONFLICT) == 0)
		return (*outcome = TLY_DECISION_CONFLICT), true;
	else
		return false;
	return memcmp(&e->ref_id, &t->reservation_id, sizeof(tly_uuid)) == 0;
}

/* Consumer thread, under mu: resolve the pending this entry answers, if any (first match wins). */
static void match(struct tly_decision_waiter *w, const struct tly_event *ev, int32_t partition,
		  int64_t offset)
{
	const struct tly_ledger_entry *e = &ev->u.ledger_entry;
	struct pending *pd = table_get(&w->pending, &e->cause_event_id);
	enum tly_decision_outcome outcome;
	if (!pd || pd->resolved || memcmp(&pd->ticket.tenant_id, &ev->tenant_id, sizeof(tly_uuid)) != 0 ||
	    !entry_outcome(e, &pd->ticket, &outcome))
		return;
	struct tly_decision *d = &pd->result;
	d->outcome = outcome;
	snprintf(d->kind, sizeof(d->kind), "%s", e->kind);
	snprintf(d->reason, sizeof(d->reason), "%s", e->reason ? e->reason : "");
	d->seq = e->seq;
	d->allowance_remaining = e->allowance_remaining;
	d->credits_remaining = e->credits_remaining;
	d->held = e->held;
	d->available = e->allowance_remaining + e->credits_remaining - e->held;
	d->ledger_time = e->ledger_time;
	d->partition = partition;
	d->offset = offset;
	pd->resolved = true;
	pd->failed = false; /* decided: whatever the delivery report said, the ledger has it */
	pthread_cond_broadcast(&w->cond);
}

static void *thread_main(void *arg)
{
	struct tly_decision_waiter *w = arg;
	char errstr[256];
	for (;;) {
		pthread_mutex_lock(&w->mu);
		bool stop = w->stop;
		tly_producer_poll(w->prod, 0);
		pthread_mutex_unlock(&w->mu);
		if (stop)
			break;
		rd_kafka_message_t *m = rd_kafka_consumer_poll(w->rk, POLL_MS);
		if (!m)
			continue;
		if (m->err) {
			if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
				tly_warn("could not read the ledger topic", "reason=\"%s\"",
					 rd_kafka_message_errstr(m));
			rd_kafka_message_destroy(m);
			continue;
		}
		int rc = tly_codec_decode(w->codec, m->payload, m->len, &w->ev, errstr, sizeof(errstr));
		pthread_mutex_lock(&w->mu);
		if (m->partition >= 0 && m->partition < w->partitions)
			w->lanes[m->partition].next = m->offset + 1;
		if (rc == 0 && w->ev.type == TLY_EV_LEDGER_ENTRY)
			match(w, &w->ev, m->partition, m->offset);
		pthread_mutex_unlock(&w->mu);
		if (rc != 0)
			tly_warn("could not decode a ledger entry", "partition=%d offset=%" PRId64 " reason=\"%s\"",
				 (int)m->partition, m->offset, errstr);
		tly_event_reset(&w->ev);
		rd_kafka_message_destroy(m);
	}
	return NULL;
}

struct tly_decision_waiter *tly_decision_waiter_new(const struct tly_config *cfg, char *errstr,
						    size_t errlen)
{
	struct tly_decision_waiter *w = calloc(1, sizeof(*w));
	pthread_condattr_t ca;
	if (!w) {
		snprintf(errstr, errlen, "could not create decision waiter: out of memory");
		return NULL;
	}
	pthread_mutex_init(&w->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&w->cond, &ca);
	pthread_condattr_destroy(&ca);
	if (!(w->codec = tly_codec_new(errstr, errlen)))
		goto fail;
	if (!(w->prod = tly_producer_new(cfg, on_delivery, w, errstr, errlen)))
		goto fail;
	const char *topic = tly_config_str(cfg, "topics.ledger");
	if (!(w->ledger_topic = strdup(topic && *topic ? topic : "tally.ledger"))) {
		snprintf(errstr, errlen, "could not create decision waiter: out of memory");
		goto fail;
	}
	const char *events = tly_producer_topic(w->prod, TLY_EV_TOKENS_RESERVED);
	int32_t n_events = 0;
	if (tly_producer_partition_count(w->prod, events, &n_events) != 0 ||
	    tly_producer_partition_count(w->prod, w->ledger_topic, &w->partitions) != 0) {
		snprintf(errstr, errlen, "could not read the partitions of \"%s\" and \"%s\" (see the log)",
			 events, w->ledger_topic);
		goto fail;
	}
	if (n_events != w->partitions) {
		snprintf(errstr, errlen, "topic \"%s\" has %d partitions and \"%s\" %d: the ledger "
			 "publishes an entry on its event's partition number, so they must match",
			 events, (int)n_events, w->ledger_topic, (int)w->partitions);
		goto fail;
	}
	if (!(w->lanes = calloc((size_t)w->partitions, sizeof(*w->lanes)))) {
		snprintf(errstr, errlen, "could not create decision waiter: out of memory");
		goto fail;
	}
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, errlen);
	if (!conf)
		goto fail;
	if (tly_kafka_conf_set(conf, "auto.offset.reset", "earliest", errstr, errlen) != 0) {
		rd_kafka_conf_destroy(conf);
		goto fail;
	}
	/* Partitions are assigned, never subscribed: the group is not joined or committed to. */
	char group[80];
	snprintf(group, sizeof(group), "tally-decision-%ld-%p", (long)getpid(), (void *)w);
	if (!(w->rk = tly_kafka_consumer_new(conf, group, errstr, errlen)))
		goto fail;
	int rc = pthread_create(&w->thread, NULL, thread_main, w);
	if (rc != 0) {
		snprintf(errstr, errlen, "could not start the decision waiter's thread: %s", strerror(rc));
		goto fail;
	}
	w->thread_started = true;
	return w;
fail:
	tly_decision_waiter_free(w);
	return NULL;
}

void tly_decision_waiter_free(struct tly_decision_waiter *w)
{
	if (!w)
		return;
	if (w->thread_started) {
		pthread_mutex_lock(&w->mu);
		w->stop = true;
		pthread_mutex_unlock(&w->mu);
		pthread_join(w->thread, NULL);
	}
	tly_kafka_consumer_destroy(w->rk);
	tly_producer_free(w->prod, FLUSH_ON_FREE_MS); /* reports land in the maps, freed next */
	table_free(&w->pending);
	table_free(&w->undelivered);
	tly_event_free(&w->ev);
	tly_codec_free(w->codec);
	free(w->lanes);
	free(w->ledger_topic);
	pthread_cond_destroy(&w->cond);
	pthread_mutex_destroy(&w->mu);
	free(w);
}

/*
 * Under mu: make sure the consumer reads partition from at most from_offset. rewind: the entries
 * already read past from_offset may hold this ticket's outcome (a ticket not reserved here).
 */
static int lane_cover(struct tly_decision_waiter *w, int32_t partition, int64_t from_offset,
		      bool rewind)
{
	struct lane *l = &w->lanes[partition];
	if (l->assigned && (!rewind || from_offset >= l->next))
		return 0;
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
	if (!list)
		return TLY_E_NOMEM;
	rd_kafka_topic_partition_list_add(list, w->ledger_topic, partition)->offset = from_offset;
	int rc = 0;
	if (!l->assigned) {
		rd_kafka_error_t *error = rd_kafka_incremental_assign(w->rk, list);
		if (error) {
			tly_error("could not assign a ledger partition", "topic=%s partition=%d reason=\"%s\"",
				  w->ledger_topic, (int)partition, rd_kafka_error_string(error));
			rd_kafka_error_destroy(error);
			rc = TLY_E_KAFKA;
		}
	} else {
		rd_kafka_error_t *error = rd_kafka_seek_partitions(w->rk, list, SEEK_TIMEOUT_MS);
		if (!error && list->elems[0].err)
			tly_error("could not rewind a ledger partition", "topic=%s partition=%d reason=\"%s\"",
				  w->ledger_topic, (int)partition, rd_kafka_err2str(list->elems[0].err));
		if (error) {
			tly_error("could not rewind a ledger partition", "topic=%s partition=%d reason=\"%s\"",
				  w->ledger_topic, (int)partition, rd_kafka_error_string(error));
			rd_kafka_error_destroy(error);
		}
		if (error || list->elems[0].err)
			rc = TLY_E_KAFKA;
	}
	if (rc == 0) {
		l->assigned = true;
		l->next = from_offset;
	}
	rd_kafka_topic_partition_list_destroy(list);
	return rc;
}

int tly_decision_reserve(struct tly_decision_waiter *w, const struct tly_event *ev,
			 struct tly_decision_ticket *ticket, char *errstr, size_t errlen)
{
	char key[37];
	if (ev->type != TLY_EV_TOKENS_RESERVED) {
		snprintf(errstr, errlen, "%s: only a TokensReserved has a decision to wait for",
			 tly_event_desc(ev->type) ? tly_event_desc(ev->type)->name : "event");
		return TLY_E_INVALID;
	}
	int rc = tly_event_validate(ev, errstr, errlen);
	if (rc != 0)
		return rc;
	tly_uuid_format(&ev->tenant_id, key);
	struct tly_decision_ticket t = {.tenant_id = ev->tenant_id, .event_id = ev->event_id,
					.reservation_id = ev->u.tokens_reserved.reservation_id,
					.partition = tly_kafka_partition_for_key(key, 36, w->partitions)};
	/* Before publishing: every entry the event can cause comes at or after this offset. */
	int64_t low = 0, high = 0;
	rd_kafka_resp_err_t kerr = rd_kafka_query_watermark_offsets(w->rk, w->ledger_topic, t.partition,
								     &low, &high, WATERMARK_TIMEOUT_MS);
	if (kerr) {
		snprintf(errstr, errlen, "could not read the end offset of \"%s\" partition %d: %s",
			 w->ledger_topic, (int)t.partition, rd_kafka_err2str(kerr));
		return kerr == RD_KAFKA_RESP_ERR__TIMED_OUT ? TLY_E_TIMEOUT : TLY_E_KAFKA;
	}
	t.from_offset = high;
	struct pending *pd = calloc(1, sizeof(*pd));
	if (!pd) {
		snprintf(errstr, errlen, "out of memory");
		return TLY_E_NOMEM;
	}
	pd->ticket = t;
	pthread_mutex_lock(&w->mu);
	if (table_get(&w->pending, &t.event_id)) {
		snprintf(errstr, errlen, "TokensReserved %s is already being waited on", key);
		rc = TLY_E_INVALID;
	} else if (table_put(&w->pending, pd) != 0) {
		snprintf(errstr, errlen, "out of memory");
		rc = TLY_E_NOMEM;
	} else {
		/* Entries read between the watermark and now cannot be this event's: no rewind. */
		rc = lane_cover(w, t.partition, t.from_offset, false);
		if (rc != 0)
			snprintf(errstr, errlen, "could not read \"%s\" partition %d", w->ledger_topic,
				 (int)t.partition);
		else
			rc = tly_producer_publish(w->prod, ev, NULL, errstr, errlen);
		if (rc != 0)
			table_remove(&w->pending, pd);
	}
	pthread_mutex_unlock(&w->mu);
	if (rc != 0) {
		free(pd);
		return rc;
	}
	*ticket = t;
	return 0;
}

int tly_decision_wait(struct tly_decision_waiter *w, const struct tly_decision_ticket *ticket,
		      int timeout_ms, struct tly_decision *out)
{
	int rc = 0;
	memset(out, 0, sizeof(*out));
	if (ticket->partition < 0 || ticket->partition >= w->partitions || ticket->from_offset < 0)
		return TLY_E_INVALID;
	int64_t deadline = mono_ns() + (int64_t)(timeout_ms < 0 ? 0 : timeout_ms) * 1000000;
	pthread_mutex_lock(&w->mu);
	struct pending *pd = table_get(&w->pending, &ticket->event_id);
	if (!pd) {
		struct pending *u = table_get(&w->undelivered, &ticket->event_id);
		if (u) {
			*out = u->result;
			rc = TLY_E_KAFKA;
			goto out;
		}
		/* Not reserved here, or waited on and timed out: read again from its from_offset. */
		if (!(pd = calloc(1, sizeof(*pd)))) {
			rc = TLY_E_NOMEM;
			goto out;
		}
		pd->ticket = *ticket;
		if (table_put(&w->pending, pd) != 0) {
			free(pd);
			rc = TLY_E_NOMEM;
			goto out;
		}
		if ((rc = lane_cover(w, ticket->partition, ticket->from_offset, true)) != 0) {
			table_remove(&w->pending, pd);
			free(pd);
			goto out;
		}
	} else if (pd->waiting) {
		rc = TLY_E_INVALID; /* another thread waits on this ticket */
		goto out;
	}
	pd->waiting = true;
	while (!pd->resolved && !pd->failed) {
		if (mono_ns() >= deadline)
			break;
		struct timespec ts = {(time_t)(deadline / 1000000000), (long)(deadline % 1000000000)};
		int crc = pthread_cond_timedwait(&w->cond, &w->mu, &ts);
		if (crc != 0 && crc != ETIMEDOUT && crc != EINTR)
			break;
	}
	*out = pd->result;
	rc = pd->resolved ? 0 : pd->failed ? TLY_E_KAFKA : TLY_E_TIMEOUT;
	table_remove(&w->pending, pd);
	free(pd);
out:
	pthread_mutex_unlock(&w->mu);
	return rc;
}

size_t tly_decision_waiter_pending(struct tly_decision_waiter *w)
{
	pthread_mutex_lock(&w->mu);
	size_t n = w->pending.count;
	pthread_mutex_unlock(&w->mu);
	return n;
}
