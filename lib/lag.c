/* Consumer lag: stored offsets from consumer_offsets against the topics' watermarks. */
#include "lag.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pg.h"

/* A (consumer, topic) whose partitions are listed. */
struct pair {
	const char *consumer; /* borrowed from the query result or the caller's expect */
	const char *topic;
};

int64_t tly_lag_of(int64_t stored, int64_t low, int64_t high)
{
	int64_t from = stored >= 0 ? stored : low;
	if (high < 0 || from < 0)
		return -1;
	return high > from ? high - from : 0;
}

void tly_lag_report_free(struct tly_lag_report *report)
{
	if (!report)
		return;
	free(report->rows);
	report->rows = NULL;
	report->count = 0;
}

int64_t tly_lag_total(const struct tly_lag_report *report, const char *consumer, const char *topic)
{
	int64_t sum = 0;
	for (size_t i = 0; i < report->count; i++) {
		const struct tly_lag_row *r = &report->rows[i];
		if ((consumer && strcmp(r->consumer, consumer) != 0) ||
		    (topic && strcmp(r->topic, topic) != 0))
			continue;
		if (r->lag < 0)
			return -1;
		sum += r->lag;
	}
	return sum;
}

static int cmp_row(const void *a, const void *b)
{
	const struct tly_lag_row *x = a, *y = b;
	int c = strcmp(x->consumer, y->consumer);
	if (c == 0)
		c = strcmp(x->topic, y->topic);
	if (c == 0)
		c = (x->partition > y->partition) - (x->partition < y->partition);
	return c;
}

static int add_row(struct tly_lag_report *report, size_t *cap, const char *consumer,
		   const char *topic, int32_t partition, int64_t stored)
{
	if (report->count == *cap) {
		size_t ncap = *cap ? *cap * 2 : 64;
		struct tly_lag_row *grown = realloc(report->rows, ncap * sizeof(*grown));
		if (!grown)
			return TLY_E_NOMEM;
		report->rows = grown;
		*cap = ncap;
	}
	struct tly_lag_row *r = &report->rows[report->count++];
	memset(r, 0, sizeof(*r));
	snprintf(r->consumer, sizeof(r->consumer), "%s", consumer);
	snprintf(r->topic, sizeof(r->topic), "%s", topic);
	r->partition = partition;
	r->stored = stored;
	r->low = r->high = r->lag = -1;
	return 0;
}

static bool have_pair(const struct pair *pairs, size_t n, const char *consumer, const char *topic)
{
	for (size_t i = 0; i < n; i++) {
		if (strcmp(pairs[i].consumer, consumer) == 0 && strcmp(pairs[i].topic, topic) == 0)
			return true;
	}
	return false;
}

/* Partition count of topic in md; -1 if the cluster does not have it. */
static int partitions_of(const struct rd_kafka_metadata *md, const char *topic)
{
	for (int i = 0; i < md->topic_cnt; i++) {
		if (strcmp(md->topics[i].topic, topic) == 0)
			return md->topics[i].err ? -1 : md->topics[i].partition_cnt;
	}
	return -1;
}

/* Watermarks of every row whose partition exists; one query per topic partition. */
static int fill_watermarks(rd_kafka_t *rk, const struct rd_kafka_metadata *md,
			   struct tly_lag_report *report, int timeout_ms, char *errstr, size_t errlen)
{
	for (size_t i = 0; i < report->count; i++) {
		struct tly_lag_row *r = &report->rows[i];
		if (r->partition >= partitions_of(md, r->topic))
			continue;
		const struct tly_lag_row *seen = NULL;
		for (size_t j = 0; j < i && !seen; j++) {
			const struct tly_lag_row *o = &report->rows[j];
			if (o->partition == r->partition && o->high >= 0 && strcmp(o->topic, r->topic) == 0)
				seen = o;
		}
		if (seen) {
			r->low = seen->low;
			r->high = seen->high;
			continue;
		}
		int64_t low = -1, high = -1;
		rd_kafka_resp_err_t err = rd_kafka_query_watermark_offsets(rk, r->topic, r->partition,
									   &low, &high, timeout_ms);
		if (err) {
			snprintf(errstr, errlen,
				 "could not query the watermarks of topic \"%s\" partition %" PRId32 ": %s",
				 r->topic, r->partition, rd_kafka_err2str(err));
			return TLY_E_KAFKA;
		}
		r->low = low;
		r->high = high;
	}
	return 0;
}

int tly_lag_collect(PGconn *conn, rd_kafka_t *rk, const struct tly_lag_expect *expect,
		    size_t nexpect, int timeout_ms, struct tly_lag_report *report, char *errstr,
		    size_t errlen)
{
	struct tly_pg_error err;
	const struct rd_kafka_metadata *md = NULL;
	struct pair *pairs = NULL;
	size_t npairs = 0, cap = 0;
	int rc = 0;

	report->rows = NULL;
	report->count = 0;
	PGresult *res = tly_pg_query(conn,
				     "SELECT consumer, topic, partition, next_offset FROM consumer_offsets "
				     "ORDER BY consumer, topic, partition",
				     0, NULL, &err);
	if (!res) {
		snprintf(errstr, errlen, "could not read table \"consumer_offsets\": %s", err.message);
		return TLY_E_PG;
	}
	int n = PQntuples(res);

	rd_kafka_resp_err_t kerr = rd_kafka_metadata(rk, 1, NULL, &md, timeout_ms);
	if (kerr) {
		snprintf(errstr, errlen, "could not read the topics of the Kafka cluster: %s",
			 rd_kafka_err2str(kerr));
		md = NULL;
		rc = TLY_E_KAFKA;
		goto fail;
	}

	/* The (consumer, topic) pairs: stored ones, then the expected topics of stored consumers. */
	pairs = calloc((size_t)n + nexpect + 1, sizeof(*pairs));
	if (!pairs)
		goto nomem;
	for (int i = 0; i < n; i++) {
		const char *c = PQgetvalue(res, i, 0), *t = PQgetvalue(res, i, 1);
		if (!have_pair(pairs, npairs, c, t))
			pairs[npairs++] = (struct pair){c, t};
	}
	for (size_t e = 0; e < nexpect; e++) {
		bool stored = false;
		for (int i = 0; i < n && !stored; i++)
			stored = strcmp(PQgetvalue(res, i, 0), expect[e].consumer) == 0;
		if (stored && !have_pair(pairs, npairs, expect[e].consumer, expect[e].topic))
			pairs[npairs++] = (struct pair){expect[e].consumer, expect[e].topic};
	}

	for (size_t p = 0; p < npairs; p++) {
		int parts = partitions_of(md, pairs[p].topic);
		for (int32_t part = 0; part < parts; part++) {
			if (add_row(report, &cap, pairs[p].consumer, pairs[p].topic, part, -1) != 0)
				goto nomem;
		}
		/* Stored offsets: on their partition's row, or a row of their own beyond the topic. */
		for (int i = 0; i < n; i++) {
			if (strcmp(PQgetvalue(res, i, 0), pairs[p].consumer) != 0 ||
			    strcmp(PQgetvalue(res, i, 1), pairs[p].topic) != 0)
				continue;
			int32_t part = (int32_t)strtol(PQgetvalue(res, i, 2), NULL, 10);
			int64_t next = strtoll(PQgetvalue(res, i, 3), NULL, 10);
			if (part < parts) {
				for (size_t r = report->count; r-- > 0;) {
					struct tly_lag_row *row = &report->rows[r];
					if (row->partition == part &&
					    strcmp(row->consumer, pairs[p].consumer) == 0 &&
					    strcmp(row->topic, pairs[p].topic) == 0) {
						row->stored = next;
						break;
					}
				}
			} else if (add_row(report, &cap, pairs[p].consumer, pairs[p].topic, part,
					   next) != 0) {
				goto nomem;
			}
		}
	}

	rc = fill_watermarks(rk, md, report, timeout_ms, errstr, errlen);
	if (rc != 0)
		goto fail;
	for (size_t i = 0; i < report->count; i++) {
		struct tly_lag_row *r = &report->rows[i];
		r->lag = tly_lag_of(r->stored, r->low, r->high);
	}
	if (report->count > 1)
		qsort(report->rows, report->count, sizeof(report->rows[0]), cmp_row);
	goto done;
nomem:
	snprintf(errstr, errlen, "could not compute consumer lag: out of memory");
	rc = TLY_E_NOMEM;
fail:
	tly_lag_report_free(report);
done:
	free(pairs);
	if (md)
		rd_kafka_metadata_destroy(md);
	PQclear(res);
	return rc;
}
