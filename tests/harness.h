/*
 * Test harness: the services integration tests need, started by the harness itself.
 *
 * PostgreSQL: one throw-away PostgreSQL 15 cluster per test run (initdb as a non-root user,
 * --no-sync, unix socket in a temp dir, free port), started by the runner before any integration
 * suite and removed after. Each test takes a fresh, empty database from it.
 *
 * Broker: one tally-devbroker process per test that needs one (faults are per broker).
 */
#ifndef TLY_TEST_HARNESS_H
#define TLY_TEST_HARNESS_H

#include <sys/types.h>

#include <libpq-fe.h>

/* Runner only: start / stop the run's PostgreSQL cluster. Aborts the run if it cannot start. */
void tly_test_pg_start(void);
void tly_test_pg_stop(void);

/*
 * A new empty database on the run's cluster; returns its conninfo string (malloc'd, caller frees).
 * Fails the current test if it cannot be created.
 */
char *tly_test_pg_fresh_db(void);

/* The run's cluster: the conninfo of its maintenance database (owned by the harness). */
const char *tly_test_pg_admin_conninfo(void);

struct tly_test_broker {
	pid_t pid;
	char dir[256];         /* temp dir holding the files below; removed on stop */
	char bootstraps[512];  /* "127.0.0.1:port,…" */
	char ctl_path[300];    /* control socket (see lib/devbroker_ctl.h) */
	char bootstrap_file[300];
	char log_path[300];
};

/* Start a tally-devbroker with the given broker and partition counts; fails the test on error. */
void tly_test_broker_start(struct tly_test_broker *b, int brokers, int partitions);
/* SIGTERM it and check it exits 0; remove its dir. */
void tly_test_broker_stop(struct tly_test_broker *b);

/* A fresh database migrated to head, and a connection to it (both owned by the caller). */
struct tly_test_db {
	char *conninfo;
	PGconn *conn;
};
void tly_test_db_up(struct tly_test_db *d, const char *application_name);
void tly_test_db_down(struct tly_test_db *d);

/*
 * Start the real tally-ledger on db in consumer group `group` against a dev broker with
 * `partitions` partitions, logging to log; short batches and one-second heartbeats keep the tests
 * quick. Fails the test if it cannot start.
 */
pid_t tly_test_ledger_spawn(const char *bootstraps, const char *db, const char *group, int partitions,
			    const char *log);

/*
 * SIGTERM the ledger once it has logged that it started (its handlers are in place; up to 30 s)
 * and check it exits 0 (else fail the test, naming its log).
 */
void tly_test_ledger_stop(pid_t pid, const char *log);

/* Start the real tally-projector (group projector-test, one-second heartbeats) logging to log. */
pid_t tly_test_projector_spawn(const char *bootstraps, const char *db, const char *log);

/* The same for the projector. */
void tly_test_projector_stop(pid_t pid, const char *log);

/* The whole file at path (malloc'd, caller frees); "" when it cannot be opened. */
char *tly_test_read_file(const char *path);
/* Occurrences of needle in the file at path (0 when it cannot be opened). */
int tly_test_log_count(const char *path, const char *needle);
/* Lines of the file at path holding needle and not without (NULL: no exclusion). */
int tly_test_log_lines(const char *path, const char *needle, const char *without);
/* Wait until the file at path holds needle at least count times; fails the test after timeout_ms. */
void tly_test_wait_log(const char *path, const char *needle, int count, int timeout_ms);
/*
 * The first column of the first row of a parameterised query as a number (-1 for no row or
 * NULL); fails the test if the query fails.
 */
long tly_test_q_long(PGconn *conn, const char *sql, int n, const char *const *values);

/* Path of a built program ("tallyctl"), from $TALLY_BIN (set by make check) or build/bin. */
const char *tly_test_bin(const char *program);

#endif
