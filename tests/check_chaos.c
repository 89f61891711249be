/*
 * Suite "chaos": the end checks of lib/ledgercheck catch a tampered ledger (a changed balance, a
 * gap, a record applied twice, an entry below the limit) on entries the real tally-ledger wrote;
 * and a short tally-chaos run (kill -9 of both daemons, PostgreSQL restarts, brokers down,
 * request errors, a second ledger) passes every check with every kind of fault struck.
 */
#include <check.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#include "codec.h"
#include "config.h"
#include "harness.h"
#include "kafka.h"
#include "ledgercheck.h"
#include "pg.h"
#include "proc.h"
#include "producer.h"
#include "suites.h"

#define PARTITIONS 2
#define CHAOS_SEED "3"
#define CHAOS_SECONDS "50"

static void exec_sql(PGconn *conn, const char *sql)
{
	struct tly_pg_error err;
	ck_assert_msg(tly_pg_exec(conn, sql, 0, NULL, &err) == 0, "%s: %s", sql, err.message);
}

static int64_t q_int(PGconn *conn, const char *sql)
{
	struct tly_pg_error err;
	PGresult *r = tly_pg_query(conn, sql, 0, NULL, &err);
	ck_assert_msg(r != NULL, "%s: %s", sql, err.message);
	int64_t v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	PQclear(r);
	return v;
}

struct verdict {
	struct tly_ledgercheck chain, limit, conservation, causes;
	struct tly_ledgercheck_totals totals;
};

static void run_checks(PGconn *conn, struct tly_codec *codec, struct verdict *v)
{
	struct tly_pg_error err;
	ck_assert_msg(tly_ledgercheck_chain(conn, codec, &v->chain, &err) == 0, "%s", err.message);
	ck_assert_msg(tly_ledgercheck_limit(conn, 0, &v->limit, &err) == 0, "%s", err.message);
	ck_assert_msg(tly_ledgercheck_conservation(conn, &v->conservation, &v->totals, &err) == 0, "%s",
		      err.message);
	ck_assert_msg(tly_ledgercheck_causes(conn, &v->causes, &err) == 0, "%s", err.message);
}

/* The sum of tally.events' high watermarks on broker b: the offsets a ledger stores at its end. */
static int64_t events_end(const struct tly_test_broker *b)
{
	char errstr[512];
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert_msg(tly_config_set(cfg, "kafka.bootstrap.servers", b->bootstraps, errstr,
				     sizeof(errstr)) == 0, "%s", errstr);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(conf != NULL, "%s", errstr);
	rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	int64_t end = 0;
	for (int p = 0; p < PARTITIONS; p++) {
		int64_t low = -1, high = -1;
		rd_kafka_resp_err_t err = rd_kafka_query_watermark_offsets(rk, "tally.events", p, &low,
									   &high, 10000);
		ck_assert_msg(err == RD_KAFKA_RESP_ERR_NO_ERROR, "tally.events [%d]: %s", p,
			      rd_kafka_err2str(err));
		end += high;
	}
	rd_kafka_destroy(rk);
	ck_assert_int_gt(end, 0);
	return end;
}

/* A ledger the real tally-ledger wrote from loadgen traffic (periods close, holds expire). */
static void ledger_from_loadgen(struct tly_test_broker *b, struct tly_test_db *d)
{
	char log[400], kset[600], out[4096];
	tly_test_broker_start(b, 1, PARTITIONS);
	tly_test_db_up(d, "check_chaos");
	snprintf(log, sizeof(log), "%s/ledger.log", b->dir);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", b->bootstraps);
	char *const argv[] = {(char *)tly_test_bin("tally-loadgen"), "--seed", "11", "--tenants", "8",
			      "--events", "1500", "--duplicates", "5", "--step-ms", "3600000",
			      "-s", kset, NULL};
	int rc = tly_proc_run(argv, out, sizeof(out));
	ck_assert_msg(rc == 0, "tally-loadgen exited %d: %s", rc, out);
	int64_t end = events_end(b);
	pid_t ledger = tly_test_ledger_spawn(b->bootstraps, d->conninfo, "chaos-test", PARTITIONS, log);
	/*
	 * Consumed once its stored offsets reach the end of tally.events (loadgen delivered all of
	 * it before it exited). Offsets that merely stopped moving for 600 ms were not enough: a
	 * ledger waiting that long for a CPU would be stopped part way, on whatever it had by then.
	 */
	int64_t cur = 0;
	for (int i = 0; i < 1200 && cur != end; i++) {
		usleep(100000);
		cur = q_int(d->conn, "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
				     "WHERE consumer = 'tally-ledger'");
	}
	ck_assert_msg(cur == end, "the ledger stored %" PRId64 " of %" PRId64 " offsets (see %s)", cur,
		      end, log);
	tly_test_ledger_stop(ledger, log);
	ck_assert_int_gt(q_int(d->conn, "SELECT count(*) FROM ledger_entries"), 100);
}

START_TEST(checks_catch_tampering)
{
	struct tly_test_broker b;
	struct tly_test_db d;
	struct verdict v;
	char errstr[512];
	ledger_from_loadgen(&b, &d);
	struct tly_codec *codec = tly_codec_new(errstr, sizeof(errstr));
	ck_assert_msg(codec != NULL, "%s", errstr);

	/* as written: every check holds, over every entry */
	run_checks(d.conn, codec, &v);
	int64_t entries = q_int(d.conn, "SELECT count(*) FROM ledger_entries");
	ck_assert_int_eq(v.chain.checked, entries);
	ck_assert_msg(v.chain.violations == 0, "%s", v.chain.first);
	ck_assert_int_eq(v.limit.checked, entries);
	ck_assert_msg(v.limit.violations == 0, "%s", v.limit.first);
	ck_assert_msg(v.conservation.violations == 0, "%s", v.conservation.first);
	ck_assert_int_eq(v.conservation.checked, q_int(d.conn, "SELECT count(DISTINCT tenant_id) FROM ledger_entries"));
	ck_assert_int_gt(v.totals.granted, 0);
	ck_assert_int_gt(v.totals.spent, 0);
	ck_assert_int_eq(v.totals.granted - v.totals.spent - v.totals.held, v.totals.balances);
	ck_assert_msg(v.causes.violations == 0, "%s", v.causes.first);

	/* one balance changed in place: its hash no longer matches, its tenant's deltas disagree */
	exec_sql(d.conn, "UPDATE ledger_entries SET allowance_remaining = allowance_remaining + 7 "
			 "WHERE (tenant_id, seq) = (SELECT tenant_id, max(seq) FROM ledger_entries "
			 "GROUP BY tenant_id ORDER BY tenant_id LIMIT 1)");
	run_checks(d.conn, codec, &v);
	ck_assert_int_eq(v.chain.violations, 1);
	ck_assert_ptr_nonnull(strstr(v.chain.first, "stored hash is not the hash of the entry"));
	ck_assert_int_eq(v.conservation.violations, 2); /* the tenant, and the totals */
	ck_assert_int_eq(v.limit.violations, 0);

	/* an entry deleted: a gap (and the next prev_hash points at nothing) */
	exec_sql(d.conn, "DELETE FROM ledger_entries WHERE (tenant_id, seq) = (SELECT tenant_id, 2 "
			 "FROM ledger_entries GROUP BY tenant_id HAVING max(seq) > 3 "
			 "ORDER BY tenant_id DESC LIMIT 1)");
	run_checks(d.conn, codec, &v);
	ck_assert_int_ge(v.chain.violations, 3);

	/* held above what the tenant has: below the limit */
	exec_sql(d.conn, "UPDATE ledger_entries SET held = allowance_remaining + credits_remaining + 1 "
			 "WHERE (tenant_id, seq) = (SELECT tenant_id, 1 FROM ledger_entries "
			 "ORDER BY tenant_id LIMIT 1)");
	run_checks(d.conn, codec, &v);
	ck_assert_int_eq(v.limit.violations, 1);
	ck_assert_ptr_nonnull(strstr(v.limit.first, "available -1"));

	/* a record applied twice: an entry of a later record now names an earlier one's cause */
	ck_assert_int_eq(v.causes.violations, 0);
	exec_sql(d.conn, "UPDATE ledger_entries l SET cause_partition = f.cause_partition, "
			 "cause_offset = f.cause_offset FROM (SELECT a.tenant_id, c.seq, a.cause_partition, "
			 "a.cause_offset FROM ledger_entries a JOIN ledger_entries c ON c.tenant_id = a.tenant_id "
			 "AND c.seq > a.seq + 1 AND (c.cause_partition, c.cause_offset) <> "
			 "(a.cause_partition, a.cause_offset) JOIN ledger_entries m ON m.tenant_id = a.tenant_id "
			 "AND m.seq = a.seq + 1 AND (m.cause_partition, m.cause_offset) <> "
			 "(a.cause_partition, a.cause_offset) ORDER BY a.tenant_id, a.seq LIMIT 1) f "
			 "WHERE l.tenant_id = f.tenant_id AND l.seq = f.seq");
	run_checks(d.conn, codec, &v);
	ck_assert_int_ge(v.causes.violations, 1);
	ck_assert_ptr_nonnull(strstr(v.causes.first, "caused seqs"));

	tly_codec_free(codec);
	tly_test_db_down(&d);
	tly_test_broker_stop(&b);
}
END_TEST

/*
 * Found by tally-chaos (seed 1, 300 s): when the stored offset is no longer in the partition (the
 * broker dropped the head of tally.events: retention), librdkafka's default auto.offset.reset
 * (latest) moved the ledger to the end, past every record the topic still held; none of them was
 * ever applied. It must resume at the earliest record still kept.
 */
START_TEST(ledger_resumes_at_earliest_kept_record)
{
	struct tly_test_broker b;
	struct tly_test_db d;
	char errstr[512], log[400], kset[600], out[4096];
	tly_test_broker_start(&b, 1, 1);
	tly_test_db_up(&d, "check_chaos");
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert(tly_config_set(cfg, "kafka.bootstrap.servers", b.bootstraps, errstr, sizeof(errstr)) == 0);
	struct tly_producer *prod = tly_producer_new(cfg, NULL, NULL, errstr, sizeof(errstr));
	ck_assert_msg(prod != NULL, "%s", errstr);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	ck_assert_msg(conf != NULL, "%s", errstr);
	rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	tly_config_free(cfg);

	/* 8 MB of bad records: the dev broker keeps about 5 MiB a partition and drops the head */
	static char big[100000];
	memset(big, 'x', sizeof(big));
	for (int i = 0; i < 80; i++)
		ck_assert(tly_producer_publish_raw(prod, "tally.events", "k", 1, 0, big, sizeof(big), NULL,
						   errstr, sizeof(errstr)) == 0);
	ck_assert_int_eq(tly_producer_flush(prod, 30000), 0);
	tly_producer_free(prod, 5000);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", b.bootstraps);
	char *const argv[] = {(char *)tly_test_bin("tally-loadgen"), "--seed", "5", "--tenants", "3",
			      "--events", "200", "-s", kset, NULL};
	int rc = tly_proc_run(argv, out, sizeof(out));
	ck_assert_msg(rc == 0, "tally-loadgen exited %d: %s", rc, out);
	int64_t low = -1, high = -1;
	ck_assert_int_eq(rd_kafka_query_watermark_offsets(rk, "tally.events", 0, &low, &high, 10000), 0);
	ck_assert_int_gt(low, 0);
	ck_assert_int_ge(high, low + 200);

	/* a new ledger: nothing stored, so it asks for offset 0, which is gone */
	snprintf(log, sizeof(log), "%s/ledger.log", b.dir);
	pid_t ledger = tly_test_ledger_spawn(b.bootstraps, d.conninfo, "chaos-test", 1, log);
	int64_t stored = -1;
	for (int i = 0; i < 300 && stored != high; i++) {
		usleep(100000);
		stored = q_int(d.conn, "SELECT coalesce(max(next_offset), -1) FROM consumer_offsets "
				       "WHERE consumer = 'tally-ledger' AND topic = 'tally.events'");
	}
	tly_test_ledger_stop(ledger, log);
	ck_assert_msg(stored == high, "the ledger stored offset %" PRId64 ", the partition ends at %"
		      PRId64 " (see %s)", stored, high, log);
	/* every bad record still kept is quarantined, the traffic after them applied */
	ck_assert_int_eq(q_int(d.conn, "SELECT count(*) FROM quarantine WHERE length(value) = 100000"),
			 80 - low);
	ck_assert_int_eq(q_int(d.conn, "SELECT min(\"offset\") FROM quarantine"), low);
	ck_assert_int_gt(q_int(d.conn, "SELECT count(*) FROM ledger_entries"), 0);
	rd_kafka_destroy(rk);
	tly_test_db_down(&d);
	tly_test_broker_stop(&b);
}
END_TEST

/* The short chaos run: every check passes, and every kind of fault was struck. */
START_TEST(short_run)
{
	char out_path[] = "/tmp/tally-chaos-test-XXXXXX", errstr[512];
	int fd = mkstemp(out_path);
	ck_assert_int_ge(fd, 0);
	close(fd);
	char *const argv[] = {(char *)tly_test_bin("tally-chaos"), "--seed", CHAOS_SEED, "--seconds",
			      CHAOS_SECONDS, NULL};
	pid_t pid = tly_proc_spawn(argv, out_path, errstr, sizeof(errstr));
	ck_assert_msg(pid > 0, "could not start tally-chaos: %s", errstr);
	int status = 0;
	ck_assert_msg(tly_proc_wait(pid, 420000, &status) == 0, "tally-chaos still running after 420 s "
		      "(see %s)", out_path);

	FILE *f = fopen(out_path, "r");
	ck_assert_ptr_nonnull(f);
	char line[2048];
	int checks = -1, failed = -1, faults = -1, ledger = -1, projector = -1, pg = -1, brokers = -1,
	    errors = -1, second = -1;
	char result[8] = "";
	while (fgets(line, sizeof(line), f)) {
		if (strncmp(line, "result: ", 8) == 0)
			ck_assert_int_eq(sscanf(line, "result: %7s (%d checks, %d failed; seed %*u, %d faults: "
						"kill -9 ledger %d, kill -9 projector %d, PostgreSQL restarts %d, "
						"broker outages %d, request errors %d, second ledger %d)",
						result, &checks, &failed, &faults, &ledger, &projector, &pg,
						&brokers, &errors, &second), 10);
	}
	fclose(f);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0 && strcmp(result, "PASS") == 0,
		      "tally-chaos failed (wait status %d, result \"%s\"); its output: %s", status, result,
		      out_path);
	ck_assert_int_eq(failed, 0);
	ck_assert_int_ge(checks, 16);
	/* the faults really struck: this seed's schedule has every kind, the kills many times */
	ck_assert_int_ge(ledger, 3);
	ck_assert_int_ge(projector, 3);
	ck_assert_int_ge(pg, 1);
	ck_assert_int_ge(brokers, 1);
	ck_assert_int_ge(errors, 1);
	ck_assert_int_ge(second, 1);
	unlink(out_path);
}
END_TEST

Suite *chaos_suite(void)
{
	Suite *s = suite_create("chaos");
	TCase *tc = tcase_create("checks");
	tcase_add_test(tc, checks_catch_tampering);
	tcase_set_timeout(tc, 180);
	suite_add_tcase(s, tc);
	tc = tcase_create("defects");
	tcase_add_test(tc, ledger_resumes_at_earliest_kept_record);
	tcase_set_timeout(tc, 120);
	suite_add_tcase(s, tc);
	tc = tcase_create("run");
	tcase_add_test(tc, short_run);
	tcase_set_timeout(tc, 480);
	suite_add_tcase(s, tc);
	return s;
}
