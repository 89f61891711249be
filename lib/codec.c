/* Single-object Avro encoding and decoding of typed events, driven by the field descriptors. */
#include "codec.h"

#include <avro.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "codec_plan.h"
#include "schema.h"
#include "validate_bytes.h"

/* Where a descriptor's field sits in a record schema, so that it is looked up by name once. */
#define FIELD_MEMO 1024
struct field_memo {
	const struct tly_field *field;
	avro_schema_t schema;
	size_t index;
};

#define WRITER_MEMO 64 /* slots of the decoder's fingerprint memo, a power of two */

/* A writer schema found by its fingerprint, with the message type its full name names. */
struct writer_memo {
	uint64_t fp;
	const struct tly_schema *writer; /* NULL: empty slot */
	const struct tly_event_desc *d;
	const struct tly_codec_plan *plan; /* its plan, once plan_tried */
	bool plan_tried;
};

struct tly_codec {
	struct tly_schema_registry *reg;
	/* one reusable generic value per registry entry, created on first use */
	avro_value_t *values;
	bool *has_value;
	size_t n_values;
	const struct tly_schema *current[TLY_EV__COUNT]; /* writer schema of each type */
	const struct tly_codec_plan *current_plan[TLY_EV__COUNT]; /* its plan, once looked up */
	bool current_tried[TLY_EV__COUNT];
	bool sealed[TLY_EV__COUNT];         /* its schema ends with the SHA-256 its seal sets */
	bool sealed_checked[TLY_EV__COUNT];
	avro_writer_t writer;
	avro_reader_t reader;
	struct field_memo *memo; /* FIELD_MEMO slots: a field's index in a record schema */
	/* per registry entry: its compiled plan (NULL: none); plan_tried once compiled or refused */
	struct tly_codec_plan **plans;
	bool *plan_tried;
	bool generic;            /* plans off: avro-c's generic values only */
	struct tly_uuid_memo *uuids;
	struct writer_memo writers[WRITER_MEMO]; /* fingerprints decoded: their schema and type */
	struct tly_buf scratch;  /* encodings hashed by tly_codec_digest and tly_codec_decode_digest */
	EVP_MD *sha256;
	EVP_MD_CTX *md;
};

void tly_buf_free(struct tly_buf *buf)
{
	if (!buf)
		return;
	free(buf->data);
	buf->data = NULL;
	buf->len = buf->cap = 0;
}

int tly_buf_reserve(struct tly_buf *buf, size_t n)
{
	if (buf->cap >= n)
		return 0;
	size_t cap = buf->cap ? buf->cap : 512;
	while (cap < n)
		cap *= 2;
	unsigned char *grown = realloc(buf->data, cap);
	if (!grown)
		return TLY_E_NOMEM;
	buf->data = grown;
	buf->cap = cap;
	return 0;
}

struct tly_codec *tly_codec_new(char *errstr, size_t errlen)
{
	struct tly_schema_registry *reg = tly_schema_registry_new(errstr, errlen);
	if (!reg)
		return NULL;
	return tly_codec_new_with_registry(reg, errstr, errlen);
}

struct tly_codec *tly_codec_new_with_registry(struct tly_schema_registry *reg, char *errstr,
					      size_t errlen)
{
	struct tly_codec *codec = calloc(1, sizeof(*codec));
	if (!codec)
		goto oom;
	codec->reg = reg;
	reg = NULL;
	codec->n_values = tly_schema_count(codec->reg);
	codec->values = calloc(codec->n_values ? codec->n_values : 1, sizeof(avro_value_t));
	codec->has_value = calloc(codec->n_values ? codec->n_values : 1, sizeof(bool));
	codec->writer = avro_writer_memory(NULL, 0);
	codec->reader = avro_reader_memory(NULL, 0);
	codec->memo = calloc(FIELD_MEMO, sizeof(*codec->memo));
	codec->plans = calloc(codec->n_values ? codec->n_values : 1, sizeof(*codec->plans));
	codec->plan_tried = calloc(codec->n_values ? codec->n_values : 1, sizeof(bool));
	codec->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
	codec->md = EVP_MD_CTX_new();
	codec->uuids = calloc(1, sizeof(*codec->uuids));
	if (!codec->values || !codec->has_value || !codec->writer || !codec->reader || !codec->memo ||
	    !codec->plans || !codec->plan_tried || !codec->sha256 || !codec->md || !codec->uuids)
		goto oom;
	for (int t = 0; t < TLY_EV__COUNT; t++) {
		const struct tly_event_desc *d = tly_event_desc((enum tly_event_type)t);
		codec->current[t] = tly_schema_current(codec->reg, d->fullname);
	}
	return codec;
oom:
	snprintf(errstr, errlen, "out of memory");
	tly_schema_registry_free(reg);
	tly_codec_free(codec);
	return NULL;
}

void tly_codec_free(struct tly_codec *codec)
{
	if (!codec)
		return;
	for (size_t i = 0; i < codec->n_values && codec->has_value; i++) {
		if (codec->has_value[i])
			avro_value_decref(&codec->values[i]);
	}
	free(codec->values);
	free(codec->has_value);
	free(codec->memo);
	for (size_t i = 0; i < codec->n_values && codec->plans; i++)
		tly_codec_plan_free(codec->plans[i]);
	free(codec->plans);
	free(codec->plan_tried);
	tly_buf_free(&codec->scratch);
	free(codec->uuids);
	EVP_MD_free(codec->sha256);
	EVP_MD_CTX_free(codec->md);
	if (codec->writer)
		avro_writer_free(codec->writer);
	if (codec->reader)
		avro_reader_free(codec->reader);
	tly_schema_registry_free(codec->reg);
	free(codec);
}

const struct tly_schema_registry *tly_codec_registry(const struct tly_codec *codec)
{
	return codec->reg;
}

/* The cached value of a registry entry, reset and ready to fill. */
static int value_for(struct tly_codec *codec, const struct tly_schema *s, avro_value_t **out)
{
	for (size_t i = 0; i < codec->n_values; i++) {
		if (tly_schema_at(codec->reg, i) != s)
			continue;
		if (!codec->has_value[i]) {
			if (avro_generic_value_new(tly_schema_iface(s), &codec->values[i]) != 0)
				return TLY_E_NOMEM;
			codec->has_value[i] = true;
		} else if (avro_value_reset(&codec->values[i]) != 0) {
			return TLY_E_NOMEM;
		}
		*out = &codec->values[i];
		return 0;
	}
	return TLY_E_NOT_FOUND;
}

/* The value of field f in record rec: 0, or non-zero when rec's schema has no such field. */
static int field_value(struct tly_codec *codec, const struct tly_field *f, avro_value_t *rec,
		       avro_value_t *fv)
{
	avro_schema_t schema = avro_value_get_schema(rec);
	uintptr_t h = ((uintptr_t)f >> 3) ^ ((uintptr_t)schema >> 5);
	struct field_memo *m = &codec->memo[h % FIELD_MEMO];
	if (m->field == f && m->schema == schema)
		return avro_value_get_by_index(rec, m->index, fv, NULL);
	size_t index;
	if (avro_value_get_by_name(rec, f->name, fv, &index) != 0)
		return -1;
	*m = (struct field_memo){f, schema, index};
	return 0;
}

/* ---- encode ------------------------------------------------------------------------------- */

static int put_record(struct tly_codec *codec, const struct tly_record_desc *rd,
		      const unsigned char *base, avro_value_t *rec, char *errstr, size_t errlen);

static int set_opt(avro_value_t *fv, bool present, avro_value_t *branch)
{
	if (!present) {
		avro_value_t nullv;
		if (avro_value_set_branch(fv, 0, &nullv) != 0)
			return -1;
		return avro_value_set_null(&nullv);
	}
	return avro_value_set_branch(fv, 1, branch);
}

static int put_field(struct tly_codec *codec, const struct tly_field *f, const unsigned char *base,
		     avro_value_t *rec, char *errstr, size_t errlen)
{
	avro_value_t fv, inner;
	const void *p = base + f->offset;
	char text[37];
	const char *s;
	int64_t l;
	int32_t i32;
	bool b;
	struct tly_opt_i64 o;
	int rc = 0;

	if (field_value(codec, f, rec, &fv) != 0) {
		snprintf(errstr, errlen, "schema has no field \"%s\"", f->name);
		return TLY_E_SCHEMA;
	}
	switch (f->kind) {
	case TLY_F_UUID:
		tly_uuid_format(p, text);
		rc = avro_value_set_string(&fv, text);
		break;
	case TLY_F_OPT_UUID:
		rc = set_opt(&fv, !tly_uuid_is_nil(p), &inner);
		if (rc == 0 && !tly_uuid_is_nil(p)) {
			tly_uuid_format(p, text);
			rc = avro_value_set_string(&inner, text);
		}
		break;
	case TLY_F_STR:
	case TLY_F_JSON:
		memcpy(&s, p, sizeof(s));
		rc = avro_value_set_string(&fv, s);
		break;
	case TLY_F_OPT_STR:
		memcpy(&s, p, sizeof(s));
		rc = set_opt(&fv, s != NULL, &inner);
		if (rc == 0 && s)
			rc = avro_value_set_string(&inner, s);
		break;
	case TLY_F_LONG:
	case TLY_F_TS:
		memcpy(&l, p, sizeof(l));
		rc = avro_value_set_long(&fv, l);
		break;
	case TLY_F_INT:
		memcpy(&i32, p, sizeof(i32));
		rc = avro_value_set_int(&fv, i32);
		break;
	case TLY_F_BOOL:
		memcpy(&b, p, sizeof(b));
		rc = avro_value_set_boolean(&fv, b);
		break;
	case TLY_F_OPT_LONG:
	case TLY_F_OPT_TS:
		memcpy(&o, p, sizeof(o));
		rc = set_opt(&fv, o.set, &inner);
		if (rc == 0 && o.set)
			rc = avro_value_set_long(&inner, o.v);
		break;
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL: {
		const struct tly_map *m = p;
		for (size_t i = 0; i < m->n && rc == 0; i++) {
			const struct tly_map_entry *e = &m->items[i];
			rc = avro_value_add(&fv, e->key, &inner, NULL, NULL);
			if (rc == 0)
				rc = f->kind == TLY_F_MAP_LONG  ? avro_value_set_long(&inner, e->i)
				     : f->kind == TLY_F_MAP_STR ? avro_value_set_string(&inner, e->s)
								: avro_value_set_boolean(&inner, e->b);
		}
		break;
	}
	case TLY_F_RECORDS: {
		struct tly_list list;
		memcpy(&list, p, sizeof(list));
		for (size_t i = 0; i < list.n && rc == 0; i++) {
			rc = avro_value_append(&fv, &inner, NULL);
			if (rc == 0) {
				const unsigned char *item = (const unsigned char *)list.items + i * f->sub->size;
				int prc = put_record(codec, f->sub, item, &inner, errstr, errlen);
				if (prc != 0)
					return prc;
			}
		}
		break;
	}
	case TLY_F_SHA256:
		rc = avro_value_set_bytes(&fv, (void *)(uintptr_t)p, 32);
		break;
	}
	if (rc != 0) {
		snprintf(errstr, errlen, "could not set field \"%s\": %s", f->name, avro_strerror());
		return TLY_E_INVALID;
	}
	return 0;
}

static int put_record(struct tly_codec *codec, const struct tly_record_desc *rd,
		      const unsigned char *base, avro_value_t *rec, char *errstr, size_t errlen)
{
	for (size_t i = 0; i < rd->n_fields; i++) {
		int rc = put_field(codec, &rd->fields[i], base, rec, errstr, errlen);
		if (rc != 0)
			return rc;
	}
	return 0;
}

static void put_header(unsigned char *h, uint64_t fp)
{
	h[0] = 0xC3;
	h[1] = 0x01;
	for (int i = 0; i < 8; i++)
		h[2 + i] = (unsigned char)(fp >> (8 * i));
}

void tly_codec_set_generic(struct tly_codec *codec, bool generic)
{
	codec->generic = generic;
}

/* The plan of registry entry s for d (compiled on first use); NULL: none, or plans are off. */
static const struct tly_codec_plan *plan_for(struct tly_codec *codec, const struct tly_schema *s,
					     const struct tly_event_desc *d)
{
	if (codec->generic)
		return NULL;
	for (size_t i = 0; i < codec->n_values; i++) {
		if (tly_schema_at(codec->reg, i) != s)
			continue;
		if (!codec->plan_tried[i]) {
			codec->plans[i] = tly_codec_plan_new(tly_schema_avro(s), &d->record);
			codec->plan_tried[i] = true;
		}
		return codec->plans[i];
	}
	return NULL;
}

/*
 * The single-object encoding of ev, which has passed tly_event_validate, appended to out at
 * out->len; on failure out->len is left where it was.
 */
static int encode_append(struct tly_codec *codec, const struct tly_event *ev, struct tly_buf *out,
			 char *errstr, size_t errlen)
{
	const struct tly_event_desc *d = tly_event_desc(ev->type);
	const struct tly_schema *s = codec->current[ev->type];
	const size_t at = out->len;
	char why[512];
	int rc;
	if (s && !codec->generic && !codec->current_tried[ev->type]) {
		codec->current_plan[ev->type] = plan_for(codec, s, d);
		codec->current_tried[ev->type] = true;
	}
	const struct tly_codec_plan *plan = codec->generic ? NULL : codec->current_plan[ev->type];
	if (plan) {
		if (tly_buf_reserve(out, at + TLY_CODEC_HEADER) != 0) {
			snprintf(errstr, errlen, "out of memory");
			return TLY_E_NOMEM;
		}
		put_header(out->data + at, tly_schema_fingerprint(s));
		out->len = at + TLY_CODEC_HEADER;
		rc = tly_codec_plan_encode(plan, ev, out);
		if (rc == 0 && out->len - at > TLY_CODEC_MAX_BYTES) {
			snprintf(errstr, errlen, "%s: %zu bytes encoded, more than the %u allowed", d->name,
				 out->len - at, TLY_CODEC_MAX_BYTES);
			rc = TLY_E_TOO_LARGE;
		} else if (rc != 0) {
			snprintf(errstr, errlen, "%s: %s", d->name,
				 rc == TLY_E_NOMEM ? "out of memory" : "a required string is NULL");
		}
		if (rc != 0)
			out->len = at;
		return rc;
	}
	avro_value_t *rec;
	if (!s || value_for(codec, s, &rec) != 0) {
		snprintf(errstr, errlen, "no schema for %s", d->name);
		return TLY_E_NOT_FOUND;
	}
	if ((rc = put_record(codec, &d->record, (const unsigned char *)ev, rec, why, sizeof(why))) != 0) {
		snprintf(errstr, errlen, "%s: %s", d->name, why);
		return rc;
	}
	size_t size;
	if (avro_value_sizeof(rec, &size) != 0) {
		snprintf(errstr, errlen, "%s: could not size the value: %s", d->name, avro_strerror());
		return TLY_E_INVALID;
	}
	if (size + TLY_CODEC_HEADER > TLY_CODEC_MAX_BYTES) {
		snprintf(errstr, errlen, "%s: %zu bytes encoded, more than the %u allowed", d->name,
			 size + TLY_CODEC_HEADER, TLY_CODEC_MAX_BYTES);
		return TLY_E_TOO_LARGE;
	}
	if (tly_buf_reserve(out, at + size + TLY_CODEC_HEADER) != 0) {
		snprintf(errstr, errlen, "out of memory");
		return TLY_E_NOMEM;
	}
	put_header(out->data + at, tly_schema_fingerprint(s));
	avro_writer_memory_set_dest(codec->writer, (const char *)out->data + at + TLY_CODEC_HEADER,
				    (int64_t)size);
	if (avro_value_write(codec->writer, rec) != 0) {
		snprintf(errstr, errlen, "%s: could not write the value: %s", d->name, avro_strerror());
		return TLY_E_INVALID;
	}
	out->len = at + size + TLY_CODEC_HEADER;
	return 0;
}

/* The single-object encoding of ev, which has passed tly_event_validate, into out (replaced). */
static int encode_valid(struct tly_codec *codec, const struct tly_event *ev, struct tly_buf *out,
			char *errstr, size_t errlen)
{
	out->len = 0;
	return encode_append(codec, ev, out, errstr, errlen);
}

/* decoded: ev was filled by decode() (see tly_event_validate_decoded) */
static int validate_as(const struct tly_event *ev, bool decoded, char *errstr, size_t errlen)
{
	const struct tly_event_desc *d = tly_event_desc(ev->type);
	char why[512];
	int rc = decoded ? tly_event_validate_decoded(ev, why, sizeof(why))
			 : tly_event_validate(ev, why, sizeof(why));
	if (rc != 0)
		snprintf(errstr, errlen, "%s: %s", d ? d->name : "event", why);
	return rc;
}

static int validate(const struct tly_event *ev, char *errstr, size_t errlen)
{
	return validate_as(ev, false, errstr, errlen);
}

int tly_codec_encode(struct tly_codec *codec, const struct tly_event *ev, struct tly_buf *out,
		     char *errstr, size_t errlen)
{
	int rc = validate(ev, errstr, errlen);
	return rc ? rc : encode_valid(codec, ev, out, errstr, errlen);
}

/* SHA-256 of a[0..alen) then b[0..blen), with the codec's digest context. */
static int sha256(struct tly_codec *codec, const void *a, size_t alen, const void *b, size_t blen,
		  unsigned char out[32])
{
	unsigned int n = 0;
	if (EVP_DigestInit_ex(codec->md, codec->sha256, NULL) != 1 ||
	    (alen && EVP_DigestUpdate(codec->md, a, alen) != 1) ||
	    EVP_DigestUpdate(codec->md, b, blen) != 1 || EVP_DigestFinal_ex(codec->md, out, &n) != 1 ||
	    n != 32)
		return TLY_E_NOMEM;
	return 0;
}

int tly_codec_digest(struct tly_codec *codec, const struct tly_event *ev, bool body_only,
		     const void *prefix, size_t prefix_len, unsigned char digest[32], char *errstr,
		     size_t errlen)
{
	int rc = validate(ev, errstr, errlen);
	if (rc == 0)
		rc = encode_valid(codec, ev, &codec->scratch, errstr, errlen);
	if (rc != 0)
		return rc;
	size_t skip = body_only ? TLY_CODEC_HEADER : 0;
	rc = sha256(codec, prefix, prefix_len, codec->scratch.data + skip, codec->scratch.len - skip,
		    digest);
	if (rc != 0)
		snprintf(errstr, errlen, "could not compute SHA-256");
	return rc;
}

static int seal(struct tly_codec *codec, const struct tly_event *ev, const void *prefix,
		size_t prefix_len, struct tly_buf *out, unsigned char hash[32], bool check,
		char *errstr, size_t errlen)
{
	const struct tly_event_desc *d = tly_event_desc(ev->type);
	const struct tly_field *last = d && d->record.n_fields ? &d->record.fields[d->record.n_fields - 1]
							      : NULL;
	if (d && !codec->sealed_checked[ev->type]) {
		const struct tly_schema *s = codec->current[ev->type];
		avro_schema_t as = s ? tly_schema_avro(s) : NULL;
		size_t nf = as ? avro_schema_record_size(as) : 0;
		const char *name = nf ? avro_schema_record_field_name(as, (int)nf - 1) : NULL;
		codec->sealed[ev->type] = last && last->kind == TLY_F_SHA256 && name &&
					  strcmp(name, last->name) == 0;
		codec->sealed_checked[ev->type] = true;
	}
	if (!d || !codec->sealed[ev->type]) {
		snprintf(errstr, errlen, "%s does not end with its hash", d ? d->name : "the message");
		return TLY_E_INVALID;
	}
	/* ev itself when its hash field is zero already (as the decision core leaves it) */
	static const unsigned char zero[32];
	struct tly_event copy;
	if (memcmp((const unsigned char *)ev + last->offset, zero, 32) != 0) {
		copy = *ev;
		memset((unsigned char *)&copy + last->offset, 0, 32);
		ev = &copy;
	}
	const size_t at = out->len;
	int rc = check ? validate(ev, errstr, errlen) : 0;
	if (rc == 0)
		rc = encode_append(codec, ev, out, errstr, errlen);
	if (rc != 0)
		return rc;
	/* hashed where it is written: Avro writes the last field, 32 bytes, as its zig-zag length
	 * (64) and the bytes, which are zero while hashed and the hash once sealed */
	unsigned char *enc = out->data + at;
	size_t len = out->len - at;
	if (len < TLY_CODEC_HEADER + 33 || enc[len - 33] != 64) {
		out->len = at;
		snprintf(errstr, errlen, "%s: the hash is not where it was expected", d->name);
		return TLY_E_INVALID;
	}
	if (sha256(codec, prefix, prefix_len, enc + TLY_CODEC_HEADER, len - TLY_CODEC_HEADER,
		   hash) != 0) {
		out->len = at;
		snprintf(errstr, errlen, "could not compute SHA-256");
		return TLY_E_NOMEM;
	}
	memcpy(enc + len - 32, hash, 32);
	return 0;
}

int tly_codec_encode_sealed(struct tly_codec *codec, const struct tly_event *ev, const void *prefix,
			    size_t prefix_len, struct tly_buf *out, unsigned char hash[32],
			    char *errstr, size_t errlen)
{
	return seal(codec, ev, prefix, prefix_len, out, hash, true, errstr, errlen);
}

int tly_codec_encode_sealed_trusted(struct tly_codec *codec, const struct tly_event *ev,
				    const void *prefix, size_t prefix_len, struct tly_buf *out,
				    unsigned char hash[32], char *errstr, size_t errlen)
{
	return seal(codec, ev, prefix, prefix_len, out, hash, false, errstr, errlen);
}

/* ---- decode ------------------------------------------------------------------------------- */

static int get_record(struct tly_codec *codec, const struct tly_record_desc *rd,
		      unsigned char *base, avro_value_t *rec, const struct tly_schema *current,
		      struct tly_arena *arena, char *errstr, size_t errlen);

static int bad(char *errstr, size_t errlen, const char *field, const char *why)
{
	snprintf(errstr, errlen, "field %s: %s", field, why);
	return TLY_E_INVALID;
}

/* A string value copied into the arena; strings with NUL bytes are refused. */
static int get_str(avro_value_t *v, struct tly_arena *arena, const char *field, const char **out,
		   char *errstr, size_t errlen)
{
	const char *str;
	size_t size;
	if (avro_value_get_string(v, &str, &size) != 0)
		return bad(errstr, errlen, field, "is not a string");
	size_t len = size ? size - 1 : 0;
	if (memchr(str, '\0', len))
		return bad(errstr, errlen, field, "contains a NUL byte");
	if (!(*out = tly_arena_strndup(arena, str, len)))
		return TLY_E_NOMEM;
	return 0;
}

/* A long, also from an int written by an older writer (Avro's int -> long promotion). */
static int get_long(avro_value_t *v, int64_t *out)
{
	if (avro_value_get_type(v) == AVRO_INT32) {
		int32_t i = 0; /* avro_value_get_int leaves it unset when the value has no int getter */
		int rc = avro_value_get_int(v, &i);
		*out = i;
		return rc;
	}
	return avro_value_get_long(v, out);
}

/* The value inside an optional field: *present false for null. Non-union writers count as set. */
static int get_opt(avro_value_t *fv, avro_value_t *inner, bool *present)
{
	if (avro_value_get_type(fv) != AVRO_UNION) {
		*inner = *fv;
		*present = true;
		return 0;
	}
	if (avro_value_get_current_branch(fv, inner) != 0)
		return -1;
	*present = avro_value_get_type(inner) != AVRO_NULL;
	return 0;
}

/* A field the writer's schema lacks takes the current schema's default. */
static int apply_default(const struct tly_field *f, unsigned char *base,
			 const struct tly_schema *current, struct tly_arena *arena, char *errstr,
			 size_t errlen)
{
	const json_t *def = current ? tly_schema_field_default(current, f->name) : NULL;
	void *p = base + f->offset;
	if (!def)
		return bad(errstr, errlen, f->name, "missing in the writer's schema and has no default");
	if (json_is_null(def) || json_is_object(def) || json_is_array(def))
		return 0; /* absent optional, empty map or list: the zeroed field already says so */
	switch (f->kind) {
	case TLY_F_LONG:
	case TLY_F_TS: {
		int64_t l = json_integer_value(def);
		memcpy(p, &l, sizeof(l));
		return 0;
	}
	case TLY_F_INT: {
		int32_t i = (int32_t)json_integer_value(def);
		memcpy(p, &i, sizeof(i));
		return 0;
	}
	case TLY_F_BOOL: {
		bool b = json_is_true(def);
		memcpy(p, &b, sizeof(b));
		return 0;
	}
	case TLY_F_STR:
	case TLY_F_OPT_STR:
	case TLY_F_JSON: {
		const char *s = tly_arena_strndup(arena, json_string_value(def), json_string_length(def));
		if (!s)
			return TLY_E_NOMEM;
		memcpy(p, &s, sizeof(s));
		return 0;
	}
	default:
		return bad(errstr, errlen, f->name, "has a default the codec cannot apply");
	}
}

static int get_field(struct tly_codec *codec, const struct tly_field *f, unsigned char *base,
		     avro_value_t *rec, const struct tly_schema *current, struct tly_arena *arena,
		     char *errstr, size_t errlen)
{
	avro_value_t fv, inner;
	void *p = base + f->offset;
	const char *s = NULL;
	bool present;
	int rc;

	if (field_value(codec, f, rec, &fv) != 0)
		return apply_default(f, base, current, arena, errstr, errlen);

	/* optional strings and UUIDs: a null leaves the field absent, else read what is inside */
	if (f->kind == TLY_F_OPT_UUID || f->kind == TLY_F_OPT_STR) {
		if (get_opt(&fv, &inner, &present) != 0)
			return bad(errstr, errlen, f->name, "is not a union");
		if (!present)
			return 0;
		fv = inner;
	}

	switch (f->kind) {
	case TLY_F_UUID:
	case TLY_F_OPT_UUID:
		if ((rc = get_str(&fv, arena, f->name, &s, errstr, errlen)) != 0)
			return rc;
		if (tly_codec_uuid_parse(s, strlen(s), p) != 0) {
			char why[128];
			snprintf(why, sizeof(why), "\"%.40s\" is not a UUID", s);
			return bad(errstr, errlen, f->name, why);
		}
		return 0;
	case TLY_F_STR:
	case TLY_F_JSON:
	case TLY_F_OPT_STR:
		if ((rc = get_str(&fv, arena, f->name, &s, errstr, errlen)) != 0)
			return rc;
		memcpy(p, &s, sizeof(s));
		return 0;
	case TLY_F_LONG:
	case TLY_F_TS: {
		int64_t l;
		if (get_long(&fv, &l) != 0)
			return bad(errstr, errlen, f->name, "is not a long");
		memcpy(p, &l, sizeof(l));
		return 0;
	}
	case TLY_F_INT: {
		int32_t i;
		if (avro_value_get_int(&fv, &i) != 0)
			return bad(errstr, errlen, f->name, "is not an int");
		memcpy(p, &i, sizeof(i));
		return 0;
	}
	case TLY_F_BOOL: {
		int b;
		if (avro_value_get_boolean(&fv, &b) != 0)
			return bad(errstr, errlen, f->name, "is not a boolean");
		bool v = b != 0;
		memcpy(p, &v, sizeof(v));
		return 0;
	}
	case TLY_F_OPT_LONG:
	case TLY_F_OPT_TS: {
		struct tly_opt_i64 o = {0};
		if (get_opt(&fv, &inner, &present) != 0)
			return bad(errstr, errlen, f->name, "is not a union");
		if (present) {
			if (get_long(&inner, &o.v) != 0)
				return bad(errstr, errlen, f->name, "is not a long");
			o.set = true;
		}
		memcpy(p, &o, sizeof(o));
		return 0;
	}
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL: {
		struct tly_map m = {0};
		size_t n;
		if (avro_value_get_size(&fv, &n) != 0)
			return bad(errstr, errlen, f->name, "is not a map");
		struct tly_map_entry *items = NULL;
		if (n && !(items = tly_arena_alloc(arena, n * sizeof(*items))))
			return TLY_E_NOMEM;
		for (size_t i = 0; i < n; i++) {
			const char *key;
			memset(&items[i], 0, sizeof(items[i]));
			if (avro_value_get_by_index(&fv, i, &inner, &key) != 0)
				return bad(errstr, errlen, f->name, "has an unreadable entry");
			if (!(items[i].key = tly_arena_strndup(arena, key, strlen(key))))
				return TLY_E_NOMEM;
			if (f->kind == TLY_F_MAP_LONG) {
				if (get_long(&inner, &items[i].i) != 0)
					return bad(errstr, errlen, f->name, "has a value that is not a long");
			} else if (f->kind == TLY_F_MAP_STR) {
				if ((rc = get_str(&inner, arena, f->name, &items[i].s, errstr, errlen)) != 0)
					return rc;
			} else {
				int b;
				if (avro_value_get_boolean(&inner, &b) != 0)
					return bad(errstr, errlen, f->name, "has a value that is not a boolean");
				items[i].b = b != 0;
			}
		}
		m.items = items;
		m.n = n;
		memcpy(p, &m, sizeof(m));
		return 0;
	}
	case TLY_F_RECORDS: {
		struct tly_list list = {0};
		size_t n;
		if (avro_value_get_size(&fv, &n) != 0)
			return bad(errstr, errlen, f->name, "is not an array");
		unsigned char *items = NULL;
		if (n && !(items = tly_arena_alloc(arena, n * f->sub->size)))
			return TLY_E_NOMEM;
		for (size_t i = 0; i < n; i++) {
			unsigned char *item = items + i * f->sub->size;
			memset(item, 0, f->sub->size);
			if (avro_value_get_by_index(&fv, i, &inner, NULL) != 0)
				return bad(errstr, errlen, f->name, "has an unreadable item");
			/* Nested records have no separate current schema: no defaults inside. */
			if ((rc = get_record(codec, f->sub, item, &inner, NULL, arena, errstr, errlen)) != 0)
				return rc;
		}
		list.items = items;
		list.n = n;
		memcpy(p, &list, sizeof(list));
		return 0;
	}
	case TLY_F_SHA256: {
		const void *buf;
		size_t size;
		if (avro_value_get_bytes(&fv, &buf, &size) != 0 || size != 32)
			return bad(errstr, errlen, f->name, "is not 32 bytes");
		memcpy(p, buf, 32);
		return 0;
	}
	}
	return bad(errstr, errlen, f->name, "has an unknown kind");
}

static int get_record(struct tly_codec *codec, const struct tly_record_desc *rd,
		      unsigned char *base, avro_value_t *rec, const struct tly_schema *current,
		      struct tly_arena *arena, char *errstr, size_t errlen)
{
	for (size_t i = 0; i < rd->n_fields; i++) {
		int rc = get_field(codec, &rd->fields[i], base, rec, current, arena, errstr, errlen);
		if (rc != 0)
			return rc;
	}
	return 0;
}

int tly_codec_peek_fingerprint(const void *bytes, size_t len, uint64_t *fingerprint)
{
	const unsigned char *b = bytes;
	if (len >= 1 && b[0] != 0xC3)
		return TLY_E_BAD_MAGIC;
	if (len >= 2 && b[1] != 0x01)
		return TLY_E_BAD_MAGIC;
	if (len < TLY_CODEC_HEADER)
		return TLY_E_TRUNCATED;
	uint64_t fp = 0;
	for (int i = 0; i < 8; i++)
		fp |= (uint64_t)b[2 + i] << (8 * i);
	*fingerprint = fp;
	return 0;
}

/*
 * tly_codec_decode; *canonical when bytes are exactly the event's encoding with its current
 * schema (read by the current schema's plan, which found nothing it would write otherwise).
 */
static int decode(struct tly_codec *codec, const void *bytes, size_t len, struct tly_event *ev,
		  bool *canonical, char *errstr, size_t errlen)
{
	uint64_t fp = 0;
	*canonical = false;
	char why[512];
	int rc;

	tly_event_reset(ev);
	if (len > TLY_CODEC_MAX_BYTES) {
		snprintf(errstr, errlen, "message of %zu bytes is larger than the %u allowed", len,
			 TLY_CODEC_MAX_BYTES);
		return TLY_E_TOO_LARGE;
	}
	rc = tly_codec_peek_fingerprint(bytes, len, &fp);
	if (rc == TLY_E_BAD_MAGIC) {
		snprintf(errstr, errlen, "not Avro single-object encoding (no C3 01 header)");
		return rc;
	}
	if (rc != 0) {
		snprintf(errstr, errlen, "truncated: %zu bytes, shorter than the 10-byte header", len);
		return rc;
	}
	struct writer_memo *wm = &codec->writers[(fp ^ fp >> 32) & (WRITER_MEMO - 1)];
	if (!wm->writer || wm->fp != fp) {
		const struct tly_schema *found = tly_schema_find(codec->reg, fp);
		if (!found) {
			snprintf(errstr, errlen, "unknown schema fingerprint %016llx",
				 (unsigned long long)fp);
			return TLY_E_UNKNOWN_FINGERPRINT;
		}
		const char *fullname = tly_schema_fullname(found);
		const struct tly_event_desc *named = tly_event_desc_by_name(fullname);
		if (!named) {
			snprintf(errstr, errlen, "schema \"%s\" is not a Tally message type",
				 fullname);
			return TLY_E_UNKNOWN_FINGERPRINT;
		}
		*wm = (struct writer_memo){fp, found, named, NULL, false};
	}
	const struct tly_schema *writer = wm->writer;
	const struct tly_event_desc *d = wm->d;
	const unsigned char *body = (const unsigned char *)bytes + TLY_CODEC_HEADER;
	size_t body_len = len - TLY_CODEC_HEADER;
	if (!codec->generic && !wm->plan_tried) {
		wm->plan = plan_for(codec, writer, d);
		wm->plan_tried = true;
	}
	const struct tly_codec_plan *plan = codec->generic ? NULL : wm->plan;
	if (plan) {
		struct tly_arena *arena = tly_event_arena(ev);
		if (!arena) {
			snprintf(errstr, errlen, "out of memory");
			return TLY_E_NOMEM;
		}
		tly_event_init(ev, d->type);
		rc = tly_codec_plan_decode(plan, body, body_len, ev, arena, codec->uuids, canonical);
		*canonical = *canonical && writer == codec->current[d->type];
		if (rc == TLY_E_NOMEM) {
			snprintf(errstr, errlen, "out of memory");
			return rc;
		}
		if (rc == 0)
			goto validate;
		tly_event_reset(ev); /* the generic path says what is wrong */
	}
	rc = tly_avro_validate_bytes(tly_schema_avro(writer), body, body_len, why, sizeof(why));
	if (rc != 0) {
		snprintf(errstr, errlen, "%s: %s", d->name, why);
		return rc;
	}
	avro_value_t *rec;
	if (value_for(codec, writer, &rec) != 0) {
		snprintf(errstr, errlen, "out of memory");
		return TLY_E_NOMEM;
	}
	avro_reader_memory_set_source(codec->reader, (const char *)body, (int64_t)body_len);
	if (avro_value_read(codec->reader, rec) != 0) {
		snprintf(errstr, errlen, "%s: corrupt: %s", d->name, avro_strerror());
		return TLY_E_CORRUPT;
	}
	struct tly_arena *arena = tly_event_arena(ev);
	if (!arena) {
		snprintf(errstr, errlen, "out of memory");
		return TLY_E_NOMEM;
	}
	tly_event_init(ev, d->type);
	rc = get_record(codec, &d->record, (unsigned char *)ev, rec, codec->current[d->type], arena,
			why, sizeof(why));
	if (rc != 0) {
		snprintf(errstr, errlen, "%s: %s", d->name, why);
		return rc;
	}
validate:
	/* every string was checked as UTF-8 as it was read (plan or tly_avro_validate_bytes) */
	return validate_as(ev, true, errstr, errlen);
}

int tly_codec_decode(struct tly_codec *codec, const void *bytes, size_t len, struct tly_event *ev,
		     char *errstr, size_t errlen)
{
	bool canonical;
	return decode(codec, bytes, len, ev, &canonical, errstr, errlen);
}

void tly_codec_uuid_hint(struct tly_codec *codec, const tly_uuid *id)
{
	tly_uuid_memo_offer(codec->uuids, id);
}

/* A hex digit's value plus one, 0 for any other byte. */
static const unsigned char hex_values[256] = {
	['0'] = 1,  ['1'] = 2,  ['2'] = 3,  ['3'] = 4,  ['4'] = 5,  ['5'] = 6,  ['6'] = 7,  ['7'] = 8,
	['8'] = 9,  ['9'] = 10, ['a'] = 11, ['b'] = 12, ['c'] = 13, ['d'] = 14, ['e'] = 15, ['f'] = 16,
	['A'] = 11, ['B'] = 12, ['C'] = 13, ['D'] = 14, ['E'] = 15, ['F'] = 16,
};

/* A hex digit's value, or a value with bit 0x100 set for any other byte (from a table: digits
 * and letters mix at random in a UUID, and comparisons telling them apart mispredicted). */
static unsigned hex_value(unsigned char c)
{
	return (unsigned)hex_values[c] - 1u;
}

int tly_codec_uuid_parse(const char *text, size_t len, tly_uuid *out)
{
	/* where each byte's two hex digits start in the 8-4-4-4-12 text */
	static const unsigned char at[16] = {0,  2,  4,  6,  9,  11, 14, 16,
					     19, 21, 24, 26, 28, 30, 32, 34};
	const unsigned char *s = (const unsigned char *)text;
	tly_uuid u;
	unsigned bad = 0;
	if (len != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-')
		return TLY_E_INVALID;
	for (size_t i = 0; i < 16; i++) {
		unsigned hi = hex_value(s[at[i]]), lo = hex_value(s[at[i] + 1]);
		bad |= hi | lo;
		u.b[i] = (unsigned char)(hi << 4 | (lo & 0xf));
	}
	if (bad & 0x100)
		return TLY_E_INVALID;
	*out = u;
	return 0;
}

int tly_codec_decode_digest(struct tly_codec *codec, const void *bytes, size_t len,
			    struct tly_event *ev, unsigned char digest[32], char *errstr,
			    size_t errlen)
{
	bool canonical = false;
	int rc = decode(codec, bytes, len, ev, &canonical, errstr, errlen);
	if (rc == 0 && canonical) { /* the bytes are their own current encoding */
		rc = sha256(codec, NULL, 0, bytes, len, digest);
		goto out;
	}
	if (rc == 0) /* ev is what decoding just validated */
		rc = encode_valid(codec, ev, &codec->scratch, errstr, errlen);
	if (rc != 0)
		return rc;
	rc = sha256(codec, NULL, 0, codec->scratch.data, codec->scratch.len, digest);
out:
	if (rc != 0)
		snprintf(errstr, errlen, "could not compute SHA-256");
	return rc;
}
