/* The producer API: one validated, encoded, keyed Kafka publish per event, one report per event. */
#include "producer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "kafka.h"
#include "log.h"

#define PRODUCE_QUEUE_TIMEOUT_MS 30000 /* how long publish waits for room in a full local queue */
#define METADATA_TIMEOUT_MS 10000
#define MAX_TOPICS 8

/* One published event until its last copy is reported; linked so free can report leftovers. */
struct pending {
	struct pending *prev, *next;
	enum tly_event_type type;
	tly_uuid event_id;
	void *opaque;
	int remaining; /* copies not yet reported */
	int copies;
	int err;
	rd_kafka_resp_err_t kafka_err;
	char reason[256];
	const char *topic; /* owned by the producer */
	int32_t partition;
	int64_t offset;
};

struct topic_count {
	char *topic;
	int32_t count;
};

struct tly_producer {
	rd_kafka_t *rk;
	struct tly_codec *codec;
	struct tly_buf buf;          /* encoding scratch, reused */
	char *topics[TLY_EV__COUNT]; /* owned */
	struct topic_count counts[MAX_TOPICS];
	size_t n_counts;
	struct pending head;         /* sentinel of the in-flight list */
	size_t in_flight;
	tly_delivery_cb cb;
	void *ud;
	struct tly_producer_stats stats;
};

static void report(struct tly_producer *p, struct pending *pd)
{
	struct tly_delivery d = {
		.type = pd->type,
		.event_id = pd->event_id,
		.opaque = pd->opaque,
		.err = pd->err,
		.kafka_err = pd->kafka_err,
		.reason = pd->reason,
		.topic = pd->topic,
		.partition = pd->partition,
		.offset = pd->offset,
		.copies = pd->copies,
	};
	tly_uuid_format(&pd->event_id, d.event_id_text);
	if (pd->err)
		p->stats.failed++;
	else
		p->stats.delivered++;
	pd->prev->next = pd->next;
	pd->next->prev = pd->prev;
	p->in_flight--;
	if (p->cb)
		p->cb(&d, p->ud);
	free(pd);
}

static void on_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	(void)rk;
	struct tly_producer *p = opaque;
	struct pending *pd = m->_private;
	if (!pd)
		return;
	if (m->err && !pd->err) {
		pd->err = TLY_E_KAFKA;
		pd->kafka_err = m->err;
		snprintf(pd->reason, sizeof(pd->reason), "%s", rd_kafka_err2str(m->err));
	}
	pd->partition = m->partition;
	pd->offset = m->err ? -1 : m->offset;
	if (--pd->remaining == 0)
		report(p, pd);
}

/* "tally.events" -> the value of the "topics.events" setting, when cfg has one. */
static char *topic_for(const struct tly_config *cfg, const char *dflt)
{
	const char *name = dflt;
	const char *dot = strchr(dflt, '.');
	if (cfg && dot) {
		char key[64];
		snprintf(key, sizeof(key), "topics.%s", dot + 1);
		const struct tly_setting *s;
		size_t n;
		s = tly_settings(&n);
		for (size_t i = 0; i < n; i++) {
			if (strcmp(s[i].key, key) == 0) {
				const char *v = tly_config_str(cfg, key);
				if (v && *v)
					name = v;
				break;
			}
		}
	}
	return strdup(name);
}

struct tly_producer *tly_producer_new(const struct tly_config *cfg, tly_delivery_cb cb, void *ud,
				      char *errstr, size_t errlen)
{
	struct tly_producer *p = calloc(1, sizeof(*p));
	rd_kafka_conf_t *conf = NULL;
	if (!p) {
		snprintf(errstr, errlen, "could not create producer: out of memory");
		return NULL;
	}
	p->head.next = p->head.prev = &p->head;
	p->cb = cb;
	p->ud = ud;
	for (int t = 0; t < TLY_EV__COUNT; t++) {
		if (!(p->topics[t] = topic_for(cfg, tly_event_desc((enum tly_event_type)t)->topic))) {
			snprintf(errstr, errlen, "could not create producer: out of memory");
			goto fail;
		}
	}
	if (!(p->codec = tly_codec_new(errstr, errlen)))
		goto fail;
	if (!(conf = tly_kafka_conf_new(cfg, errstr, errlen)))
		goto fail;
	rd_kafka_conf_set_dr_msg_cb(conf, on_dr);
	rd_kafka_conf_set_opaque(conf, p);
	p->rk = tly_kafka_producer_new(conf, errstr, errlen);
	conf = NULL; /* owned by tly_kafka_producer_new, also on failure */
	if (!p->rk)
		goto fail;
	return p;
fail:
	tly_producer_free(p, 0);
	return NULL;
}

const char *tly_producer_topic(const struct tly_producer *p, enum tly_event_type type)
{
	return (int)type >= 0 && type < TLY_EV__COUNT ? p->topics[type] : NULL;
}

int tly_producer_partition_count(struct tly_producer *p, const char *topic, int32_t *count)
{
	for (size_t i = 0; i < p->n_counts; i++) {
		if (strcmp(p->counts[i].topic, topic) == 0) {
			*count = p->counts[i].count;
			return 0;
		}
	}
	int rc = TLY_E_KAFKA;
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(p->rk, topic, NULL);
	if (!rkt)
		return TLY_E_KAFKA;
	rd_kafka_resp_err_t err = rd_kafka_metadata(p->rk, 0, rkt, &md, METADATA_TIMEOUT_MS);
	if (err) {
		tly_error("could not read Kafka topic metadata", "topic=%s reason=\"%s\"", topic,
			  rd_kafka_err2str(err));
		goto out;
	}
	if (md->topic_cnt != 1 || md->topics[0].err || md->topics[0].partition_cnt < 1) {
		tly_error("could not read Kafka topic metadata", "topic=%s reason=\"%s\"", topic,
			  md->topic_cnt == 1 ? rd_kafka_err2str(md->topics[0].err) : "no such topic");
		rc = TLY_E_NOT_FOUND;
		goto out;
	}
	*count = md->topics[0].partition_cnt;
	if (p->n_counts < MAX_TOPICS) {
		char *copy = strdup(topic);
		if (copy)
			p->counts[p->n_counts++] = (struct topic_count){copy, *count};
	}
	rc = 0;
out:
	if (md)
		rd_kafka_metadata_destroy(md);
	rd_kafka_topic_destroy(rkt);
	return rc;
}

static struct pending *pending_new(struct tly_producer *p, enum tly_event_type type,
				   const tly_uuid *id, const char *topic, void *opaque)
{
	struct pending *pd = calloc(1, sizeof(*pd));
	if (!pd)
		return NULL;
	pd->type = type;
	if (id)
		pd->event_id = *id;
	pd->opaque = opaque;
	pd->topic = topic;
	pd->partition = -1;
	pd->offset = -1;
	pd->next = &p->head;
	pd->prev = p->head.prev;
	p->head.prev->next = pd;
	p->head.prev = pd;
	p->in_flight++;
	return pd;
}

/* Drop a pending that never got a message enqueued (no report). */
static void pending_drop(struct tly_producer *p, struct pending *pd)
{
	pd->prev->next = pd->next;
	pd->next->prev = pd->prev;
	p->in_flight--;
	free(pd);
}

static int enqueue(struct tly_producer *p, struct pending *pd, const char *topic, int32_t partition,
		   const void *key, size_t keylen, const void *bytes, size_t len, char *errstr,
		   size_t errlen)
{
	struct tly_kafka_msg msg = {
		.topic = topic,
		.partition = partition,
		.key = key,
		.keylen = keylen,
		.value = bytes,
		.valuelen = len,
		.opaque = pd,
	};
	rd_kafka_resp_err_t kerr;
	int rc = tly_kafka_produce(p->rk, &msg, PRODUCE_QUEUE_TIMEOUT_MS, &kerr);
	if (rc != 0)
		snprintf(errstr, errlen, "could not enqueue on \"%s\": %s", topic,
			 rc == TLY_E_TIMEOUT ? "local queue full" : rd_kafka_err2str(kerr));
	return rc;
}

/* Enqueue n copies (one per partition when partition < 0 and key is NULL, else one). */
static int send_event(struct tly_producer *p, struct pending *pd, const char *topic, const void *key,
		      size_t keylen, int32_t n_partitions, const void *bytes, size_t len,
		      char *errstr, size_t errlen)
{
	int copies = key ? 1 : n_partitions;
	pd->remaining = copies + 1; /* +1 held until every copy is enqueued */
	pd->copies = copies;
	int sent = 0, rc = 0;
	for (int32_t i = 0; i < copies; i++) {
		rc = enqueue(p, pd, topic, key ? RD_KAFKA_PARTITION_UA : i, key, keylen, bytes, len,
			     errstr, errlen);
		if (rc != 0)
			break;
		sent++;
	}
	if (sent == 0) {
		pending_drop(p, pd);
		return rc;
	}
	if (rc != 0 && !pd->err) {
		/* Some copies are on their way: report the event as failed once they are done. */
		pd->err = rc;
		snprintf(pd->reason, sizeof(pd->reason), "only %d of %d copies enqueued: %s", sent,
			 copies, errstr);
	}
	pd->remaining -= copies - sent;
	if (--pd->remaining == 0)
		report(p, pd);
	return 0;
}

int tly_producer_publish(struct tly_producer *p, const struct tly_event *ev, void *opaque,
			 char *errstr, size_t errlen)
{
	const struct tly_event_desc *d = tly_event_desc(ev->type);
	char key[37];
	int32_t n_partitions = 1;
	int rc;

	rd_kafka_poll(p->rk, 0);
	if (!d) {
		snprintf(errstr, errlen, "unknown event type %d", (int)ev->type);
		rc = TLY_E_INVALID;
		goto rejected;
	}
	if (ev->type == TLY_EV_LEDGER_ENTRY) {
		snprintf(errstr, errlen, "LedgerEntry: only tally-ledger writes the ledger topic");
		rc = TLY_E_INVALID;
		goto rejected;
	}
	if ((rc = tly_codec_encode(p->codec, ev, &p->buf, errstr, errlen)) != 0)
		goto rejected;
	const char *topic = p->topics[ev->type];
	const char *k = key;
	if (ev->type == TLY_EV_CLOCK_TICK) {
		k = NULL;
		if ((rc = tly_producer_partition_count(p, topic, &n_partitions)) != 0) {
			snprintf(errstr, errlen, "ClockTick: could not learn the partitions of \"%s\"", topic);
			return rc;
		}
	} else if (ev->type == TLY_EV_PLAN_PUBLISHED) {
		tly_uuid_format(&ev->u.plan_published.plan_id, key);
	} else {
		tly_uuid_format(&ev->tenant_id, key);
	}
	struct pending *pd = pending_new(p, ev->type, &ev->event_id, topic, opaque);
	if (!pd) {
		snprintf(errstr, errlen, "out of memory");
		return TLY_E_NOMEM;
	}
	if ((rc = send_event(p, pd, topic, k, k ? strlen(k) : 0, n_partitions, p->buf.data, p->buf.len,
			     errstr, errlen)) != 0)
		return rc;
	p->stats.published++;
	return 0;
rejected:
	p->stats.rejected++;
	return rc;
}

int tly_producer_publish_raw(struct tly_producer *p, const char *topic, const void *key,
			     size_t keylen, int32_t partition, const void *bytes, size_t len,
			     void *opaque, char *errstr, size_t errlen)
{
	rd_kafka_poll(p->rk, 0);
	if (!key && partition < 0) {
		snprintf(errstr, errlen, "a message without a key needs an explicit partition");
		return TLY_E_INVALID;
	}
	struct pending *pd = pending_new(p, TLY_EV__COUNT, NULL, topic, opaque);
	if (!pd) {
		snprintf(errstr, errlen, "out of memory");
		return TLY_E_NOMEM;
	}
	pd->remaining = 1;
	pd->copies = 1;
	int rc = enqueue(p, pd, topic, key ? RD_KAFKA_PARTITION_UA : partition, key, keylen, bytes, len,
			 errstr, errlen);
	if (rc != 0) {
		pending_drop(p, pd);
		return rc;
	}
	p->stats.published++;
	return 0;
}

int tly_producer_poll(struct tly_producer *p, int timeout_ms)
{
	return rd_kafka_poll(p->rk, timeout_ms);
}

int tly_producer_flush(struct tly_producer *p, int timeout_ms)
{
	return tly_kafka_flush(p->rk, timeout_ms);
}

size_t tly_producer_in_flight(const struct tly_producer *p)
{
	return p->in_flight;
}

void tly_producer_stats(const struct tly_producer *p, struct tly_producer_stats *out)
{
	*out = p->stats;
}

rd_kafka_t *tly_producer_handle(struct tly_producer *p)
{
	return p->rk;
}

void tly_producer_free(struct tly_producer *p, int flush_timeout_ms)
{
	if (!p)
		return;
	if (p->rk) {
		if (p->in_flight && tly_kafka_flush(p->rk, flush_timeout_ms) != 0) {
			/* Purged messages come back as failed delivery reports. */
			rd_kafka_purge(p->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
			rd_kafka_poll(p->rk, 0);
		}
		/* Whatever librdkafka did not report is reported here, then the handle goes. */
		while (p->head.next != &p->head) {
			struct pending *pd = p->head.next;
			if (!pd->err) {
				pd->err = TLY_E_TIMEOUT;
				snprintf(pd->reason, sizeof(pd->reason),
					 "not delivered within %d ms before shutdown", flush_timeout_ms);
			}
			pd->remaining = 1;
			report(p, pd);
		}
		rd_kafka_destroy(p->rk);
	}
	tly_codec_free(p->codec);
	tly_buf_free(&p->buf);
	for (int t = 0; t < TLY_EV__COUNT; t++)
		free(p->topics[t]);
	for (size_t i = 0; i < p->n_counts; i++)
		free(p->counts[i].topic);
	free(p);
}
