/*
 * Structural check of an Avro binary body against its writer schema, run before avro-c reads it.
 * avro-c 1.11 trusts lengths on the wire: a negative string length makes it write before its
 * buffer and a huge one makes it allocate that much. This walk rejects such input first, and
 * tells truncated input from corrupt input.
 */
#ifndef TLY_VALIDATE_BYTES_H
#define TLY_VALIDATE_BYTES_H

#include <avro.h>
#include <stddef.h>

#include "err.h"

#define TLY_AVRO_MAX_DEPTH 32 /* nesting of records, arrays, maps and unions */

/*
 * 0 if body[0..len) is exactly one value of schema: varints well formed and in range, lengths and
 * counts within the remaining bytes, union branches and enum symbols in range, booleans 0 or 1,
 * strings valid UTF-8, no trailing bytes. Otherwise TLY_E_TRUNCATED, TLY_E_CORRUPT or
 * TLY_E_TOO_LARGE (nesting) with the byte offset and reason in errstr.
 */
int tly_avro_validate_bytes(avro_schema_t schema, const void *body, size_t len, char *errstr,
			    size_t errlen) TLY_MUST_CHECK;

#endif
