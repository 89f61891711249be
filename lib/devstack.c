/* The dev stack of tally-chaos and tally-soak: PostgreSQL, a migrated database, a dev broker. */
#include "devstack.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "devbroker_ctl.h"
#include "devpg.h"
#include "migrate.h"
#include "pg.h"
#include "proc.h"

#define BROKER_START_MS 15000
#define MAX_EXTRA 32

int tly_devstack_new_db(struct tly_devstack *s, const char *dbname, char *out, size_t outlen,
			char *errstr, size_t errlen)
{
	struct tly_pg_error pe;
	int rc = TLY_E_PG;
	PGconn *conn = tly_pg_connect(tly_devpg_conninfo(s->pg), "tally-devstack", errstr, errlen);
	if (!conn)
		return TLY_E_PG;
	char *ident = PQescapeIdentifier(conn, dbname, strlen(dbname));
	char sql[256];
	if (!ident) {
		snprintf(errstr, errlen, "could not quote database name \"%s\"", dbname);
		PQfinish(conn);
		return TLY_E_PG;
	}
	snprintf(sql, sizeof(sql), "CREATE DATABASE %s", ident);
	PQfreemem(ident);
	int exec = tly_pg_exec_script(conn, sql, &pe);
	PQfinish(conn);
	if (exec != 0) {
		snprintf(errstr, errlen, "could not create database \"%s\": %s", dbname, pe.message);
		return TLY_E_PG;
	}
	snprintf(out, outlen, "host=%s port=%d user=postgres dbname=%s", tly_devpg_dir(s->pg),
		 tly_devpg_port(s->pg), dbname);
	struct tly_migrate_set *set = tly_migrate_load_embedded(errstr, errlen);
	if (!set)
		return TLY_E_PG;
	if ((conn = tly_pg_connect(out, "tally-devstack", errstr, errlen)) != NULL &&
	    tly_migrate_up(conn, set, NULL, errstr, errlen) == 0)
		rc = 0;
	PQfinish(conn);
	tly_migrate_free(set);
	return rc;
}

static int broker_start(struct tly_devstack *s, int brokers, int partitions, char *errstr,
			size_t errlen)
{
	char exe[PATH_MAX], boot[128], log[128], nb[16], np[16], reply[TLY_DEVBROKER_LINE_MAX + 1];
	tly_proc_sibling("tally-devbroker", exe, sizeof(exe));
	snprintf(boot, sizeof(boot), "%s/bootstrap", s->dir);
	snprintf(log, sizeof(log), "%s/devbroker.log", s->dir);
	snprintf(s->ctl_path, sizeof(s->ctl_path), "%s/ctl.sock", s->dir);
	snprintf(nb, sizeof(nb), "%d", brokers);
	snprintf(np, sizeof(np), "%d", partitions);
	char *argv[] = {exe, "--brokers", nb, "--partitions", np, "--bootstrap-file", boot,
			"--control", s->ctl_path, NULL};
	if ((s->broker = tly_proc_spawn(argv, log, errstr, errlen)) < 0)
		return TLY_E_IO;
	if (tly_proc_wait_file(boot, BROKER_START_MS) != 0) {
		snprintf(errstr, errlen, "tally-devbroker did not write \"%s\" (see %s)", boot, log);
		return TLY_E_IO;
	}
	FILE *f = fopen(boot, "r");
	bool got = f && fgets(s->bootstraps, sizeof(s->bootstraps), f) != NULL;
	if (f)
		fclose(f);
	if (!got) {
		snprintf(errstr, errlen, "could not read \"%s\"", boot);
		return TLY_E_IO;
	}
	s->bootstraps[strcspn(s->bootstraps, "\r\n")] = '\0';
	/* the socket listens before the file is written; still, allow for a slow start */
	for (int waited = 0; waited < BROKER_START_MS; waited += 20) {
		if (tly_devbroker_ctl(s->ctl_path, "ping", reply, sizeof(reply)) == 0)
			return 0;
		usleep(20000);
	}
	snprintf(errstr, errlen, "tally-devbroker does not answer on \"%s\": %s", s->ctl_path, reply);
	return TLY_E_IO;
}

int tly_devstack_start(struct tly_devstack *s, const char *dbname, int brokers, int partitions,
		       bool durable, char *errstr, size_t errlen)
{
	memset(s, 0, sizeof(*s));
	s->broker = -1;
	snprintf(s->dir, sizeof(s->dir), "/tmp/tally-stack-XXXXXX");
	if (!mkdtemp(s->dir)) {
		snprintf(errstr, errlen, "could not create temp dir: %s", strerror(errno));
		s->dir[0] = '\0';
		return TLY_E_IO;
	}
	if (!(s->pg = tly_devpg_start_durable(NULL, durable, errstr, errlen))) {
		tly_devstack_stop(s, false);
		return TLY_E_PG;
	}
	int rc = tly_devstack_new_db(s, dbname, s->db, sizeof(s->db), errstr, errlen);
	if (rc == 0)
		rc = broker_start(s, brokers, partitions, errstr, errlen);
	if (rc != 0)
		tly_devstack_stop(s, false);
	return rc;
}

pid_t tly_devstack_spawn(const struct tly_devstack *s, const char *program, const char *db,
			 const char *const *extra, const char *log_name, char *errstr, size_t errlen)
{
	char exe[PATH_MAX], dbset[1100], kset[600], log[PATH_MAX];
	char *argv[8 + MAX_EXTRA + 1];
	int n = 0;
	tly_proc_sibling(program, exe, sizeof(exe));
	snprintf(dbset, sizeof(dbset), "database.url=%s", db);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", s->bootstraps);
	snprintf(log, sizeof(log), "%s/%s", s->dir, log_name);
	argv[n++] = exe;
	argv[n++] = "-s";
	argv[n++] = dbset;
	argv[n++] = "-s";
	argv[n++] = kset;
	argv[n++] = "-s";
	argv[n++] = "http.listen=127.0.0.1:0"; /* never collide with another daemon */
	for (int i = 0; extra && extra[i]; i++) {
		if (i == MAX_EXTRA) {
			snprintf(errstr, errlen, "more than %d arguments for %s", MAX_EXTRA, program);
			return -1;
		}
		argv[n++] = (char *)extra[i];
	}
	argv[n] = NULL;
	return tly_proc_spawn(argv, log, errstr, errlen);
}

void tly_devstack_stop(struct tly_devstack *s, bool keep_dir)
{
	if (s->broker > 0)
		(void)tly_proc_stop(s->broker, 5000);
	s->broker = -1;
	tly_devpg_stop(s->pg);
	s->pg = NULL;
	if (s->dir[0] && !keep_dir) {
		char *rm[] = {"rm", "-rf", s->dir, NULL};
		if (tly_proc_run(rm, NULL, 0) != 0)
			fprintf(stderr, "could not remove \"%s\"\n", s->dir);
	}
	s->dir[0] = '\0';
}
