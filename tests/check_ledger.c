/*
 * Suite "ledger": tally-ledger through the real binary, a dev broker and a fresh database per
 * test (happy path with publish, double spend under concurrent producers, kill -9 under load with
 * a deterministic replay, bad input quarantined), and its fencing compare-and-set directly.
 */
#include <check.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../consumers/ledger_partition.h"
#include "codec.h"
#include "config.h"
#include "decide.h"
#include "fixtures.h"
#include "harness.h"
#include "kafka.h"
#include "migrate.h"
#include "pg.h"
#include "proc.h"
#include "producer.h"
#include "suites.h"

#define PARTITIONS 4
#define T0 1767225600000000LL /* 2026-01-01 */
#define HOUR 3600000000LL

struct env {
	struct tly_test_broker b;
	char *db;
	PGconn *conn;
	struct tly_producer *prod;
	char log[400];
};

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static struct tly_config *env_config(const struct env *e)
{
	char errstr[512];
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert_msg(tly_config_set(cfg, "kafka.bootstrap.servers", e->b.bootstraps, errstr,
				     sizeof(errstr)) == 0, "%s", errstr);
	return cfg;
}

static struct tly_producer *env_producer(const struct env *e)
{
	char errstr[512];
	struct tly_config *cfg = env_config(e);
	struct tly_producer *p = tly_producer_new(cfg, NULL, NULL, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(p != NULL, "%s", errstr);
	return p;
}

static void env_up(struct env *e)
{
	char errstr[1024];
	int applied = 0;
	memset(e, 0, sizeof(*e));
	tly_test_broker_start(&e->b, 1, PARTITIONS);
	e->db = tly_test_pg_fresh_db();
	e->conn = tly_pg_connect(e->db, "check_ledger", errstr, sizeof(errstr));
	ck_assert_msg(e->conn != NULL, "%s", errstr);
	struct tly_migrate_set *set = tly_migrate_load_embedded(errstr, sizeof(errstr));
	ck_assert_msg(set && tly_migrate_up(e->conn, set, &applied, errstr, sizeof(errstr)) == 0,
		      "%s", errstr);
	tly_migrate_free(set);
	snprintf(e->log, sizeof(e->log), "%s/ledger.log", e->b.dir);
	e->prod = env_producer(e);
}

static void env_down(struct env *e)
{
	tly_producer_free(e->prod, 5000);
	PQfinish(e->conn);
	free(e->db);
	tly_test_broker_stop(&e->b);
}

static pid_t ledger_start_db(const struct env *e, const char *db, const char *group)
{
	char errstr[512], dbset[600], kset[600], gset[128];
	snprintf(dbset, sizeof(dbset), "database.url=%s", db);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", e->b.bootstraps);
	snprintf(gset, sizeof(gset), "ledger.group.id=%s", group);
	char *const argv[] = {(char *)tly_test_bin("tally-ledger"), "-s", dbset, "-s", kset, "-s", gset,
			      "-s", "topics.partitions=4", "-s", "ledger.batch.max.ms=20", NULL};
	pid_t pid = tly_proc_spawn(argv, e->log, errstr, sizeof(errstr));
	ck_assert_msg(pid > 0, "could not start tally-ledger: %s", errstr);
	return pid;
}

static pid_t ledger_start(const struct env *e)
{
	return ledger_start_db(e, e->db, "ledger-test");
}

static void ledger_stop(const struct env *e, pid_t pid)
{
	int status = tly_proc_stop(pid, 20000);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "tally-ledger did not exit 0 on SIGTERM (status %d); see %s", status, e->log);
}

static long q_long(PGconn *conn, const char *sql, int n, const char *const *v)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, n, v, &err);
	ck_assert_msg(res != NULL, "%s: %s", sql, err.message);
	long x = PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ? atol(PQgetvalue(res, 0, 0)) : -1;
	PQclear(res);
	return x;
}

/* Wait until the ledger's stored offsets sum to want (every record consumed and committed). */
static void wait_consumed(const struct env *e, long want, int timeout_ms)
{
	int64_t deadline = now_ms() + timeout_ms;
	long have = -1;
	while (now_ms() < deadline) {
		have = q_long(e->conn, "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
				       "WHERE consumer = 'tally-ledger'", 0, NULL);
		if (have >= want)
			break;
		usleep(100000);
	}
	ck_assert_msg(have == want, "ledger consumed %ld of %ld records (see %s)", have, want, e->log);
}

static void publish(struct tly_producer *p, const struct tly_event *ev)
{
	char errstr[512];
	ck_assert_msg(tly_producer_publish(p, ev, NULL, errstr, sizeof(errstr)) == 0, "%s", errstr);
}

static void flush(struct tly_producer *p)
{
	ck_assert_msg(tly_producer_flush(p, 15000) == 0, "events not delivered");
}

static void tenant_of(unsigned n, tly_uuid *t)
{
	struct tly_event ev;
	tly_fixture_event(&ev, TLY_EV_TENANT_CREATED, 1000 + n);
	*t = ev.tenant_id;
}

/* A subscription with tokens tokens, no overage (reservations past zero are refused). */
static void subscribe(struct tly_producer *p, const tly_uuid *tenant, int64_t tokens)
{
	struct tly_event ev;
	tly_fixture_event(&ev, TLY_EV_SUBSCRIPTION_STARTED, 7);
	tly_uuid_generate(&ev.event_id);
	ev.tenant_id = *tenant;
	ev.occurred_at = T0;
	ev.u.subscription_started.period_start = T0;
	ev.u.subscription_started.period_end = T0 + 720 * HOUR;
	ev.u.subscription_started.trial_ends_at.set = false;
	ev.u.subscription_started.terms.tokens_per_period = tokens;
	ev.u.subscription_started.terms.rollover_cap_tokens = 0;
	ev.u.subscription_started.terms.overage_price_micros_per_1k_tokens.set = false;
	publish(p, &ev);
}

static void reserve_event(struct tly_event *ev, const tly_uuid *tenant, int64_t tokens, int64_t at)
{
	tly_fixture_event(ev, TLY_EV_TOKENS_RESERVED, 9);
	tly_uuid_generate(&ev->event_id);
	tly_uuid_generate(&ev->u.tokens_reserved.reservation_id);
	ev->tenant_id = *tenant;
	ev->occurred_at = at;
	ev->u.tokens_reserved.tokens = tokens;
	ev->u.tokens_reserved.expires_at = T0 + 700 * HOUR;
}

/* Per tenant: seq 1..n without gap, each prev_hash the previous hash; returns the entry count. */
static long check_chains(PGconn *conn)
{
	ck_assert_int_eq(q_long(conn, "SELECT count(*) FROM (SELECT tenant_id FROM ledger_entries "
				      "GROUP BY tenant_id HAVING max(seq) <> count(*) OR min(seq) <> 1) x",
				0, NULL), 0);
	ck_assert_int_eq(q_long(conn, "SELECT count(*) FROM ledger_entries e JOIN ledger_entries p "
				      "ON p.tenant_id = e.tenant_id AND p.seq = e.seq - 1 "
				      "WHERE e.prev_hash <> p.hash", 0, NULL), 0);
	ck_assert_int_eq(q_long(conn, "SELECT count(*) FROM ledger_entries WHERE seq = 1 AND "
				      "prev_hash <> decode(repeat('00', 32), 'hex')", 0, NULL), 0);
	return q_long(conn, "SELECT count(*) FROM ledger_entries", 0, NULL);
}

/* Read tally.ledger from the start until want messages; each decodes, its hash recomputes and equals the stored row. */
static void check_published(const struct env *e, long want)
{
	char errstr[512];
	struct tly_codec *codec = tly_codec_new(errstr, sizeof(errstr));
	ck_assert_msg(codec != NULL, "%s", errstr);
	struct tly_config *cfg = env_config(e);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(conf != NULL, "%s", errstr);
	rd_kafka_t *rk = tly_kafka_consumer_new(conf, "ledger-check", errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(PARTITIONS);
	for (int p = 0; p < PARTITIONS; p++)
		rd_kafka_topic_partition_list_add(l, "tally.ledger", p)->offset = RD_KAFKA_OFFSET_BEGINNING;
	ck_assert_int_eq(rd_kafka_assign(rk, l), 0);
	rd_kafka_topic_partition_list_destroy(l);
	struct tly_event ev = {0};
	long got = 0;
	int64_t deadline = now_ms() + 20000;
	while (got < want && now_ms() < deadline) {
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
		if (!m)
			continue;
		if (!m->err) {
			ck_assert_msg(tly_codec_decode(codec, m->payload, m->len, &ev, errstr,
						       sizeof(errstr)) == 0, "%s", errstr);
			ck_assert_int_eq(ev.type, TLY_EV_LEDGER_ENTRY);
			unsigned char h[32];
			ck_assert(tly_ledger_entry_hash(codec, &ev, h) == 0);
			ck_assert_msg(memcmp(h, ev.u.ledger_entry.hash, 32) == 0, "published hash does not verify");
			ck_assert_int_eq(m->partition, ev.u.ledger_entry.cause_partition);
			char tenant[37], seq[24];
			tly_uuid_format(&ev.tenant_id, tenant);
			snprintf(seq, sizeof(seq), "%" PRId64, ev.u.ledger_entry.seq);
			const char *v[] = {tenant, seq};
			int len[] = {0, 0}, fmt[] = {0, 0};
			struct tly_pg_error err;
			PGresult *res = tly_pg_query_params(e->conn, "SELECT hash FROM ledger_entries WHERE "
							    "tenant_id = $1 AND seq = $2", 2, v, len, fmt, 1, &err);
			ck_assert_msg(res && PQntuples(res) == 1, "published entry %s/%s not in the database", tenant, seq);
			ck_assert(memcmp(PQgetvalue(res, 0, 0), h, 32) == 0);
			PQclear(res);
			got++;
		}
		rd_kafka_message_destroy(m);
	}
	ck_assert_msg(got >= want, "read %ld of %ld entries from tally.ledger", got, want);
	tly_event_free(&ev);
	tly_kafka_consumer_destroy(rk);
	tly_codec_free(codec);
}

/* ---- tests ------------------------------------------------------------------------------- */

START_TEST(test_happy_path)
{
	enum { K = 10 };
	struct env e;
	env_up(&e);
	tly_uuid t;
	tenant_of(1, &t);
	pid_t pid = ledger_start(&e);
	subscribe(e.prod, &t, 1000);
	for (int i = 0; i < K; i++) {
		struct tly_event ev;
		reserve_event(&ev, &t, 50, T0 + (i + 1) * 1000000LL);
		publish(e.prod, &ev);
	}
	flush(e.prod);
	wait_consumed(&e, 1 + K, 30000);
	ledger_stop(&e, pid);
	ck_assert_int_eq(check_chains(e.conn), 1 + K);
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'hold_placed'",
				0, NULL), K);
	ck_assert_int_eq(q_long(e.conn, "SELECT max(held) FROM ledger_entries", 0, NULL), 50 * K);
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM ledger_wallets", 0, NULL), 1);
	check_published(&e, 1 + K);
	/* Delivered marker stored: a restart republishes nothing. */
	ck_assert_int_eq(q_long(e.conn, "SELECT sum(next_offset) FROM ledger_published", 0, NULL),
			 q_long(e.conn, "SELECT max(cause_offset) + 1 FROM ledger_entries", 0, NULL));
	env_down(&e);
}
END_TEST

START_TEST(test_double_spend_concurrent)
{
	enum { PROCS = 4, EACH = 20, AMOUNT = 30, BALANCE = 1000 };
	struct env e;
	env_up(&e);
	tly_uuid t;
	tenant_of(2, &t);
	subscribe(e.prod, &t, BALANCE);
	flush(e.prod);
	pid_t pid = ledger_start(&e);
	pid_t kids[PROCS];
	for (int k = 0; k < PROCS; k++) {
		kids[k] = fork();
		ck_assert_int_ge(kids[k], 0);
		if (kids[k] == 0) {
			char errstr[256];
			struct tly_producer *p = env_producer(&e);
			int bad = 0;
			for (int i = 0; i < EACH; i++) {
				struct tly_event ev;
				reserve_event(&ev, &t, AMOUNT, T0 + 1000000LL + k * 100 + i);
				bad += tly_producer_publish(p, &ev, NULL, errstr, sizeof(errstr)) != 0;
			}
			bad += tly_producer_flush(p, 15000) != 0;
			tly_producer_free(p, 1000);
			_exit(bad ? 1 : 0);
		}
	}
	for (int k = 0; k < PROCS; k++) {
		int status;
		ck_assert_int_eq(waitpid(kids[k], &status, 0), kids[k]);
		ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "producer %d failed", k);
	}
	wait_consumed(&e, 1 + PROCS * EACH, 30000);
	ledger_stop(&e, pid);
	check_chains(e.conn);
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'hold_placed'",
				0, NULL), BALANCE / AMOUNT);
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'rejected' "
				       "AND reason = 'insufficient_tokens'", 0, NULL),
			 PROCS * EACH - BALANCE / AMOUNT);
	ck_assert_int_ge(q_long(e.conn, "SELECT min(allowance_remaining + credits_remaining - held) "
					"FROM ledger_entries", 0, NULL), 0);
	env_down(&e);
}
END_TEST

/* Rows of (tenant, seq, hash) as one text, for comparing two databases. */
static char *entries_digest(PGconn *conn)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, "SELECT coalesce(string_agg(tenant_id::text || ':' || seq || ':' || "
				     "encode(hash, 'hex'), ',' ORDER BY tenant_id, seq), '') FROM ledger_entries",
				     0, NULL, &err);
	ck_assert_msg(res != NULL, "%s", err.message);
	char *s = strdup(PQgetvalue(res, 0, 0));
	PQclear(res);
	return s;
}

START_TEST(test_crash_and_replay)
{
	enum { TENANTS = 6, ROUNDS = 4, PER_ROUND = 150 };
	struct env e;
	env_up(&e);
	tly_uuid t[TENANTS];
	for (int i = 0; i < TENANTS; i++) {
		tenant_of(10 + (unsigned)i, &t[i]);
		subscribe(e.prod, &t[i], 20000);
	}
	flush(e.prod);
	long sent = TENANTS;
	srand(42);
	for (int r = 0; r < ROUNDS; r++) {
		pid_t pid = ledger_start(&e);
		for (int i = 0; i < PER_ROUND; i++) {
			struct tly_event ev;
			reserve_event(&ev, &t[i % TENANTS], 10 + i % 90, T0 + (r * PER_ROUND + i + 1) * 1000LL);
			publish(e.prod, &ev);
			sent++;
			if (i % 25 == 0)
				usleep(20000);
		}
		flush(e.prod);
		usleep((useconds_t)(1000 * (rand() % 1500)));
		kill(pid, SIGKILL);
		int status;
		ck_assert(tly_proc_wait(pid, 5000, &status) == 0);
	}
	pid_t pid = ledger_start(&e);
	wait_consumed(&e, sent, 30000);
	ledger_stop(&e, pid);
	long n = check_chains(e.conn);
	/* every input record has exactly one outcome */
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM ledger_entries WHERE cause_type = 'TokensReserved'",
				0, NULL), sent - TENANTS);
	ck_assert_int_eq(q_long(e.conn, "SELECT count(DISTINCT (cause_partition, cause_offset)) FROM ledger_entries",
				0, NULL), sent);
	check_published(&e, n);

	/* determinism: the same input into an empty database gives byte-identical entries */
	char *db2 = tly_test_pg_fresh_db(), errstr[512];
	int applied;
	PGconn *c2 = tly_pg_connect(db2, "check_ledger", errstr, sizeof(errstr));
	ck_assert_msg(c2 != NULL, "%s", errstr);
	struct tly_migrate_set *set = tly_migrate_load_embedded(errstr, sizeof(errstr));
	ck_assert_msg(set && tly_migrate_up(c2, set, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	tly_migrate_free(set);
	pid = ledger_start_db(&e, db2, "ledger-replay");
	int64_t deadline = now_ms() + 30000;
	while (now_ms() < deadline &&
	       q_long(c2, "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets", 0, NULL) < sent)
		usleep(100000);
	ledger_stop(&e, pid);
	char *a = entries_digest(e.conn), *b = entries_digest(c2);
	ck_assert_msg(strlen(a) > 0 && strcmp(a, b) == 0, "replayed entries differ");
	free(a);
	free(b);
	PQfinish(c2);
	free(db2);
	env_down(&e);
}
END_TEST

/* Produce bytes to exactly partition with key (NULL: none), whatever the key hashes to. */
static void produce_raw(struct env *e, const void *key, size_t keylen, int32_t partition,
			const void *bytes, size_t len)
{
	char errstr[256];
	struct tly_config *cfg = env_config(e);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(conf != NULL, "%s", errstr);
	rd_kafka_t *rk = tly_kafka_producer_new(conf, errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	struct tly_kafka_msg msg = {.topic = "tally.events", .partition = partition, .key = key,
				    .keylen = keylen, .value = bytes, .valuelen = len};
	ck_assert(tly_kafka_produce(rk, &msg, 5000, NULL) == 0);
	ck_assert(tly_kafka_flush(rk, 10000) == 0);
	tly_kafka_producer_destroy(rk, 1000);
}

START_TEST(test_quarantine)
{
	char errstr[256], key[37];
	struct env e;
	env_up(&e);
	struct tly_codec *codec = tly_codec_new(errstr, sizeof(errstr));
	ck_assert_ptr_nonnull(codec);
	tly_uuid t;
	tenant_of(3, &t);
	tly_uuid_format(&t, key);
	int32_t home = tly_kafka_partition_for_key(key, 36, PARTITIONS);
	int32_t other = (home + 1) % PARTITIONS;
	pid_t pid = ledger_start(&e);
	subscribe(e.prod, &t, 1000);
	flush(e.prod);

	struct tly_event ev;
	struct tly_buf buf = {0};
	reserve_event(&ev, &t, 10, T0 + 1000000);
	ck_assert(tly_codec_encode(codec, &ev, &buf, errstr, sizeof(errstr)) == 0);
	produce_raw(&e, key, 36, other, buf.data, buf.len);              /* wrong_partition */
	produce_raw(&e, NULL, 0, home, buf.data, buf.len);               /* missing_key */
	produce_raw(&e, key, 36, home, "garbage!", 8);                   /* bad_magic */
	unsigned char unknown[32] = {0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0};
	produce_raw(&e, key, 36, home, unknown, sizeof(unknown));        /* unknown_fingerprint */
	char ids[37];
	tly_uuid_format(&ev.event_id, ids);
	unsigned char *at = memmem(buf.data, buf.len, ids, 36);
	ck_assert_ptr_nonnull(at);
	memset(at, 'z', 36);
	produce_raw(&e, key, 36, home, buf.data, buf.len);               /* invalid */
	reserve_event(&ev, &t, 10, T0 + 2000000);
	publish(e.prod, &ev);                                            /* still applied */
	flush(e.prod);
	wait_consumed(&e, 7, 30000);
	ledger_stop(&e, pid);

	static const char *const reasons[] = {"wrong_partition", "missing_key", "bad_magic",
					      "unknown_fingerprint", "invalid"};
	for (size_t i = 0; i < 5; i++) {
		const char *v[] = {reasons[i]};
		if (q_long(e.conn, "SELECT count(*) FROM quarantine WHERE reason = $1 AND value IS NOT NULL",
			   1, v) != 1) {
			struct tly_pg_error qerr;
			PGresult *res = tly_pg_query(e.conn, "SELECT string_agg(reason || ' ' || "
						     "coalesce(detail, ''), '; ') FROM quarantine", 0, NULL, &qerr);
			ck_abort_msg("no quarantine row with reason %s; rows: %s", reasons[i],
				     res ? PQgetvalue(res, 0, 0) : qerr.message);
		}
	}
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'hold_placed'", 0, NULL), 1);
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM ledger_entries", 0, NULL), 2);

	/* tallyctl quarantine list and replay */
	char dbset[600], kset[600], out[8192], id[24];
	snprintf(dbset, sizeof(dbset), "database.url=%s", e.db);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", e.b.bootstraps);
	char *const list[] = {(char *)tly_test_bin("tallyctl"), "-s", dbset, "-s", kset, "quarantine", "list", NULL};
	ck_assert_int_eq(tly_proc_run(list, out, sizeof(out)), 0);
	ck_assert_msg(strstr(out, "wrong_partition") && strstr(out, "(5 rows)"), "%s", out);
	snprintf(id, sizeof(id), "%ld", q_long(e.conn, "SELECT id FROM quarantine WHERE reason = 'wrong_partition'", 0, NULL));
	char *const replay[] = {(char *)tly_test_bin("tallyctl"), "-s", dbset, "-s", kset, "quarantine", "replay", id, NULL};
	ck_assert_msg(tly_proc_run(replay, out, sizeof(out)) == 0, "%s", out);
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM quarantine WHERE replayed_at IS NOT NULL", 0, NULL), 1);
	pid = ledger_start(&e);
	wait_consumed(&e, 8, 30000);
	ledger_stop(&e, pid);
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'hold_placed'", 0, NULL), 2);
	tly_buf_free(&buf);
	tly_codec_free(codec);
	env_down(&e);
}
END_TEST

/* Two owners of one partition: the one whose stored offset moved cannot commit. */
START_TEST(test_stale_owner_fenced)
{
	char errstr[256], key[37];
	struct env e;
	env_up(&e);
	struct tly_codec *codec = tly_codec_new(errstr, sizeof(errstr));
	ck_assert_ptr_nonnull(codec);
	struct tly_ledger_ctx ctx = {e.conn, codec, {0, codec}, "tally.events", "tally.ledger", PARTITIONS};
	tly_uuid t;
	tenant_of(4, &t);
	tly_uuid_format(&t, key);
	int32_t part = tly_kafka_partition_for_key(key, 36, PARTITIONS);
	struct tly_pg_error err;
	struct tly_ledger_partition *a = tly_ledger_partition_open(&ctx, part, &err);
	struct tly_ledger_partition *b = tly_ledger_partition_open(&ctx, part, &err);
	ck_assert(a && b);
	struct tly_event ev;
	struct tly_buf buf = {0};
	reserve_event(&ev, &t, 10, T0);
	ck_assert(tly_codec_encode(codec, &ev, &buf, errstr, sizeof(errstr)) == 0);
	bool added, fenced;
	struct tly_ledger_batch_out out;
	ck_assert(tly_ledger_partition_add(b, 0, key, 36, buf.data, buf.len, 0, &added) == 0 && added);
	ck_assert(tly_ledger_partition_commit(b, &ctx, -1, &out, &fenced, &err) == 0);
	ck_assert_int_eq(out.n_entries, 1);
	ck_assert(tly_ledger_partition_add(a, 0, key, 36, buf.data, buf.len, 0, &added) == 0 && added);
	ck_assert_int_eq(tly_ledger_partition_commit(a, &ctx, -1, &out, &fenced, &err), TLY_E_PG);
	ck_assert(fenced);
	/* also once a row exists: b goes on, a stale copy loaded before is refused */
	tly_ledger_partition_free(a);
	a = tly_ledger_partition_open(&ctx, part, &err);
	ck_assert_ptr_nonnull(a);
	ck_assert(tly_ledger_partition_add(b, 1, key, 36, buf.data, buf.len, 0, &added) == 0 && added);
	ck_assert(tly_ledger_partition_commit(b, &ctx, -1, &out, &fenced, &err) == 0);
	ck_assert_str_eq(out.entries[0].u.ledger_entry.kind, "duplicate");
	ck_assert(tly_ledger_partition_add(a, 1, key, 36, buf.data, buf.len, 0, &added) == 0 && added);
	ck_assert_int_eq(tly_ledger_partition_commit(a, &ctx, -1, &out, &fenced, &err), TLY_E_PG);
	ck_assert(fenced);
	ck_assert_int_eq(q_long(e.conn, "SELECT count(*) FROM ledger_entries", 0, NULL), 2);
	ck_assert_int_eq(q_long(e.conn, "SELECT next_offset FROM consumer_offsets", 0, NULL), 2);
	tly_ledger_partition_free(a);
	tly_ledger_partition_free(b);
	tly_buf_free(&buf);
	tly_codec_free(codec);
	env_down(&e);
}
END_TEST

START_TEST(test_partition_guard)
{
	struct env e;
	env_up(&e);
	struct tly_pg_error err;
	ck_assert_int_eq(tly_pg_exec(e.conn, "INSERT INTO topic_partitions (topic, partition_count) "
				     "VALUES ('tally.events', 12)", 0, NULL, &err), 0);
	pid_t pid = ledger_start(&e);
	int status;
	ck_assert_msg(tly_proc_wait(pid, 20000, &status) == 0, "tally-ledger did not refuse to start");
	ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1);
	char buf[8192] = "";
	FILE *f = fopen(e.log, "r");
	ck_assert_ptr_nonnull(f);
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	ck_assert_msg(strstr(buf, "has 4 partitions, but the ledger was built with 12") &&
		      strstr(buf, "what to do"), "%s", buf);
	env_down(&e);
}
END_TEST

Suite *ledger_suite(void)
{
	Suite *s = suite_create("ledger");
	TCase *tc = tcase_create("ledger");
	tcase_set_timeout(tc, 90);
	tcase_add_test(tc, test_happy_path);
	tcase_add_test(tc, test_stale_owner_fenced);
	tcase_add_test(tc, test_quarantine);
	tcase_add_test(tc, test_partition_guard);
	tcase_add_test(tc, test_double_spend_concurrent);
	tcase_add_test(tc, test_crash_and_replay);
	suite_add_tcase(s, tc);
	return s;
}
