/* Bump allocator for per-message memory: everything a decoded message owns is freed at once. */
#ifndef TLY_ARENA_H
#define TLY_ARENA_H

#include <stddef.h>

struct tly_arena;

/* Returns NULL when out of memory. */
struct tly_arena *tly_arena_new(void);

/*
 * An arena whose first block holds first_block bytes (later ones 8 KiB, or what one allocation
 * needs): for many small arenas alive at once, such as one per decoded event of a batch.
 */
struct tly_arena *tly_arena_new_sized(size_t first_block);

/* Memory aligned for any type; valid until the next tly_arena_reset or tly_arena_free. NULL on OOM. */
void *tly_arena_alloc(struct tly_arena *arena, size_t size);

/* Copy of s[0..len) with a terminating NUL. NULL on OOM. */
char *tly_arena_strndup(struct tly_arena *arena, const char *s, size_t len);

/* Release everything allocated, keeping the first block for reuse. */
void tly_arena_reset(struct tly_arena *arena);

/* Accepts NULL. */
void tly_arena_free(struct tly_arena *arena);

#endif
