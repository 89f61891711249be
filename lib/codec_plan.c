/*
 * Compiled plans: Avro binary bodies written and read field by field from the descriptors. avro-c
 * installs no per-value encoder (its binary encoding table is internal), so the zig-zag varints are
 * written here; tests/check_codec.c checks every plan byte for byte against avro-c's generic path.
 */
#include "codec_plan.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <uuid/uuid.h>

#include "arena.h"

struct step {
	const struct tly_field *f;
	struct tly_codec_plan *sub; /* TLY_F_RECORDS: the item record's plan */
};

struct tly_codec_plan {
	const struct tly_record_desc *rd;
	size_t n_steps;
	struct step steps[]; /* in the schema's field order */
};

/* ---- compile ------------------------------------------------------------------------------ */

static avro_schema_t deref(avro_schema_t s)
{
	while (s && avro_typeof(s) == AVRO_LINK)
		s = avro_schema_link_target(s);
	return s;
}

static bool is(avro_schema_t s, avro_type_t t)
{
	return (s = deref(s)) != NULL && avro_typeof(s) == t;
}

/* ["null", t]: what the codec writes for an optional field. */
static bool opt_of(avro_schema_t s, avro_type_t t)
{
	s = deref(s);
	return s && avro_typeof(s) == AVRO_UNION && avro_schema_union_size(s) == 2 &&
	       is(avro_schema_union_branch(s, 0), AVRO_NULL) && is(avro_schema_union_branch(s, 1), t);
}

/* Does field type s carry kind f exactly as the generic path writes it? Compiles sub-plans. */
static bool fits(avro_schema_t s, const struct tly_field *f, struct step *st)
{
	s = deref(s);
	switch (f->kind) {
	case TLY_F_UUID:
	case TLY_F_STR:
	case TLY_F_JSON:
		return is(s, AVRO_STRING);
	case TLY_F_OPT_UUID:
	case TLY_F_OPT_STR:
		return opt_of(s, AVRO_STRING);
	case TLY_F_LONG:
	case TLY_F_TS:
		return is(s, AVRO_INT64);
	case TLY_F_INT:
		return is(s, AVRO_INT32);
	case TLY_F_BOOL:
		return is(s, AVRO_BOOLEAN);
	case TLY_F_OPT_LONG:
	case TLY_F_OPT_TS:
		return opt_of(s, AVRO_INT64);
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL:
		return is(s, AVRO_MAP) &&
		       is(avro_schema_map_values(s), f->kind == TLY_F_MAP_LONG  ? AVRO_INT64
						     : f->kind == TLY_F_MAP_STR ? AVRO_STRING
										: AVRO_BOOLEAN);
	case TLY_F_RECORDS:
		if (!is(s, AVRO_ARRAY) || !f->sub)
			return false;
		st->sub = tly_codec_plan_new(deref(avro_schema_array_items(s)), f->sub);
		return st->sub != NULL;
	case TLY_F_SHA256:
		return is(s, AVRO_BYTES);
	}
	return false;
}

struct tly_codec_plan *tly_codec_plan_new(avro_schema_t schema, const struct tly_record_desc *rd)
{
	schema = deref(schema);
	if (!schema || avro_typeof(schema) != AVRO_RECORD ||
	    avro_schema_record_size(schema) != rd->n_fields)
		return NULL;
	struct tly_codec_plan *plan = calloc(1, sizeof(*plan) + rd->n_fields * sizeof(struct step));
	if (!plan)
		return NULL;
	plan->rd = rd;
	for (size_t i = 0; i < rd->n_fields; i++) {
		const char *name = avro_schema_record_field_name(schema, (int)i);
		struct step *st = &plan->steps[i];
		plan->n_steps = i + 1;
		for (size_t k = 0; k < rd->n_fields && name && !st->f; k++) {
			if (strcmp(rd->fields[k].name, name) == 0)
				st->f = &rd->fields[k];
		}
		if (!st->f || !fits(avro_schema_record_field_get_by_index(schema, (int)i), st->f, st)) {
			tly_codec_plan_free(plan);
			return NULL;
		}
	}
	return plan;
}

void tly_codec_plan_free(struct tly_codec_plan *plan)
{
	if (!plan)
		return;
	for (size_t i = 0; i < plan->n_steps; i++)
		tly_codec_plan_free(plan->steps[i].sub);
	free(plan);
}

/* ---- encode ------------------------------------------------------------------------------- */

#define VARINT_MAX 10

/* Avro long: zig-zag, then 7 bits a byte, low first. Returns the bytes written (at most 10). */
static size_t put_varint(unsigned char *p, int64_t v)
{
	uint64_t z = ((uint64_t)v << 1) ^ (0 - ((uint64_t)v >> 63));
	size_t n = 0;
	while (z > 0x7f) {
		p[n++] = (unsigned char)(z | 0x80);
		z >>= 7;
	}
	p[n++] = (unsigned char)z;
	return n;
}

/* Room for n more bytes at out->len. */
static inline unsigned char *room(struct tly_buf *out, size_t n)
{
	if (out->cap - out->len < n && tly_buf_reserve(out, out->len + n) != 0)
		return NULL;
	return out->data + out->len;
}

static int put_long(struct tly_buf *out, int64_t v)
{
	unsigned char *p = room(out, VARINT_MAX);
	if (!p)
		return TLY_E_NOMEM;
	out->len += put_varint(p, v);
	return 0;
}

static int put_bytes(struct tly_buf *out, const void *s, size_t len)
{
	unsigned char *p = room(out, VARINT_MAX + len);
	if (!p)
		return TLY_E_NOMEM;
	size_t n = put_varint(p, (int64_t)len);
	memcpy(p + n, s, len);
	out->len += n + len;
	return 0;
}

static int put_str(struct tly_buf *out, const char *s)
{
	return s ? put_bytes(out, s, strlen(s)) : TLY_E_INVALID;
}

static int put_uuid(struct tly_buf *out, const tly_uuid *u)
{
	unsigned char *p = room(out, 1 + 37);
	if (!p)
		return TLY_E_NOMEM;
	p[0] = 36 << 1;
	uuid_unparse_lower(u->b, (char *)p + 1);
	out->len += 1 + 36;
	return 0;
}

/* An Avro boolean: one byte, 0 or 1. */
static int put_bool(struct tly_buf *out, bool b)
{
	unsigned char *p = room(out, 1);
	if (!p)
		return TLY_E_NOMEM;
	*p = b ? 1 : 0;
	out->len++;
	return 0;
}

/* A union branch of ["null", t]: 0 for null, 1 for the value. */
static int put_branch(struct tly_buf *out, bool present)
{
	return put_long(out, present ? 1 : 0);
}

static int put_map(struct tly_buf *out, const struct tly_field *f, const struct tly_map *m)
{
	int rc = 0;
	if (m->n)
		rc = put_long(out, (int64_t)m->n);
	for (size_t i = 0; i < m->n && rc == 0; i++) {
		const struct tly_map_entry *e = &m->items[i];
		rc = put_str(out, e->key);
		if (rc == 0)
			rc = f->kind == TLY_F_MAP_LONG  ? put_long(out, e->i)
			     : f->kind == TLY_F_MAP_STR ? put_str(out, e->s)
							: put_bool(out, e->b);
	}
	return rc ? rc : put_long(out, 0);
}

static int put_step(const struct step *st, const unsigned char *base, struct tly_buf *out)
{
	const struct tly_field *f = st->f;
	const void *p = base + f->offset;
	const char *s;
	int64_t l;
	int32_t i32;
	bool b;
	struct tly_opt_i64 o;
	int rc;
	switch (f->kind) {
	case TLY_F_UUID:
		return put_uuid(out, p);
	case TLY_F_OPT_UUID:
		if (tly_uuid_is_nil(p))
			return put_branch(out, false);
		return (rc = put_branch(out, true)) ? rc : put_uuid(out, p);
	case TLY_F_STR:
	case TLY_F_JSON:
		memcpy(&s, p, sizeof(s));
		return put_str(out, s);
	case TLY_F_OPT_STR:
		memcpy(&s, p, sizeof(s));
		if (!s)
			return put_branch(out, false);
		return (rc = put_branch(out, true)) ? rc : put_str(out, s);
	case TLY_F_LONG:
	case TLY_F_TS:
		memcpy(&l, p, sizeof(l));
		return put_long(out, l);
	case TLY_F_INT:
		memcpy(&i32, p, sizeof(i32));
		return put_long(out, i32); /* an Avro int is the same zig-zag varint */
	case TLY_F_BOOL:
		memcpy(&b, p, sizeof(b));
		return put_bool(out, b);
	case TLY_F_OPT_LONG:
	case TLY_F_OPT_TS:
		memcpy(&o, p, sizeof(o));
		if (!o.set)
			return put_branch(out, false);
		return (rc = put_branch(out, true)) ? rc : put_long(out, o.v);
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL:
		return put_map(out, f, p);
	case TLY_F_RECORDS: {
		struct tly_list list;
		memcpy(&list, p, sizeof(list));
		rc = list.n ? put_long(out, (int64_t)list.n) : 0;
		for (size_t i = 0; i < list.n && rc == 0; i++)
			rc = tly_codec_plan_encode(st->sub,
						   (const unsigned char *)list.items + i * f->sub->size, out);
		return rc ? rc : put_long(out, 0);
	}
	case TLY_F_SHA256:
		return put_bytes(out, p, 32);
	}
	return TLY_E_INVALID;
}

int tly_codec_plan_encode(const struct tly_codec_plan *plan, const void *base, struct tly_buf *out)
{
	for (size_t i = 0; i < plan->n_steps; i++) {
		int rc = put_step(&plan->steps[i], base, out);
		if (rc != 0)
			return rc;
	}
	return 0;
}

/* ---- decode ------------------------------------------------------------------------------- */

/*
 * Everything here refuses at least what lib/validate_bytes refuses and what the generic reader
 * refuses or reads differently; a refusal is not an answer, only "read it the generic way".
 */
#define NO TLY_E_CORRUPT

struct in {
	const unsigned char *p;
	size_t len, pos;
	struct tly_arena *arena;
	struct tly_uuid_memo *memo; /* may be NULL */
	bool canonical;             /* so far exactly what tly_codec_plan_encode writes */
};

/* A varint of at most max bytes, zig-zag decoded. */
static int get_varint(struct in *in, int max, int64_t *out)
{
	uint64_t v = 0;
	for (int i = 0;; i++) {
		if (in->pos >= in->len || i >= max)
			return NO;
		unsigned char b = in->p[in->pos++];
		if (i == 9 && b > 1)
			return NO;
		v |= (uint64_t)(b & 0x7f) << (7 * i);
		if (!(b & 0x80)) {
			if (i > 0 && b == 0)
				in->canonical = false; /* over-long: a writer's zero padding */
			break;
		}
	}
	*out = (int64_t)((v >> 1) ^ (0 - (v & 1)));
	return 0;
}

static int get_long(struct in *in, int64_t *out)
{
	return get_varint(in, VARINT_MAX, out);
}

static int get_int(struct in *in, int32_t *out)
{
	int64_t v;
	if (get_varint(in, 5, &v) != 0 || v < INT32_MIN || v > INT32_MAX)
		return NO;
	*out = (int32_t)v;
	return 0;
}

static int get_bool(struct in *in, bool *out)
{
	if (in->pos >= in->len || in->p[in->pos] > 1)
		return NO;
	*out = in->p[in->pos++] == 1;
	return 0;
}

/* A length-prefixed run of bytes inside the input (not copied). */
static int get_span(struct in *in, const unsigned char **s, size_t *len)
{
	int64_t n;
	if (get_long(in, &n) != 0 || n < 0 || (uint64_t)n > in->len - in->pos)
		return NO;
	*s = in->p + in->pos;
	*len = (size_t)n;
	in->pos += (size_t)n;
	return 0;
}

/* A string: valid UTF-8 with no NUL byte, copied into the arena. */
static int get_str(struct in *in, const char **out)
{
	const unsigned char *s;
	size_t len;
	if (get_span(in, &s, &len) != 0 || memchr(s, '\0', len) ||
	    !tly_utf8_valid((const char *)s, len))
		return NO;
	return (*out = tly_arena_strndup(in->arena, (const char *)s, len)) ? 0 : TLY_E_NOMEM;
}

/* The memo slot of a UUID text of 36 bytes. */
static size_t memo_slot(const unsigned char *s)
{
	uint64_t w0, w1;
	memcpy(&w0, s, 8);
	memcpy(&w1, s + 28, 8);
	return (size_t)((w0 ^ w1) * 0x9e3779b97f4a7c15ull >> 52) & (TLY_UUID_MEMO - 1);
}

void tly_uuid_memo_offer(struct tly_uuid_memo *memo, const tly_uuid *id)
{
	char text[37];
	uuid_unparse_lower(id->b, text);
	unsigned at = memo->next_hint++ % TLY_UUID_HINTS;
	struct tly_uuid_memo_slot *h = &memo->hint[at];
	memcpy(&memo->hint_head[at], text, 8);
	memcpy(h->text, text, 36);
	h->id = *id;
	h->used = true;
	h->lower = true;
}

/*
 * The offered or remembered slot with this text, or NULL. The offers first: a few, in one place;
 * a fresh field's value is never remembered, so its look-up does not touch the larger table.
 */
static const struct tly_uuid_memo_slot *memo_find(const struct tly_uuid_memo *m,
						  const unsigned char *s, bool fresh)
{
	const struct tly_uuid_memo_slot *slot;
	uint64_t head;
	memcpy(&head, s, 8);
	for (size_t i = 0; i < TLY_UUID_HINTS; i++) {
		if (m->hint_head[i] == head && m->hint[i].used &&
		    memcmp(m->hint[i].text, s, 36) == 0)
			return &m->hint[i];
	}
	slot = &m->slot[memo_slot(s)];
	return !fresh && slot->used && memcmp(slot->text, s, 36) == 0 ? slot : NULL;
}

/* A UUID's text through tly_codec_uuid_parse, or what the memo holds for it; fresh: see TLY_FF_FRESH. */
static int get_uuid(struct in *in, tly_uuid *out, bool fresh)
{
	const unsigned char *s;
	size_t len;
	if (get_span(in, &s, &len) != 0 || len != 36)
		return NO;
	struct tly_uuid_memo *m = in->memo;
	const struct tly_uuid_memo_slot *hit = m ? memo_find(m, s, fresh) : NULL;
	if (hit) {
		*out = hit->id;
		in->canonical = in->canonical && hit->lower;
		return 0;
	}
	if (tly_codec_uuid_parse((const char *)s, len, out) != 0)
		return NO;
	unsigned upper = 0; /* an upper-case hex digit: written back in lower case */
	for (size_t i = 0; i < 36; i++)
		upper |= (unsigned)(s[i] - 'A') <= 'F' - 'A';
	bool lower = upper == 0;
	in->canonical = in->canonical && lower;
	if (m && !fresh) {
		struct tly_uuid_memo_slot *slot = &m->slot[memo_slot(s)];
		memcpy(slot->text, s, 36);
		slot->id = *out;
		slot->used = true;
		slot->lower = lower;
	}
	return 0;
}

/* The branch of a ["null", t] union: false for null. */
static int get_branch(struct in *in, bool *present)
{
	int64_t b;
	if (get_long(in, &b) != 0 || (b != 0 && b != 1))
		return NO;
	*present = b == 1;
	return 0;
}

/*
 * The item count of the next array or map block: 0 at the end. A block with a byte size (negative
 * count) is read like any other. Every item takes at least one byte.
 */
static int get_block(struct in *in, size_t *count, int *blocks)
{
	int64_t n, bytes;
	if (get_long(in, &n) != 0)
		return NO;
	if (n < 0) {
		if (n == INT64_MIN || get_long(in, &bytes) != 0 || bytes < 0 ||
		    (uint64_t)bytes > in->len - in->pos)
			return NO;
		n = -n;
		in->canonical = false; /* written with its byte size */
	}
	if (n > 0 && (*blocks)++ > 0)
		in->canonical = false; /* written in more than one block */
	if ((uint64_t)n > in->len - in->pos)
		return NO;
	*count = (size_t)n;
	return 0;
}

/* Items of every block, in one arena array of item bytes each (later blocks copied on). */
static int get_items(struct in *in, size_t item, void **items, size_t *n,
		     int (*one)(struct in *in, void *at, const void *ud), const void *ud)
{
	size_t count;
	int blocks = 0;
	*items = NULL;
	*n = 0;
	while (get_block(in, &count, &blocks) == 0) {
		if (count == 0)
			return 0;
		unsigned char *all = tly_arena_alloc(in->arena, (*n + count) * item);
		if (!all)
			return TLY_E_NOMEM;
		if (*n)
			memcpy(all, *items, *n * item);
		memset(all + *n * item, 0, count * item);
		for (size_t i = 0; i < count; i++) {
			int rc = one(in, all + (*n + i) * item, ud);
			if (rc != 0)
				return rc;
		}
		*items = all;
		*n += count;
	}
	return NO;
}

static int get_map_entry(struct in *in, void *at, const void *ud)
{
	const struct tly_field *f = ud;
	struct tly_map_entry *e = at;
	int rc = get_str(in, &e->key);
	if (rc == 0)
		rc = f->kind == TLY_F_MAP_LONG  ? get_long(in, &e->i)
		     : f->kind == TLY_F_MAP_STR ? get_str(in, &e->s)
						: get_bool(in, &e->b);
	return rc;
}

static int get_record_item(struct in *in, void *at, const void *ud);

static int get_step(const struct step *st, unsigned char *base, struct in *in)
{
	const struct tly_field *f = st->f;
	void *p = base + f->offset;
	bool present;
	int rc;
	switch (f->kind) {
	case TLY_F_UUID:
		return get_uuid(in, p, f->flags & TLY_FF_FRESH);
	case TLY_F_OPT_UUID:
		if ((rc = get_branch(in, &present)) != 0 || !present)
			return rc;
		if ((rc = get_uuid(in, p, f->flags & TLY_FF_FRESH)) == 0 && tly_uuid_is_nil(p))
			in->canonical = false; /* a nil UUID is written back as null */
		return rc;
	case TLY_F_STR:
	case TLY_F_JSON:
		return get_str(in, p);
	case TLY_F_OPT_STR:
		if ((rc = get_branch(in, &present)) != 0 || !present)
			return rc;
		return get_str(in, p);
	case TLY_F_LONG:
	case TLY_F_TS:
		return get_long(in, p);
	case TLY_F_INT:
		return get_int(in, p);
	case TLY_F_BOOL:
		return get_bool(in, p);
	case TLY_F_OPT_LONG:
	case TLY_F_OPT_TS: {
		struct tly_opt_i64 *o = p;
		if ((rc = get_branch(in, &present)) != 0 || !present)
			return rc;
		o->set = true;
		return get_long(in, &o->v);
	}
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL: {
		struct tly_map *m = p;
		void *items;
		if ((rc = get_items(in, sizeof(struct tly_map_entry), &items, &m->n, get_map_entry, f)) != 0)
			return rc;
		m->items = items;
		/* the generic reader keeps one entry per key: leave duplicates to it */
		for (size_t i = 0; i < m->n; i++)
			for (size_t j = 0; j < i; j++)
				if (strcmp(m->items[i].key, m->items[j].key) == 0)
					return NO;
		return 0;
	}
	case TLY_F_RECORDS: {
		struct tly_list *l = p;
		void *items;
		if ((rc = get_items(in, f->sub->size, &items, &l->n, get_record_item, st->sub)) != 0)
			return rc;
		l->items = items;
		return 0;
	}
	case TLY_F_SHA256: {
		const unsigned char *s;
		size_t len;
		if (get_span(in, &s, &len) != 0 || len != 32)
			return NO;
		memcpy(p, s, 32);
		return 0;
	}
	}
	return NO;
}

static int get_record(const struct tly_codec_plan *plan, unsigned char *base, struct in *in)
{
	for (size_t i = 0; i < plan->n_steps; i++) {
		int rc = get_step(&plan->steps[i], base, in);
		if (rc != 0)
			return rc;
	}
	return 0;
}

static int get_record_item(struct in *in, void *at, const void *ud)
{
	return get_record(ud, at, in);
}

int tly_codec_plan_decode(const struct tly_codec_plan *plan, const void *body, size_t len,
			  void *base, struct tly_arena *arena, struct tly_uuid_memo *memo,
			  bool *canonical)
{
	struct in in = {body, len, 0, arena, memo, true};
	int rc = get_record(plan, base, &in);
	if (rc == 0 && in.pos != len)
		rc = NO;
	*canonical = rc == 0 && in.canonical;
	return rc;
}
