/* tally-ledger's output to tally.ledger and tally.deadletter, and the delivered marker per partition. */
#include "ledger_publisher.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "codec.h"
#include "kafka.h"
#include "log.h"

#define PRODUCE_TIMEOUT_MS 10000
/*
 * linger.ms unless kafka.linger.ms is set: a committed group's entries are enqueued all at once
 * and nothing more comes until the next commit, so waiting longer (librdkafka's 5 ms) only
 * delays every decision; 1 ms still packs a group into few produce requests. 5 ms was measured
 * at 22,000 decisions/s (docs/ledger-speed.md, "own CPU, session 9"): the dev broker's CPU did
 * not fall and every entry reached tally.ledger's readers 4-5 ms later.
 */
#define LINGER_MS "1"

/* One published batch of a partition: done when every message of it is reported. */
struct pub_batch {
	int64_t end_offset;  /* input offsets below it are covered once this and every earlier one is */
	int remaining;       /* messages not yet reported */
	int32_t lane;        /* the partition whose marker it moves */
	bool failed;
	struct pub_batch *next;
};

struct lane {                  /* one partition */
	struct pub_batch *head, *tail;
	int64_t delivered;         /* marker: -1 unknown */
	int64_t taken;             /* last marker handed out by take_marker */
	bool failure;
};

struct tly_ledger_publisher {
	rd_kafka_t *rk;
	rd_kafka_topic_t *rkt;     /* tally.ledger, for rd_kafka_produce_batch */
	rd_kafka_message_t *msgs;  /* send_entries' messages, cap of them, kept between batches */
	char (*keys)[37];          /* and their keys' texts */
	size_t cap;
	struct tly_codec *codec;   /* borrowed */
	char *ledger_topic, *deadletter_topic;
	int32_t partition_count;
	struct lane *lanes;
	struct tly_buf buf;
};

static void settle(struct tly_ledger_publisher *pub, int32_t partition)
{
	struct lane *l = &pub->lanes[partition];
	while (l->head && l->head->remaining == 0) {
		struct pub_batch *b = l->head;
		if (b->failed)
			l->failure = true;
		else if (!l->failure && b->end_offset > l->delivered)
			l->delivered = b->end_offset;
		l->head = b->next;
		if (!l->head)
			l->tail = NULL;
		free(b);
	}
}

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	(void)rk;
	struct tly_ledger_publisher *pub = opaque;
	struct pub_batch *b = m->_private; /* a message's opaque is its batch, which outlives it */
	if (!b)
		return;
	if (m->err) {
		tly_error("could not deliver ledger output", "topic=%s partition=%d reason=\"%s\"",
			  rd_kafka_topic_name(m->rkt), (int)m->partition, rd_kafka_err2str(m->err));
		b->failed = true;
	} else if (!tly_ledger_publisher_confirmed(m)) {
		/* a republish costs at most duplicates, which readers drop by (tenant_id, seq) */
		tly_warn("ledger output acknowledged without an offset; republishing to be sure",
			 "topic=%s partition=%d", rd_kafka_topic_name(m->rkt), (int)m->partition);
		b->failed = true;
	}
	b->remaining--;
	settle(pub, b->lane);
}

bool tly_ledger_publisher_confirmed(const rd_kafka_message_t *m)
{
	return !m->err && m->offset >= 0;
}

struct tly_ledger_publisher *tly_ledger_publisher_new(const struct tly_config *cfg,
						      struct tly_codec *codec,
						      int32_t partition_count, char *errstr,
						      size_t errlen)
{
	struct tly_ledger_publisher *pub = calloc(1, sizeof(*pub));
	if (!pub || !(pub->lanes = calloc((size_t)partition_count, sizeof(*pub->lanes))) ||
	    !(pub->ledger_topic = strdup(tly_config_str(cfg, "topics.ledger"))) ||
	    !(pub->deadletter_topic = strdup(tly_config_str(cfg, "topics.deadletter")))) {
		snprintf(errstr, errlen, "out of memory");
		goto fail;
	}
	pub->codec = codec;
	pub->partition_count = partition_count;
	for (int32_t i = 0; i < partition_count; i++)
		pub->lanes[i].delivered = pub->lanes[i].taken = -1;
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, errlen);
	if (!conf)
		goto fail;
	if (tly_kafka_conf_default(conf, "linger.ms", LINGER_MS, errstr, errlen) != 0) {
		rd_kafka_conf_destroy(conf);
		goto fail;
	}
	rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
	rd_kafka_conf_set_opaque(conf, pub);
	if (!(pub->rk = tly_kafka_producer_new(conf, errstr, errlen)))
		goto fail;
	if (!(pub->rkt = rd_kafka_topic_new(pub->rk, pub->ledger_topic, NULL))) {
		snprintf(errstr, errlen, "could not create the topic handle of \"%s\": %s",
			 pub->ledger_topic, rd_kafka_err2str(rd_kafka_last_error()));
		goto fail;
	}
	return pub;
fail:
	tly_ledger_publisher_free(pub, 0);
	return NULL;
}

void tly_ledger_publisher_free(struct tly_ledger_publisher *pub, int flush_timeout_ms)
{
	if (!pub)
		return;
	if (pub->rkt)
		rd_kafka_topic_destroy(pub->rkt);
	tly_kafka_producer_destroy(pub->rk, flush_timeout_ms);
	free(pub->msgs);
	free(pub->keys);
	for (int32_t i = 0; pub->lanes && i < pub->partition_count; i++) {
		while (pub->lanes[i].head) {
			struct pub_batch *b = pub->lanes[i].head;
			pub->lanes[i].head = b->next;
			free(b);
		}
	}
	free(pub->lanes);
	free(pub->ledger_topic);
	free(pub->deadletter_topic);
	tly_buf_free(&pub->buf);
	free(pub);
}

rd_kafka_t *tly_ledger_publisher_handle(struct tly_ledger_publisher *pub)
{
	return pub->rk;
}

static struct pub_batch *open_batch(struct tly_ledger_publisher *pub, int32_t partition,
				    int64_t end_offset)
{
	struct pub_batch *b = calloc(1, sizeof(*b));
	if (!b)
		return NULL;
	b->end_offset = end_offset;
	b->lane = partition;
	b->remaining = 1; /* held until every message is enqueued */
	struct lane *l = &pub->lanes[partition];
	if (l->tail)
		l->tail->next = b;
	else
		l->head = b;
	l->tail = b;
	return b;
}

static int produce(struct tly_ledger_publisher *pub, struct pub_batch *b, struct tly_kafka_msg *msg)
{
	msg->opaque = b;
	rd_kafka_resp_err_t kerr;
	int rc = tly_kafka_produce(pub->rk, msg, PRODUCE_TIMEOUT_MS, &kerr);
	if (rc != 0) {
		if (msg->headers)
			rd_kafka_headers_destroy(msg->headers);
		b->failed = true;
		return rc;
	}
	b->remaining++;
	return 0;
}

/* One entry to tally.ledger: its encoding when given (the bytes its hash covers), else encoded here. */
static int send_entry(struct tly_ledger_publisher *pub, struct pub_batch *b, int32_t partition,
		      const struct tly_event *entry, const void *encoded, size_t encoded_len)
{
	char errstr[256], key[37];
	if (!encoded) {
		int rc = tly_codec_encode(pub->codec, entry, &pub->buf, errstr, sizeof(errstr));
		if (rc != 0) {
			tly_error("could not encode ledger entry",
				  "partition=%d seq=%" PRId64 " reason=\"%s\"", (int)partition,
				  entry->u.ledger_entry.seq, errstr);
			b->failed = true;
			return rc;
		}
		encoded = pub->buf.data;
		encoded_len = pub->buf.len;
	}
	tly_uuid_format(&entry->tenant_id, key);
	struct tly_kafka_msg msg = {.topic = pub->ledger_topic, .partition = partition,
				    .key = key, .keylen = 36, .value = encoded,
				    .valuelen = encoded_len};
	return produce(pub, b, &msg);
}

static int send_deadletter(struct tly_ledger_publisher *pub, struct pub_batch *b,
			   const struct tly_ledger_quarantined *q)
{
	char part[16], off[24];
	snprintf(part, sizeof(part), "%d", (int)q->partition);
	snprintf(off, sizeof(off), "%" PRId64, q->offset);
	rd_kafka_headers_t *h = rd_kafka_headers_new(5);
	if (!h)
		return TLY_E_NOMEM;
	if (rd_kafka_header_add(h, "reason", -1, q->reason, -1) ||
	    rd_kafka_header_add(h, "source_topic", -1, q->topic, -1) ||
	    rd_kafka_header_add(h, "source_partition", -1, part, -1) ||
	    rd_kafka_header_add(h, "source_offset", -1, off, -1) ||
	    (q->detail && rd_kafka_header_add(h, "detail", -1, q->detail, -1))) {
		rd_kafka_headers_destroy(h);
		return TLY_E_NOMEM;
	}
	struct tly_kafka_msg msg = {.topic = pub->deadletter_topic,
				    .partition = RD_KAFKA_PARTITION_UA,
				    .key = q->key, .keylen = q->keylen,
				    .value = q->value, .valuelen = q->valuelen, .headers = h};
	return produce(pub, b, &msg);
}

/*
 * A committed batch's encoded entries to tally.ledger in one rd_kafka_produce_batch call (one
 * topic lookup, one pass under the topic's lock) instead of one rd_kafka_producev each. A full
 * local queue: serve delivery reports and go on from the first message refused, in order, for
 * up to PRODUCE_TIMEOUT_MS.
 */
static int send_entries(struct tly_ledger_publisher *pub, struct pub_batch *b, int32_t partition,
			const struct tly_ledger_batch_out *out)
{
	size_t n = out->n_entries;
	if (n > pub->cap) {
		rd_kafka_message_t *msgs = realloc(pub->msgs, n * sizeof(*msgs));
		if (msgs)
			pub->msgs = msgs;
		char(*keys)[37] = realloc(pub->keys, n * sizeof(*keys));
		if (keys)
			pub->keys = keys;
		if (!msgs || !keys)
			return TLY_E_NOMEM;
		pub->cap = n;
	}
	for (size_t i = 0; i < n; i++) {
		size_t len = 0;
		const void *bytes = tly_entries_encoded(out->encoded, i, &len);
		tly_uuid_format(&out->entries[i].tenant_id, pub->keys[i]);
		pub->msgs[i] = (rd_kafka_message_t){.payload = (void *)bytes, .len = len,
						    .key = pub->keys[i], .key_len = 36, ._private = b};
	}
	int rc = 0;
	size_t done = 0; /* messages enqueued, in order */
	int64_t deadline = tly_clock_ms() + PRODUCE_TIMEOUT_MS;
	while (done < n) {
		rd_kafka_message_t *batch = pub->msgs + done;
		size_t k = n - done, i = 0;
		int good = rd_kafka_produce_batch(pub->rkt, partition, RD_KAFKA_MSG_F_COPY, batch, (int)k);
		b->remaining += good;
		while (i < k && !batch[i].err)
			i++;
		done += i;
		if (i == k)
			break;
		/* A full queue refuses message i and every one after it: they wait, in order. */
		if (batch[i].err == RD_KAFKA_RESP_ERR__QUEUE_FULL && (size_t)good == i) {
			int64_t left = deadline - tly_clock_ms();
			if (left > 0) {
				rd_kafka_poll(pub->rk, left < 100 ? (int)left : 100);
				continue;
			}
			tly_warn("could not produce Kafka message: local queue still full",
				 "topic=%s partition=%d timeout_ms=%d", pub->ledger_topic, (int)partition,
				 PRODUCE_TIMEOUT_MS);
			rc = TLY_E_TIMEOUT;
		} else {
			tly_error("could not produce Kafka message", "topic=%s partition=%d reason=\"%s\"",
				  pub->ledger_topic, (int)partition, rd_kafka_err2str(batch[i].err));
			rc = TLY_E_KAFKA;
		}
		break;
	}
	return rc;
}

int tly_ledger_publisher_send(struct tly_ledger_publisher *pub, int32_t partition,
			      const struct tly_ledger_batch_out *out)
{
	int rc = 0;
	struct pub_batch *b = open_batch(pub, partition, out->end_offset);
	if (!b)
		return TLY_E_NOMEM;
	if (out->encoded && out->n_entries) {
		rc = send_entries(pub, b, partition, out);
	} else {
		for (size_t i = 0; i < out->n_entries && rc == 0; i++)
			rc = send_entry(pub, b, partition, &out->entries[i], NULL, 0);
	}
	for (size_t i = 0; i < out->n_quarantined && rc == 0; i++)
		rc = send_deadletter(pub, b, &out->quarantined[i]);
	if (rc != 0)
		b->failed = true;
	b->remaining--;
	settle(pub, partition);
	return rc;
}

struct republish {
	struct tly_ledger_publisher *pub;
	struct pub_batch *b;
	int32_t partition;
	int64_t upto;
	size_t n;
};

static int republish_one(const struct tly_event *entry, void *ud)
{
	struct republish *r = ud;
	if (entry->u.ledger_entry.cause_offset >= r->upto)
		return 0;
	r->n++;
	return send_entry(r->pub, r->b, r->partition, entry, NULL, 0);
}

int tly_ledger_publisher_republish(struct tly_ledger_publisher *pub, PGconn *conn,
				   int32_t partition, int64_t upto, struct tly_pg_error *err)
{
	int64_t marker = 0;
	int rc = tly_ledger_store_load_published(conn, pub->ledger_topic, partition, &marker, err);
	if (rc != 0)
		return rc;
	struct lane *l = &pub->lanes[partition];
	l->failure = false;
	if (marker > l->delivered)
		l->delivered = l->taken = marker;
	if (marker >= upto)
		return 0;
	struct republish r = {pub, open_batch(pub, partition, upto), partition, upto, 0};
	if (!r.b)
		return TLY_E_NOMEM;
	rc = tly_ledger_store_load_entries(conn, partition, marker, republish_one, &r, err);
	if (rc != 0)
		r.b->failed = true;
	r.b->remaining--;
	settle(pub, partition);
	tly_info("republished ledger entries after the delivered marker",
		 "partition=%d from_offset=%" PRId64 " to_offset=%" PRId64 " entries=%zu",
		 (int)partition, marker, upto, r.n);
	return rc;
}

void tly_ledger_publisher_poll(struct tly_ledger_publisher *pub, int timeout_ms)
{
	rd_kafka_poll(pub->rk, timeout_ms);
}

int tly_ledger_publisher_flush(struct tly_ledger_publisher *pub, int timeout_ms)
{
	return tly_kafka_flush(pub->rk, timeout_ms);
}

int64_t tly_ledger_publisher_take_marker(struct tly_ledger_publisher *pub, int32_t partition)
{
	struct lane *l = &pub->lanes[partition];
	if (l->delivered <= l->taken)
		return -1;
	l->taken = l->delivered;
	return l->delivered;
}

bool tly_ledger_publisher_take_failure(struct tly_ledger_publisher *pub, int32_t partition)
{
	bool f = pub->lanes[partition].failure;
	pub->lanes[partition].failure = false;
	return f;
}
