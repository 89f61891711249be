/*
 * The audit's maps from a UUID to a record that starts with that UUID (a tenant, an event id it
 * saw, a hold): open addressing over 16-byte slots (a 64-bit hash and the record), so a lookup of
 * an id not there reads one cache line, and the key is compared in the record only when the
 * hashes are equal. Records are the caller's and must outlive the map. Not thread-safe.
 */
#ifndef TLY_AUDIT_IDS_H
#define TLY_AUDIT_IDS_H

#include <stddef.h>

#include "err.h"
#include "event.h"

struct tly_audit_ids;

struct tly_audit_ids *tly_audit_ids_new(void); /* NULL: out of memory */
void tly_audit_ids_free(struct tly_audit_ids *m); /* accepts NULL; not the records */

/* The record whose leading tly_uuid is id, or NULL. */
void *tly_audit_ids_get(const struct tly_audit_ids *m, const tly_uuid *id);

/* Start loading the slot of id into the CPU's caches, for a lookup a little later. */
void tly_audit_ids_prefetch(const struct tly_audit_ids *m, const tly_uuid *id);

/* Add rec (starting with its key, not in m yet; borrowed while m lives). 0 or TLY_E_NOMEM. */
int tly_audit_ids_add(struct tly_audit_ids *m, void *rec) TLY_MUST_CHECK;

/* Every record, in no order: slots 0 .. capacity - 1, NULL for an empty one. */
size_t tly_audit_ids_capacity(const struct tly_audit_ids *m);
void *tly_audit_ids_slot(const struct tly_audit_ids *m, size_t i);

#endif
