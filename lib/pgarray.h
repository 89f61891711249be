/*
 * One-dimensional PostgreSQL arrays in their binary form (what array_send writes and array_recv
 * reads, so a binary COPY column of an array type): built element by element into one value,
 * and read back element by element without copying.
 *
 * The form: int32 ndim (0 for an empty array, else 1), int32 flags (1: some element is NULL),
 * uint32 element type oid, then per dimension int32 length and int32 lower bound (1), then each
 * element as int32 length (-1: NULL) and its bytes in the element type's binary form. All
 * integers in network order.
 */
#ifndef TLY_PGARRAY_H
#define TLY_PGARRAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

/* Element type oids (pg_type.h; fixed for built-in types). */
#define TLY_PGARRAY_BYTEA 17u
#define TLY_PGARRAY_INT8  20u
#define TLY_PGARRAY_TEXT  25u /* elements: the text's bytes, in the server's encoding */
#define TLY_PGARRAY_UUID  2950u

struct tly_pgarray;

struct tly_pgarray *tly_pgarray_new(void);    /* NULL on OOM */
void tly_pgarray_free(struct tly_pgarray *a); /* accepts NULL */

/* Start a new array of elemtype elements (memory kept from the one before). */
void tly_pgarray_begin(struct tly_pgarray *a, uint32_t elemtype);
void tly_pgarray_add(struct tly_pgarray *a, const void *p, size_t len); /* one element's bytes */
void tly_pgarray_null(struct tly_pgarray *a);
void tly_pgarray_int8(struct tly_pgarray *a, int64_t v);

/*
 * The array built since begin, borrowed until the next begin or free; NULL when an element
 * could not be added (out of memory, sticky until begin).
 */
const void *tly_pgarray_value(struct tly_pgarray *a, size_t *len);

/* Reading one array value in place: every pointer borrows the value's bytes. Fields private. */
struct tly_pgarray_reader {
	const unsigned char *p, *end;
	size_t left;
};

/*
 * Open value (len bytes) as a one-dimensional array of elemtype: its element count, or
 * TLY_E_CORRUPT (not such an array: other element type, more dimensions, bounds past the end).
 */
int tly_pgarray_open(struct tly_pgarray_reader *r, const void *value, size_t len,
		     uint32_t elemtype) TLY_MUST_CHECK;

/*
 * The next element: 1 with *p and *len on its bytes (*len -1: NULL), 0 after the last one (the
 * value must end there), or TLY_E_CORRUPT.
 */
int tly_pgarray_next(struct tly_pgarray_reader *r, const char **p, int *len) TLY_MUST_CHECK;

#endif
