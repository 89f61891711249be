/* UUID-pair hash map: linear probing over a power-of-two table, kept at most half full. */
#include "uuidmap.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct slot {
	tly_uuid a, b;
	void *value; /* NULL: empty */
};

struct tly_uuidmap {
	struct slot *slots;
	size_t cap, n;
};

static const tly_uuid nil_uuid;

static uint64_t word(const unsigned char *p)
{
	uint64_t w;
	memcpy(&w, p, sizeof(w));
	return w;
}

static size_t hash_pair(const tly_uuid *a, const tly_uuid *b)
{
	/*
	 * Four words folded by multiplication, then splitmix64's finaliser. Multiplying only carries
	 * bits upwards, so without the finaliser ids that differ only in the high bytes of a word (a
	 * counter stored big-endian, time-ordered ids) all fell into one slot's probe run.
	 */
	uint64_t h = (word(a->b) ^ 0x9e3779b97f4a7c15ull) * 0xbf58476d1ce4e5b9ull;
	h = (h ^ word(a->b + 8)) * 0x94d049bb133111ebull;
	h = (h ^ word(b->b)) * 0xbf58476d1ce4e5b9ull;
	h = (h ^ word(b->b + 8)) * 0x94d049bb133111ebull;
	h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
	h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
	return (size_t)(h ^ (h >> 31));
}

struct tly_uuidmap *tly_uuidmap_new(void)
{
	struct tly_uuidmap *map = calloc(1, sizeof(*map));
	if (!map)
		return NULL;
	map->cap = 64;
	if (!(map->slots = calloc(map->cap, sizeof(*map->slots)))) {
		free(map);
		return NULL;
	}
	return map;
}

void tly_uuidmap_free(struct tly_uuidmap *map)
{
	if (!map)
		return;
	free(map->slots);
	free(map);
}

static struct slot *find(const struct tly_uuidmap *map, const tly_uuid *a, const tly_uuid *b)
{
	size_t mask = map->cap - 1;
	for (size_t i = hash_pair(a, b) & mask;; i = (i + 1) & mask) {
		struct slot *s = &map->slots[i];
		if (!s->value || (memcmp(&s->a, a, sizeof(*a)) == 0 && memcmp(&s->b, b, sizeof(*b)) == 0))
			return s;
	}
}

void *tly_uuidmap_get(const struct tly_uuidmap *map, const tly_uuid *a, const tly_uuid *b)
{
	return find(map, a, b ? b : &nil_uuid)->value;
}

static int grow(struct tly_uuidmap *map)
{
	struct tly_uuidmap bigger = {calloc(map->cap * 2, sizeof(struct slot)), map->cap * 2, 0};
	if (!bigger.slots)
		return TLY_E_NOMEM;
	for (size_t i = 0; i < map->cap; i++) {
		struct slot *s = &map->slots[i];
		if (s->value)
			*find(&bigger, &s->a, &s->b) = *s;
	}
	free(map->slots);
	map->slots = bigger.slots;
	map->cap = bigger.cap;
	return 0;
}

int tly_uuidmap_put(struct tly_uuidmap *map, const tly_uuid *a, const tly_uuid *b, void *value)
{
	if (!b)
		b = &nil_uuid;
	if ((map->n + 1) * 2 > map->cap && grow(map) != 0)
		return TLY_E_NOMEM;
	struct slot *s = find(map, a, b);
	if (!s->value)
		map->n++;
	s->a = *a;
	s->b = *b;
	s->value = value;
	return 0;
}

void tly_uuidmap_clear(struct tly_uuidmap *map)
{
	memset(map->slots, 0, map->cap * sizeof(*map->slots));
	map->n = 0;
}

size_t tly_uuidmap_count(const struct tly_uuidmap *map)
{
	return map->n;
}

size_t tly_uuidmap_capacity(const struct tly_uuidmap *map)
{
	return map->cap;
}

void *tly_uuidmap_slot(const struct tly_uuidmap *map, size_t i)
{
	return i < map->cap ? map->slots[i].value : NULL;
}
