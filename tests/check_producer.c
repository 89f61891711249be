/*
 * Suite "producer": JSON <-> event (every type), the producer API against the dev broker (every
 * type, keys, partitions, delivery reports), tallyctl publish and tail, the documented NDJSON
 * examples, tally-loadgen's determinism and a publish from Python decoded by Tally's codec.
 */
#include <check.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "config.h"
#include "event_json.h"
#include "corpus.h"
#include "fixtures.h"
#include "harness.h"
#include "kafka.h"
#include "proc.h"
#include "producer.h"
#include "suites.h"

#define PARTITIONS 6
#define EXAMPLES "docs/events.ndjson"
#define EXAMPLES_DOC "docs/events.md"

static int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Kafka's Utils.murmur2 (Java), written from its source: the reference for the partitioner. */
static int32_t java_murmur2(const unsigned char *data, size_t length)
{
	const uint32_t seed = 0x9747b28c, m = 0x5bd1e995;
	const int r = 24;
	uint32_t h = seed ^ (uint32_t)length;
	size_t length4 = length / 4;
	for (size_t i = 0; i < length4; i++) {
		size_t i4 = i * 4;
		uint32_t k = (uint32_t)data[i4] | (uint32_t)data[i4 + 1] << 8 |
			     (uint32_t)data[i4 + 2] << 16 | (uint32_t)data[i4 + 3] << 24;
		k *= m;
		k ^= k >> r;
		k *= m;
		h *= m;
		h ^= k;
	}
	switch (length % 4) {
	case 3: h ^= (uint32_t)data[(length & ~3u) + 2] << 16; /* fall through */
	case 2: h ^= (uint32_t)data[(length & ~3u) + 1] << 8;  /* fall through */
	case 1: h ^= data[length & ~3u]; h *= m;
	}
	h ^= h >> 13;
	h *= m;
	h ^= h >> 15;
	return (int32_t)h;
}

static int32_t java_partition(const char *key, int32_t partitions)
{
	return (int32_t)(((uint32_t)java_murmur2((const unsigned char *)key, strlen(key)) & 0x7fffffffu) %
			 (uint32_t)partitions);
}

/* ---- JSON <-> event ------------------------------------------------------------------------ */

START_TEST(test_json_round_trip)
{
	enum tly_event_type type = (enum tly_event_type)_i;
	struct tly_event in = {0}, out = {0};
	struct tly_buf a = {0}, b = {0};
	char err[512];
	struct tly_codec *codec = tly_codec_new(err, sizeof(err));
	ck_assert_msg(codec, "%s", err);
	tly_fixture_event(&in, type, 3);
	char *text = tly_event_to_json_text(&in);
	ck_assert_ptr_nonnull(text);
	ck_assert_msg(strstr(text, tly_event_desc(type)->name), "%s", text);
	ck_assert_msg(tly_event_from_json_text(text, strlen(text), 0, &out, err, sizeof(err)) == 0,
		      "%s: %s", err, text);
	ck_assert_int_eq(out.type, type);
	/* Every field is in the encoding: equal encodings mean the JSON lost nothing. */
	ck_assert_msg(tly_codec_encode(codec, &in, &a, err, sizeof(err)) == 0, "%s", err);
	ck_assert_msg(tly_codec_encode(codec, &out, &b, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(a.len, b.len);
	ck_assert_mem_eq(a.data, b.data, a.len);
	/* The strings belong to the event: the text can go. */
	char *again = tly_event_to_json_text(&out);
	memset(text, 'x', strlen(text));
	ck_assert_ptr_nonnull(again);
	char *third = tly_event_to_json_text(&out);
	ck_assert_str_eq(again, third);
	free(text);
	free(again);
	free(third);
	tly_buf_free(&a);
	tly_buf_free(&b);
	tly_event_free(&in);
	tly_event_free(&out);
	tly_codec_free(codec);
}
END_TEST

START_TEST(test_json_errors)
{
	static const struct {
		const char *line;
		const char *want; /* substring of the error */
	} cases[] = {
		{"[1,2]", "expected a JSON object"},
		{"{\"slug\":\"a\"}", "field type: missing"},
		{"{\"type\":\"Nope\"}", "field type: unknown event type \"Nope\""},
		{"{\"type\":42}", "field type: expected a string"},
		{"{\"type\":\"ClockTick\",\"event_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e01\","
		 "\"occurred_at\":\"2026-01-01T00:00:00Z\",\"tenant_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e01\"}",
		 "field tenant_id: unknown field for ClockTick"},
		{"{\"type\":\"ClockTick\",\"event_id\":\"not-a-uuid\",\"occurred_at\":0}",
		 "field event_id: expected a UUID"},
		{"{\"type\":\"ClockTick\",\"event_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e01\","
		 "\"occurred_at\":\"2026-13-01T00:00:00Z\"}",
		 "field occurred_at: \"2026-13-01T00:00:00Z\" is not an RFC 3339 timestamp"},
		{"{\"type\":\"ClockTick\",\"event_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e01\","
		 "\"occurred_at\":1.5}",
		 "field occurred_at: expected an RFC 3339 timestamp or integer microseconds"},
		{"{\"type\":\"ClockTick\",\"event_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e01\"}",
		 "field occurred_at: missing"},
		{"{\"type\":\"TenantCreated\",\"event_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e01\","
		 "\"tenant_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e02\",\"occurred_at\":0,\"slug\":1,\"name\":\"n\"}",
		 "field slug: expected a string"},
		{"{\"type\":\"TenantCreated\",\"event_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e01\","
		 "\"tenant_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e02\",\"occurred_at\":0,\"slug\":null,\"name\":\"n\"}",
		 "field slug: must not be null"},
		{"{\"type\":\"CreditsGranted\",\"event_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e01\","
		 "\"tenant_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e02\",\"occurred_at\":0,"
		 "\"grant_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e03\",\"tokens\":\"10\",\"reason\":\"r\"}",
		 "field tokens: expected an integer"},
		{"{\"type\":\"SubscriptionCancelled\",\"event_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e01\","
		 "\"tenant_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e02\",\"occurred_at\":0,"
		 "\"subscription_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e03\",\"at_period_end\":\"yes\"}",
		 "field at_period_end: expected true or false"},
		{"{\"type\":\"ClockTick\",\"type\":\"ClockTick\"}", "not JSON"},
	};
	struct tly_event ev = {0};
	char err[512];
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc = tly_event_from_json_text(cases[i].line, strlen(cases[i].line), 0, &ev, err,
						  sizeof(err));
		ck_assert_msg(rc == TLY_E_INVALID && strstr(err, cases[i].want),
			      "case %zu: want \"%s\", got rc %d \"%s\"", i, cases[i].want, rc, err);
	}
	/* Nested records and maps: a valid plan with one thing wrong inside. */
	struct tly_event plan = {0};
	tly_fixture_event(&plan, TLY_EV_PLAN_PUBLISHED, 1);
	for (int k = 0; k < 3; k++) {
		json_t *obj = tly_event_to_json(&plan);
		ck_assert_ptr_nonnull(obj);
		const char *want = "";
		if (k == 0) {
			json_object_set_new(json_array_get(json_object_get(obj, "features"), 1), "bogus",
					    json_integer(1));
			want = "field features[1].bogus: unknown field for PlanFeature";
		} else if (k == 1) {
			json_object_set_new(json_object_get(obj, "feature_toggles"), "sso", json_integer(1));
			want = "field feature_toggles: value of \"sso\": expected true or false";
		} else {
			json_object_set_new(json_array_get(json_object_get(obj, "features"), 0),
					    "hard_limit", json_string("50"));
			want = "field features[0].hard_limit: expected an integer or null";
		}
		int rc = tly_event_from_json(obj, 0, &ev, err, sizeof(err));
		ck_assert_msg(rc == TLY_E_INVALID && strstr(err, want), "want \"%s\", got rc %d \"%s\"",
			      want, rc, err);
		json_decref(obj);
	}
	tly_event_free(&plan);

	/* Omitted event_id and occurred_at are filled in when asked; optional fields may be omitted. */
	const char *line = "{\"type\":\"TokensDebited\",\"tenant_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e02\","
			   "\"debit_id\":\"5b0c2a9e-4d6f-4c1a-9f0e-1a2b3c4d5e03\",\"tokens\":5,"
			   "\"cost_micros\":1,\"reason\":\"r\"}";
	ck_assert_int_eq(tly_event_from_json_text(line, strlen(line), 0, &ev, err, sizeof(err)),
			 TLY_E_INVALID);
	ck_assert_msg(strstr(err, "field event_id: missing"), "%s", err);
	ck_assert_msg(tly_event_from_json_text(line, strlen(line), TLY_EVJ_FILL_ID | TLY_EVJ_FILL_TIME,
					       &ev, err, sizeof(err)) == 0, "%s", err);
	ck_assert(!tly_uuid_is_nil(&ev.event_id));
	ck_assert_int_gt(ev.occurred_at, 1700000000000000LL);
	ck_assert_int_eq(tly_event_validate(&ev, err, sizeof(err)), 0);
	tly_event_free(&ev);
}
END_TEST

START_TEST(test_json_times)
{
	static const struct {
		const char *text;
		int64_t us;
	} ok[] = {
		{"2026-01-01T00:00:00Z", 1767225600000000LL},
		{"2026-01-01T00:00:00.5Z", 1767225600500000LL},
		{"2026-01-01T00:00:00.000001Z", 1767225600000001LL},
		{"2026-01-01T02:00:00+02:00", 1767225600000000LL},
		{"2025-12-31T19:00:00.250-05:00", 1767225600250000LL},
		{"1970-01-01T00:00:00Z", 0},
		{"2024-02-29T00:00:00Z", 1709164800000000LL},
	};
	static const char *const bad[] = {"2026-01-01", "2026-01-01T00:00:00", "2026-02-30T00:00:00Z",
					  "2025-02-29T00:00:00Z", "2026-01-01T00:00:00.1234567Z",
					  "2026-01-01T24:00:00Z", "2026-01-01T00:00:00+2:00", "x"};
	int64_t us;
	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		ck_assert_msg(tly_time_parse_rfc3339(ok[i].text, &us) == 0, "%s", ok[i].text);
		ck_assert_msg(us == ok[i].us, "%s: want %lld, got %lld", ok[i].text, (long long)ok[i].us,
			      (long long)us);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		ck_assert_msg(tly_time_parse_rfc3339(bad[i], &us) == TLY_E_INVALID, "%s accepted", bad[i]);
	char out[40];
	tly_time_format_rfc3339(1767225600000000LL, out);
	ck_assert_str_eq(out, "2026-01-01T00:00:00Z");
	tly_time_format_rfc3339(1767225600250000LL, out);
	ck_assert_str_eq(out, "2026-01-01T00:00:00.250000Z");
	tly_time_format_rfc3339(-1, out);
	ck_assert_str_eq(out, "1969-12-31T23:59:59.999999Z");
	ck_assert_int_eq(tly_time_parse_rfc3339(out, &us), 0);
	ck_assert_int_eq(us, -1);
}
END_TEST

/* ---- the partitioner -------------------------------------------------------------------------- */

START_TEST(test_partition_agreement)
{
	/* Kafka's own vectors check the reference; then librdkafka must agree on tenant keys. */
	ck_assert_int_eq(java_murmur2((const unsigned char *)"21", 2), -973932308);
	ck_assert_int_eq(java_murmur2((const unsigned char *)"foobar", 6), -790332482);
	ck_assert_int_eq(java_murmur2((const unsigned char *)"a-little-bit-long-string", 24), -985981536);
	ck_assert_int_eq(java_murmur2((const unsigned char *)"abc", 3), 479470107);
	/* Tenant keys: the Java reference and librdkafka agree for every partition count up to 64. */
	static const char *const known[] = {
		"0d9e8f7a-6b5c-4d3e-8f1a-2b3c4d5e6f70", "3fa09318-72db-4d77-8517-623d07bcd2c4",
		"a3c073b5-6121-49e1-8c02-bbfbffaa1a70", "00000000-0000-4000-8000-000000000001",
	};
	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++) {
		for (int32_t p = 1; p <= 64; p++) {
			int32_t want = java_partition(known[i], p);
			int32_t got = tly_kafka_partition_for_key(known[i], strlen(known[i]), p);
			ck_assert_msg(got == want, "key %s over %d: java %d, librdkafka %d", known[i], p,
				      want, got);
		}
	}
	/* And on a thousand generated tenant ids. */
	for (int i = 0; i < 1000; i++) {
		tly_uuid u;
		char key[37];
		tly_uuid_generate(&u);
		tly_uuid_format(&u, key);
		ck_assert_int_eq(tly_kafka_partition_for_key(key, 36, 12), java_partition(key, 12));
	}
}
END_TEST

/* ---- the producer API against the dev broker ---------------------------------------------- */

struct reports {
	int n, ok, failed;
	int seen[64];         /* by opaque (1-based) */
	int copies[64];
	int32_t partition[64];
	int last_err;
	char last_reason[256];
};

static void on_report(const struct tly_delivery *d, void *ud)
{
	struct reports *r = ud;
	uintptr_t i = (uintptr_t)d->opaque;
	r->n++;
	if (d->err) {
		r->failed++;
		r->last_err = d->err;
		snprintf(r->last_reason, sizeof(r->last_reason), "%s", d->reason);
	} else {
		r->ok++;
	}
	if (i < 64) {
		r->seen[i]++;
		r->copies[i] = d->copies;
		r->partition[i] = d->partition;
	}
}

static struct tly_config *broker_config(const struct tly_test_broker *b)
{
	char err[512];
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert_msg(tly_config_set(cfg, "kafka.bootstrap.servers", b->bootstraps, err, sizeof(err)) == 0,
		      "%s", err);
	return cfg;
}

struct consumed {
	int n;
	int per_partition[PARTITIONS];
	int clock_ticks_per_partition[PARTITIONS];
	int types[TLY_EV__COUNT];
	int wrong_partition;
	char last_error[600];
};

/* Read topic from the beginning until want messages or timeout; decode each, check its partition. */
static void consume_all(const struct tly_test_broker *b, const char *topic, int want,
			struct consumed *c)
{
	char err[512];
	struct tly_config *cfg = broker_config(b);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, err, sizeof(err));
	tly_config_free(cfg);
	ck_assert_msg(conf, "%s", err);
	rd_kafka_t *rk = tly_kafka_consumer_new(conf, "producer-test", err, sizeof(err));
	ck_assert_msg(rk, "%s", err);
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(PARTITIONS);
	for (int p = 0; p < PARTITIONS; p++)
		rd_kafka_topic_partition_list_add(list, topic, p)->offset = RD_KAFKA_OFFSET_BEGINNING;
	ck_assert_int_eq(rd_kafka_assign(rk, list), 0);
	rd_kafka_topic_partition_list_destroy(list);
	struct tly_codec *codec = tly_codec_new(err, sizeof(err));
	ck_assert_msg(codec, "%s", err);
	struct tly_event ev = {0};
	memset(c, 0, sizeof(*c));
	int64_t deadline = mono_ms() + 15000;
	while (c->n < want && mono_ms() < deadline) {
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
		if (!m)
			continue;
		if (m->err) {
			rd_kafka_message_destroy(m);
			continue;
		}
		c->n++;
		c->per_partition[m->partition]++;
		if (tly_codec_decode(codec, m->payload, m->len, &ev, err, sizeof(err)) != 0) {
			snprintf(c->last_error, sizeof(c->last_error), "%s", err);
		} else {
			c->types[ev.type]++;
			if (ev.type == TLY_EV_CLOCK_TICK) {
				ck_assert_ptr_null(m->key);
				c->clock_ticks_per_partition[m->partition]++;
			} else {
				char key[37];
				tly_uuid_format(ev.type == TLY_EV_PLAN_PUBLISHED ? &ev.u.plan_published.plan_id
										 : &ev.tenant_id,
						key);
				if (!m->key || m->key_len != 36 || memcmp(m->key, key, 36) != 0 ||
				    m->partition != java_partition(key, PARTITIONS))
					c->wrong_partition++;
			}
		}
		rd_kafka_message_destroy(m);
	}
	tly_event_free(&ev);
	tly_codec_free(codec);
	tly_kafka_consumer_destroy(rk);
}

START_TEST(test_api_every_type)
{
	struct tly_test_broker b;
	struct reports r = {0};
	char err[512];
	tly_test_broker_start(&b, 1, PARTITIONS);
	struct tly_config *cfg = broker_config(&b);
	struct tly_producer *p = tly_producer_new(cfg, on_report, &r, err, sizeof(err));
	tly_config_free(cfg);
	ck_assert_msg(p, "%s", err);
	ck_assert_str_eq(tly_producer_topic(p, TLY_EV_PLAN_PUBLISHED), "tally.catalog");

	struct tly_event ev = {0};
	int events = 0, sent_events_topic = 0;
	for (int t = 0; t < TLY_EV__COUNT; t++) {
		tly_fixture_event(&ev, (enum tly_event_type)t, (unsigned)t);
		int rc = tly_producer_publish(p, &ev, (void *)(uintptr_t)(t + 1), err, sizeof(err));
		if (t == TLY_EV_LEDGER_ENTRY) {
			ck_assert_int_eq(rc, TLY_E_INVALID);
			ck_assert_msg(strstr(err, "LedgerEntry"), "%s", err);
			continue;
		}
		ck_assert_msg(rc == 0, "%s: %s", tly_event_desc(ev.type)->name, err);
		events++;
		if (t != TLY_EV_PLAN_PUBLISHED)
			sent_events_topic += t == TLY_EV_CLOCK_TICK ? PARTITIONS : 1;
	}
	/* Invalid: refused with the field named, nothing enqueued, no report. */
	size_t before = tly_producer_in_flight(p);
	tly_fixture_event(&ev, TLY_EV_TOKENS_RESERVED, 40);
	ev.u.tokens_reserved.tokens = 0;
	ck_assert_int_eq(tly_producer_publish(p, &ev, (void *)(uintptr_t)40, err, sizeof(err)), TLY_E_INVALID);
	ck_assert_msg(strstr(err, "TokensReserved: field tokens"), "%s", err);
	tly_fixture_event(&ev, TLY_EV_USER_REGISTERED, 41);
	ev.u.user_registered.email = "not-an-email";
	ck_assert_int_eq(tly_producer_publish(p, &ev, (void *)(uintptr_t)41, err, sizeof(err)), TLY_E_INVALID);
	ck_assert_msg(strstr(err, "field email"), "%s", err);
	ck_assert_uint_eq(tly_producer_in_flight(p), before);

	ck_assert_int_eq(tly_producer_flush(p, 15000), 0);
	ck_assert_uint_eq(tly_producer_in_flight(p), 0);
	ck_assert_int_eq(r.n, events);
	ck_assert_msg(r.failed == 0, "failed: %s", r.last_reason);
	for (int t = 0; t < TLY_EV__COUNT; t++) {
		int want = t == TLY_EV_LEDGER_ENTRY ? 0 : 1;
		ck_assert_msg(r.seen[t + 1] == want, "type %d reported %d times", t, r.seen[t + 1]);
	}
	ck_assert_int_eq(r.seen[40] + r.seen[41], 0);
	ck_assert_int_eq(r.copies[TLY_EV_CLOCK_TICK + 1], PARTITIONS);
	struct tly_event fx = {0};
	tly_fixture_event(&fx, TLY_EV_TOKENS_RESERVED, TLY_EV_TOKENS_RESERVED);
	char key[37];
	tly_uuid_format(&fx.tenant_id, key);
	ck_assert_int_eq(r.partition[TLY_EV_TOKENS_RESERVED + 1], java_partition(key, PARTITIONS));
	struct tly_producer_stats st;
	tly_producer_stats(p, &st);
	ck_assert_uint_eq(st.published, (uint64_t)events);
	ck_assert_uint_eq(st.rejected, 3);
	ck_assert_uint_eq(st.delivered, (uint64_t)events);
	tly_producer_free(p, 5000);

	struct consumed c;
	consume_all(&b, "tally.events", sent_events_topic, &c);
	ck_assert_msg(c.n == sent_events_topic, "consumed %d of %d (%s)", c.n, sent_events_topic, c.last_error);
	ck_assert_int_eq(c.wrong_partition, 0);
	for (int t = 0; t < TLY_EV__COUNT; t++) {
		int want = t == TLY_EV_CLOCK_TICK ? PARTITIONS
			   : t == TLY_EV_PLAN_PUBLISHED || t == TLY_EV_LEDGER_ENTRY ? 0 : 1;
		ck_assert_msg(c.types[t] == want, "type %s: %d on tally.events",
			      tly_event_desc((enum tly_event_type)t)->name, c.types[t]);
	}
	for (int q = 0; q < PARTITIONS; q++)
		ck_assert_int_eq(c.clock_ticks_per_partition[q], 1);
	consume_all(&b, "tally.catalog", 1, &c);
	ck_assert_int_eq(c.types[TLY_EV_PLAN_PUBLISHED], 1);
	ck_assert_int_eq(c.wrong_partition, 0);
	tly_event_free(&ev);
	tly_event_free(&fx);
	tly_test_broker_stop(&b);
}
END_TEST

/* A delivery that cannot happen is reported as failed, with librdkafka's reason, exactly once. */
START_TEST(test_api_delivery_failure)
{
	struct reports r = {0};
	char err[512];
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert(tly_config_set(cfg, "kafka.bootstrap.servers", "127.0.0.1:1", err, sizeof(err)) == 0);
	ck_assert(tly_config_set(cfg, "kafka.message.timeout.ms", "800", err, sizeof(err)) == 0);
	struct tly_producer *p = tly_producer_new(cfg, on_report, &r, err, sizeof(err));
	tly_config_free(cfg);
	ck_assert_msg(p, "%s", err);
	struct tly_event ev = {0};
	tly_fixture_event(&ev, TLY_EV_TOKENS_DEBITED, 1);
	ck_assert_int_eq(tly_producer_publish(p, &ev, (void *)(uintptr_t)7, err, sizeof(err)), 0);
	int64_t deadline = mono_ms() + 10000;
	while (r.n == 0 && mono_ms() < deadline)
		tly_producer_poll(p, 100);
	ck_assert_int_eq(r.n, 1);
	ck_assert_int_eq(r.failed, 1);
	ck_assert_int_eq(r.seen[7], 1);
	ck_assert_int_eq(r.last_err, TLY_E_KAFKA);
	ck_assert_msg(r.last_reason[0] != '\0', "no reason");
	tly_producer_free(p, 0);
	ck_assert_int_eq(r.n, 1);
	tly_event_free(&ev);
}
END_TEST

/* ---- tallyctl publish / tail ----------------------------------------------------------------- */

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	ck_assert_msg(f && fputs(text, f) >= 0 && fclose(f) == 0, "could not write %s", path);
}

/* Run tallyctl with args (NULL-terminated) and bootstrap servers (may be NULL); output in out. */
static int tallyctl(const char *bootstraps, char *out, size_t outlen, ...)
{
	char exe[512], set[600];
	char *argv[16];
	int n = 0;
	snprintf(exe, sizeof(exe), "%s", tly_test_bin("tallyctl"));
	argv[n++] = exe;
	if (bootstraps) {
		snprintf(set, sizeof(set), "kafka.bootstrap.servers=%s", bootstraps);
		argv[n++] = "-s";
		argv[n++] = set;
	}
	va_list ap;
	va_start(ap, outlen);
	char *a;
	while ((a = va_arg(ap, char *)) != NULL && n < 15)
		argv[n++] = a;
	va_end(ap);
	argv[n] = NULL;
	return tly_proc_run(argv, out, outlen);
}

/* The documented examples: one per type, each shown in docs/events.md, all valid. */
START_TEST(test_documented_examples)
{
	static char out[65536];
	int rc = tallyctl(NULL, out, sizeof(out), "publish", EXAMPLES, "--dry-run", NULL);
	ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
	ck_assert_msg(strstr(out, "0 rejected"), "%s", out);
	char *lines = tly_test_read_file(EXAMPLES), *doc = tly_test_read_file(EXAMPLES_DOC);
	bool have[TLY_EV__COUNT] = {false};
	struct tly_event ev = {0};
	char err[512];
	for (char *save = NULL, *line = strtok_r(lines, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save)) {
		ck_assert_msg(strstr(doc, line), "%s does not show the example %.80s…", EXAMPLES_DOC, line);
		ck_assert_msg(tly_event_from_json_text(line, strlen(line), TLY_EVJ_FILL_ID | TLY_EVJ_FILL_TIME,
						       &ev, err, sizeof(err)) == 0, "%s", err);
		have[ev.type] = true;
	}
	for (int t = 0; t < TLY_EV__COUNT; t++) {
		if (t != TLY_EV_LEDGER_ENTRY)
			ck_assert_msg(have[t], "no example of %s", tly_event_desc((enum tly_event_type)t)->name);
	}
	tly_event_free(&ev);
	free(lines);
	free(doc);
}
END_TEST

START_TEST(test_tallyctl_publish_and_tail)
{
	static char out[1 << 17];
	struct tly_test_broker b;
	tly_test_broker_start(&b, 1, PARTITIONS);
	/* Every documented example, live. */
	int rc = tallyctl(b.bootstraps, out, sizeof(out), "publish", EXAMPLES, NULL);
	ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
	ck_assert_msg(strstr(out, "sent 21, rejected 0, delivered 21, failed 0"), "%s", out);

	/* Bad lines are reported by number, good lines still go, the exit status says it failed. */
	char path[300];
	snprintf(path, sizeof(path), "%s/mixed.ndjson", b.dir);
	write_file(path,
		   "{\"type\":\"TenantCreated\",\"tenant_id\":\"11111111-2222-4333-8444-555555555555\",\"slug\":\"t\",\"name\":\"T\"}\n"
		   "{\"type\":\"TokensReserved\",\"tenant_id\":\"11111111-2222-4333-8444-555555555555\","
		   "\"reservation_id\":\"11111111-2222-4333-8444-555555555556\",\"tokens\":0,"
		   "\"expires_at\":\"2099-01-01T00:00:00Z\",\"model\":\"m\"}\n"
		   "\n"
		   "{\"type\":\"Bogus\"}\n"
		   "{\"type\":\"TenantCreated\",\"tenant_id\":\"11111111-2222-4333-8444-555555555555\",\"slug\":\"t\",\"name\":\"T\",\"x\":1}\n"
		   "{broken\n"
		   "{\"type\":\"TokensDebited\",\"tenant_id\":\"11111111-2222-4333-8444-555555555555\","
		   "\"debit_id\":\"11111111-2222-4333-8444-555555555557\",\"tokens\":10,\"cost_micros\":1,\"reason\":\"r\"}\n");
	rc = tallyctl(b.bootstraps, out, sizeof(out), "publish", path, NULL);
	ck_assert_msg(rc == 1, "exit %d: %s", rc, out);
	ck_assert_msg(strstr(out, "line 2: TokensReserved: field tokens: must be at least 1"), "%s", out);
	ck_assert_msg(strstr(out, "line 4: field type: unknown event type \"Bogus\""), "%s", out);
	ck_assert_msg(strstr(out, "line 5: field x: unknown field for TenantCreated"), "%s", out);
	ck_assert_msg(strstr(out, "line 6: not JSON"), "%s", out);
	ck_assert_msg(!strstr(out, "line 3"), "blank line reported: %s", out);
	ck_assert_msg(strstr(out, "sent 2, rejected 4, delivered 2, failed 0"), "%s", out);
	rc = tallyctl(b.bootstraps, out, sizeof(out), "publish", path, "--dry-run", NULL);
	ck_assert_msg(rc == 1 && strstr(out, "dry run: 2 valid, 4 rejected"), "exit %d: %s", rc, out);

	/* tail reads them back as JSON lines: 20 examples on tally.events (ClockTick once per partition) + 2. */
	int want = 19 + PARTITIONS + 2;
	char max[16];
	snprintf(max, sizeof(max), "%d", want);
	rc = tallyctl(b.bootstraps, out, sizeof(out), "tail", "tally.events", "--from-beginning", "--max",
		      max, "--timeout-ms", "10000", NULL);
	ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
	int lines = 0;
	struct tly_event ev = {0};
	char err[512];
	for (char *save = NULL, *line = strtok_r(out, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save)) {
		ck_assert_msg(tly_event_from_json_text(line, strlen(line), 0, &ev, err, sizeof(err)) == 0,
			      "tail printed \"%.100s\": %s", line, err);
		lines++;
	}
	ck_assert_int_eq(lines, want);
	tly_event_free(&ev);
	/* the one catalog example; stopping at it, not at 1.5 s without a record (which a slow first
	 * fetch took for the end) */
	rc = tallyctl(b.bootstraps, out, sizeof(out), "tail", "tally.catalog", "--from-beginning",
		      "--max", "1", "--timeout-ms", "10000", NULL);
	ck_assert_msg(rc == 0 && strstr(out, "\"type\":\"PlanPublished\""), "exit %d: %s", rc, out);

	/*
	 * The bad-bytes corpus (tests/corpus/ndjson), each line followed by a good one: every bad
	 * line is reported by number with its error, every good line behind one is delivered.
	 */
	struct tly_corpus_case *cases;
	size_t n = tly_test_corpus_load("ndjson", &cases), bad = 0;
	snprintf(path, sizeof(path), "%s/corpus.ndjson", b.dir);
	FILE *f = fopen(path, "wb");
	ck_assert_ptr_nonnull(f);
	static const char good[] = "{\"type\":\"TenantCreated\",\"tenant_id\":"
				   "\"11111111-2222-4333-8444-555555555555\",\"slug\":\"t\",\"name\":\"T\"}\n";
	for (size_t i = 0; i < n; i++) {
		ck_assert(fwrite(cases[i].data, 1, cases[i].len, f) == cases[i].len);
		ck_assert(fputs(good, f) >= 0);
		bad += strcmp(cases[i].error, "ok") != 0;
	}
	ck_assert(fclose(f) == 0);
	rc = tallyctl(b.bootstraps, out, sizeof(out), "publish", path, NULL);
	ck_assert_msg(rc == 1, "exit %d: %s", rc, out);
	for (size_t i = 0; i < n; i++) {
		char line[64];
		snprintf(line, sizeof(line), "tallyctl: line %zu: ", 2 * i + 1);
		const char *at = strstr(out, line);
		if (strcmp(cases[i].error, "ok") == 0) {
			ck_assert_msg(!at, "case %s reported: %s", cases[i].name, out);
		} else {
			ck_assert_msg(at, "case %s: no \"%s\" in:\n%s", cases[i].name, line, out);
			const char *eol = strchr(at, '\n'), *text = strstr(at, cases[i].text);
			ck_assert_msg(text && (!eol || text < eol), "case %s: no \"%s\" in %.*s", cases[i].name,
				      cases[i].text, eol ? (int)(eol - at) : 300, at);
		}
		snprintf(line, sizeof(line), "line %zu: ", 2 * i + 2);
		ck_assert_msg(!strstr(out, line), "good line after case %s rejected: %s", cases[i].name, out);
	}
	char summary[128];
	snprintf(summary, sizeof(summary), "sent %zu, rejected %zu, delivered %zu, failed 0", 2 * n - bad,
		 bad, 2 * n - bad);
	ck_assert_msg(strstr(out, summary), "expected \"%s\" in:\n%s", summary, out);
	tly_test_corpus_free(cases, n);
	tly_test_broker_stop(&b);
}
END_TEST

/* ---- Python publishes, Tally decodes --------------------------------------------------------- */

START_TEST(test_python_publish)
{
	static char out[8192];
	struct tly_test_broker b;
	tly_test_broker_start(&b, 1, PARTITIONS);
	static const char *const tenants[] = {"0d9e8f7a-6b5c-4d3e-8f1a-2b3c4d5e6f70",
					      "3fa09318-72db-4d77-8517-623d07bcd2c4",
					      "a3c073b5-6121-49e1-8c02-bbfbffaa1a70"};
	for (size_t i = 0; i < 3; i++) {
		char event_id[37];
		snprintf(event_id, sizeof(event_id), "11111111-2222-4333-8444-55555555555%zu", i);
		char *argv[] = {"/usr/bin/python3", "tests/py_publish.py", b.bootstraps, "schemas",
				(char *)tenants[i], event_id, NULL};
		int rc = tly_proc_run(argv, out, sizeof(out));
		ck_assert_msg(rc == 0, "py_publish.py exit %d: %s", rc, out);
		int partition = -1;
		long long offset = -1;
		ck_assert_msg(sscanf(out, "%d %lld", &partition, &offset) == 2, "%s", out);
		ck_assert_int_eq(partition, java_partition(tenants[i], PARTITIONS));
	}
	struct consumed c;
	consume_all(&b, "tally.events", 3, &c);
	ck_assert_msg(c.n == 3 && c.types[TLY_EV_TENANT_CREATED] == 3, "decoded %d of 3 (%s)", c.n,
		      c.last_error);
	ck_assert_int_eq(c.wrong_partition, 0);
	tly_test_broker_stop(&b);
}
END_TEST

/* ---- tally-loadgen ---------------------------------------------------------------------------- */

static void loadgen(const char *seed, const char *extra, const char *out_path)
{
	char cmd[1024];
	snprintf(cmd, sizeof(cmd), "%s --dry-run --seed %s --events 3000 --tenants 20 %s > %s 2>/dev/null",
		 tly_test_bin("tally-loadgen"), seed, extra, out_path);
	char *argv[] = {"/bin/sh", "-c", cmd, NULL};
	int rc = tly_proc_run(argv, NULL, 0);
	ck_assert_msg(rc == 0, "tally-loadgen exit %d", rc);
}

START_TEST(test_loadgen_deterministic)
{
	char dir[] = "/tmp/tally-loadgen-test-XXXXXX";
	ck_assert_ptr_nonnull(mkdtemp(dir));
	char a[300], b2[300], c[300], d[300];
	snprintf(a, sizeof(a), "%s/a", dir);
	snprintf(b2, sizeof(b2), "%s/b", dir);
	snprintf(c, sizeof(c), "%s/c", dir);
	snprintf(d, sizeof(d), "%s/d", dir);
	loadgen("42", "", a);
	loadgen("42", "", b2);
	loadgen("43", "", c);
	loadgen("42", "--duplicates 5 --bad 5", d);
	char *ta = tly_test_read_file(a), *tb = tly_test_read_file(b2), *tc = tly_test_read_file(c), *td = tly_test_read_file(d);
	ck_assert_msg(strlen(ta) > 100000, "only %zu bytes", strlen(ta));
	ck_assert_msg(strcmp(ta, tb) == 0, "same seed, different events");
	ck_assert_msg(strcmp(ta, tc) != 0, "different seeds, same events");

	/* Every event of a clean run is valid, and every type of traffic is there. */
	static char out[1 << 16];
	int rc = tallyctl(NULL, out, sizeof(out), "publish", a, "--dry-run", NULL);
	ck_assert_msg(rc == 0, "exit %d: %.2000s", rc, out);
	static const char *const types[] = {
		"TenantCreated", "UserRegistered", "SubscriptionStarted", "ConversationStarted",
		"MessageAppended", "TokensReserved", "ReservationSettled", "ReservationReleased",
		"TokensDebited", "CreditsGranted", "UsageReported", "ClockTick", "AgentHandoff",
		"ConversationClosed"};
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		char needle[64];
		snprintf(needle, sizeof(needle), "\"type\":\"%s\"", types[i]);
		ck_assert_msg(strstr(ta, needle), "no %s in the load", types[i]);
	}
	/* With bad events and duplicates, the bad ones are rejected, the rest pass. */
	rc = tallyctl(NULL, out, sizeof(out), "publish", d, "--dry-run", NULL);
	ck_assert_msg(rc == 1 && strstr(out, "rejected") && !strstr(out, " 0 rejected"), "exit %d: %.2000s",
		      rc, out);
	free(ta);
	free(tb);
	free(tc);
	free(td);
	char *rmargv[] = {"rm", "-rf", dir, NULL};
	ck_assert_int_eq(tly_proc_run(rmargv, NULL, 0), 0);
}
END_TEST

/* Loadgen against the broker: everything it says it sent is delivered, on the tenant's partition. */
START_TEST(test_loadgen_publish)
{
	static char out[1 << 15];
	struct tly_test_broker b;
	tly_test_broker_start(&b, 1, PARTITIONS);
	char exe[512];
	snprintf(exe, sizeof(exe), "%s", tly_test_bin("tally-loadgen"));
	char set[600];
	snprintf(set, sizeof(set), "kafka.bootstrap.servers=%s", b.bootstraps);
	char *argv[] = {exe, "-s", set, "--seed", "9", "--events", "2000", "--tenants", "10",
			"--duplicates", "2", "--bad", "2", NULL};
	int rc = tly_proc_run(argv, out, sizeof(out));
	ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
	unsigned long long sent = 0, delivered = 0, failed = 1, ticks = 0, bad = 0;
	ck_assert_msg(sscanf(out, "sent %llu messages", &sent) == 1, "%s", out);
	const char *d = strstr(out, "delivered ");
	ck_assert_msg(d && sscanf(d, "delivered %llu, failed %llu", &delivered, &failed) == 2, "%s", out);
	const char *t = strstr(out, "ClockTick");
	ck_assert_msg(t && sscanf(t, "ClockTick %llu", &ticks) == 1, "%s", out);
	const char *bd = strstr(out, "  bad");
	ck_assert_msg(bd && sscanf(bd, "  bad %llu", &bad) == 1, "%s", out);
	ck_assert_int_eq(sent, 2000);
	ck_assert_int_eq(delivered, sent);
	ck_assert_int_eq(failed, 0);
	ck_assert_int_gt(ticks, 0);
	ck_assert_int_gt(bad, 0);
	/* A ClockTick is one event and PARTITIONS messages. */
	int want = (int)(sent + ticks * (PARTITIONS - 1));
	struct consumed c;
	consume_all(&b, "tally.events", want, &c);
	ck_assert_int_eq(c.n, want);
	ck_assert_int_eq(c.wrong_partition, 0);
	for (int q = 0; q < PARTITIONS; q++)
		ck_assert_int_eq(c.clock_ticks_per_partition[q], (int)ticks);
	tly_test_broker_stop(&b);
}
END_TEST

Suite *producer_suite(void)
{
	Suite *s = suite_create("producer");
	TCase *json = tcase_create("json");
	tcase_add_loop_test(json, test_json_round_trip, 0, TLY_EV__COUNT);
	tcase_add_test(json, test_json_errors);
	tcase_add_test(json, test_json_times);
	tcase_add_test(json, test_partition_agreement);
	tcase_add_test(json, test_documented_examples);
	suite_add_tcase(s, json);

	TCase *broker = tcase_create("broker");
	tcase_set_timeout(broker, 60);
	tcase_add_test(broker, test_api_every_type);
	tcase_add_test(broker, test_api_delivery_failure);
	tcase_add_test(broker, test_tallyctl_publish_and_tail);
	tcase_add_test(broker, test_python_publish);
	tcase_add_test(broker, test_loadgen_deterministic);
	tcase_add_test(broker, test_loadgen_publish);
	suite_add_tcase(s, broker);
	return s;
}
