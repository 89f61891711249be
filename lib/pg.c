/* PostgreSQL connections and statements: libpq boilerplate written once for the whole project. */
#include "pg.h"

#include <libpq-events.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

/* Oldest server Tally supports (PostgreSQL 15). */
#define TLY_PG_MIN_SERVER_VERSION 150000

/* Copy src into buf as one line: newlines and tabs become spaces, trailing blanks are dropped. */
static void copy_one_line(char *buf, size_t len, const char *src)
{
	size_t n = 0;
	if (len == 0)
		return;
	for (; src && *src && n + 1 < len; src++) {
		char c = *src;
		if (c == '\n' || c == '\r' || c == '\t')
			c = ' ';
		if (c == ' ' && (n == 0 || buf[n - 1] == ' '))
			continue;
		buf[n++] = c;
	}
	while (n > 0 && buf[n - 1] == ' ')
		n--;
	buf[n] = '\0';
}

enum tly_errclass tly_pg_sqlstate_errclass(const char *sqlstate)
{
	if (!sqlstate || strlen(sqlstate) != 5)
		return TLY_ERRCLASS_RETRIABLE;
	static const char *const retriable[] = {
		"40001", /* serialization_failure */
		"40P01", /* deadlock_detected */
		"40003", /* statement_completion_unknown */
		"55P03", /* lock_not_available */
		"57014", /* query_canceled (statement_timeout) */
		"57P01", /* admin_shutdown */
		"57P02", /* crash_shutdown */
		"57P03", /* cannot_connect_now */
		"57P05", /* idle_session_timeout */
		"25P03", /* idle_in_transaction_session_timeout */
	};
	for (size_t i = 0; i < sizeof(retriable) / sizeof(retriable[0]); i++) {
		if (strcmp(sqlstate, retriable[i]) == 0)
			return TLY_ERRCLASS_RETRIABLE;
	}
	if (strncmp(sqlstate, "08", 2) == 0 || strncmp(sqlstate, "53", 2) == 0)
		return TLY_ERRCLASS_RETRIABLE;
	/* TL001: tally-ledger's compare-and-set found a moved offset (migration 0013) */
	if (strncmp(sqlstate, "22", 2) == 0 || strncmp(sqlstate, "23", 2) == 0 ||
	    strcmp(sqlstate, "TL001") == 0)
		return TLY_ERRCLASS_PERMANENT;
	return TLY_ERRCLASS_FATAL;
}

enum tly_errclass tly_pg_errclass(const PGresult *res)
{
	if (!res)
		return TLY_ERRCLASS_RETRIABLE;
	return tly_pg_sqlstate_errclass(PQresultErrorField(res, PG_DIAG_SQLSTATE));
}

void tly_pg_errtext(const PGconn *conn, const PGresult *res, char *buf, size_t len)
{
	const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
	const char *detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
	const char *sqlstate = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	char line[512];

	if (len == 0)
		return;
	if (primary) {
		copy_one_line(line, sizeof(line), primary);
	} else {
		const char *text = res ? PQresultErrorMessage(res) : "";
		if (!*text && conn)
			text = PQerrorMessage(conn);
		if (!*text && res)
			text = PQresStatus(PQresultStatus(res));
		copy_one_line(line, sizeof(line), *text ? text : "unknown error");
	}
	if (detail) {
		char d[256];
		copy_one_line(d, sizeof(d), detail);
		if (sqlstate)
			snprintf(buf, len, "%s; %s (SQLSTATE %s)", line, d, sqlstate);
		else
			snprintf(buf, len, "%s; %s", line, d);
	} else if (sqlstate) {
		snprintf(buf, len, "%s (SQLSTATE %s)", line, sqlstate);
	} else {
		snprintf(buf, len, "%s", line);
	}
}

void tly_pg_error_set(struct tly_pg_error *err, const PGconn *conn, const PGresult *res)
{
	if (!err)
		return;
	const char *sqlstate = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	snprintf(err->sqlstate, sizeof(err->sqlstate), "%s", sqlstate ? sqlstate : "");
	err->errclass = tly_pg_sqlstate_errclass(sqlstate);
	tly_pg_errtext(conn, res, err->message, sizeof(err->message));
}

/* res when the statement succeeded; else NULL with err filled and res cleared. */
static PGresult *succeeded(PGconn *conn, PGresult *res, struct tly_pg_error *err)
{
	ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
	if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
		return res;
	tly_pg_error_set(err, conn, res);
	PQclear(res);
	return NULL;
}

PGresult *tly_pg_query_params(PGconn *conn, const char *sql, int nparams,
			      const char *const *values, const int *lengths, const int *formats,
			      int result_format, struct tly_pg_error *err)
{
	return succeeded(conn, PQexecParams(conn, sql, nparams, NULL, values, lengths, formats,
					    result_format),
			 err);
}

PGresult *tly_pg_query(PGconn *conn, const char *sql, int nparams, const char *const *values,
		       struct tly_pg_error *err)
{
	return tly_pg_query_params(conn, sql, nparams, values, NULL, NULL, 0, err);
}

int tly_pg_exec(PGconn *conn, const char *sql, int nparams, const char *const *values,
		struct tly_pg_error *err)
{
	PGresult *res = tly_pg_query(conn, sql, nparams, values, err);
	if (!res)
		return TLY_E_PG;
	PQclear(res);
	return 0;
}

int tly_pg_pipeline_send(PGconn *conn, const char *const *sqls, size_t n, int *rc,
			 struct tly_pg_error *err)
{
	*rc = 0;
	if (PQenterPipelineMode(conn) != 1) {
		tly_pg_error_set(err, conn, NULL);
		return *rc = TLY_E_PG;
	}
	for (size_t i = 0; *rc == 0 && i < n; i++)
		if (PQsendQueryParams(conn, sqls[i], 0, NULL, NULL, NULL, NULL, 0) != 1)
			*rc = TLY_E_PG;
	if (PQpipelineSync(conn) != 1)
		*rc = TLY_E_PG;
	if (*rc != 0)
		tly_pg_error_set(err, conn, NULL);
	return *rc;
}

int tly_pg_pipeline_poll(PGconn *conn, bool wait, int *rc, struct tly_pg_error *err)
{
	if (!wait && PQstatus(conn) == CONNECTION_OK && PQconsumeInput(conn) != 1 && *rc == 0) {
		tly_pg_error_set(err, conn, NULL);
		*rc = TLY_E_PG;
	}
	/* every result up to the sync's: a NULL ends each statement's results */
	while (PQstatus(conn) == CONNECTION_OK) {
		if (!wait && PQisBusy(conn))
			return 0;
		PGresult *res = PQgetResult(conn);
		if (!res)
			continue;
		ExecStatusType st = PQresultStatus(res);
		bool rolled_back = st == PGRES_COMMAND_OK && strcmp(PQcmdStatus(res), "ROLLBACK") == 0;
		if (((st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_PIPELINE_SYNC) ||
		     rolled_back) && *rc == 0) {
			tly_pg_error_set(err, conn, res);
			if (rolled_back)
				snprintf(err->message, sizeof(err->message),
					 "the transaction was rolled back");
			*rc = TLY_E_PG;
		}
		PQclear(res);
		if (st == PGRES_PIPELINE_SYNC)
			break;
	}
	if (PQexitPipelineMode(conn) != 1 && *rc == 0) {
		tly_pg_error_set(err, conn, NULL);
		*rc = TLY_E_PG;
	}
	return 1;
}

int tly_pg_exec_pipeline(PGconn *conn, const char *const *sqls, size_t n, struct tly_pg_error *err)
{
	int rc = 0;
	if (n == 0)
		return 0;
	if (tly_pg_pipeline_send(conn, sqls, n, &rc, err) != 0 && !PQpipelineStatus(conn))
		return rc; /* not in pipeline mode: nothing to read */
	tly_pg_pipeline_poll(conn, true, &rc, err);
	return rc;
}

int tly_pg_exec_script(PGconn *conn, const char *sql, struct tly_pg_error *err)
{
	PGresult *res = PQexec(conn, sql);
	ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
	int rc = 0;
	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
		tly_pg_error_set(err, conn, res);
		rc = TLY_E_PG;
	}
	PQclear(res);
	return rc;
}

int tly_pg_begin(PGconn *conn, struct tly_pg_error *err)
{
	return tly_pg_exec(conn, "BEGIN", 0, NULL, err);
}

int tly_pg_commit(PGconn *conn, struct tly_pg_error *err)
{
	PGresult *res = tly_pg_query(conn, "COMMIT", 0, NULL, err);
	if (!res)
		return TLY_E_PG;
	int rc = 0;
	/* COMMIT of a failed transaction "succeeds" with the tag ROLLBACK: nothing was committed. */
	if (strcmp(PQcmdStatus(res), "ROLLBACK") == 0) {
		if (err) {
			err->errclass = TLY_ERRCLASS_FATAL;
			snprintf(err->sqlstate, sizeof(err->sqlstate), "25P02");
			snprintf(err->message, sizeof(err->message),
				 "transaction was rolled back instead of committed (SQLSTATE 25P02)");
		}
		rc = TLY_E_PG;
	}
	PQclear(res);
	return rc;
}

int tly_pg_rollback(PGconn *conn, struct tly_pg_error *err)
{
	return tly_pg_exec(conn, "ROLLBACK", 0, NULL, err);
}

int tly_pg_ping(PGconn *conn, struct tly_pg_error *err)
{
	return tly_pg_exec(conn, "SELECT 1", 0, NULL, err);
}

/* Server notices go to our log (NOTICE and below at debug), not to libpq's stderr printer. */
static void notice_receiver(void *arg, const PGresult *res)
{
	(void)arg;
	const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
	char text[512];
	tly_pg_errtext(NULL, res, text, sizeof(text));
	if (severity && strcmp(severity, "WARNING") == 0)
		tly_warn("PostgreSQL warning", "reason=\"%s\"", text);
	else
		tly_debug("PostgreSQL notice", "reason=\"%s\"", text);
}

/* A schema name that needs no quoting in search_path: [a-z_][a-z0-9_]*. */
static bool plain_identifier(const char *s)
{
	if (!*s || !((*s >= 'a' && *s <= 'z') || *s == '_'))
		return false;
	for (; *s; s++) {
		if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
			return false;
	}
	return true;
}

PGconn *tly_pg_connect_schema(const char *conninfo, const char *application_name,
			      const char *schema, char *errstr, size_t errlen)
{
	const char *const keys[] = {"dbname", "application_name", "client_encoding", NULL};
	const char *const vals[] = {conninfo, application_name ? application_name : "tally",
				    "UTF8", NULL};
	char *quoted = NULL;
	struct tly_pg_error err;
	PGconn *conn = PQconnectdbParams(keys, vals, 1);

	if (!conn) {
		snprintf(errstr, errlen, "could not connect to PostgreSQL: out of memory");
		goto fail;
	}
	if (PQstatus(conn) != CONNECTION_OK) {
		char line[400];
		copy_one_line(line, sizeof(line), PQerrorMessage(conn));
		snprintf(errstr, errlen, "could not connect to PostgreSQL: %s", line);
		goto fail;
	}
	if (PQserverVersion(conn) < TLY_PG_MIN_SERVER_VERSION) {
		snprintf(errstr, errlen,
			 "could not use PostgreSQL server: version %d is older than 15",
			 PQserverVersion(conn));
		goto fail;
	}
	PQsetNoticeReceiver(conn, notice_receiver, NULL);
	quoted = plain_identifier(schema) ? NULL : PQescapeIdentifier(conn, schema, strlen(schema));
	if (!quoted && !plain_identifier(schema)) {
		char line[400];
		copy_one_line(line, sizeof(line), PQerrorMessage(conn));
		snprintf(errstr, errlen, "could not quote schema name \"%s\": %s", schema, line);
		goto fail;
	}
	const char *const params[] = {quoted ? quoted : schema};
	if (tly_pg_exec(conn,
			"SELECT pg_catalog.set_config('search_path', $1, false), "
			"pg_catalog.set_config('TimeZone', 'UTC', false)",
			1, params, &err) != 0) {
		snprintf(errstr, errlen, "could not pin search_path to \"%s\": %s", schema,
			 err.message);
		goto fail;
	}
	PQfreemem(quoted);
	return conn;
fail:
	PQfreemem(quoted);
	PQfinish(conn);
	return NULL;
}

PGconn *tly_pg_connect(const char *conninfo, const char *application_name, char *errstr,
		       size_t errlen)
{
	return tly_pg_connect_schema(conninfo, application_name, "public", errstr, errlen);
}

int tly_pg_reconnect(PGconn **conn, const char *conninfo, const char *application_name,
		     volatile sig_atomic_t *stop, void (*waiting)(void *ud), void *ud)
{
	char errstr[512];
	int backoff_ms = 100;
	while (!*conn || PQstatus(*conn) != CONNECTION_OK) {
		PQfinish(*conn);
		if ((*conn = tly_pg_connect(conninfo, application_name, errstr, sizeof(errstr))))
			break;
		if (waiting)
			waiting(ud);
		tly_warn("could not reconnect to PostgreSQL, retrying", "reason=\"%s\" backoff_ms=%d",
			 errstr, backoff_ms);
		if (*stop)
			return -1;
		struct timespec ts = {backoff_ms / 1000, (long)(backoff_ms % 1000) * 1000000L};
		nanosleep(&ts, NULL);
		backoff_ms = backoff_ms * 2 > 5000 ? 5000 : backoff_ms * 2;
	}
	return 0;
}

bool tly_pg_check(PGconn **conn, const char *conninfo, const char *application_name)
{
	char errstr[512];
	struct tly_pg_error err;
	if (!*conn || PQstatus(*conn) != CONNECTION_OK) {
		PGconn *fresh = tly_pg_connect(conninfo, application_name, errstr, sizeof(errstr));
		if (!fresh) {
			tly_warn("PostgreSQL is unreachable", "reason=\"%s\"", errstr);
			return false;
		}
		PQfinish(*conn);
		*conn = fresh;
	}
	if (tly_pg_ping(*conn, &err) != 0) {
		tly_warn("PostgreSQL did not answer the health check", "reason=\"%s\"", err.message);
		return false;
	}
	return true;
}

/* ---- statements prepared once per connection ---------------------------------------------- */

#define PREPARED_SETS_MAX 8

/* The sets prepared on one connection: libpq instance data of prepared_events, freed with it. */
struct prepared_sets {
	const struct tly_pg_stmt *set[PREPARED_SETS_MAX];
	size_t n;
};

/* A reset connection is a new session (nothing prepared); a destroyed one frees its list. */
static int prepared_events(PGEventId id, void *info, void *passthrough)
{
	(void)passthrough;
	if (id == PGEVT_CONNRESET || id == PGEVT_CONNDESTROY) {
		const PGconn *conn = id == PGEVT_CONNRESET ? ((PGEventConnReset *)info)->conn
							   : ((PGEventConnDestroy *)info)->conn;
		struct prepared_sets *sets = PQinstanceData(conn, prepared_events);
		if (sets && id == PGEVT_CONNRESET)
			sets->n = 0;
		else if (sets)
			free(sets);
	}
	return 1;
}

bool tly_pg_prepared(const PGconn *conn, const struct tly_pg_stmt *set)
{
	const struct prepared_sets *sets = PQinstanceData(conn, prepared_events);
	for (size_t i = 0; sets && i < sets->n; i++)
		if (sets->set[i] == set)
			return true;
	return false;
}

static void prepare_failed(struct tly_pg_error *err, const char *reason)
{
	if (!err)
		return;
	err->errclass = TLY_ERRCLASS_FATAL;
	err->sqlstate[0] = '\0';
	snprintf(err->message, sizeof(err->message), "could not prepare statements: %s", reason);
}

int tly_pg_prepare(PGconn *conn, const struct tly_pg_stmt *set, size_t n, struct tly_pg_error *err)
{
	if (tly_pg_prepared(conn, set))
		return 0;
	struct prepared_sets *sets = PQinstanceData(conn, prepared_events);
	if (!sets) {
		sets = calloc(1, sizeof(*sets));
		if (!sets || PQregisterEventProc(conn, prepared_events, "tly_pg_prepare", NULL) != 1 ||
		    PQsetInstanceData(conn, prepared_events, sets) != 1) {
			free(sets);
			prepare_failed(err, "out of memory");
			return TLY_E_NOMEM;
		}
	}
	if (sets->n == PREPARED_SETS_MAX) {
		prepare_failed(err, "too many statement sets on one connection");
		return TLY_E_PG;
	}
	for (size_t i = 0; i < n; i++) {
		PGresult *res = PQprepare(conn, set[i].name, set[i].sql, 0, NULL);
		const char *sqlstate = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
		/* 42P05: prepared by an earlier call that failed on a later statement of the set */
		if (PQresultStatus(res) != PGRES_COMMAND_OK &&
		    !(sqlstate && strcmp(sqlstate, "42P05") == 0)) {
			tly_pg_error_set(err, conn, res);
			PQclear(res);
			return TLY_E_PG;
		}
		PQclear(res);
	}
	sets->set[sets->n++] = set;
	return 0;
}

PGresult *tly_pg_query_prepared(PGconn *conn, const char *name, int nparams,
				const char *const *values, const int *lengths, const int *formats,
				int result_format, struct tly_pg_error *err)
{
	return succeeded(conn,
			 PQexecPrepared(conn, name, nparams, values, lengths, formats, result_format),
			 err);
}
