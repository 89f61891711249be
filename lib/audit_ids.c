/* The audit's UUID-keyed maps of records: 16-byte slots, linear probing, at most 5/8 full. */
#include "audit_ids.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FIRST_CAP 64

struct slot {
	uint64_t hash;
	void *rec; /* NULL: empty */
};

struct tly_audit_ids {
	struct slot *slots;
	size_t cap, n; /* cap a power of two */
};

static uint64_t hash_id(const tly_uuid *id)
{
	uint64_t w0, w1;
	memcpy(&w0, id->b, 8);
	memcpy(&w1, id->b + 8, 8);
	uint64_t h = (w0 ^ 0x9e3779b97f4a7c15ull) * 0xbf58476d1ce4e5b9ull;
	h = (h ^ w1) * 0x94d049bb133111ebull;
	return h ^ (h >> 31);
}

struct tly_audit_ids *tly_audit_ids_new(void)
{
	struct tly_audit_ids *m = calloc(1, sizeof(*m));
	if (m && !(m->slots = calloc(FIRST_CAP, sizeof(*m->slots)))) {
		free(m);
		return NULL;
	}
	if (m)
		m->cap = FIRST_CAP;
	return m;
}

void tly_audit_ids_free(struct tly_audit_ids *m)
{
	if (!m)
		return;
	free(m->slots);
	free(m);
}

/* The slot holding id, or the empty slot where it would go. */
static struct slot *find(const struct tly_audit_ids *m, const tly_uuid *id, uint64_t h)
{
	size_t mask = m->cap - 1;
	for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
		struct slot *s = &m->slots[i];
		if (!s->rec || (s->hash == h && memcmp(s->rec, id->b, sizeof(id->b)) == 0))
			return s;
	}
}

void *tly_audit_ids_get(const struct tly_audit_ids *m, const tly_uuid *id)
{
	return find(m, id, hash_id(id))->rec;
}

void tly_audit_ids_prefetch(const struct tly_audit_ids *m, const tly_uuid *id)
{
	__builtin_prefetch(&m->slots[(size_t)hash_id(id) & (m->cap - 1)]);
}

static int grow(struct tly_audit_ids *m)
{
	struct tly_audit_ids bigger = {calloc(m->cap * 2, sizeof(struct slot)), m->cap * 2, m->n};
	if (!bigger.slots)
		return TLY_E_NOMEM;
	for (size_t i = 0; i < m->cap; i++) {
		const struct slot *s = &m->slots[i];
		if (s->rec)
			*find(&bigger, s->rec, s->hash) = *s;
	}
	free(m->slots);
	*m = bigger;
	return 0;
}

int tly_audit_ids_add(struct tly_audit_ids *m, void *rec)
{
	if ((m->n + 1) * 8 > m->cap * 5 && grow(m) != 0)
		return TLY_E_NOMEM;
	uint64_t h = hash_id(rec);
	struct slot *s = find(m, rec, h);
	if (!s->rec)
		m->n++;
	*s = (struct slot){h, rec};
	return 0;
}

size_t tly_audit_ids_capacity(const struct tly_audit_ids *m)
{
	return m->cap;
}

void *tly_audit_ids_slot(const struct tly_audit_ids *m, size_t i)
{
	return m->slots[i].rec;
}
