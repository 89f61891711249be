/*
 * Avro single-object encoding of Tally's messages: C3 01, the writer schema's 8-byte CRC-64-AVRO
 * fingerprint (little-endian), then the Avro binary body. Decoding finds the writer schema by
 * fingerprint, checks the bytes, reads them with avro-c and validates the typed result.
 *
 * Where a schema's fields are exactly its type's descriptor (every current schema), a compiled
 * plan (lib/codec_plan) writes and reads the bytes directly; elsewhere avro-c's generic values do,
 * and they still say why bytes the plan would not read are wrong.
 *
 * A codec caches avro-c values and is not thread-safe: use one per thread.
 */
#ifndef TLY_CODEC_H
#define TLY_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

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
/* Room for n bytes in all (len unchanged). 0 or TLY_E_NOMEM. */
int tly_buf_reserve(struct tly_buf *buf, size_t n) TLY_MUST_CHECK;
/*
 * Append n bytes at len, growing as needed. 0 or TLY_E_NOMEM (the buffer unchanged). Most appends
 * are a binary COPY field's length, an integer or a UUID: those sizes are copied inline, without
 * a call to the C library's memcpy (which a variable size compiles to).
 */
static inline int tly_buf_append(struct tly_buf *buf, const void *p, size_t n)
{
	if (buf->cap - buf->len < n && tly_buf_reserve(buf, buf->len + n) != 0)
		return TLY_E_NOMEM;
	unsigned char *d = buf->data + buf->len;
	switch (n) {
	case 2:
		memcpy(d, p, 2);
		break;
	case 4:
		memcpy(d, p, 4);
		break;
	case 8:
		memcpy(d, p, 8);
		break;
	case 16:
		memcpy(d, p, 16);
		break;
	default:
		memcpy(d, p, n);
	}
	buf->len += n;
	return 0;
}

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

/*
 * SHA-256 of prefix[0..prefix_len) followed by ev's encoding: the whole single-object encoding, or
 * with body_only its Avro body alone. Validates ev and fails as tly_codec_encode does; encodes into
 * the codec's own buffer (no allocation once it has grown).
 */
int tly_codec_digest(struct tly_codec *codec, const struct tly_event *ev, bool body_only,
		     const void *prefix, size_t prefix_len, unsigned char digest[32], char *errstr,
		     size_t errlen) TLY_MUST_CHECK;

/*
 * Seal a hash-chained message (a LedgerEntry): hash = SHA-256(prefix[0..prefix_len) || the Avro
 * body of ev with its last field, a 32-byte SHA-256, set to zeros), and append to out ev's
 * single-object encoding with that field set to hash: the bytes tly_codec_encode writes for ev
 * once its hash is set, from one encoding. TLY_E_INVALID when ev's schema does not end with such
 * a field or ev fails validation; TLY_E_TOO_LARGE; TLY_E_NOMEM.
 */
int tly_codec_encode_sealed(struct tly_codec *codec, const struct tly_event *ev, const void *prefix,
			    size_t prefix_len, struct tly_buf *out, unsigned char hash[32],
			    char *errstr, size_t errlen) TLY_MUST_CHECK;

/*
 * tly_codec_encode_sealed without validating ev: the same bytes for a valid ev. Only for a
 * message whose every field its caller set from constants, integers it computed within their
 * bounds and values of events that passed validation (the decision core's entries but invoices,
 * see ledger/decide.c); an invalid ev is encoded as it is.
 */
int tly_codec_encode_sealed_trusted(struct tly_codec *codec, const struct tly_event *ev,
				    const void *prefix, size_t prefix_len, struct tly_buf *out,
				    unsigned char hash[32], char *errstr,
				    size_t errlen) TLY_MUST_CHECK;

/*
 * tly_codec_decode, then the SHA-256 of the decoded event's single-object encoding with its
 * current schema (a cause digest as tally-ledger computes it: decode, encode, hash), without
 * validating the event a second time.
 */
int tly_codec_decode_digest(struct tly_codec *codec, const void *bytes, size_t len,
			    struct tly_event *ev, unsigned char digest[32], char *errstr,
			    size_t errlen) TLY_MUST_CHECK;

/*
 * A UUID the next decodes are likely to meet (the audit: the ids of the entries an input
 * caused): a text equal to what libuuid writes for it is then taken without parsing. Only a
 * hint: any other text is parsed as before, so a wrong hint changes nothing but the time.
 */
void tly_codec_uuid_hint(struct tly_codec *codec, const tly_uuid *id);

/*
 * The UUID written as the len bytes at text (not NUL-terminated): exactly the texts libuuid's
 * uuid_parse accepts (36 bytes, '-' at 8, 13, 18 and 23, a hex digit of either case elsewhere)
 * give the bytes it gives; anything else is TLY_E_INVALID and out is left as it was. Reads the
 * hex pairs directly, without uuid_parse's strtoul calls (a decode's largest cost).
 */
int tly_codec_uuid_parse(const char *text, size_t len, tly_uuid *out) TLY_MUST_CHECK;

/*
 * generic: encode and decode through avro-c's generic values only, never a compiled plan (the
 * reference the plans are tested against). Default false.
 */
void tly_codec_set_generic(struct tly_codec *codec, bool generic);

/* The fingerprint in a single-object header, or TLY_E_BAD_MAGIC / TLY_E_TRUNCATED. */
int tly_codec_peek_fingerprint(const void *bytes, size_t len, uint64_t *fingerprint) TLY_MUST_CHECK;

#endif
