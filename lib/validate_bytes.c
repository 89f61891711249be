/* Schema-driven walk over an Avro binary body that checks every length before avro-c trusts it. */
#include "validate_bytes.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "event.h"

struct cursor {
	const unsigned char *p;
	size_t len, pos;
	char *errstr;
	size_t errlen;
};

static int truncated(struct cursor *c, const char *what)
{
	snprintf(c->errstr, c->errlen, "truncated: input ends inside %s at byte %zu", what, c->pos);
	return TLY_E_TRUNCATED;
}

static int corrupt(struct cursor *c, const char *what, long long v)
{
	snprintf(c->errstr, c->errlen, "corrupt: %s %lld at byte %zu", what, v, c->pos);
	return TLY_E_CORRUPT;
}

/* Zig-zag varint of at most max_bytes bytes. */
static int read_varint(struct cursor *c, int max_bytes, int64_t *out, const char *what)
{
	uint64_t v = 0;
	for (int i = 0;; i++) {
		if (c->pos >= c->len)
			return truncated(c, what);
		if (i >= max_bytes)
			return corrupt(c, "over-long varint in", 0);
		unsigned char b = c->p[c->pos++];
		if (i == 9 && b > 1)
			return corrupt(c, "varint overflow in", b);
		v |= (uint64_t)(b & 0x7f) << (7 * i);
		if (!(b & 0x80))
			break;
	}
	*out = (int64_t)((v >> 1) ^ (0 - (v & 1)));
	return 0;
}

static int need(struct cursor *c, int64_t n, const char *what)
{
	if (n < 0)
		return corrupt(c, "negative length of", n);
	if ((uint64_t)n > c->len - c->pos)
		return truncated(c, what);
	return 0;
}

static int walk_bytes(struct cursor *c, bool string)
{
	const char *what = string ? "a string" : "bytes";
	int64_t v;
	int rc;
	if ((rc = read_varint(c, 10, &v, what)) != 0)
		return rc;
	if ((rc = need(c, v, what)) != 0)
		return rc;
	if (string && !tly_utf8_valid((const char *)c->p + c->pos, (size_t)v))
		return corrupt(c, "invalid UTF-8 in a string of length", v);
	c->pos += (size_t)v;
	return 0;
}

static int walk(avro_schema_t s, struct cursor *c, int depth)
{
	int64_t v;
	int rc;
	if (depth > TLY_AVRO_MAX_DEPTH) {
		snprintf(c->errstr, c->errlen, "nesting deeper than %d", TLY_AVRO_MAX_DEPTH);
		return TLY_E_TOO_LARGE;
	}
	switch (avro_typeof(s)) {
	case AVRO_NULL:
		return 0;
	case AVRO_BOOLEAN:
		if (c->pos >= c->len)
			return truncated(c, "a boolean");
		if (c->p[c->pos] > 1)
			return corrupt(c, "boolean byte", c->p[c->pos]);
		c->pos++;
		return 0;
	case AVRO_INT32:
		if ((rc = read_varint(c, 5, &v, "an int")) != 0)
			return rc;
		if (v < INT32_MIN || v > INT32_MAX)
			return corrupt(c, "int out of range", v);
		return 0;
	case AVRO_INT64:
		return read_varint(c, 10, &v, "a long");
	case AVRO_FLOAT:
		if ((rc = need(c, 4, "a float")) != 0)
			return rc;
		c->pos += 4;
		return 0;
	case AVRO_DOUBLE:
		if ((rc = need(c, 8, "a double")) != 0)
			return rc;
		c->pos += 8;
		return 0;
	case AVRO_BYTES:
		return walk_bytes(c, false);
	case AVRO_STRING:
		return walk_bytes(c, true);
	case AVRO_FIXED: {
		int64_t size = avro_schema_fixed_size(s);
		if ((rc = need(c, size, "a fixed")) != 0)
			return rc;
		c->pos += (size_t)size;
		return 0;
	}
	case AVRO_ENUM:
		if ((rc = read_varint(c, 10, &v, "an enum")) != 0)
			return rc;
		if (v < 0 || v >= avro_schema_enum_number_of_symbols(s))
			return corrupt(c, "enum symbol index", v);
		return 0;
	case AVRO_ARRAY:
	case AVRO_MAP: {
		bool map = avro_typeof(s) == AVRO_MAP;
		avro_schema_t item = map ? avro_schema_map_values(s) : avro_schema_array_items(s);
		const char *what = map ? "a map" : "an array";
		for (;;) {
			int64_t count;
			if ((rc = read_varint(c, 10, &count, what)) != 0)
				return rc;
			if (count == 0)
				return 0;
			if (count < 0) {
				int64_t bytes;
				if (count == INT64_MIN)
					return corrupt(c, "block count", count);
				count = -count;
				if ((rc = read_varint(c, 10, &bytes, what)) != 0)
					return rc;
				if ((rc = need(c, bytes, what)) != 0)
					return rc;
			}
			/* Every item takes at least one byte except null; bound the loop either way. */
			if ((uint64_t)count > c->len - c->pos + (avro_typeof(item) == AVRO_NULL ? 65536 : 0))
				return truncated(c, what);
			for (int64_t i = 0; i < count; i++) {
				if (map && (rc = walk_bytes(c, true)) != 0)
					return rc;
				if ((rc = walk(item, c, depth + 1)) != 0)
					return rc;
			}
		}
	}
	case AVRO_UNION:
		if ((rc = read_varint(c, 10, &v, "a union")) != 0)
			return rc;
		if (v < 0 || (size_t)v >= avro_schema_union_size(s))
			return corrupt(c, "union branch", v);
		return walk(avro_schema_union_branch(s, (int)v), c, depth + 1);
	case AVRO_RECORD:
		for (size_t i = 0; i < avro_schema_record_size(s); i++) {
			rc = walk(avro_schema_record_field_get_by_index(s, (int)i), c, depth + 1);
			if (rc != 0)
				return rc;
		}
		return 0;
	case AVRO_LINK:
		return walk(avro_schema_link_target(s), c, depth + 1);
	}
	snprintf(c->errstr, c->errlen, "unsupported schema type %d", (int)avro_typeof(s));
	return TLY_E_CORRUPT;
}

int tly_avro_validate_bytes(avro_schema_t schema, const void *body, size_t len, char *errstr,
			    size_t errlen)
{
	struct cursor c = {body, len, 0, errstr, errlen};
	int rc = walk(schema, &c, 0);
	if (rc == 0 && c.pos != len) {
		snprintf(errstr, errlen, "corrupt: %zu trailing bytes after the value", len - c.pos);
		return TLY_E_CORRUPT;
	}
	return rc;
}
