/*
 * tally-ledger's output: committed entries to tally.ledger (same partition number, key = tenant
 * id, in decision order, idempotent producer) and quarantined input to tally.deadletter, with
 * the delivery reports folded into a per-partition "delivered up to input offset" marker that
 * is stored in PostgreSQL; on assignment the entries after the marker are republished.
 * Single-threaded: delivery reports are served inside the calls below.
 */
#ifndef TLY_LEDGER_PUBLISHER_H
#define TLY_LEDGER_PUBLISHER_H

#include <stdbool.h>
#include <stdint.h>

#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>

#include "config.h"
#include "err.h"
#include "ledger_partition.h"
#include "pg.h"

struct tly_codec;
struct tly_ledger_publisher;

/*
 * A publisher over an idempotent producer configured from cfg (kafka.* keys, topics.ledger,
 * topics.deadletter) for partition_count partitions; codec is borrowed for its lifetime.
 * NULL with errstr filled on failure.
 */
struct tly_ledger_publisher *tly_ledger_publisher_new(const struct tly_config *cfg,
						      struct tly_codec *codec,
						      int32_t partition_count, char *errstr,
						      size_t errlen);

/* Flush for up to flush_timeout_ms (what is left is logged), destroy. Accepts NULL. */
void tly_ledger_publisher_free(struct tly_ledger_publisher *pub, int flush_timeout_ms);

rd_kafka_t *tly_ledger_publisher_handle(struct tly_ledger_publisher *pub); /* borrowed */

/* Enqueue a committed batch of partition (entries, then deadletter copies). 0 or an error (logged). */
int tly_ledger_publisher_send(struct tly_ledger_publisher *pub, int32_t partition,
			      const struct tly_ledger_batch_out *out) TLY_MUST_CHECK;

/*
 * Republish partition's committed entries from its stored marker up to (excluding) input offset
 * upto; afterwards the marker may advance to upto. 0, TLY_E_PG (err filled) or a Kafka error.
 */
int tly_ledger_publisher_republish(struct tly_ledger_publisher *pub, PGconn *conn,
				   int32_t partition, int64_t upto,
				   struct tly_pg_error *err) TLY_MUST_CHECK;

/* Serve delivery reports for up to timeout_ms. */
void tly_ledger_publisher_poll(struct tly_ledger_publisher *pub, int timeout_ms);

/* Wait for every queued message for up to timeout_ms: 0 or TLY_E_TIMEOUT. */
int tly_ledger_publisher_flush(struct tly_ledger_publisher *pub, int timeout_ms) TLY_MUST_CHECK;

/*
 * The marker to store for partition when it moved since the last call (every entry caused by an
 * input offset below it is delivered), else -1.
 */
int64_t tly_ledger_publisher_take_marker(struct tly_ledger_publisher *pub, int32_t partition);

/* True (once) when a delivery of partition failed for good: republish from the marker. */
bool tly_ledger_publisher_take_failure(struct tly_ledger_publisher *pub, int32_t partition);

/*
 * Whether a delivery report proves its message is on the topic: no error and the offset the
 * broker gave it. librdkafka also reports success without an offset, when it acknowledges a
 * message implicitly because a later one of its partition succeeded; the dev broker does not
 * check an idempotent producer's sequence numbers, so there that was seen to hide a loss.
 */
bool tly_ledger_publisher_confirmed(const rd_kafka_message_t *m);

#endif
