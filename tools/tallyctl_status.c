/* tallyctl status: each consumer's lag per topic and partition (lib/lag), as a table or as JSON. */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "kafka.h"
#include "lag.h"
#include "tallyctl.h"

#define DEFAULT_TIMEOUT_MS 5000

static void status_usage(void)
{
	fprintf(stderr, "tallyctl: usage: tallyctl status [--json] [--timeout-ms T]\n");
}

/* A number, or null when unknown (negative). */
static json_t *json_known(int64_t v)
{
	return v >= 0 ? json_integer((json_int_t)v) : json_null();
}

static void print_value(int width, int64_t v)
{
	if (v >= 0)
		printf(" %*" PRId64, width, v);
	else
		printf(" %*s", width, "-");
}

static void print_table(const struct tly_lag_report *report)
{
	printf("%-20s %-20s %9s %12s %12s %12s\n", "CONSUMER", "TOPIC", "PARTITION", "STORED", "END",
	       "LAG");
	for (size_t i = 0; i < report->count; i++) {
		const struct tly_lag_row *r = &report->rows[i];
		printf("%-20s %-20s %9" PRId32, r->consumer, r->topic, r->partition);
		print_value(12, r->stored);
		print_value(12, r->high);
		print_value(12, r->lag);
		printf("\n");
		bool last_of_topic = i + 1 == report->count ||
				     strcmp(report->rows[i + 1].topic, r->topic) != 0 ||
				     strcmp(report->rows[i + 1].consumer, r->consumer) != 0;
		bool last_of_consumer = i + 1 == report->count ||
					strcmp(report->rows[i + 1].consumer, r->consumer) != 0;
		if (last_of_topic) {
			printf("%-20s %-20s %9s %12s %12s", r->consumer, r->topic, "total", "", "");
			print_value(12, tly_lag_total(report, r->consumer, r->topic));
			printf("\n");
		}
		if (last_of_consumer) {
			printf("%-20s %-20s %9s %12s %12s", r->consumer, "all topics", "", "", "");
			print_value(12, tly_lag_total(report, r->consumer, NULL));
			printf("\n\n");
		}
	}
	if (report->count == 0)
		printf("(no consumer has stored an offset yet)\n");
	printf("%-20s %-20s %9s %12s %12s", "total", "", "", "", "");
	print_value(12, tly_lag_total(report, NULL, NULL));
	printf("\n");
}

/*
 * {"consumers": [{"consumer", "lag", "topics": [{"topic", "lag", "partitions": [{"partition",
 * "stored", "low", "high", "lag"}]}]}], "lag": N}; unknown numbers are null.
 */
static json_t *report_json(const struct tly_lag_report *report)
{
	json_t *root = json_object(), *consumers = json_array();
	json_t *consumer = NULL, *topics = NULL, *topic = NULL, *parts = NULL;
	if (!root || !consumers || json_object_set_new(root, "consumers", consumers) != 0)
		goto fail;
	for (size_t i = 0; i < report->count; i++) {
		const struct tly_lag_row *r = &report->rows[i];
		bool new_consumer = i == 0 || strcmp(report->rows[i - 1].consumer, r->consumer) != 0;
		if (new_consumer) {
			consumer = json_pack("{s:s, s:o, s:[]}", "consumer", r->consumer, "lag",
					     json_known(tly_lag_total(report, r->consumer, NULL)), "topics");
			if (!consumer || json_array_append_new(consumers, consumer) != 0)
				goto fail;
			topics = json_object_get(consumer, "topics");
		}
		if (new_consumer || strcmp(report->rows[i - 1].topic, r->topic) != 0) {
			topic = json_pack("{s:s, s:o, s:[]}", "topic", r->topic, "lag",
					  json_known(tly_lag_total(report, r->consumer, r->topic)),
					  "partitions");
			if (!topic || json_array_append_new(topics, topic) != 0)
				goto fail;
			parts = json_object_get(topic, "partitions");
		}
		json_t *part = json_pack("{s:i, s:o, s:o, s:o, s:o}", "partition", (int)r->partition,
					 "stored", json_known(r->stored), "low", json_known(r->low),
					 "high", json_known(r->high), "lag", json_known(r->lag));
		if (!part || json_array_append_new(parts, part) != 0)
			goto fail;
	}
	if (json_object_set_new(root, "lag", json_known(tly_lag_total(report, NULL, NULL))) != 0)
		goto fail;
	return root;
fail:
	json_decref(root);
	return NULL;
}

rd_kafka_t *tallyctl_kafka_client(struct app *app)
{
	char err[1024];
	rd_kafka_t *rk;
	if (!tly_config_str(app->cfg, "kafka.bootstrap.servers")) {
		fprintf(stderr, "tallyctl: kafka.bootstrap.servers is not set (use -s "
				"kafka.bootstrap.servers=… or TALLY_KAFKA_BOOTSTRAP_SERVERS)\n");
		return NULL;
	}
	rd_kafka_conf_t *conf = tly_kafka_conf_new(app->cfg, err, sizeof(err));
	if (!conf) {
		fprintf(stderr, "tallyctl: %s\n", err);
		return NULL;
	}
	/* A plain client: it only reads metadata and watermarks. rd_kafka_new owns conf on success. */
	if (!(rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err)))) {
		rd_kafka_conf_destroy(conf);
		fprintf(stderr, "tallyctl: could not create a Kafka client: %s\n", err);
	}
	return rk;
}

int tallyctl_lag_collect(struct app *app, PGconn *conn, rd_kafka_t *rk, int timeout_ms,
			 struct tly_lag_report *report, char *err, size_t errlen)
{
	const char *events = tly_config_str(app->cfg, "topics.events");
	const char *ledger = tly_config_str(app->cfg, "topics.ledger");
	const char *catalog = tly_config_str(app->cfg, "topics.catalog");
	const struct tly_lag_expect expect[] = {
		{"tally-ledger", events},
		{"tally-projector", events},
		{"tally-projector", ledger},
		{"tally-projector", catalog},
	};
	return tly_lag_collect(conn, rk, expect, sizeof(expect) / sizeof(expect[0]), timeout_ms, report,
			       err, errlen);
}

int cmd_status(struct app *app, int argc, char **argv)
{
	char err[1024];
	bool as_json = false;
	long long timeout_ms = DEFAULT_TIMEOUT_MS;
	for (int i = 1; i < argc; i++) {
		char *end = NULL;
		if (strcmp(argv[i], "--json") == 0) {
			as_json = true;
		} else if (strcmp(argv[i], "--timeout-ms") == 0 && i + 1 < argc) {
			timeout_ms = strtoll(argv[++i], &end, 10);
			if (*end || timeout_ms < 1 || timeout_ms > 600000) {
				status_usage();
				return 2;
			}
		} else {
			status_usage();
			return 2;
		}
	}
	int rc = 1;
	rd_kafka_t *rk = NULL;
	json_t *doc = NULL;
	struct tly_lag_report report = {0};
	PGconn *conn = tallyctl_connect_db(app);
	if (!conn || !(rk = tallyctl_kafka_client(app)))
		goto out;
	if (tallyctl_lag_collect(app, conn, rk, (int)timeout_ms, &report, err, sizeof(err)) != 0) {
		fprintf(stderr, "tallyctl: %s\n", err);
		goto out;
	}
	if (as_json) {
		if (!(doc = report_json(&report)) || json_dumpf(doc, stdout, JSON_COMPACT) != 0) {
			fprintf(stderr, "tallyctl: could not write the status as JSON\n");
			goto out;
		}
		printf("\n");
	} else {
		print_table(&report);
	}
	if (fflush(stdout) != 0) {
		fprintf(stderr, "tallyctl: could not write the status\n");
		goto out;
	}
	rc = 0;
out:
	json_decref(doc);
	tly_lag_report_free(&report);
	if (rk)
		rd_kafka_destroy(rk);
	if (conn)
		PQfinish(conn);
	return rc;
}
