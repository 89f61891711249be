/* Binary COPY TO STDOUT read row by row: the signature, then field counts and lengths. */
#include "copyout.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>

static const char signature[11] = "PGCOPY\n\377\r\n";

struct tly_copyout {
	PGconn *conn;
	char *msg;       /* the CopyData message being read (libpq's) */
	int len, pos;
	bool header;     /* the file header has been read */
	bool done;
	const char **values;
	int *lengths;
	int cap;
};

struct tly_copyout *tly_copyout_start(PGconn *conn, const char *sql, struct tly_pg_error *err)
{
	PGresult *res = PQexec(conn, sql);
	if (!res || PQresultStatus(res) != PGRES_COPY_OUT) {
		tly_pg_error_set(err, conn, res);
		PQclear(res);
		return NULL;
	}
	PQclear(res);
	struct tly_copyout *c = calloc(1, sizeof(*c));
	if (!c) {
		err->errclass = TLY_ERRCLASS_FATAL;
		snprintf(err->message, sizeof(err->message), "out of memory");
		return NULL;
	}
	c->conn = conn;
	return c;
}

void tly_copyout_free(struct tly_copyout *c)
{
	if (!c)
		return;
	PQfreemem(c->msg);
	free(c->values);
	free(c->lengths);
	free(c);
}

int32_t tly_copyout_int4(const char *value)
{
	uint32_t v;
	memcpy(&v, value, 4);
	return (int32_t)ntohl(v);
}

int64_t tly_copyout_int8(const char *value)
{
	return (int64_t)((uint64_t)(uint32_t)tly_copyout_int4(value) << 32 |
			 (uint32_t)tly_copyout_int4(value + 4));
}

static int16_t be16(const char *p)
{
	uint16_t v;
	memcpy(&v, p, 2);
	return (int16_t)ntohs(v);
}

/* The end of the COPY: its command result. */
static int finish(struct tly_copyout *c, struct tly_pg_error *err)
{
	int rc = 0;
	PGresult *res;
	while ((res = PQgetResult(c->conn)) != NULL) {
		if (PQresultStatus(res) != PGRES_COMMAND_OK && rc == 0) {
			tly_pg_error_set(err, c->conn, res);
			rc = TLY_E_PG;
		}
		PQclear(res);
	}
	c->done = true;
	return rc;
}

int tly_copyout_next(struct tly_copyout *c, const char *const **values, const int **lengths,
		     int *nfields, struct tly_pg_error *err)
{
	for (;;) {
		if (c->done)
			return 0;
		if (!c->msg || c->pos >= c->len) {
			PQfreemem(c->msg);
			c->msg = NULL;
			c->len = PQgetCopyData(c->conn, &c->msg, 0);
			c->pos = 0;
			if (c->len == -1) {
				int rc = finish(c, err);
				return rc ? rc : TLY_E_CORRUPT; /* ended without its trailer */
			}
			if (c->len < 0) {
				tly_pg_error_set(err, c->conn, NULL);
				return TLY_E_PG;
			}
			continue;
		}
		const char *p = c->msg + c->pos;
		int left = c->len - c->pos;
		if (!c->header) {
			if (left < 19 || memcmp(p, signature, sizeof(signature)) != 0)
				return TLY_E_CORRUPT;
			int32_t ext = tly_copyout_int4(p + 15);
			if (ext < 0 || ext > left - 19)
				return TLY_E_CORRUPT;
			c->pos += 19 + ext;
			c->header = true;
			continue;
		}
		if (left < 2)
			return TLY_E_CORRUPT;
		int n = be16(p);
		if (n == -1) { /* the trailer */
			c->pos = c->len;
			PQfreemem(c->msg);
			c->msg = NULL;
			while (PQgetCopyData(c->conn, &c->msg, 0) > 0) { /* nothing follows a trailer */
				PQfreemem(c->msg);
				c->msg = NULL;
			}
			return finish(c, err);
		}
		if (n < 0)
			return TLY_E_CORRUPT;
		if (n > c->cap) {
			const char **v = realloc(c->values, (size_t)n * sizeof(*v));
			if (v)
				c->values = v;
			int *l = realloc(c->lengths, (size_t)n * sizeof(*l));
			if (l)
				c->lengths = l;
			if (!v || !l)
				return TLY_E_NOMEM;
			c->cap = n;
		}
		int at = 2;
		for (int i = 0; i < n; i++) {
			if (left - at < 4)
				return TLY_E_CORRUPT;
			int32_t flen = tly_copyout_int4(p + at);
			at += 4;
			if (flen < -1 || (flen > 0 && flen > left - at))
				return TLY_E_CORRUPT;
			c->values[i] = flen < 0 ? NULL : p + at;
			c->lengths[i] = flen;
			at += flen < 0 ? 0 : flen;
		}
		c->pos += at;
		*values = c->values;
		*lengths = c->lengths;
		*nfields = n;
		return 1;
	}
}
