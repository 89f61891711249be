/* Harness pieces for suites that run the real tally-ledger: a migrated database and the process. */
#include "harness.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

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

pid_t tly_test_ledger_spawn(const char *bootstraps, const char *db, const char *group, int partitions,
			    const char *log)
{
	char errstr[512], dbset[600], kset[600], gset[128], pset[64];
	snprintf(dbset, sizeof(dbset), "database.url=%s", db);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", bootstraps);
	snprintf(gset, sizeof(gset), "ledger.group.id=%s", group);
	snprintf(pset, sizeof(pset), "topics.partitions=%d", partitions);
	char *const argv[] = {(char *)tly_test_bin("tally-ledger"), "-s", dbset, "-s", kset, "-s", gset,
			      "-s", pset, "-s", "ledger.batch.max.ms=20",
			      "-s", "kafka.heartbeat.interval.ms=1000", NULL};
	pid_t pid = tly_proc_spawn(argv, log, errstr, sizeof(errstr));
	ck_assert_msg(pid > 0, "could not start tally-ledger: %s", errstr);
	return pid;
}

void tly_test_ledger_stop(pid_t pid, const char *log)
{
	int status = tly_proc_stop(pid, 20000);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "tally-ledger did not exit 0 on SIGTERM (status %d); see %s", status, log);
}

pid_t tly_test_projector_spawn(const char *bootstraps, const char *db, const char *log)
{
	char errstr[512], dbset[600], kset[600];
	snprintf(dbset, sizeof(dbset), "database.url=%s", db);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", bootstraps);
	char *const argv[] = {(char *)tly_test_bin("tally-projector"), "-s", dbset, "-s", kset,
			      "-s", "projector.group.id=projector-test",
			      "-s", "kafka.heartbeat.interval.ms=1000", NULL};
	pid_t pid = tly_proc_spawn(argv, log, errstr, sizeof(errstr));
	ck_assert_msg(pid > 0, "could not start tally-projector: %s", errstr);
	return pid;
}

void tly_test_projector_stop(pid_t pid, const char *log)
{
	int status = tly_proc_stop(pid, 20000);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "tally-projector did not exit 0 on SIGTERM (status %d); see %s", status, log);
}
