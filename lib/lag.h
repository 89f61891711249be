/* Consumer lag: how far each consumer's stored offsets (consumer_offsets) are behind its topics' ends. */
#ifndef TLY_LAG_H
#define TLY_LAG_H

#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>
#include <libpq-fe.h>

#include "err.h"

/* One partition of one consumer's topic. */
struct tly_lag_row {
	char consumer[128];
	char topic[256];
	int32_t partition;
	int64_t stored; /* next offset stored in consumer_offsets; -1: none stored */
	int64_t low;    /* the partition's low watermark; -1: unknown */
	int64_t high;   /* the partition's high watermark (next offset to be written); -1: unknown */
	int64_t lag;    /* tly_lag_of(stored, low, high) */
};

/* Rows ordered by consumer, topic, partition; rows is malloc'd (tly_lag_report_free). */
struct tly_lag_report {
	struct tly_lag_row *rows;
	size_t count;
};

/*
 * A topic a consumer reads: listed (every partition, from the low watermark where nothing is
 * stored) once the consumer has stored any offset, even before it stored one for this topic.
 */
struct tly_lag_expect {
	const char *consumer;
	const char *topic;
};

/*
 * Records a consumer has still to read in one partition: high - stored, or high - low when nothing
 * is stored (a new consumer starts at the earliest record); never negative. -1 when high is
 * unknown, or low too when nothing is stored.
 */
int64_t tly_lag_of(int64_t stored, int64_t low, int64_t high);

/*
 * Fill report with every partition of every (consumer, topic) in consumer_offsets, plus the
 * expected topics of the consumers found there: stored offsets from conn, partitions and
 * watermarks from rk (any client handle; metadata and watermark queries each wait up to
 * timeout_ms). A partition stored but no longer in the topic, or a topic the cluster does not
 * have, gets unknown watermarks. Fails (TLY_E_PG or TLY_E_KAFKA, errstr filled, report empty)
 * when the database or the cluster cannot be read. Thread notes: uses conn and rk only for the call.
 */
int tly_lag_collect(PGconn *conn, rd_kafka_t *rk, const struct tly_lag_expect *expect,
		    size_t nexpect, int timeout_ms, struct tly_lag_report *report, char *errstr,
		    size_t errlen) TLY_MUST_CHECK;

/*
 * Sum of the lag of the rows of consumer and topic (either NULL: any); -1 if any of them is
 * unknown.
 */
int64_t tly_lag_total(const struct tly_lag_report *report, const char *consumer, const char *topic);

/* Release report's rows (the struct itself is the caller's); accepts NULL. */
void tly_lag_report_free(struct tly_lag_report *report);

#endif
