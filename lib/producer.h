/*
 * The producer API for upstream C services: validate, encode (Avro single-object) and publish
 * Tally events, keyed by tenant, with a delivery report per event.
 *
 *   static void on_delivery(const struct tly_delivery *d, void *ud)
 *   {
 *           if (d->err)   // not delivered: retry it or raise an alarm (d->reason says why)
 *                   fprintf(stderr, "event %s: %s\n", d->event_id_text, d->reason);
 *   }
 *
 *   char err[512];
 *   struct tly_producer *p = tly_producer_new(cfg, on_delivery, NULL, err, sizeof(err));
 *   struct tly_event ev = {0};
 *   tly_event_init(&ev, TLY_EV_TOKENS_RESERVED);
 *   tly_uuid_generate(&ev.event_id);
 *   ev.tenant_id = tenant;
 *   ev.occurred_at = now_us;
 *   ev.u.tokens_reserved = (struct tly_ev_tokens_reserved){rid, 4096, now_us + 60000000, "gpt-4o"};
 *   if (tly_producer_publish(p, &ev, my_opaque, err, sizeof(err)) != 0)
 *           fprintf(stderr, "not published: %s\n", err);   // e.g. "…: field tokens: must be at least 1"
 *   tly_producer_poll(p, 0);              // on every turn of your loop: serves delivery reports
 *   …
 *   tly_producer_free(p, 10000);          // flushes (waits for the last reports), then frees
 *
 * Routing: the topic is the event type's (tly_event_desc(type)->topic, renamed by the topics.*
 * settings); the key is the tenant UUID as 36-character lower-case text, partitioned by the Java
 * client's murmur2 on an idempotent producer, so one tenant's events stay on one partition in
 * order. ClockTick has no tenant: it is published to every partition of its topic (key NULL,
 * explicit partition) and reported once, when every copy is delivered. PlanPublished is keyed by
 * its plan_id. LedgerEntry is refused (only tally-ledger writes tally.ledger).
 *
 * Not thread-safe: one producer per thread (the delivery callback runs inside poll, flush and
 * publish, on the calling thread).
 */
#ifndef TLY_PRODUCER_H
#define TLY_PRODUCER_H

#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

#include "config.h"
#include "err.h"
#include "event.h"

struct tly_producer;

/* One event's outcome; every pointer is borrowed for the duration of the callback. */
struct tly_delivery {
	enum tly_event_type type;
	tly_uuid event_id;          /* nil for raw publishes */
	char event_id_text[37];
	void *opaque;               /* as given to publish */
	int err;                    /* 0: delivered (persisted by the broker); else TLY_E_KAFKA / TLY_E_TIMEOUT */
	rd_kafka_resp_err_t kafka_err; /* librdkafka's code when err != 0 (see tly_kafka_errclass) */
	const char *reason;         /* librdkafka's text, "" when delivered */
	const char *topic;
	int32_t partition;          /* of the (last) copy */
	int64_t offset;             /* of the (last) copy; -1 if unknown */
	int copies;                 /* Kafka messages this event was sent as (ClockTick: P) */
};

typedef void (*tly_delivery_cb)(const struct tly_delivery *d, void *ud);

/* Counters since creation. */
struct tly_producer_stats {
	uint64_t published; /* events accepted by publish */
	uint64_t rejected;  /* events refused by publish (invalid, too large, refused type) */
	uint64_t delivered; /* delivery reports with err == 0 */
	uint64_t failed;    /* delivery reports with err != 0 */
};

/*
 * A producer configured from cfg (kafka.* keys handed to librdkafka unchanged; topics.* names).
 * cb (may be NULL) is called once per published event with ud. NULL + errstr on failure.
 */
struct tly_producer *tly_producer_new(const struct tly_config *cfg, tly_delivery_cb cb, void *ud,
				      char *errstr, size_t errlen);

/*
 * Validate, encode and enqueue ev (borrowed for the call). Returns 0 (enqueued: the delivery
 * report follows), TLY_E_INVALID / TLY_E_TOO_LARGE with errstr naming the type and field and
 * nothing enqueued, TLY_E_TIMEOUT (local queue stayed full), TLY_E_KAFKA. opaque is handed back in
 * the delivery report. Serves pending delivery reports first.
 */
int tly_producer_publish(struct tly_producer *p, const struct tly_event *ev, void *opaque,
			 char *errstr, size_t errlen) TLY_MUST_CHECK;

/*
 * Enqueue bytes as they are (no validation: for tests and the load generator's deliberately bad
 * input) on topic with key (may be NULL: then partition must be explicit). Reported like an event
 * of type TLY_EV__COUNT with a nil event id.
 */
int tly_producer_publish_raw(struct tly_producer *p, const char *topic, const void *key,
			     size_t keylen, int32_t partition, const void *bytes, size_t len,
			     void *opaque, char *errstr, size_t errlen) TLY_MUST_CHECK;

/* Serve delivery reports, waiting up to timeout_ms for the first; returns how many were served. */
int tly_producer_poll(struct tly_producer *p, int timeout_ms);

/* Wait up to timeout_ms for every report: 0 or TLY_E_TIMEOUT (the rest are reported as failed by free). */
int tly_producer_flush(struct tly_producer *p, int timeout_ms) TLY_MUST_CHECK;

/* Events published and not yet reported. */
size_t tly_producer_in_flight(const struct tly_producer *p);

/* Partition count of topic (from broker metadata, cached); TLY_E_KAFKA / TLY_E_NOT_FOUND. */
int tly_producer_partition_count(struct tly_producer *p, const char *topic, int32_t *count) TLY_MUST_CHECK;

/* The topic events of type go to under this producer's configuration. */
const char *tly_producer_topic(const struct tly_producer *p, enum tly_event_type type);

void tly_producer_stats(const struct tly_producer *p, struct tly_producer_stats *out);

/* The underlying librdkafka handle, borrowed (for metrics and advanced settings). */
rd_kafka_t *tly_producer_handle(struct tly_producer *p);

/*
 * Flush for up to flush_timeout_ms, then destroy: events still undelivered get a failure report
 * (err TLY_E_TIMEOUT) before the handle goes. Accepts NULL.
 */
void tly_producer_free(struct tly_producer *p, int flush_timeout_ms);

#endif
