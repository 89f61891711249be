/* Binary COPY payloads: PostgreSQL's "binary format" of COPY, built in one growable buffer. */
#include "pgcopy.h"

#include "codec.h" /* struct tly_buf */

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define PG_EPOCH_US (946684800LL * 1000000) /* 2000-01-01, PostgreSQL's timestamp epoch */

static const unsigned char HEADER[19] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', 0xFF, '\r', '\n', 0,
					 0, 0, 0, 0, /* flags */ 0, 0, 0, 0 /* extension length */};

struct tly_pgcopy {
	struct tly_buf out; /* the COPY data so far, header first */
	size_t rows;
	bool oom;
};

static void put(struct tly_pgcopy *c, const void *p, size_t n)
{
	if (!c->oom && tly_buf_append(&c->out, p, n) != 0)
		c->oom = true;
}

static void put_be(struct tly_pgcopy *c, uint64_t v, int bytes)
{
	unsigned char b[8];
	for (int i = 0; i < bytes; i++)
		b[i] = (unsigned char)(v >> (8 * (bytes - 1 - i)));
	put(c, b, (size_t)bytes);
}

struct tly_pgcopy *tly_pgcopy_new(void)
{
	struct tly_pgcopy *c = calloc(1, sizeof(*c));
	if (c)
		tly_pgcopy_reset(c);
	return c;
}

void tly_pgcopy_free(struct tly_pgcopy *c)
{
	if (!c)
		return;
	free(c->out.data);
	free(c);
}

void tly_pgcopy_reset(struct tly_pgcopy *c)
{
	c->out.len = 0;
	c->rows = 0;
	c->oom = false;
	put(c, HEADER, sizeof(HEADER));
}

size_t tly_pgcopy_rows(const struct tly_pgcopy *c)
{
	return c->rows;
}

int tly_pgcopy_reserve(struct tly_pgcopy *c, size_t bytes)
{
	if (bytes > SIZE_MAX - c->out.len)
		return TLY_E_NOMEM;
	return tly_buf_reserve(&c->out, c->out.len + bytes);
}

void tly_pgcopy_row(struct tly_pgcopy *c, int nfields)
{
	put_be(c, (uint16_t)nfields, 2);
	c->rows++;
}

void tly_pgcopy_null(struct tly_pgcopy *c)
{
	put_be(c, UINT32_MAX, 4); /* length -1 */
}

void tly_pgcopy_bool(struct tly_pgcopy *c, bool v)
{
	put_be(c, 1, 4);
	put(c, v ? "\x01" : "\x00", 1);
}

void tly_pgcopy_int4(struct tly_pgcopy *c, int32_t v)
{
	put_be(c, 4, 4);
	put_be(c, (uint32_t)v, 4);
}

void tly_pgcopy_int8(struct tly_pgcopy *c, int64_t v)
{
	put_be(c, 8, 4);
	put_be(c, (uint64_t)v, 8);
}

void tly_pgcopy_bytea(struct tly_pgcopy *c, const void *p, size_t len)
{
	put_be(c, (uint32_t)len, 4);
	put(c, p, len);
}

void tly_pgcopy_text(struct tly_pgcopy *c, const char *s)
{
	if (!s)
		tly_pgcopy_null(c);
	else
		tly_pgcopy_bytea(c, s, strlen(s));
}

void tly_pgcopy_uuid(struct tly_pgcopy *c, const tly_uuid *u)
{
	tly_pgcopy_bytea(c, u->b, 16);
}

void tly_pgcopy_timestamptz(struct tly_pgcopy *c, int64_t unix_us)
{
	tly_pgcopy_int8(c, unix_us - PG_EPOCH_US);
}

void tly_pgcopy_date(struct tly_pgcopy *c, int32_t unix_days)
{
	tly_pgcopy_int4(c, unix_days - (int32_t)(PG_EPOCH_US / 86400000000LL));
}

void tly_pgcopy_jsonb(struct tly_pgcopy *c, const char *json)
{
	if (!json) {
		tly_pgcopy_null(c);
		return;
	}
	size_t n = strlen(json);
	put_be(c, (uint32_t)(n + 1), 4);
	put(c, "\x01", 1); /* jsonb binary format version */
	put(c, json, n);
}

static int oom_error(struct tly_pg_error *err)
{
	if (err) {
		err->errclass = TLY_ERRCLASS_FATAL;
		err->sqlstate[0] = '\0';
		snprintf(err->message, sizeof(err->message), "out of memory");
	}
	return TLY_E_NOMEM;
}

int tly_pgcopy_begin(PGconn *conn, const char *sql, struct tly_pg_error *err)
{
	PGresult *res = PQexec(conn, sql);
	if (PQresultStatus(res) != PGRES_COPY_IN) {
		tly_pg_error_set(err, conn, res);
		PQclear(res);
		return TLY_E_PG;
	}
	PQclear(res);
	if (PQputCopyData(conn, (const char *)HEADER, sizeof(HEADER)) != 1) {
		tly_pg_error_set(err, conn, NULL);
		return TLY_E_PG;
	}
	return 0;
}

/* c's rows, without the header, into the COPY in progress on conn; c is left as it is. */
static int put_rows(PGconn *conn, const struct tly_pgcopy *c, struct tly_pg_error *err)
{
	if (c->oom)
		return oom_error(err);
	size_t n = c->out.len - sizeof(HEADER);
	if (n > 0 && (n > INT32_MAX ||
		      PQputCopyData(conn, (const char *)c->out.data + sizeof(HEADER), (int)n) != 1)) {
		tly_pg_error_set(err, conn, NULL);
		return TLY_E_PG;
	}
	return 0;
}

int tly_pgcopy_send_rows(PGconn *conn, struct tly_pgcopy *c, struct tly_pg_error *err)
{
	int rc = put_rows(conn, c, err);
	if (rc == 0)
		tly_pgcopy_reset(c);
	return rc;
}

int tly_pgcopy_end(PGconn *conn, struct tly_pg_error *err)
{
	static const unsigned char trailer[2] = {0xFF, 0xFF};
	bool sent = PQputCopyData(conn, (const char *)trailer, 2) == 1 && PQputCopyEnd(conn, NULL) == 1;
	if (!sent)
		tly_pg_error_set(err, conn, NULL);
	PGresult *res = PQgetResult(conn);
	bool ok = sent && PQresultStatus(res) == PGRES_COMMAND_OK;
	if (sent && !ok)
		tly_pg_error_set(err, conn, res);
	PQclear(res);
	while ((res = PQgetResult(conn)) != NULL)
		PQclear(res);
	return ok ? 0 : TLY_E_PG;
}

int tly_pgcopy_send(PGconn *conn, struct tly_pgcopy *c, const char *sql, struct tly_pg_error *err)
{
	if (c->oom)
		return oom_error(err);
	if (c->rows == 0)
		return 0;
	int rc = tly_pgcopy_begin(conn, sql, err);
	if (rc == 0 && (rc = put_rows(conn, c, err)) != 0) {
		struct tly_pg_error ignored;
		if (tly_pgcopy_end(conn, &ignored) != 0) /* ends the COPY; the first error is reported */
			rc = TLY_E_PG;
		return rc;
	}
	return rc == 0 ? tly_pgcopy_end(conn, err) : rc;
}
