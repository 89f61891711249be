/* Harness pieces for suites that run the real tally-ledger: a migrated database and the process. */
#include "harness.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "migrate.h"
#include "pg.h"
#include "proc.h"

void tly_test_db_up(struct tly_test_db *d, const char *application_name)
{
	char errstr[1024];
	int applied = 0;
	d->conninfo = tly_test_pg_fresh_db();
	d->conn = tly_pg_connect(d->conninfo, application_name, errstr, sizeof(errstr));
	ck_assert_msg(d->conn != NULL, "%s", errstr);
	struct tly_migrate_set *set = tly_migrate_load_embedded(errstr, sizeof(errstr));
	ck_assert_msg(set && tly_migrate_up(d->conn, set, &applied, errstr, sizeof(errstr)) == 0,
		      "%s", errstr);
	tly_migrate_free(set);
}

long tly_test_q_long(PGconn *conn, const char *sql, int n, const char *const *values)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, n, values, &err);
	ck_assert_msg(res != NULL, "%s: %s", sql, err.message);
	long x = PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ? atol(PQgetvalue(res, 0, 0)) : -1;
	PQclear(res);
	return x;
}

void tly_test_db_down(struct tly_test_db *d)
{
	PQfinish(d->conn);
	free(d->conninfo);
	memset(d, 0, sizeof(*d));
}

/*
 * A daemon handles SIGTERM once it has installed its handlers, which it does before its start-up
 * and so before its "<program> started" line: a SIGTERM earlier kills it (status 15). A stop waits
 * for that line first (or for the process to end), in the log it was spawned with (a test may
 * name another at the stop). Logs are appended to by every run a test makes, so each spawn notes
 * how many such lines its log held before.
 */
#define STARTED_WAIT_MS 30000
static struct {
	pid_t pid;
	int before; /* "<program> started" lines in its log before it was spawned */
	char log[512];
} spawned[32];
static unsigned n_spawned;

static pid_t spawn_noted(char *const argv[], const char *program, const char *log)
{
	char errstr[512], needle[64];
	snprintf(needle, sizeof(needle), "msg=\"%s started\"", program);
	int before = tly_test_log_count(log, needle);
	pid_t pid = tly_proc_spawn(argv, log, errstr, sizeof(errstr));
	ck_assert_msg(pid > 0, "could not start %s: %s", program, errstr);
	spawned[n_spawned % 32].pid = pid;
	spawned[n_spawned % 32].before = before;
	snprintf(spawned[n_spawned % 32].log, sizeof(spawned[0].log), "%s", log);
	n_spawned++;
	return pid;
}

/* SIGTERM pid once it has logged that it started (or has ended); its exit status. */
static int stop_started(pid_t pid, const char *program, const char *log)
{
	char needle[64];
	snprintf(needle, sizeof(needle), "msg=\"%s started\"", program);
	int before = 0;
	for (unsigned i = 0; i < 32; i++) {
		if (spawned[i].pid == pid) {
			before = spawned[i].before;
			log = spawned[i].log;
		}
	}
	for (int waited = 0; tly_test_log_count(log, needle) <= before && tly_proc_alive(pid);
	     waited += 50) {
		if (waited >= STARTED_WAIT_MS) {
			tly_proc_stop(pid, 20000);
			ck_abort_msg("%s (pid %d) did not log that it started within %d s, so it may not "
				     "handle SIGTERM yet: killed it; see %s", program, (int)pid,
				     STARTED_WAIT_MS / 1000, log);
		}
		usleep(50000);
	}
	return tly_proc_stop(pid, 20000);
}

pid_t tly_test_ledger_spawn(const char *bootstraps, const char *db, const char *group, int partitions,
			    const char *log)
{
	char dbset[600], kset[600], gset[128], pset[64];
	snprintf(dbset, sizeof(dbset), "database.url=%s", db);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", bootstraps);
	snprintf(gset, sizeof(gset), "ledger.group.id=%s", group);
	snprintf(pset, sizeof(pset), "topics.partitions=%d", partitions);
	char *const argv[] = {(char *)tly_test_bin("tally-ledger"), "-s", dbset, "-s", kset, "-s", gset,
			      "-s", pset, "-s", "ledger.batch.max.ms=20",
			      "-s", "kafka.heartbeat.interval.ms=1000", NULL};
	return spawn_noted(argv, "tally-ledger", log);
}

void tly_test_ledger_stop(pid_t pid, const char *log)
{
	int status = stop_started(pid, "tally-ledger", log);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "tally-ledger did not exit 0 on SIGTERM (status %d); see %s", status, log);
}

pid_t tly_test_projector_spawn(const char *bootstraps, const char *db, const char *log)
{
	char dbset[600], kset[600];
	snprintf(dbset, sizeof(dbset), "database.url=%s", db);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", bootstraps);
	char *const argv[] = {(char *)tly_test_bin("tally-projector"), "-s", dbset, "-s", kset,
			      "-s", "projector.group.id=projector-test",
			      "-s", "kafka.heartbeat.interval.ms=1000", NULL};
	return spawn_noted(argv, "tally-projector", log);
}

void tly_test_projector_stop(pid_t pid, const char *log)
{
	int status = stop_started(pid, "tally-projector", log);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "tally-projector did not exit 0 on SIGTERM (status %d); see %s", status, log);
}
