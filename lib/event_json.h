/*
 * JSON form of Tally's messages: one JSON object per event, {"type": "TokensReserved", ...} with
 * the event's fields under their Avro names, driven by the field descriptors of event.h (no code
 * per type). Used by `tallyctl publish` (NDJSON in) and `tallyctl tail` (JSON lines out).
 *
 *   UUIDs            "0b6f8e1c-…" (text; lower case on output)
 *   timestamps       RFC 3339 text ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00.250+02:00")
 *                    or integer microseconds since the epoch; output is RFC 3339 in UTC
 *   optional fields  omitted or null
 *   maps, lists      objects and arrays; may be omitted (empty)
 *   JSON text        (MessageAppended.content) a string holding JSON text, or any JSON value,
 *                    which is stored as its compact text; output is the string
 *   SHA-256          64 hex digits (LedgerEntry hashes)
 *
 * Unknown fields, wrong JSON types and malformed values are errors naming the field.
 */
#ifndef TLY_EVENT_JSON_H
#define TLY_EVENT_JSON_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "event.h"

#define TLY_EVJ_FILL_ID 0x1u   /* absent "event_id": a new random UUID (libuuid) */
#define TLY_EVJ_FILL_TIME 0x2u /* absent "occurred_at": now (wall clock) */

/*
 * Fill ev from obj (ev is reset first, keeping its arena; every string, map and list is copied into
 * tly_event_arena(ev), so obj may be freed afterwards). Does not run tly_event_validate: the
 * result has the right shape, not necessarily valid values. Returns 0, TLY_E_INVALID with errstr
 * naming the field ("field tokens: expected an integer"), or TLY_E_NOMEM.
 */
int tly_event_from_json(const json_t *obj, unsigned flags, struct tly_event *ev, char *errstr,
			size_t errlen) TLY_MUST_CHECK;

/* The same from JSON text (one object; trailing text other than whitespace is an error). */
int tly_event_from_json_text(const char *text, size_t len, unsigned flags, struct tly_event *ev,
			     char *errstr, size_t errlen) TLY_MUST_CHECK;

/* ev as a new JSON object ("type" first, then the fields in schema order); NULL on OOM. */
json_t *tly_event_to_json(const struct tly_event *ev);

/*
 * ev's field `name` alone as tly_event_to_json renders it (a map or a list of records without the
 * rest of the message); NULL when ev has no such field, or on OOM.
 */
json_t *tly_event_field_to_json(const struct tly_event *ev, const char *name);

/* ev as compact JSON text on one line; malloc'd (caller frees), NULL on OOM. */
char *tly_event_to_json_text(const struct tly_event *ev);

/* RFC 3339 text -> µs since the epoch. TLY_E_INVALID for malformed text. */
int tly_time_parse_rfc3339(const char *text, int64_t *out) TLY_MUST_CHECK;

/* µs since the epoch -> "2026-01-01T00:00:00Z" (fraction only when non-zero, 6 digits). */
void tly_time_format_rfc3339(int64_t us, char out[40]);

#endif
