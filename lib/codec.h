/*
 * Avro single-object encoding of Tally's messages: C3 01, the writer schema's 8-byte CRC-64-AVRO
 * fingerprint (little-endian), then the Avro binary body. Decoding finds the writer schema by
 * fingerprint, checks the bytes, reads them with avro-c and validates the typed result.
 *
 * A codec caches avro-c values and is not thread-safe: use one per thread.
 */
#ifndef TLY_CODEC_H
#define TLY_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "event.h"

#define TLY_CODEC_MAX_BYTES (4u << 20) /* largest message accepted or produced */
#define TLY_CODEC_HEADER 10            /* C3 01 + fingerprint */

struct tly_codec;
struct tly_schema_registry;

/* A growable output buffer; zero-initialise, reuse across calls, release with tly_buf_free. */
struct tly_buf {
	unsigned char *data;
	size_t len, cap;
};
void tly_buf_free(struct tly_buf *buf);

/* A codec over the compiled-in registry. NULL with errstr on failure. */
struct tly_codec *tly_codec_new(char *errstr, size_t errlen);

/* A codec over reg; takes ownership of reg (freed with the codec, also on failure). */
struct tly_codec *tly_codec_new_with_registry(struct tly_schema_registry *reg, char *errstr,
					      size_t errlen);

void tly_codec_free(struct tly_codec *codec); /* accepts NULL */

/* The codec's registry, borrowed for the codec's lifetime. */
const struct tly_schema_registry *tly_codec_registry(const struct tly_codec *codec);

/*
 * Validate ev and write its single-object encoding into out (replacing its contents). Returns 0,
 * TLY_E_INVALID (errstr names the field; nothing written), or TLY_E_TOO_LARGE.
 */
int tly_codec_encode(struct tly_codec *codec, const struct tly_event *ev, struct tly_buf *out,
		     char *errstr, size_t errlen) TLY_MUST_CHECK;

/*
 * Decode one message into ev (reset first; strings, maps and lists go to ev's arena). Returns 0
 * or a typed error with a reason in errstr: TLY_E_BAD_MAGIC (not single-object encoding),
 * TLY_E_TRUNCATED, TLY_E_UNKNOWN_FINGERPRINT, TLY_E_CORRUPT (bytes no writer produces),
 * TLY_E_TOO_LARGE, TLY_E_INVALID (decodes, but the value breaks a validation rule).
 */
int tly_codec_decode(struct tly_codec *codec, const void *bytes, size_t len, struct tly_event *ev,
		     char *errstr, size_t errlen) TLY_MUST_CHECK;

/* The fingerprint in a single-object header, or TLY_E_BAD_MAGIC / TLY_E_TRUNCATED. */
int tly_codec_peek_fingerprint(const void *bytes, size_t len, uint64_t *fingerprint) TLY_MUST_CHECK;

#endif
