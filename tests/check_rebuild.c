/*
 * Suite "rebuild": tallyctl rebuild through the real binaries (dev broker, tally-ledger,
 * tally-projector, tally-loadgen): a rebuild gives exactly the rows of the live projection and
 * keeps each table's indexes, constraints, grants and row-level security; a rebuild while traffic
 * flows and the projector runs, then a second rebuild at quiescence, agree; after kill -9 of the
 * projector mid-batch and a restart the projections equal a rebuild (invariant 8).
 *
 * Rows are compared without the bigserial ids of agent_messages, plan_features and token_balances:
 * they are allocation numbers drawn from the table's sequence in whatever order batches inserted
 * rows (a rebuild draws new ones from the same sequence), not part of the fold; those rows are
 * identified by their natural keys (message_id, (plan_id, feature_key), (tenant_id,
 * subscription_id)), which are compared.
 */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#include "clock.h"
#include "config.h"
#include "fold.h"
#include "harness.h"
#include "kafka.h"
#include "lag.h"
#include "compare.h"
#include "pg.h"
#include "proc.h"
#include "suites.h"

#define PARTITIONS 4
#define ANALYST "tly_test_rebuild_analyst"

static char *q_text(PGconn *conn, const char *sql, int n, const char *const *v)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, n, v, &err);
	ck_assert_msg(res != NULL, "%s: %s", sql, err.message);
	char *out = strdup(PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ? PQgetvalue(res, 0, 0) : "(null)");
	PQclear(res);
	return out;
}

static long q_long(PGconn *conn, const char *sql)
{
	char *t = q_text(conn, sql, 0, NULL);
	long v = atol(t);
	free(t);
	return v;
}

/* ---- the stack ---------------------------------------------------------------------------- */

struct env {
	struct tly_test_broker b;
	struct tly_test_db d;
	rd_kafka_t *rk; /* watermarks for quiescence */
	pid_t ledger, projector;
	char ledger_log[400], projector_log[400], dbset[600], kset[600];
};

static pid_t projector_spawn(struct env *e)
{
	return tly_test_projector_spawn(e->b.bootstraps, e->d.conninfo, e->projector_log);
}

static void env_up(struct env *e)
{
	char errstr[512];
	memset(e, 0, sizeof(*e));
	tly_test_broker_start(&e->b, 1, PARTITIONS);
	tly_test_db_up(&e->d, "check_rebuild");
	snprintf(e->ledger_log, sizeof(e->ledger_log), "%s/ledger.log", e->b.dir);
	snprintf(e->projector_log, sizeof(e->projector_log), "%s/projector.log", e->b.dir);
	snprintf(e->dbset, sizeof(e->dbset), "database.url=%s", e->d.conninfo);
	snprintf(e->kset, sizeof(e->kset), "kafka.bootstrap.servers=%s", e->b.bootstraps);
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert(tly_config_set(cfg, "kafka.bootstrap.servers", e->b.bootstraps, errstr, sizeof(errstr)) == 0);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(conf != NULL, "%s", errstr);
	e->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	ck_assert_msg(e->rk != NULL, "%s", errstr);
	e->ledger = tly_test_ledger_spawn(e->b.bootstraps, e->d.conninfo, "ledger-test", PARTITIONS,
					  e->ledger_log);
	e->projector = projector_spawn(e);
}

static void projector_stop(struct env *e)
{
	tly_test_projector_stop(e->projector, e->projector_log);
	e->projector = 0;
}

static void env_down(struct env *e)
{
	if (e->projector)
		projector_stop(e);
	tly_test_ledger_stop(e->ledger, e->ledger_log);
	rd_kafka_destroy(e->rk);
	tly_test_db_down(&e->d);
	tly_test_broker_stop(&e->b);
}

static pid_t loadgen_spawn(struct env *e, const char *seed, const char *events, const char *rate,
			   const char *log)
{
	char errstr[512];
	char *const argv[] = {(char *)tly_test_bin("tally-loadgen"), "--seed", (char *)seed, "--tenants",
			      "20", "--events", (char *)events, "--rate", (char *)rate, "--duplicates", "10",
			      "--bad", "2", "--step-ms", "3600000", "-s", e->kset, NULL};
	pid_t pid = tly_proc_spawn(argv, log, errstr, sizeof(errstr));
	ck_assert_msg(pid > 0, "could not start tally-loadgen: %s", errstr);
	return pid;
}

static void loadgen_wait(pid_t pid, const char *log)
{
	int status = 0;
	ck_assert_int_eq(tly_proc_wait(pid, 120000, &status), 0);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "tally-loadgen failed; see %s", log);
}

/*
 * Quiescence: the ledger has read every event, the projector every record of its three topics
 * and every tenant's last ledger entry, and the projections did not change over a second. The
 * ledger commits its offsets before it publishes the entries: with lag 0 alone, a ledger whose
 * publisher waited for a CPU over two looks would leave entries the projector applies after the
 * live digest (and a rebuild reads them from ledger_entries).
 */
static char *digest_all(PGconn *conn);

static void wait_quiescent(struct env *e)
{
	static const struct tly_lag_expect expect[] = {
		{"tally-ledger", "tally.events"},     {"tally-projector", "tally.events"},
		{"tally-projector", "tally.ledger"},  {"tally-projector", "tally.catalog"},
	};
	char errstr[512];
	char *prev = NULL;
	int64_t deadline = tly_clock_ms() + 120000;
	for (;;) {
		struct tly_lag_report report = {0};
		int rc = tly_lag_collect(e->d.conn, e->rk, expect, 4, 5000, &report, errstr, sizeof(errstr));
		ck_assert_msg(rc == 0, "%s", errstr);
		int64_t lag = tly_lag_total(&report, NULL, NULL);
		/* every expected topic listed: a consumer is in the report only once it stored an
		 * offset, and a projector still joining its group would look caught up (lag 0, its
		 * empty projections unchanged from one look to the next) */
		bool all = true;
		for (size_t i = 0; i < sizeof(expect) / sizeof(expect[0]); i++) {
			bool listed = false;
			for (size_t r = 0; r < report.count && !listed; r++)
				listed = strcmp(report.rows[r].consumer, expect[i].consumer) == 0 &&
					 strcmp(report.rows[r].topic, expect[i].topic) == 0;
			all &= listed;
		}
		tly_lag_report_free(&report);
		if (lag == 0 && all &&
		    q_long(e->d.conn, "SELECT count(*) FROM (SELECT tenant_id, max(seq) AS seq FROM "
				      "ledger_entries GROUP BY tenant_id) l WHERE NOT EXISTS (SELECT 1 FROM "
				      "projector_ledger_applied a WHERE a.tenant_id = l.tenant_id AND "
				      "a.seq >= l.seq)") == 0) {
			char *now = digest_all(e->d.conn);
			if (prev && strcmp(prev, now) == 0) {
				free(prev);
				free(now);
				return;
			}
			free(prev);
			prev = now;
		}
		ck_assert_msg(tly_clock_ms() < deadline, "no quiescence in 120 s (lag %lld); see %s and %s",
			      (long long)lag, e->projector_log, e->ledger_log);
		usleep(1000000);
	}
}

/* ---- snapshots ---------------------------------------------------------------------------- */

static char *digest_all(PGconn *conn)
{
	struct tly_pg_error err;
	char *d = tly_compare_digest(conn, &err);
	ck_assert_msg(d != NULL, "could not digest the projections: %s", err.message);
	return d;
}

/*
 * What a table is besides its rows: columns, indexes and constraints by name and definition,
 * owner, grants, row-level security flags and policies, storage parameters (the fill factors of
 * migrations/0011), the sequences its columns own.
 */
static char *signature(PGconn *conn)
{
	static const char sql[] =
		"SELECT string_agg(s, E'\\n' ORDER BY s) FROM ("
		"SELECT c.relname || ' owner ' || pg_get_userbyid(c.relowner) || ' acl ' || "
		"  coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(c.relacl) x), '') "
		"  || ' rls ' || c.relrowsecurity || c.relforcerowsecurity "
		"  || ' options ' || coalesce(array_to_string(c.reloptions, ','), '') AS s "
		"FROM pg_class c WHERE c.oid = ANY($1::regclass[]) "
		"UNION ALL SELECT c.relname || ' col ' || a.attname || ' ' || format_type(a.atttypid, "
		"  a.atttypmod) || ' ' || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') "
		"FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
		"  AND NOT a.attisdropped LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum "
		"WHERE c.oid = ANY($1::regclass[]) "
		"UNION ALL SELECT c.relname || ' index ' || pg_get_indexdef(i.indexrelid) FROM pg_index i "
		"  JOIN pg_class c ON c.oid = i.indrelid WHERE c.oid = ANY($1::regclass[]) "
		"UNION ALL SELECT c.relname || ' constraint ' || k.conname || ' ' || "
		"  pg_get_constraintdef(k.oid) || ' ' || k.convalidated FROM pg_constraint k "
		"  JOIN pg_class c ON c.oid = k.conrelid WHERE c.oid = ANY($1::regclass[]) "
		"UNION ALL SELECT p.tablename || ' policy ' || p.policyname || ' ' || p.permissive || ' ' || "
		"  p.roles::text || ' ' || p.cmd || ' ' || coalesce(p.qual, '') || ' ' || "
		"  coalesce(p.with_check, '') FROM pg_policies p WHERE p.tablename = ANY($2::text[]) "
		"UNION ALL SELECT c.relname || ' owns ' || d.objid::regclass::text FROM pg_depend d "
		"  JOIN pg_class c ON c.oid = d.refobjid WHERE d.refobjid = ANY($1::regclass[]) "
		"  AND d.classid = 'pg_class'::regclass AND d.deptype = 'a') x";
	char names[1024];
	size_t off = (size_t)snprintf(names, sizeof(names), "{");
	for (size_t i = 0; i < tly_fold_n_tables; i++)
		off += (size_t)snprintf(names + off, sizeof(names) - off, "%s%s", i ? "," : "",
					tly_fold_tables[i]);
	snprintf(names + off, sizeof(names) - off, "}");
	const char *const v[] = {names, names};
	return q_text(conn, sql, 2, v);
}

static void expect_same(const char *what, const char *want, const char *have)
{
	if (strcmp(want, have) == 0)
		return;
	/* name the first differing line */
	const char *w = want, *h = have;
	while (*w && *w == *h) {
		w++;
		h++;
	}
	while (w > want && w[-1] != '\n') {
		w--;
		h--;
	}
	ck_abort_msg("%s differs at:\n  want: %.300s\n  have: %.300s", what, w, h);
}

static void rebuild(struct env *e, const char *what)
{
	char out[8192];
	char *const argv[] = {(char *)tly_test_bin("tallyctl"), "-s", e->dbset, "-s", e->kset, "rebuild",
			      (char *)what, NULL};
	int rc = tly_proc_run(argv, out, sizeof(out));
	ck_assert_msg(rc == 0, "tallyctl rebuild %s exited %d: %s", what, rc, out);
	ck_assert_msg(strstr(out, "rebuilt ") != NULL, "%s", out);
}

static void expect_no_shadows(PGconn *conn)
{
	ck_assert_int_eq(q_long(conn, "SELECT count(*) FROM pg_class WHERE relname LIKE '%\\_rebuild' "
				      "AND relkind = 'r'"), 0);
}

/* ---- tests -------------------------------------------------------------------------------- */

/* An analyst of tenant A reads A's rows of the swapped tables and nothing of anyone else. */
static void check_analyst(struct env *e)
{
	struct tly_pg_error err;
	ck_assert_msg(tly_pg_exec(e->d.conn,
				  "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '" ANALYST "') "
				  "THEN BEGIN CREATE ROLE " ANALYST " LOGIN IN ROLE tally_analyst; "
				  "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END; END IF; END $$",
				  0, NULL, &err) == 0, "%s", err.message);
	char *tenant = q_text(e->d.conn, "SELECT tenant_id FROM agent_messages GROUP BY 1 ORDER BY count(*) DESC "
				       "LIMIT 1", 0, NULL);
	const char *const v[] = {tenant};
	char *mine = q_text(e->d.conn, "SELECT count(*) FROM agent_messages WHERE tenant_id = $1", 1, v);
	ck_assert_int_gt(atol(mine), 0);
	ck_assert_int_gt(q_long(e->d.conn, "SELECT count(DISTINCT tenant_id) FROM agent_messages"), 1);

	char conninfo[2048], errstr[512];
	snprintf(conninfo, sizeof(conninfo), "%s user='" ANALYST "'", e->d.conninfo);
	PGconn *a = tly_pg_connect(conninfo, "check_rebuild", errstr, sizeof(errstr));
	ck_assert_msg(a != NULL, "%s", errstr);
	ck_assert_int_eq(q_long(a, "SELECT count(*) FROM agent_messages"), 0); /* no tenant set */
	ck_assert(tly_pg_exec(a, "SELECT set_config('app.tenant_id', $1, false)", 1, v, &err) == 0);
	char *seen = q_text(a, "SELECT count(*) FROM agent_messages", 0, NULL);
	ck_assert_str_eq(seen, mine);
	static const char *const tenant_tables[] = {"users", "agent_conversations", "agent_messages",
						    "tenant_subscriptions", "subscription_invoices",
						    "subscription_usage", "token_balances", "api_usage"};
	for (size_t i = 0; i < sizeof(tenant_tables) / sizeof(tenant_tables[0]); i++) {
		char sql[256];
		snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s WHERE tenant_id <> $1", tenant_tables[i]);
		char *other = q_text(a, sql, 1, v);
		ck_assert_msg(strcmp(other, "0") == 0, "analyst reads %s rows of other tenants in %s", other,
			      tenant_tables[i]);
		free(other);
	}
	ck_assert_int_eq(q_long(a, "SELECT count(*) FROM tenant_accounts"), 1);
	/* the projector's own state stays closed to analysts */
	ck_assert(tly_pg_exec(a, "SELECT 1 FROM projector_seen_events LIMIT 1", 0, NULL, &err) != 0);
	ck_assert_str_eq(err.sqlstate, "42501");
	PQfinish(a);
	free(seen);
	free(mine);
	free(tenant);
}

START_TEST(rebuild_equals_live)
{
	struct env e;
	char log[500];
	env_up(&e);
	snprintf(log, sizeof(log), "%s/loadgen.log", e.b.dir);
	loadgen_wait(loadgen_spawn(&e, "11", "3000", "0", log), log);
	wait_quiescent(&e);
	ck_assert_int_gt(q_long(e.d.conn, "SELECT count(*) FROM subscription_invoices"), 0);
	char *live = digest_all(e.d.conn), *sig = signature(e.d.conn);
	char *seq = q_text(e.d.conn, "SELECT last_value FROM agent_messages_id_seq", 0, NULL);

	/* one table, then everything */
	rebuild(&e, "token_balances");
	char *after1 = digest_all(e.d.conn), *sig1 = signature(e.d.conn);
	expect_same("rows after rebuild token_balances", live, after1);
	expect_same("schema after rebuild token_balances", sig, sig1);
	rebuild(&e, "all");
	char *after = digest_all(e.d.conn), *sig2 = signature(e.d.conn);
	expect_same("rows after rebuild all", live, after);
	expect_same("schema after rebuild all", sig, sig2);
	expect_no_shadows(e.d.conn);
	/* the sequence went on: rebuilt ids are new, never reused */
	const char *const v[] = {seq};
	char *grown = q_text(e.d.conn, "SELECT last_value > $1::bigint FROM agent_messages_id_seq", 1, v);
	ck_assert_str_eq(grown, "t");
	check_analyst(&e);

	/* the projector goes on on the swapped tables: more traffic, and a rebuild still agrees */
	loadgen_wait(loadgen_spawn(&e, "12", "1000", "0", log), log);
	wait_quiescent(&e);
	char *live2 = digest_all(e.d.conn);
	rebuild(&e, "all");
	char *after2 = digest_all(e.d.conn);
	expect_same("rows after more traffic and rebuild all", live2, after2);
	free(live);
	free(sig);
	free(seq);
	free(after1);
	free(sig1);
	free(after);
	free(sig2);
	free(grown);
	free(live2);
	free(after2);
	env_down(&e);
}
END_TEST

START_TEST(rebuild_under_traffic)
{
	struct env e;
	char log[500];
	env_up(&e);
	snprintf(log, sizeof(log), "%s/loadgen.log", e.b.dir);
	pid_t lg = loadgen_spawn(&e, "21", "4000", "400", log);
	/* rebuilds while events flow and the projector commits batches */
	usleep(3000000);
	rebuild(&e, "all");
	rebuild(&e, "agent_conversations");
	loadgen_wait(lg, log);
	wait_quiescent(&e);
	char *live = digest_all(e.d.conn);
	rebuild(&e, "all");
	char *after = digest_all(e.d.conn);
	expect_same("rows after rebuilds under traffic, then a rebuild at quiescence", live, after);
	ck_assert_int_gt(q_long(e.d.conn, "SELECT count(*) FROM agent_messages"), 100);
	expect_no_shadows(e.d.conn);
	free(live);
	free(after);
	env_down(&e);
}
END_TEST

START_TEST(kill_projector_then_rebuild)
{
	struct env e;
	char log[500];
	env_up(&e);
	snprintf(log, sizeof(log), "%s/loadgen.log", e.b.dir);
	pid_t lg = loadgen_spawn(&e, "31", "4000", "500", log);
	/* kill -9 in the middle of the traffic, twice, once it has committed something */
	for (int i = 0; i < 2; i++) {
		int64_t deadline = tly_clock_ms() + 30000;
		long base = q_long(e.d.conn, "SELECT count(*) FROM projector_seen_events");
		while (q_long(e.d.conn, "SELECT count(*) FROM projector_seen_events") <= base + 200 &&
		       tly_clock_ms() < deadline)
			usleep(50000);
		ck_assert_int_eq(kill(e.projector, SIGKILL), 0);
		int status = 0;
		ck_assert_int_eq(tly_proc_wait(e.projector, 10000, &status), 0);
		ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
		e.projector = projector_spawn(&e);
	}
	loadgen_wait(lg, log);
	wait_quiescent(&e);
	char *live = digest_all(e.d.conn);
	rebuild(&e, "all");
	char *after = digest_all(e.d.conn);
	expect_same("rows after kill -9 and restart vs a rebuild", live, after);
	free(live);
	free(after);
	env_down(&e);
}
END_TEST

START_TEST(rebuild_usage_errors)
{
	char out[4096];
	char *const argv[] = {(char *)tly_test_bin("tallyctl"), "rebuild", "no_such_table", NULL};
	int rc = tly_proc_run(argv, out, sizeof(out));
	ck_assert_int_eq(rc, 2);
	ck_assert_msg(strstr(out, "unknown projection \"no_such_table\"") != NULL, "%s", out);
	char *const argv2[] = {(char *)tly_test_bin("tallyctl"), "rebuild", NULL};
	ck_assert_int_eq(tly_proc_run(argv2, out, sizeof(out)), 2);
}
END_TEST

Suite *rebuild_suite(void)
{
	Suite *s = suite_create("rebuild");
	TCase *tc = tcase_create("cli");
	tcase_add_test(tc, rebuild_usage_errors);
	suite_add_tcase(s, tc);
	tc = tcase_create("stack");
	tcase_add_test(tc, rebuild_equals_live);
	tcase_add_test(tc, rebuild_under_traffic);
	tcase_add_test(tc, kill_projector_then_rebuild);
	tcase_set_timeout(tc, 300);
	suite_add_tcase(s, tc);
	return s;
}
