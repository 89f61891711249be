/*
 * A compiled plan of one record schema for its field descriptors: the codec's fast path. It writes
 * and reads the Avro binary body straight from and into the typed struct, in the writer's field
 * order, with no avro-c generic value in between. A plan exists only where the schema's fields are
 * exactly the descriptor's (same names, the types the codec writes: no defaults, no promotions);
 * elsewhere the codec uses avro-c's generic values. Immutable once built: may be shared by threads.
 */
#ifndef TLY_CODEC_PLAN_H
#define TLY_CODEC_PLAN_H

#include <avro.h>
#include <stdbool.h>
#include <stddef.h>

#include "codec.h"
#include "err.h"
#include "event.h"

struct tly_arena;
struct tly_codec_plan;

/*
 * UUID texts a codec's decodes parsed lately, with their bytes: decodes meet the same tenants,
 * users and conversations again, and libuuid's parse is the costly part of a decode. A field
 * whose every value is new (TLY_FF_FRESH: an event's own id) is not remembered, so it does not
 * push out the ids that come back. A caller that expects a UUID may offer it first
 * (tly_uuid_memo_offer), kept apart in a short ring of the latest offers: a text equal to what
 * libuuid writes for it is what libuuid parses back to it, so nothing offered is trusted.
 * One per codec (not shared between threads); calloc it to start.
 */
#define TLY_UUID_MEMO 4096 /* remembered texts, a power of two */
#define TLY_UUID_HINTS 16  /* offered texts */
struct tly_uuid_memo_slot {
	char text[36];
	tly_uuid id;
	bool used;
	bool lower;   /* text has no upper-case hex digit (as the plans write it) */
	char pad[10]; /* one cache line a slot */
};
struct tly_uuid_memo {
	struct tly_uuid_memo_slot slot[TLY_UUID_MEMO]; /* parsed, by a hash of the text */
	struct tly_uuid_memo_slot hint[TLY_UUID_HINTS]; /* offered, the latest in a ring */
	uint64_t hint_head[TLY_UUID_HINTS]; /* their first 8 bytes of text (0: empty), scanned */
	unsigned next_hint;
};

/* Remember id with its text as uuid_unparse_lower writes it, for the decodes that follow. */
void tly_uuid_memo_offer(struct tly_uuid_memo *memo, const tly_uuid *id);

/* The plan of record schema for rd, or NULL when it has none (or out of memory). */
struct tly_codec_plan *tly_codec_plan_new(avro_schema_t schema, const struct tly_record_desc *rd);
void tly_codec_plan_free(struct tly_codec_plan *plan); /* accepts NULL */

/*
 * Append the Avro binary body of the struct at base to out: the bytes avro-c's generic writer
 * produces for the same value (single block arrays and maps, null as union branch 0). base must
 * have passed tly_event_validate. 0, TLY_E_NOMEM, or TLY_E_INVALID for a required string that is
 * NULL.
 */
int tly_codec_plan_encode(const struct tly_codec_plan *plan, const void *base,
			  struct tly_buf *out) TLY_MUST_CHECK;

/*
 * Read body[0..len) into the zeroed struct at base (strings, maps and lists into arena; memo may
 * be NULL). 0 when
 * the bytes are exactly one value that the generic path reads to the same struct; TLY_E_NOMEM; or
 * TLY_E_CORRUPT for anything else (malformed, truncated, a NUL byte, a duplicate map key, a UUID
 * that does not parse, ...): the caller then reads it the generic way, which gives the reason.
 * *canonical: the body is exactly what tly_codec_plan_encode writes for the value read (minimal
 * varints, one block per array and map, UUIDs in lower case, no nil UUID for a null).
 */
int tly_codec_plan_decode(const struct tly_codec_plan *plan, const void *body, size_t len,
			  void *base, struct tly_arena *arena, struct tly_uuid_memo *memo,
			  bool *canonical) TLY_MUST_CHECK;

#endif
