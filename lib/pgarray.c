/* One-dimensional PostgreSQL arrays in binary form: built into one value, read in place. */
#include "pgarray.h"

#include "codec.h" /* struct tly_buf */

#include <stdlib.h>
#include <string.h>

#define HEADER 20 /* ndim, flags, element type, length, lower bound */

struct tly_pgarray {
	struct tly_buf out; /* the array value so far, header first */
	size_t n; /* elements since begin */
	bool has_null;
	bool oom;
};

struct tly_pgarray *tly_pgarray_new(void)
{
	return calloc(1, sizeof(struct tly_pgarray));
}

void tly_pgarray_free(struct tly_pgarray *a)
{
	if (!a)
		return;
	free(a->out.data);
	free(a);
}

static void put(struct tly_pgarray *a, const void *p, size_t n)
{
	if (!a->oom && tly_buf_append(&a->out, p, n) != 0)
		a->oom = true;
}

static void be32_at(unsigned char *b, uint32_t v)
{
	b[0] = (unsigned char)(v >> 24);
	b[1] = (unsigned char)(v >> 16);
	b[2] = (unsigned char)(v >> 8);
	b[3] = (unsigned char)v;
}

static void put32(struct tly_pgarray *a, uint32_t v)
{
	unsigned char b[4];
	be32_at(b, v);
	put(a, b, 4);
}

void tly_pgarray_begin(struct tly_pgarray *a, uint32_t elemtype)
{
	a->out.len = 0;
	a->n = 0;
	a->has_null = false;
	a->oom = false;
	/* ndim, flags and length are set by tly_pgarray_value, once the elements are known */
	put32(a, 1);
	put32(a, 0);
	put32(a, elemtype);
	put32(a, 0);
	put32(a, 1);
}

void tly_pgarray_add(struct tly_pgarray *a, const void *p, size_t len)
{
	put32(a, (uint32_t)len);
	put(a, p, len);
	a->n++;
}

void tly_pgarray_null(struct tly_pgarray *a)
{
	put32(a, UINT32_MAX);
	a->has_null = true;
	a->n++;
}

void tly_pgarray_int8(struct tly_pgarray *a, int64_t v)
{
	unsigned char b[8];
	be32_at(b, (uint32_t)((uint64_t)v >> 32));
	be32_at(b + 4, (uint32_t)v);
	tly_pgarray_add(a, b, 8);
}

const void *tly_pgarray_value(struct tly_pgarray *a, size_t *len)
{
	if (a->oom || a->out.len < HEADER)
		return NULL;
	if (a->n == 0) { /* an empty array has no dimensions */
		be32_at(a->out.data, 0);
		be32_at(a->out.data + 4, 0);
		*len = 12;
		return a->out.data;
	}
	be32_at(a->out.data + 4, a->has_null ? 1 : 0);
	be32_at(a->out.data + 12, (uint32_t)a->n);
	*len = a->out.len;
	return a->out.data;
}

static uint32_t get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

int tly_pgarray_open(struct tly_pgarray_reader *r, const void *value, size_t len, uint32_t elemtype)
{
	const unsigned char *p = value;
	if (len < 12 || get32(p + 8) != elemtype || get32(p + 4) > 1)
		return TLY_E_CORRUPT;
	uint32_t ndim = get32(p);
	r->end = p + len;
	if (ndim == 0) {
		r->p = p + 12;
		r->left = 0;
		return 0;
	}
	if (ndim != 1 || len < HEADER || get32(p + 12) > INT32_MAX)
		return TLY_E_CORRUPT;
	r->left = get32(p + 12);
	r->p = p + HEADER;
	/* every element takes at least its 4-byte length */
	if (r->left > (size_t)(r->end - r->p) / 4)
		return TLY_E_CORRUPT;
	return (int)r->left;
}

int tly_pgarray_next(struct tly_pgarray_reader *r, const char **p, int *len)
{
	if (r->left == 0)
		return r->p == r->end ? 0 : TLY_E_CORRUPT;
	if (r->end - r->p < 4)
		return TLY_E_CORRUPT;
	uint32_t n = get32(r->p);
	r->p += 4;
	r->left--;
	if (n == UINT32_MAX) {
		*p = NULL;
		*len = -1;
		return 1;
	}
	if (n > INT32_MAX || n > (size_t)(r->end - r->p))
		return TLY_E_CORRUPT;
	*p = (const char *)r->p;
	*len = (int)n;
	r->p += n;
	return 1;
}
