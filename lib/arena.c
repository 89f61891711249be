/* A chain of blocks; allocations bump a pointer, reset keeps one block. */
#include "arena.h"

#include <stdalign.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ARENA_BLOCK 8192

struct block {
	struct block *next;
	size_t size; /* usable bytes in data */
	size_t used;
	alignas(max_align_t) unsigned char data[];
};

struct tly_arena {
	struct block *head; /* newest block first */
	size_t first;       /* size of the first block; 0: ARENA_BLOCK */
};

struct tly_arena *tly_arena_new(void)
{
	return calloc(1, sizeof(struct tly_arena));
}

struct tly_arena *tly_arena_new_sized(size_t first_block)
{
	struct tly_arena *arena = tly_arena_new();
	if (arena)
		arena->first = first_block;
	return arena;
}

void *tly_arena_alloc(struct tly_arena *arena, size_t size)
{
	const size_t align = alignof(max_align_t);
	size_t need = (size + align - 1) & ~(align - 1);
	if (need < size)
		return NULL;
	struct block *b = arena->head;
	if (!b || b->size - b->used < need) {
		size_t want = !b && arena->first ? arena->first : ARENA_BLOCK;
		size_t bsize = need > want ? need : want;
		if (bsize > SIZE_MAX - sizeof(struct block))
			return NULL;
		b = malloc(sizeof(struct block) + bsize);
		if (!b)
			return NULL;
		b->size = bsize;
		b->used = 0;
		b->next = arena->head;
		arena->head = b;
	}
	void *p = b->data + b->used;
	b->used += need;
	return p;
}

char *tly_arena_strndup(struct tly_arena *arena, const char *s, size_t len)
{
	char *p = tly_arena_alloc(arena, len + 1);
	if (!p)
		return NULL;
	memcpy(p, s, len);
	p[len] = '\0';
	return p;
}

void tly_arena_reset(struct tly_arena *arena)
{
	if (!arena || !arena->head)
		return;
	struct block *keep = arena->head;
	while (keep->next) {
		struct block *b = keep->next;
		keep->next = b->next;
		free(b);
	}
	keep->used = 0;
}

void tly_arena_free(struct tly_arena *arena)
{
	if (!arena)
		return;
	struct block *b = arena->head;
	while (b) {
		struct block *next = b->next;
		free(b);
		b = next;
	}
	free(arena);
}
