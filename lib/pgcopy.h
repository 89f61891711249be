/*
 * A COPY ... FROM STDIN (FORMAT binary) payload built in memory, row by row, and sent in one
 * go: no text formatting on our side, no parsing of uuids, numbers, timestamps or hex on the
 * server's. Values go in column order; the out-of-memory state is sticky and reported by send.
 */
#ifndef TLY_PGCOPY_H
#define TLY_PGCOPY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "err.h"
#include "event.h"
#include "pg.h"

struct tly_pgcopy;

struct tly_pgcopy *tly_pgcopy_new(void); /* NULL on OOM */
void tly_pgcopy_free(struct tly_pgcopy *c); /* accepts NULL */
void tly_pgcopy_reset(struct tly_pgcopy *c); /* no rows, memory kept */
size_t tly_pgcopy_rows(const struct tly_pgcopy *c);
/* Room for bytes more of rows without growing (an estimate: rows past it still grow it). */
int tly_pgcopy_reserve(struct tly_pgcopy *c, size_t bytes) TLY_MUST_CHECK;

void tly_pgcopy_row(struct tly_pgcopy *c, int nfields); /* starts a row of nfields values */
void tly_pgcopy_null(struct tly_pgcopy *c);
void tly_pgcopy_bool(struct tly_pgcopy *c, bool v);
void tly_pgcopy_int4(struct tly_pgcopy *c, int32_t v);
void tly_pgcopy_int8(struct tly_pgcopy *c, int64_t v);
void tly_pgcopy_text(struct tly_pgcopy *c, const char *s);   /* NULL: SQL NULL */
void tly_pgcopy_bytea(struct tly_pgcopy *c, const void *p, size_t len);
void tly_pgcopy_uuid(struct tly_pgcopy *c, const tly_uuid *u);
void tly_pgcopy_timestamptz(struct tly_pgcopy *c, int64_t unix_us); /* µs since 1970, UTC */
void tly_pgcopy_jsonb(struct tly_pgcopy *c, const char *json); /* NULL: SQL NULL */
void tly_pgcopy_date(struct tly_pgcopy *c, int32_t unix_days); /* days since 1970-01-01 */

/*
 * Run sql (a "COPY table (columns) FROM STDIN (FORMAT binary)") and send the rows. Nothing is
 * sent without rows. 0, TLY_E_NOMEM (a value could not be added) or TLY_E_PG (err filled).
 */
int tly_pgcopy_send(PGconn *conn, struct tly_pgcopy *c, const char *sql,
		    struct tly_pg_error *err) TLY_MUST_CHECK;

/*
 * A COPY sent in parts, for rows that come over time: tly_pgcopy_begin runs sql (as for
 * tly_pgcopy_send) and sends the header; tly_pgcopy_send_rows sends the rows c holds and resets
 * it (libpq buffers; the socket's buffer lets the server read while the caller goes on);
 * tly_pgcopy_end sends the trailer and ends the COPY (also after a failed send_rows). Each: 0,
 * TLY_E_NOMEM or TLY_E_PG with err filled.
 */
int tly_pgcopy_begin(PGconn *conn, const char *sql, struct tly_pg_error *err) TLY_MUST_CHECK;
int tly_pgcopy_send_rows(PGconn *conn, struct tly_pgcopy *c, struct tly_pg_error *err) TLY_MUST_CHECK;
int tly_pgcopy_end(PGconn *conn, struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
