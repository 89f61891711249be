/* PostgreSQL connections and statements for every program: connect, run, classify, report. */
#ifndef TLY_PG_H
#define TLY_PG_H

#include <stddef.h>

#include <signal.h>
#include <stdbool.h>

#include <libpq-fe.h>

#include "err.h"

/*
 * What a failed statement leaves behind: the class a caller switches on and one log-ready line.
 * Filled by every helper below that takes one (err may be NULL when the caller does not care).
 */
struct tly_pg_error {
	enum tly_errclass errclass; /* retriable, permanent or fatal (see tly_pg_errclass) */
	char sqlstate[6];           /* five-character SQLSTATE; "" when there is none (connection lost) */
	char message[512];          /* 'relation "x" does not exist (SQLSTATE 42P01)', one line */
};

/*
 * Connect with conninfo (a "key=value" string or a postgresql:// URI), set application_name, pin
 * search_path to "public", TimeZone to UTC and client_encoding to UTF8, and refuse servers older
 * than PostgreSQL 15. Returns a ready connection (caller owns it, PQfinish) or NULL with errstr
 * filled. After a failure whose class is retriable and PQstatus(conn) == CONNECTION_BAD, close the
 * connection and connect again.
 */
PGconn *tly_pg_connect(const char *conninfo, const char *application_name, char *errstr,
		       size_t errlen);

/*
 * Make *conn a working connection: keep it when it is, else reconnect with backoff (100 ms
 * doubling to 5 s) until it works or *stop is set (then -1). waiting(ud), when not NULL, is called
 * before each wait (a daemon's heartbeat); each failure is logged with its reason.
 */
int tly_pg_reconnect(PGconn **conn, const char *conninfo, const char *application_name,
		     volatile sig_atomic_t *stop, void (*waiting)(void *ud), void *ud) TLY_MUST_CHECK;

/*
 * A health check: reconnect *conn once if it is not working, then tly_pg_ping it. True when the
 * database answered; a failure is logged with its reason (no retry loop: the caller asks again).
 */
bool tly_pg_check(PGconn **conn, const char *conninfo, const char *application_name);

/* tly_pg_connect with search_path pinned to schema (an identifier, quoted here) instead of public. */
PGconn *tly_pg_connect_schema(const char *conninfo, const char *application_name,
			      const char *schema, char *errstr, size_t errlen);

/*
 * Class of a SQLSTATE: retriable for connection failures (class 08), serialization failures and
 * deadlocks (40001, 40P01, 40003), shutdown and crash (57P01..57P03), idle timeouts (57P05,
 * 25P03), lock timeouts (55P03), cancellations (57014) and resource shortages (class 53);
 * permanent for bad data (class 22, 23); fatal for the rest (missing relations, syntax,
 * permissions…). NULL or "" is retriable: libpq reports a lost connection without a SQLSTATE.
 */
enum tly_errclass tly_pg_sqlstate_errclass(const char *sqlstate);

/* Class of a failed result (by its SQLSTATE); NULL (no result at all) is retriable. */
enum tly_errclass tly_pg_errclass(const PGresult *res);

/*
 * One line describing the failure of res (or, when res is NULL or carries no message, of conn) in
 * PostgreSQL's style: the primary message, its detail, and "(SQLSTATE xxxxx)". conn may be NULL.
 */
void tly_pg_errtext(const PGconn *conn, const PGresult *res, char *buf, size_t len);

/* Fill err (when not NULL) from a failed res and conn: class, SQLSTATE and message. */
void tly_pg_error_set(struct tly_pg_error *err, const PGconn *conn, const PGresult *res);

/*
 * Run a parameterised statement (text parameters, text results; values[i] NULL is SQL NULL) and
 * return its result when its status is PGRES_COMMAND_OK or PGRES_TUPLES_OK (caller PQclears).
 * Otherwise clear it, fill err and return NULL.
 */
PGresult *tly_pg_query(PGconn *conn, const char *sql, int nparams, const char *const *values,
		       struct tly_pg_error *err);

/*
 * tly_pg_query with PQexecParams's full form: lengths and formats (1 = binary, e.g. bytea) per
 * parameter (either may be NULL), and result_format (0 text, 1 binary).
 */
PGresult *tly_pg_query_params(PGconn *conn, const char *sql, int nparams,
			      const char *const *values, const int *lengths, const int *formats,
			      int result_format, struct tly_pg_error *err);

/* Run a parameterised statement whose rows are not needed; 0 or TLY_E_PG with err filled. */
int tly_pg_exec(PGconn *conn, const char *sql, int nparams, const char *const *values,
		struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * Run SQL text made of one or more statements with no parameters (migration files, DDL written in
 * the code); 0 or TLY_E_PG. Never pass text that contains values: use tly_pg_exec for those.
 */
int tly_pg_exec_script(PGconn *conn, const char *sql, struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * Run n statements with no parameters (whose rows are not needed) in one pipeline: sent together,
 * one round trip, in order. 0, or TLY_E_PG with err of the first that failed (the ones after it
 * are skipped; inside a transaction block, the transaction is then aborted).
 */
int tly_pg_exec_pipeline(PGconn *conn, const char *const *sqls, size_t n,
			 struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * tly_pg_exec_pipeline in two halves, so that the caller works while the server executes.
 * send enters pipeline mode and sends the n statements and a sync without waiting for a result:
 * *rc and the result are 0 or TLY_E_PG (err filled); unless PQpipelineStatus says the connection
 * did not enter pipeline mode, poll follows either way. poll reads the results that have arrived
 * (wait: every one, blocking): 0 while the sync's result has not arrived, 1 once it has been read
 * and pipeline mode left; *rc keeps TLY_E_PG from the first statement that failed (err filled).
 * A result that says ROLLBACK (a COMMIT of an aborted transaction) fails too.
 */
int tly_pg_pipeline_send(PGconn *conn, const char *const *sqls, size_t n, int *rc,
			 struct tly_pg_error *err) TLY_MUST_CHECK;
int tly_pg_pipeline_poll(PGconn *conn, bool wait, int *rc, struct tly_pg_error *err);

/* BEGIN / COMMIT / ROLLBACK; 0 or TLY_E_PG. A COMMIT the server turns into a ROLLBACK fails. */
int tly_pg_begin(PGconn *conn, struct tly_pg_error *err) TLY_MUST_CHECK;
int tly_pg_commit(PGconn *conn, struct tly_pg_error *err) TLY_MUST_CHECK;
int tly_pg_rollback(PGconn *conn, struct tly_pg_error *err) TLY_MUST_CHECK;

/* "SELECT 1": 0 when the connection works (readiness probes), else TLY_E_PG. */
int tly_pg_ping(PGconn *conn, struct tly_pg_error *err) TLY_MUST_CHECK;

/* A named statement that a module prepares once per connection (tly_pg_prepare). */
struct tly_pg_stmt {
	const char *name; /* unique among every set prepared on one connection */
	const char *sql;
};

/*
 * Prepare the n statements of set (a static table: it names the set) on conn unless conn has
 * them already: a libpq event procedure keeps, per connection, the sets prepared on it, so a new
 * connection (or one reset) prepares them again. The parameter types are inferred from the
 * statements. 0, or TLY_E_PG / TLY_E_NOMEM with err filled (the set counts as not prepared and
 * a later call prepares what is missing again).
 */
int tly_pg_prepare(PGconn *conn, const struct tly_pg_stmt *set, size_t n,
		   struct tly_pg_error *err) TLY_MUST_CHECK;

/* tly_pg_query_params of the statement prepared as name (tly_pg_prepare). */
PGresult *tly_pg_query_prepared(PGconn *conn, const char *name, int nparams,
				const char *const *values, const int *lengths, const int *formats,
				int result_format, struct tly_pg_error *err);

/* Whether set was prepared on conn by tly_pg_prepare (and the connection not reset since). */
bool tly_pg_prepared(const PGconn *conn, const struct tly_pg_stmt *set);

#endif
