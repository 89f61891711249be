/* Consumer lag (lib/lag) and the real "tallyctl status" against a dev broker and a migrated database. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "config.h"
#include "harness.h"
#include "kafka.h"
#include "lag.h"
#include "pg.h"
#include "proc.h"
#include "suites.h"

#define PARTITIONS 3

struct env {
	struct tly_test_broker b;
	struct tly_test_db db;
};

/* ---- helpers ---------------------------------------------------------------------------- */

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	int *delivered = opaque;
	(void)rk;
	if (!m->err)
		(*delivered)++;
}

/* n records on topic's partition, every one delivered. */
static void produce(const struct env *e, const char *topic, int32_t partition, int n)
{
	char errstr[512];
	int delivered = 0;
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert_msg(tly_config_set(cfg, "kafka.bootstrap.servers", e->b.bootstraps, errstr,
				     sizeof(errstr)) == 0, "%s", errstr);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(conf != NULL, "%s", errstr);
	rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
	rd_kafka_conf_set_opaque(conf, &delivered);
	rd_kafka_t *rk = tly_kafka_producer_new(conf, errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	for (int i = 0; i < n; i++) {
		char value[32];
		snprintf(value, sizeof(value), "record %d", i);
		struct tly_kafka_msg msg = {.topic = topic, .partition = partition, .value = value,
					    .valuelen = strlen(value)};
		rd_kafka_resp_err_t err;
		int rc = tly_kafka_produce(rk, &msg, 5000, &err);
		ck_assert_msg(rc == 0, "could not produce to \"%s\" [%d]: %s", topic, (int)partition,
			      rd_kafka_err2str(err));
	}
	ck_assert_int_eq(tly_kafka_flush(rk, 15000), 0);
	ck_assert_int_eq(delivered, n);
	tly_kafka_producer_destroy(rk, 1000);
}

static void store(const struct env *e, const char *consumer, const char *topic, int partition,
		  long next)
{
	char p[16], o[24];
	struct tly_pg_error err;
	snprintf(p, sizeof(p), "%d", partition);
	snprintf(o, sizeof(o), "%ld", next);
	const char *const v[] = {consumer, topic, p, o};
	ck_assert_msg(tly_pg_exec(e->db.conn,
				  "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) "
				  "VALUES ($1, $2, $3, $4)",
				  4, v, &err) == 0,
		      "%s", err.message);
}

/* Run tallyctl with database.url and bootstrap servers set, then args (NULL-terminated). */
static int tallyctl(const char *db, const char *bootstraps, char *out, size_t outlen,
		    char *const *args)
{
	char dbset[1200], kset[600];
	snprintf(dbset, sizeof(dbset), "database.url=%s", db);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", bootstraps);
	char *argv[16] = {(char *)tly_test_bin("tallyctl"), "-s", dbset, "-s", kset};
	int n = 5;
	for (int i = 0; args[i] && n < 15; i++)
		argv[n++] = args[i];
	argv[n] = NULL;
	return tly_proc_run(argv, out, outlen);
}

/* tallyctl status --json, parsed (caller decrefs). */
static json_t *status_json(const struct env *e)
{
	static char out[65536];
	char *const args[] = {"status", "--json", NULL};
	int rc = tallyctl(e->db.conninfo, e->b.bootstraps, out, sizeof(out), args);
	ck_assert_msg(rc == 0, "tallyctl status --json: exit %d: %s", rc, out);
	char *at = strstr(out, "{\"consumers\"");
	ck_assert_msg(at != NULL, "no JSON from tallyctl status: %s", out);
	at[strcspn(at, "\n")] = '\0';
	json_error_t jerr;
	json_t *doc = json_loads(at, 0, &jerr);
	ck_assert_msg(doc != NULL, "%s: %s", jerr.text, at);
	return doc;
}

static json_t *find_by(json_t *array, const char *key, const char *value)
{
	size_t i;
	json_t *item;
	json_array_foreach(array, i, item) {
		if (strcmp(json_string_value(json_object_get(item, key)), value) == 0)
			return item;
	}
	ck_abort_msg("no %s \"%s\" in the status", key, value);
	return NULL;
}

/* The lag value of consumer (and topic, and partition ≥ 0, when given); -1 for null. */
static long lag_of(json_t *doc, const char *consumer, const char *topic, int partition)
{
	json_t *node = find_by(json_object_get(doc, "consumers"), "consumer", consumer);
	if (topic) {
		node = find_by(json_object_get(node, "topics"), "topic", topic);
		if (partition >= 0) {
			json_t *parts = json_object_get(node, "partitions"), *p = NULL;
			size_t i;
			json_t *item;
			json_array_foreach(parts, i, item) {
				if (json_integer_value(json_object_get(item, "partition")) == partition)
					p = item;
			}
			ck_assert_msg(p != NULL, "no partition %d of %s in %s", partition, topic,
				      consumer);
			node = p;
		}
	}
	json_t *lag = json_object_get(node, "lag");
	ck_assert_ptr_nonnull(lag);
	return json_is_null(lag) ? -1 : (long)json_integer_value(lag);
}

/* ---- tests --------------------------------------------------------------------------------- */

START_TEST(test_lag_of)
{
	ck_assert_int_eq(tly_lag_of(6, 0, 10), 4);
	ck_assert_int_eq(tly_lag_of(10, 0, 10), 0);
	ck_assert_int_eq(tly_lag_of(-1, 3, 10), 7);  /* nothing stored: from the low watermark */
	ck_assert_int_eq(tly_lag_of(12, 0, 10), 0);  /* ahead of a truncated topic: not negative */
	ck_assert_int_eq(tly_lag_of(1, 5, 10), 9);   /* behind retention: every record since 1 */
	ck_assert_int_eq(tly_lag_of(5, 0, -1), -1);  /* end unknown */
	ck_assert_int_eq(tly_lag_of(-1, -1, 10), -1);
}
END_TEST

START_TEST(test_status_reports_known_lags)
{
	struct env e;
	tly_test_broker_start(&e.b, 1, PARTITIONS);
	tly_test_db_up(&e.db, "check_status");

	produce(&e, "tally.events", 0, 10);
	produce(&e, "tally.events", 1, 4);
	produce(&e, "tally.ledger", 0, 3);
	produce(&e, "tally.catalog", 1, 2);

	store(&e, "tally-ledger", "tally.events", 0, 6);  /* 4 behind */
	store(&e, "tally-ledger", "tally.events", 1, 4);  /* caught up; partition 2 empty */
	store(&e, "tally-projector", "tally.events", 0, 0); /* 10 behind; partition 1 from low: 4 */
	store(&e, "tally-projector", "tally.ledger", 0, 1); /* 2 behind; tally.catalog unstored: 2 */
	store(&e, "replayer", "tally.deadletter", 0, 0);  /* a consumer the tool does not know */

	json_t *doc = status_json(&e);
	ck_assert_int_eq(lag_of(doc, "tally-ledger", "tally.events", 0), 4);
	ck_assert_int_eq(lag_of(doc, "tally-ledger", "tally.events", 1), 0);
	ck_assert_int_eq(lag_of(doc, "tally-ledger", "tally.events", 2), 0);
	ck_assert_int_eq(lag_of(doc, "tally-ledger", NULL, -1), 4);
	ck_assert_int_eq(json_array_size(json_object_get(
				 find_by(json_object_get(doc, "consumers"), "consumer", "tally-ledger"),
				 "topics")),
			 1);

	ck_assert_int_eq(lag_of(doc, "tally-projector", "tally.events", 0), 10);
	ck_assert_int_eq(lag_of(doc, "tally-projector", "tally.events", 1), 4);
	ck_assert_int_eq(lag_of(doc, "tally-projector", "tally.events", -1), 14);
	ck_assert_int_eq(lag_of(doc, "tally-projector", "tally.ledger", 0), 2);
	ck_assert_int_eq(lag_of(doc, "tally-projector", "tally.ledger", -1), 2);
	ck_assert_int_eq(lag_of(doc, "tally-projector", "tally.catalog", 1), 2);
	ck_assert_int_eq(lag_of(doc, "tally-projector", "tally.catalog", -1), 2);
	ck_assert_int_eq(lag_of(doc, "tally-projector", NULL, -1), 18);
	ck_assert_int_eq(lag_of(doc, "replayer", NULL, -1), 0);
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "lag")), 22);

	/* Stored and end offsets as they are. */
	json_t *p0 = json_array_get(json_object_get(find_by(json_object_get(find_by(
			json_object_get(doc, "consumers"), "consumer", "tally-ledger"), "topics"),
			"topic", "tally.events"), "partitions"), 0);
	ck_assert_int_eq(json_integer_value(json_object_get(p0, "partition")), 0);
	ck_assert_int_eq(json_integer_value(json_object_get(p0, "stored")), 6);
	ck_assert_int_eq(json_integer_value(json_object_get(p0, "high")), 10);
	ck_assert_int_eq(json_integer_value(json_object_get(p0, "low")), 0);
	json_decref(doc);

	/* The consumer catches up: its lag follows. */
	const char *const v[] = {"tally-projector", "tally.events"};
	struct tly_pg_error err;
	ck_assert_msg(tly_pg_exec(e.db.conn, "UPDATE consumer_offsets SET next_offset = 10 "
				  "WHERE consumer = $1 AND topic = $2 AND partition = 0", 2, v, &err) == 0,
		      "%s", err.message);
	doc = status_json(&e);
	ck_assert_int_eq(lag_of(doc, "tally-projector", NULL, -1), 8);
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "lag")), 12);
	json_decref(doc);

	/* An offset stored for a partition the topic does not have: unknown, and so are its totals. */
	store(&e, "tally-ledger", "tally.events", 7, 5);
	doc = status_json(&e);
	ck_assert_int_eq(lag_of(doc, "tally-ledger", "tally.events", 7), -1);
	ck_assert_int_eq(lag_of(doc, "tally-ledger", NULL, -1), -1);
	ck_assert(json_is_null(json_object_get(doc, "lag")));
	ck_assert_int_eq(lag_of(doc, "tally-projector", NULL, -1), 8);
	json_decref(doc);

	/* The table for people. */
	static char out[65536];
	char *const table[] = {"status", NULL};
	int rc = tallyctl(e.db.conninfo, e.b.bootstraps, out, sizeof(out), table);
	ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
	ck_assert_msg(strstr(out, "CONSUMER") && strstr(out, "tally-projector") &&
			      strstr(out, "tally.catalog") && strstr(out, "all topics"),
		      "%s", out);

	tly_test_db_down(&e.db);
	tly_test_broker_stop(&e.b);
}
END_TEST

START_TEST(test_status_unreachable)
{
	struct env e;
	static char out[65536];
	tly_test_db_up(&e.db, "check_status");
	store(&e, "tally-ledger", "tally.events", 0, 1);

	/* No broker there: a clear error and exit 1, within the timeout. */
	char *const args[] = {"status", "--json", "--timeout-ms", "1500", NULL};
	int rc = tallyctl(e.db.conninfo, "127.0.0.1:1", out, sizeof(out), args);
	ck_assert_msg(rc == 1, "exit %d: %s", rc, out);
	ck_assert_msg(strstr(out, "could not read the topics of the Kafka cluster"), "%s", out);
	ck_assert_msg(strstr(out, "{\"consumers\"") == NULL, "%s", out);

	/* No database there. */
	tly_test_broker_start(&e.b, 1, PARTITIONS);
	rc = tallyctl("host=/nonexistent-tally-dir port=1 dbname=x connect_timeout=2",
		      e.b.bootstraps, out, sizeof(out), args);
	ck_assert_msg(rc == 1, "exit %d: %s", rc, out);
	ck_assert_msg(strstr(out, "could not connect"), "%s", out);

	/* Usage errors: exit 2. */
	char *const bad[] = {"status", "--timeout-ms", "soon", NULL};
	ck_assert_int_eq(tallyctl(e.db.conninfo, e.b.bootstraps, out, sizeof(out), bad), 2);

	tly_test_broker_stop(&e.b);
	tly_test_db_down(&e.db);
}
END_TEST

Suite *status_suite(void)
{
	Suite *s = suite_create("status");
	TCase *tc = tcase_create("status");
	tcase_set_timeout(tc, 90);
	tcase_add_test(tc, test_lag_of);
	tcase_add_test(tc, test_status_reports_known_lags);
	tcase_add_test(tc, test_status_unreachable);
	suite_add_tcase(s, tc);
	return s;
}
