/* The test run's throw-away PostgreSQL cluster and the fresh databases tests take from it. */
#include "harness.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "devpg.h"
#include "pg.h"

static struct tly_devpg *run_pg;     /* started by the runner; NULL when TALLY_TEST_PG was given */
static char *run_conninfo;           /* admin conninfo, also exported as TALLY_TEST_PG */
static pid_t run_owner;              /* the runner's pid: forked test children never stop it */
static unsigned fresh_counter;

void tly_test_pg_start(void)
{
	char errstr[1024];
	const char *given = getenv("TALLY_TEST_PG");

	if (run_conninfo)
		return;
	run_owner = getpid();
	if (given && *given) {
		/* An operator's cluster: used as is, never removed. */
		run_conninfo = strdup(given);
	} else {
		run_pg = tly_devpg_start(NULL, errstr, sizeof(errstr));
		if (!run_pg) {
			fprintf(stderr, "tally-tests: could not start the test PostgreSQL cluster: %s\n",
				errstr);
			exit(EXIT_FAILURE);
		}
		run_conninfo = strdup(tly_devpg_conninfo(run_pg));
		if (run_conninfo)
			setenv("TALLY_TEST_PG", run_conninfo, 1);
	}
	if (!run_conninfo) {
		fprintf(stderr, "tally-tests: out of memory\n");
		exit(EXIT_FAILURE);
	}
}

void tly_test_pg_stop(void)
{
	if (getpid() != run_owner)
		return;
	if (run_pg)
		unsetenv("TALLY_TEST_PG");
	tly_devpg_stop(run_pg);
	run_pg = NULL;
	free(run_conninfo);
	run_conninfo = NULL;
}

const char *tly_test_pg_admin_conninfo(void)
{
	if (!run_conninfo) {
		const char *env = getenv("TALLY_TEST_PG");
		ck_assert_msg(env && *env, "no test PostgreSQL: the runner did not call tly_test_pg_start");
		return env;
	}
	return run_conninfo;
}

/* admin (key=value or URI) with dbname replaced, as a key='value' string (malloc'd), or NULL. */
static char *with_dbname(const char *admin, const char *dbname)
{
	char *errmsg = NULL;
	PQconninfoOption *opts = PQconninfoParse(admin, &errmsg);
	char *out = NULL;
	size_t cap = 0, used = 0;
	FILE *f = NULL;

	if (!opts)
		goto done;
	f = open_memstream(&out, &cap);
	if (!f)
		goto done;
	for (PQconninfoOption *o = opts; o->keyword; o++) {
		const char *v = strcmp(o->keyword, "dbname") == 0 ? dbname : o->val;
		if (!v)
			continue;
		fprintf(f, "%s%s='", used++ ? " " : "", o->keyword);
		for (; *v; v++) {
			if (*v == '\'' || *v == '\\')
				fputc('\\', f);
			fputc(*v, f);
		}
		fputc('\'', f);
	}
	if (fclose(f) != 0) {
		free(out);
		out = NULL;
	}
done:
	PQfreemem(errmsg);
	PQconninfoFree(opts);
	return out;
}

char *tly_test_pg_fresh_db(void)
{
	const char *admin = tly_test_pg_admin_conninfo();
	char errstr[1024], name[64];
	uint32_t rnd = 0;
	struct tly_pg_error err;

	if (getrandom(&rnd, sizeof(rnd), 0) != sizeof(rnd))
		rnd = (uint32_t)rand();
	snprintf(name, sizeof(name), "tly_test_%ld_%u_%08x", (long)getpid(), ++fresh_counter, rnd);

	PGconn *conn = tly_pg_connect(admin, "tally-tests", errstr, sizeof(errstr));
	if (!conn)
		ck_abort_msg("could not create test database: %s", errstr);
	/* An identifier cannot be a parameter: quote it (the name is ours, made of [a-z0-9_]). */
	char *ident = PQescapeIdentifier(conn, name, strlen(name));
	char sql[128];
	snprintf(sql, sizeof(sql), "CREATE DATABASE %s", ident ? ident : name);
	PQfreemem(ident);
	int rc = tly_pg_exec(conn, sql, 0, NULL, &err);
	PQfinish(conn);
	if (rc != 0)
		ck_abort_msg("could not create test database \"%s\": %s", name, err.message);

	char *conninfo = with_dbname(admin, name);
	ck_assert_msg(conninfo != NULL, "could not build conninfo for test database \"%s\"", name);
	return conninfo;
}
