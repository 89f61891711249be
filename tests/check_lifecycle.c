/*
 * The daemons' lifecycle through the real tally-ledger and tally-projector: start-up checks that
 * fail fast with one line, SIGINT and SIGTERM (drain, commit, leave the group, exit 0), SIGHUP
 * (log.level reloaded; a bad reload keeps the running one).
 */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "pg.h"
#include "proc.h"
#include "suites.h"

#define PARTITIONS 3

struct env {
	struct tly_test_broker b;
	struct tly_test_db db;
	char log[400];
	char cfg[400];
};

static void env_up(struct env *e)
{
	tly_test_broker_start(&e->b, 1, PARTITIONS);
	tly_test_db_up(&e->db, "check_lifecycle");
	snprintf(e->log, sizeof(e->log), "%s/daemon.log", e->b.dir);
	snprintf(e->cfg, sizeof(e->cfg), "%s/daemon.conf", e->b.dir);
}

static void env_down(struct env *e)
{
	tly_test_db_down(&e->db);
	tly_test_broker_stop(&e->b);
}

/* Start program on the env's broker and db (or on db when not NULL) with extra "-s"/"-c" args. */
static pid_t daemon_spawn(const struct env *e, const char *program, const char *db,
			  char *const *extra, int nextra)
{
	char errstr[512], dbset[600], kset[600], pset[64];
	char *argv[32];
	int n = 0;
	snprintf(dbset, sizeof(dbset), "database.url=%s", db ? db : e->db.conninfo);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", e->b.bootstraps);
	snprintf(pset, sizeof(pset), "topics.partitions=%d", PARTITIONS);
	argv[n++] = (char *)tly_test_bin(program);
	char *const fixed[] = {"-s", dbset, "-s", kset, "-s", pset, "-s", "kafka.heartbeat.interval.ms=1000",
			       "-s", "ledger.batch.max.ms=20"};
	for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++)
		argv[n++] = fixed[i];
	for (int i = 0; i < nextra && n < 31; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	pid_t pid = tly_proc_spawn(argv, e->log, errstr, sizeof(errstr));
	ck_assert_msg(pid > 0, "could not start %s: %s", program, errstr);
	return pid;
}

/* Publish events messages of seeded synthetic traffic to the env's broker. */
static void loadgen(const struct env *e, const char *seed, const char *events)
{
	char kset[600], out[4096];
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", e->b.bootstraps);
	char *const argv[] = {(char *)tly_test_bin("tally-loadgen"), "--seed", (char *)seed, "--tenants",
			      "6", "--events", (char *)events, "-s", kset, NULL};
	int rc = tly_proc_run(argv, out, sizeof(out));
	ck_assert_msg(rc == 0, "tally-loadgen failed (%d): %s", rc, out);
}

static long q_long(PGconn *conn, const char *sql)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, 0, NULL, &err);
	ck_assert_msg(res != NULL, "%s: %s", sql, err.message);
	long v = strtol(PQgetvalue(res, 0, 0), NULL, 10);
	PQclear(res);
	return v;
}

static void exec_sql(PGconn *conn, const char *sql)
{
	struct tly_pg_error err;
	ck_assert_msg(tly_pg_exec(conn, sql, 0, NULL, &err) == 0, "%s: %s", sql, err.message);
}

static void write_config(const struct env *e, const char *text)
{
	FILE *f = fopen(e->cfg, "w");
	ck_assert_ptr_nonnull(f);
	ck_assert(fputs(text, f) != EOF);
	ck_assert_int_eq(fclose(f), 0);
}

/* ---- start-up checks ------------------------------------------------------------------------ */

/*
 * program refuses to start: exit 1 within 30 s, and exactly one error line of its own (librdkafka's
 * lines aside), holding expected.
 */
static void refuses(const struct env *e, const char *program, const char *db, char *const *extra,
		    int nextra, const char *expected)
{
	FILE *f = fopen(e->log, "w");
	ck_assert_ptr_nonnull(f);
	fclose(f);
	pid_t pid = daemon_spawn(e, program, db, extra, nextra);
	int status;
	if (tly_proc_wait(pid, 30000, &status) != 0) {
		tly_proc_stop(pid, 5000);
		ck_abort_msg("%s did not fail fast (%s); see %s", program, expected, e->log);
	}
	char *log = tly_test_read_file(e->log);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 1, "%s: status %d\n%s", program, status, log);
	ck_assert_msg(tly_test_log_lines(e->log, "level=error", "component=rdkafka") == 1,
		      "%s: not exactly one error line\n%s", program, log);
	ck_assert_msg(tly_test_log_lines(e->log, expected, NULL) == 1 &&
		      tly_test_log_lines(e->log, expected, "level=error") == 0,
		      "%s: no error line \"%s\"\n%s", program, expected, log);
	free(log);
}

START_TEST(test_startup_checks)
{
	struct env e;
	env_up(&e);
	static const char *const programs[] = {"tally-ledger", "tally-projector"};
	const char *unreachable = "host=/nonexistent/tally port=1 user=postgres dbname=none connect_timeout=2";
	char *behind = tly_test_pg_fresh_db();
	struct tly_test_db old;
	tly_test_db_up(&old, "check_lifecycle");
	exec_sql(old.conn, "DELETE FROM schema_migrations WHERE version = "
			   "(SELECT max(version) FROM schema_migrations)");
	char *no_events[] = {"-s", "topics.events=tally.nothere"};
	char *no_catalog[] = {"-s", "topics.catalog=tally.nothere"};
	for (int i = 0; i < 2; i++) {
		refuses(&e, programs[i], unreachable, NULL, 0, "msg=\"could not start: PostgreSQL is unreachable\"");
		refuses(&e, programs[i], behind, NULL, 0, "msg=\"could not start: the database schema is not at head\"");
		refuses(&e, programs[i], old.conninfo, NULL, 0,
			"msg=\"could not start: the database schema is not at head\"");
		refuses(&e, programs[i], NULL, i == 0 ? no_events : no_catalog, 2,
			"msg=\"could not start: a topic is missing\"");
	}
	/* the ledger was built with 12 partitions; the topic has 3 */
	exec_sql(e.db.conn, "INSERT INTO topic_partitions (topic, partition_count) VALUES ('tally.events', 12)");
	refuses(&e, "tally-ledger", NULL, NULL, 0, "msg=\"could not start: the partition count changed\"");
	tly_test_db_down(&old);
	free(behind);
	env_down(&e);
}
END_TEST

/* ---- SIGINT and SIGTERM --------------------------------------------------------------------- */

static long stored(const struct env *e, const char *consumer)
{
	char sql[256];
	snprintf(sql, sizeof(sql), "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
				   "WHERE consumer = '%s' AND topic = 'tally.events'", consumer);
	return q_long(e->db.conn, sql);
}

/* Wait until consumer's stored offsets on tally.events reach at least n. */
static void wait_stored(const struct env *e, const char *consumer, long n)
{
	for (int waited = 0; stored(e, consumer) < n; waited += 100) {
		ck_assert_msg(waited < 30000, "%s stored %ld of %ld offsets; see %s", consumer,
			      stored(e, consumer), n, e->log);
		usleep(100000);
	}
}

/* Partitions a process owns by its log: assigned minus revoked. */
static int owned(const char *log)
{
	return tly_test_log_count(log, "msg=\"partition assigned\"") -
	       tly_test_log_count(log, "msg=\"partition revoked\"");
}

/*
 * How long the dev broker (librdkafka's mock cluster) holds each rebalance round before it answers
 * the members' JoinGroup: session.timeout.ms less one second, 5 s with lib/kafka.c's 6 s. A member
 * joining a cooperative-sticky group takes two rounds (the owner revokes, then the newcomer gets
 * what was revoked): 10.0 s from the second daemon's spawn to its first partition, measured on an
 * idle machine, for both daemons. Extra rounds come from the mock coordinator: it ends the sync
 * step on the leader's SyncGroup and refuses a follower's that arrives after it, and the refused
 * member rejoins, which starts one more round (seen in about a quarter of the rounds that hand out
 * partitions on a loaded machine; check_ledger.c's group test measured it). Waits are counted in
 * rounds, as there.
 */
#define REBALANCE_ROUND_MS 5000
#define JOIN_WAIT_MS (9 * REBALANCE_ROUND_MS) /* two rounds, start-up, up to six lost syncs */
/* a member alone in the group (the first to join, or the one left): no follower's sync to lose */
#define ALONE_WAIT_MS (6 * REBALANCE_ROUND_MS)

/*
 * sig while records flow, with a second member in the group: the open batch commits, the process
 * leaves the group and exits 0, and the second member is handed every partition at once (a
 * member that did not leave would keep them until its session, 45 s by default, timed out),
 * carrying on with no record applied twice.
 */
static void drain_on(int sig, const char *program, const char *stopping, int total)
{
	struct env e;
	env_up(&e);
	char log_a[400], log_b[300];
	snprintf(log_a, sizeof(log_a), "%s", e.log);
	snprintf(log_b, sizeof(log_b), "%s/second.log", e.b.dir);
	pid_t a = daemon_spawn(&e, program, NULL, NULL, 0);
	tly_test_wait_log(log_a, "msg=\"partition assigned\"", total, ALONE_WAIT_MS);
	snprintf(e.log, sizeof(e.log), "%s", log_b);
	pid_t b = daemon_spawn(&e, program, NULL, NULL, 0);
	tly_test_wait_log(log_b, "msg=\"partition assigned\"", 1, JOIN_WAIT_MS);
	tly_test_wait_log(log_a, "msg=\"partition revoked\"", 1, JOIN_WAIT_MS);
	loadgen(&e, "5", "400");
	wait_stored(&e, program, 1);

	ck_assert_int_eq(kill(a, sig), 0);
	int status;
	ck_assert_msg(tly_proc_wait(a, 20000, &status) == 0, "%s did not exit on signal %d", program, sig);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s: status %d; see %s", program,
		      status, log_a);
	ck_assert_int_eq(tly_test_log_count(log_a, stopping), 1);
	ck_assert_int_eq(tly_test_log_lines(log_a, "level=error", NULL), 0);
	ck_assert_int_eq(tly_test_log_lines(log_a, "lost=true", NULL), 0);
	/* cooperative rebalancing: B is assigned what A gave up, and owns everything */
	for (int waited = 0; owned(log_b) < total; waited += 100) {
		ck_assert_msg(waited < ALONE_WAIT_MS, "%s B owns %d of %d partitions %d s after A left; see %s",
			      program, owned(log_b), total, ALONE_WAIT_MS / 1000, log_b);
		usleep(100000);
	}

	loadgen(&e, "6", "200");
	wait_stored(&e, program, 600); /* 600 messages, a clock tick being one record per partition */
	if (strcmp(program, "tally-ledger") == 0) {
		/* nothing A committed was applied again: no duplicate entries (the traffic has none) */
		ck_assert_int_eq(q_long(e.db.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'duplicate'"), 0);
		ck_assert_int_gt(q_long(e.db.conn, "SELECT count(*) FROM ledger_entries"), 0);
	}
	ck_assert_int_eq(kill(b, SIGTERM), 0);
	ck_assert_msg(tly_proc_wait(b, 20000, &status) == 0 && WIFEXITED(status) &&
		      WEXITSTATUS(status) == 0, "%s did not exit 0 on SIGTERM; see %s", program, log_b);
	env_down(&e);
}

START_TEST(test_ledger_sigint)
{
	drain_on(SIGINT, "tally-ledger", "msg=\"stopping: committing open batches\"", PARTITIONS);
}
END_TEST

START_TEST(test_projector_sigint)
{
	drain_on(SIGINT, "tally-projector", "msg=\"stopping: committing the open batch\"", 3 * PARTITIONS);
}
END_TEST

START_TEST(test_projector_sigterm)
{
	drain_on(SIGTERM, "tally-projector", "msg=\"stopping: committing the open batch\"", 3 * PARTITIONS);
}
END_TEST

/*
 * The harness's stop right after the spawn: it waits until the daemon has started (its handlers
 * are in place), so the SIGTERM drains and exits 0 instead of killing it (status 15).
 */
START_TEST(test_stop_at_once)
{
	struct env e;
	env_up(&e);
	for (int i = 0; i < 3; i++) {
		pid_t ledger = tly_test_ledger_spawn(e.b.bootstraps, e.db.conninfo, "lifecycle-test",
						     PARTITIONS, e.log);
		tly_test_ledger_stop(ledger, e.log);
		pid_t projector = tly_test_projector_spawn(e.b.bootstraps, e.db.conninfo, e.log);
		tly_test_projector_stop(projector, e.log);
	}
	env_down(&e);
}
END_TEST

/* ---- SIGHUP ----------------------------------------------------------------------------------- */

/*
 * log.level from the config file, reloaded on SIGHUP: debug shows the per-commit debug line; a
 * bad file is refused with the reason and debug stays; info again hides the line.
 */
static void reload_on_hup(const char *program, const char *debug_line)
{
	struct env e;
	env_up(&e);
	write_config(&e, "log.level = info\n");
	char *extra[] = {"-c", e.cfg};
	pid_t pid = daemon_spawn(&e, program, NULL, extra, 2);
	tly_test_wait_log(e.log, "msg=\"partition assigned\"", PARTITIONS, ALONE_WAIT_MS);
	loadgen(&e, "7", "100");
	wait_stored(&e, program, 100);
	ck_assert_int_eq(tly_test_log_count(e.log, debug_line), 0);

	write_config(&e, "log.level = debug\n");
	ck_assert_int_eq(kill(pid, SIGHUP), 0);
	tly_test_wait_log(e.log, "msg=\"configuration reloaded\" log_level=debug", 1, 10000);
	loadgen(&e, "8", "100");
	tly_test_wait_log(e.log, debug_line, 1, 20000);

	write_config(&e, "log.level = loud\n");
	ck_assert_int_eq(kill(pid, SIGHUP), 0);
	tly_test_wait_log(e.log, "msg=\"could not reload the configuration, keeping the running one\"", 1, 10000);
	ck_assert_msg(tly_test_log_lines(e.log, "could not reload the configuration", "log_level=debug") == 0 &&
		      tly_test_log_lines(e.log, "could not reload the configuration", "loud") == 0,
		      "the refused reload does not name the bad value and the kept level; see %s", e.log);
	int before = tly_test_log_count(e.log, debug_line);
	loadgen(&e, "9", "100");
	tly_test_wait_log(e.log, debug_line, before + 1, 20000);

	unlink(e.cfg);
	ck_assert_int_eq(kill(pid, SIGHUP), 0);
	tly_test_wait_log(e.log, "msg=\"could not reload the configuration, keeping the running one\"", 2, 10000);

	write_config(&e, "log.level = info\n");
	ck_assert_int_eq(kill(pid, SIGHUP), 0);
	tly_test_wait_log(e.log, "msg=\"configuration reloaded\" log_level=info", 1, 10000);
	long at = stored(&e, program);
	before = tly_test_log_count(e.log, debug_line);
	loadgen(&e, "10", "100");
	wait_stored(&e, program, at + 1);
	usleep(500000);
	ck_assert_int_eq(tly_test_log_count(e.log, debug_line), before);

	ck_assert_int_eq(kill(pid, SIGTERM), 0);
	int status;
	ck_assert_msg(tly_proc_wait(pid, 20000, &status) == 0 && WIFEXITED(status) &&
		      WEXITSTATUS(status) == 0, "%s did not exit 0; see %s", program, e.log);
	env_down(&e);
}

START_TEST(test_ledger_sighup)
{
	reload_on_hup("tally-ledger", "msg=\"group committed\"");
}
END_TEST

START_TEST(test_projector_sighup)
{
	reload_on_hup("tally-projector", "msg=\"batch committed\"");
}
END_TEST

/* Every program answers --help with its usage on stdout and exit 0, and refuses an unknown option. */
START_TEST(test_help)
{
	static const char *const programs[] = {"tallyctl", "tally-ledger", "tally-projector",
					       "tally-loadgen", "tally-devbroker", "tally-bench",
					       "tally-bench-publish", "tally-bench-projector", "tally-tests"};
	char out[16384];
	for (size_t i = 0; i < sizeof(programs) / sizeof(programs[0]); i++) {
		char *const help[] = {(char *)tly_test_bin(programs[i]), "--help", NULL};
		ck_assert_msg(tly_proc_run(help, out, sizeof(out)) == 0, "%s --help: %s", programs[i], out);
		ck_assert_msg(strncmp(out, "Usage: ", 7) == 0, "%s --help: %s", programs[i], out);
		char *const bad[] = {(char *)tly_test_bin(programs[i]), "--no-such-option", NULL};
		ck_assert_msg(tly_proc_run(bad, out, sizeof(out)) == 2, "%s accepted an unknown option: %s",
			      programs[i], out);
	}
}
END_TEST

/*
 * tally-bench refuses a dev broker it could not start (--partitions outside 1..1000, no broker)
 * with exit 2 and the option named, before it starts PostgreSQL or a broker.
 */
START_TEST(test_bench_topology_arguments)
{
	static const char *const bad[][3] = {
		{"--partitions", "0", "tally-bench: --partitions must be 1..1000, not 0"},
		{"--partitions", "1001", "tally-bench: --partitions must be 1..1000, not 1001"},
		{"--brokers", "0", "tally-bench: --brokers must be 1..32, not 0"},
	};
	char out[16384];
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char *const argv[] = {(char *)tly_test_bin("tally-bench"), (char *)bad[i][0],
				      (char *)bad[i][1], NULL};
		ck_assert_msg(tly_proc_run(argv, out, sizeof(out)) == 2, "tally-bench %s %s: %s", bad[i][0],
			      bad[i][1], out);
		ck_assert_msg(strstr(out, bad[i][2]) != NULL, "tally-bench %s %s: %s", bad[i][0], bad[i][1], out);
		ck_assert_msg(strstr(out, "PostgreSQL 15 with") == NULL, "tally-bench %s %s started: %s",
			      bad[i][0], bad[i][1], out);
	}
}
END_TEST

Suite *lifecycle_suite(void)
{
	Suite *s = suite_create("lifecycle");
	TCase *tc = tcase_create("lifecycle");
	tcase_set_timeout(tc, 195);
	tcase_add_test(tc, test_help);
	tcase_add_test(tc, test_bench_topology_arguments);
	tcase_add_test(tc, test_startup_checks);
	tcase_add_test(tc, test_ledger_sigint);
	tcase_add_test(tc, test_projector_sigint);
	tcase_add_test(tc, test_projector_sigterm);
	tcase_add_test(tc, test_ledger_sighup);
	tcase_add_test(tc, test_projector_sighup);
	suite_add_tcase(s, tc);
	TCase *stop = tcase_create("stop"); /* CK_RUN_CASE=stop: the harness's stop alone */
	tcase_set_timeout(stop, 195);
	tcase_add_test(stop, test_stop_at_once);
	suite_add_tcase(s, stop);
	return s;
}
