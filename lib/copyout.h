/*
 * Rows of a COPY ... TO STDOUT (FORMAT binary), read one at a time as the server streams them:
 * the server goes on producing while the caller works on the rows before, with no cursor round
 * trips and no result sets built. One COPY per connection at a time.
 */
#ifndef TLY_COPYOUT_H
#define TLY_COPYOUT_H

#include <stdint.h>

#include <libpq-fe.h>

#include "err.h"
#include "pg.h"

struct tly_copyout;

/*
 * Run sql (a "COPY (...) TO STDOUT (FORMAT binary)") on conn. NULL with err filled. Until the
 * last row has been read (tly_copyout_next returned 0) conn can do nothing else.
 */
struct tly_copyout *tly_copyout_start(PGconn *conn, const char *sql, struct tly_pg_error *err);

/*
 * The next row: 1 with its nfields values and lengths (length -1: NULL), borrowed until the next
 * call; 0 at the end (the COPY finished well); TLY_E_PG (err filled), TLY_E_CORRUPT (not binary
 * COPY data) or TLY_E_NOMEM.
 */
int tly_copyout_next(struct tly_copyout *c, const char *const **values, const int **lengths,
		     int *nfields, struct tly_pg_error *err) TLY_MUST_CHECK;

void tly_copyout_free(struct tly_copyout *c); /* accepts NULL; does not read the rest */

/* A binary int4 or int8 value of a row (4 or 8 bytes, network order). */
int32_t tly_copyout_int4(const char *value);
int64_t tly_copyout_int8(const char *value);

#endif
