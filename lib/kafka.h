/* Kafka through librdkafka for every program: configuration, client handles, produce, flush, error classes. */
#ifndef TLY_KAFKA_H
#define TLY_KAFKA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

#include "config.h"
#include "err.h"

/*
 * A librdkafka configuration holding every "kafka.*" key of cfg with the prefix stripped, handed to
 * rd_kafka_conf_set unchanged, and a log callback that writes librdkafka's logs through tly_log.
 * cfg may be NULL (log routing only). Returns NULL with errstr filled on a bad key or value:
 * invalid Kafka setting "kafka.foo": <librdkafka's error text>. The caller owns the result.
 */
rd_kafka_conf_t *tly_kafka_conf_new(const struct tly_config *cfg, char *errstr, size_t errlen);

/*
 * value for name unless conf already sets name to something other than librdkafka's default (the
 * operator's kafka.* settings win). 0, or TLY_E_CONFIG with errstr.
 */
int tly_kafka_conf_default(rd_kafka_conf_t *conf, const char *name, const char *value,
			   char *errstr, size_t errlen) TLY_MUST_CHECK;

/* One more setting on conf; TLY_E_CONFIG with librdkafka's error text in errstr on failure. */
int tly_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *errstr,
		       size_t errlen) TLY_MUST_CHECK;

/*
 * An idempotent producer (enable.idempotence=true, partitioner=murmur2_random: the Java client's
 * partitioner, so partition = murmur2(key) % P). Takes ownership of conf, also on failure; set a
 * delivery report callback on conf before, the report is the only success signal. NULL + errstr.
 */
rd_kafka_t *tly_kafka_producer_new(rd_kafka_conf_t *conf, char *errstr, size_t errlen);

/*
 * A consumer in group group_id with enable.auto.commit=false and the cooperative-sticky assignor;
 * session.timeout.ms becomes 6000 unless conf sets another value (the dev broker never forms a group
 * at 3000 or less). The main queue is redirected to the consumer queue (rd_kafka_poll_set_consumer).
 * Takes ownership of conf, also on failure. NULL + errstr.
 */
rd_kafka_t *tly_kafka_consumer_new(rd_kafka_conf_t *conf, const char *group_id, char *errstr,
				   size_t errlen);

/* Subscribe to n topics; TLY_E_KAFKA with the reason logged on failure. */
int tly_kafka_subscribe(rd_kafka_t *rk, const char *const *topics, size_t n) TLY_MUST_CHECK;

/*
 * The partition count of topic from the cluster's metadata (waiting up to timeout_ms): 0, or -1
 * with a one-line reason in errstr (no metadata, or the topic does not exist).
 */
int tly_kafka_topic_partitions(rd_kafka_t *rk, const char *topic, int timeout_ms, int32_t *count,
			       char *errstr, size_t errlen) TLY_MUST_CHECK;

/* One message to produce; every buffer is borrowed for the call only (librdkafka copies it). */
struct tly_kafka_msg {
	const char *topic;
	int32_t partition;          /* RD_KAFKA_PARTITION_UA: the partitioner picks it from key */
	const void *key;            /* may be NULL */
	size_t keylen;
	const void *value;          /* may be NULL */
	size_t valuelen;
	rd_kafka_headers_t *headers; /* NULL, or taken over by librdkafka when the call succeeds */
	void *opaque;               /* per-message opaque, given back in the delivery report */
};

/*
 * Enqueue msg. On a full local queue (QUEUE_FULL) serve delivery reports and retry for up to
 * timeout_ms; then TLY_E_TIMEOUT. Other failures: TLY_E_KAFKA, logged, and the librdkafka code in
 * *errp (may be NULL) for tly_kafka_errclass. 0 means enqueued, not delivered.
 */
int tly_kafka_produce(rd_kafka_t *rk, const struct tly_kafka_msg *msg, int timeout_ms,
		      rd_kafka_resp_err_t *errp) TLY_MUST_CHECK;

/* Wait up to timeout_ms for every queued message to be delivered or fail: 0 or TLY_E_TIMEOUT (logged). */
int tly_kafka_flush(rd_kafka_t *rk, int timeout_ms) TLY_MUST_CHECK;

/* Flush for up to flush_timeout_ms (what is left is logged and lost), then destroy. Accepts NULL. */
void tly_kafka_producer_destroy(rd_kafka_t *rk, int flush_timeout_ms);

/* Leave the group (rd_kafka_consumer_close), then destroy. Accepts NULL. */
void tly_kafka_consumer_destroy(rd_kafka_t *rk);

/*
 * Class of a librdkafka error: fatal for RD_KAFKA_RESP_ERR__FATAL or when fatal is set (from
 * rd_kafka_error_is_fatal or the error callback); retriable for transient broker and transport
 * errors (the ones rd_kafka_error_is_retriable and the Java client's RetriableException name);
 * permanent otherwise.
 */
enum tly_errclass tly_kafka_errclass(rd_kafka_resp_err_t err, bool fatal);

/*
 * The partition the Java client's default partitioner (librdkafka murmur2 / murmur2_random) gives a
 * non-NULL key: (murmur2(key) & 0x7fffffff) % partition_count. -1 if partition_count < 1.
 */
int32_t tly_kafka_partition_for_key(const void *key, size_t len, int32_t partition_count);

/*
 * The cooperative rebalance callback of a consumer, once: an assignment goes to assign; a
 * revocation to revoke, lost when the assignment was lost or failed says this process can no
 * longer commit; any other event is logged and handled as a lost revocation. Then the revoked
 * partitions are handed back (incremental unassign; a failure is logged). ud goes to both.
 */
void tly_kafka_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *parts,
			 bool failed, void (*assign)(void *ud, rd_kafka_topic_partition_list_t *parts),
			 void (*revoke)(void *ud, rd_kafka_topic_partition_list_t *parts, bool lost),
			 void *ud);

#endif
