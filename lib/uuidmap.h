/*
 * A hash map from a pair of UUIDs (tenant, event id; or one UUID and the nil UUID) to a borrowed
 * pointer: open addressing, grows as needed. Values are never freed by the map.
 */
#ifndef TLY_UUIDMAP_H
#define TLY_UUIDMAP_H

#include <stddef.h>

#include "err.h"
#include "event.h"

struct tly_uuidmap;

struct tly_uuidmap *tly_uuidmap_new(void); /* NULL on OOM */
void tly_uuidmap_free(struct tly_uuidmap *map); /* accepts NULL; values are the caller's */

/* The value stored under (a, b), or NULL. b may be NULL (the nil UUID). */
void *tly_uuidmap_get(const struct tly_uuidmap *map, const tly_uuid *a, const tly_uuid *b);

/* Store value (non-NULL, borrowed) under (a, b), replacing any value. 0 or TLY_E_NOMEM. */
int tly_uuidmap_put(struct tly_uuidmap *map, const tly_uuid *a, const tly_uuid *b,
		    void *value) TLY_MUST_CHECK;

/* Remove every entry (the values are the caller's). */
void tly_uuidmap_clear(struct tly_uuidmap *map);

size_t tly_uuidmap_count(const struct tly_uuidmap *map);

/* The i-th stored value in slot order for i < capacity, or NULL for an empty slot. */
size_t tly_uuidmap_capacity(const struct tly_uuidmap *map);
void *tly_uuidmap_slot(const struct tly_uuidmap *map, size_t i);

#endif
