/* Schema registry: canonical forms, fingerprints, lookup by fingerprint, compatibility checks. */
#include "schema.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crc64.h"
#include "embedded.h"

struct tly_schema {
	char *fullname;
	char *text;
	char *pcf;
	uint64_t fingerprint;
	bool current;
	json_t *json;
	avro_schema_t avro;
	avro_value_iface_t *iface;
};

struct tly_schema_registry {
	struct tly_schema **items;
	size_t n, cap;
};

/* ---- Parsing Canonical Form ---------------------------------------------------------------- */

struct sb {
	char *buf;
	size_t len, cap;
	bool oom;
};

static void sb_put(struct sb *sb, const char *s, size_t n)
{
	if (sb->oom)
		return;
	if (sb->len + n + 1 > sb->cap) {
		size_t cap = sb->cap ? sb->cap : 256;
		while (cap < sb->len + n + 1)
			cap *= 2;
		char *grown = realloc(sb->buf, cap);
		if (!grown) {
			sb->oom = true;
			return;
		}
		sb->buf = grown;
		sb->cap = cap;
	}
	memcpy(sb->buf + sb->len, s, n);
	sb->len += n;
	sb->buf[sb->len] = '\0';
}

static void sb_str(struct sb *sb, const char *s)
{
	sb_put(sb, s, strlen(s));
}

/* A JSON string literal; [STRINGS]: characters appear as UTF-8, only '"' and '\' are escaped. */
static void sb_quoted(struct sb *sb, const char *s)
{
	sb_put(sb, "\"", 1);
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			sb_put(sb, "\\", 1);
		sb_put(sb, s, 1);
	}
	sb_put(sb, "\"", 1);
}

static bool is_primitive(const char *t)
{
	static const char *const prims[] = {"null", "boolean", "int", "long", "float",
					    "double", "bytes", "string", NULL};
	for (const char *const *p = prims; *p; p++) {
		if (strcmp(*p, t) == 0)
			return true;
	}
	return false;
}

/* [FULLNAMES] fullname of a name in namespace ns (NULL or ""), into out. */
static void fullname_of(const char *name, const char *ns, char *out, size_t outlen)
{
	if (strchr(name, '.') || !ns || !*ns)
		snprintf(out, outlen, "%s", name);
	else
		snprintf(out, outlen, "%s.%s", ns, name);
}

static int pcf_node(const json_t *node, const char *ns, struct sb *sb, char *errstr, size_t errlen);

static int pcf_named(const json_t *node, const char *type, const char *ns, struct sb *sb,
		     char *errstr, size_t errlen)
{
	const char *name = json_string_value(json_object_get(node, "name"));
	if (!name) {
		snprintf(errstr, errlen, "%s schema without a name", type);
		return TLY_E_SCHEMA;
	}
	const char *own_ns = ns;
	const json_t *jns = json_object_get(node, "namespace");
	if (json_is_string(jns))
		own_ns = json_string_value(jns);
	char full[512];
	fullname_of(name, own_ns, full, sizeof(full));
	/* The namespace that names inside this type resolve against. */
	char inner_ns[512] = "";
	const char *dot = strrchr(full, '.');
	if (dot)
		snprintf(inner_ns, sizeof(inner_ns), "%.*s", (int)(dot - full), full);

	sb_str(sb, "{\"name\":");
	sb_quoted(sb, full);
	sb_str(sb, ",\"type\":");
	sb_quoted(sb, type);
	if (strcmp(type, "record") == 0 || strcmp(type, "error") == 0) {
		const json_t *fields = json_object_get(node, "fields");
		if (!json_is_array(fields)) {
			snprintf(errstr, errlen, "record \"%s\" without fields", full);
			return TLY_E_SCHEMA;
		}
		sb_str(sb, ",\"fields\":[");
		for (size_t i = 0; i < json_array_size(fields); i++) {
			const json_t *f = json_array_get(fields, i);
			const char *fname = json_string_value(json_object_get(f, "name"));
			const json_t *ftype = json_object_get(f, "type");
			if (!fname || !ftype) {
				snprintf(errstr, errlen, "field %zu of \"%s\" lacks a name or type", i, full);
				return TLY_E_SCHEMA;
			}
			if (i)
				sb_str(sb, ",");
			sb_str(sb, "{\"name\":");
			sb_quoted(sb, fname);
			sb_str(sb, ",\"type\":");
			int rc = pcf_node(ftype, inner_ns, sb, errstr, errlen);
			if (rc != 0)
				return rc;
			sb_str(sb, "}");
		}
		sb_str(sb, "]");
	} else if (strcmp(type, "enum") == 0) {
		const json_t *symbols = json_object_get(node, "symbols");
		if (!json_is_array(symbols)) {
			snprintf(errstr, errlen, "enum \"%s\" without symbols", full);
			return TLY_E_SCHEMA;
		}
		sb_str(sb, ",\"symbols\":[");
		for (size_t i = 0; i < json_array_size(symbols); i++) {
			if (i)
				sb_str(sb, ",");
			const char *sym = json_string_value(json_array_get(symbols, i));
			if (!sym) {
				snprintf(errstr, errlen, "enum \"%s\" has a non-string symbol", full);
				return TLY_E_SCHEMA;
			}
			sb_quoted(sb, sym);
		}
		sb_str(sb, "]");
	} else { /* fixed */
		const json_t *size = json_object_get(node, "size");
		if (!json_is_integer(size) || json_integer_value(size) < 0) {
			snprintf(errstr, errlen, "fixed \"%s\" without a valid size", full);
			return TLY_E_SCHEMA;
		}
		char num[32];
		snprintf(num, sizeof(num), ",\"size\":%lld", (long long)json_integer_value(size));
		sb_str(sb, num); /* [INTEGERS]: printed without leading zeros */
	}
	sb_str(sb, "}");
	return 0;
}

static int pcf_node(const json_t *node, const char *ns, struct sb *sb, char *errstr, size_t errlen)
{
	if (json_is_string(node)) {
		const char *t = json_string_value(node);
		if (is_primitive(t)) {
			sb_quoted(sb, t);
		} else {
			char full[512];
			fullname_of(t, ns, full, sizeof(full));
			sb_quoted(sb, full);
		}
		return 0;
	}
	if (json_is_array(node)) {
		sb_str(sb, "[");
		for (size_t i = 0; i < json_array_size(node); i++) {
			if (i)
				sb_str(sb, ",");
			int rc = pcf_node(json_array_get(node, i), ns, sb, errstr, errlen);
			if (rc != 0)
				return rc;
		}
		sb_str(sb, "]");
		return 0;
	}
	if (!json_is_object(node)) {
		snprintf(errstr, errlen, "a schema must be a string, an array or an object");
		return TLY_E_SCHEMA;
	}
	const json_t *jtype = json_object_get(node, "type");
	if (!json_is_string(jtype)) {
		if (jtype)
			return pcf_node(jtype, ns, sb, errstr, errlen);
		snprintf(errstr, errlen, "schema object without a type");
		return TLY_E_SCHEMA;
	}
	const char *type = json_string_value(jtype);
	if (strcmp(type, "record") == 0 || strcmp(type, "error") == 0 ||
	    strcmp(type, "enum") == 0 || strcmp(type, "fixed") == 0)
		return pcf_named(node, type, ns, sb, errstr, errlen);
	if (strcmp(type, "array") == 0 || strcmp(type, "map") == 0) {
		bool array = type[0] == 'a';
		const json_t *inner = json_object_get(node, array ? "items" : "values");
		if (!inner) {
			snprintf(errstr, errlen, "%s schema without %s", type, array ? "items" : "values");
			return TLY_E_SCHEMA;
		}
		sb_str(sb, array ? "{\"type\":\"array\",\"items\":" : "{\"type\":\"map\",\"values\":");
		int rc = pcf_node(inner, ns, sb, errstr, errlen);
		sb_str(sb, "}");
		return rc;
	}
	/* [PRIMITIVES] {"type":"int", "logicalType":…} becomes "int"; other names are references. */
	return pcf_node(jtype, ns, sb, errstr, errlen);
}

char *tly_schema_canonical_form(const char *json, size_t len, char *errstr, size_t errlen)
{
	json_error_t jerr;
	json_t *root = json_loadb(json, len, JSON_DECODE_ANY, &jerr);
	if (!root) {
		snprintf(errstr, errlen, "schema is not JSON: %s (line %d)", jerr.text, jerr.line);
		return NULL;
	}
	struct sb sb = {0};
	int rc = pcf_node(root, NULL, &sb, errstr, errlen);
	json_decref(root);
	if (rc == 0 && sb.oom) {
		snprintf(errstr, errlen, "out of memory");
		rc = TLY_E_NOMEM;
	}
	if (rc != 0) {
		free(sb.buf);
		return NULL;
	}
	return sb.buf;
}

uint64_t tly_schema_fingerprint_pcf(const char *pcf)
{
	return tly_crc64_avro(pcf, strlen(pcf));
}

/* ---- the registry ----------------------------------------------------------------------------- */

static void schema_free(struct tly_schema *s)
{
	if (!s)
		return;
	if (s->iface)
		avro_value_iface_decref(s->iface);
	if (s->avro)
		avro_schema_decref(s->avro);
	json_decref(s->json);
	free(s->fullname);
	free(s->text);
	free(s->pcf);
	free(s);
}

struct tly_schema_registry *tly_schema_registry_new_empty(void)
{
	return calloc(1, sizeof(struct tly_schema_registry));
}

void tly_schema_registry_free(struct tly_schema_registry *reg)
{
	if (!reg)
		return;
	for (size_t i = 0; i < reg->n; i++)
		schema_free(reg->items[i]);
	free(reg->items);
	free(reg);
}

int tly_schema_registry_add(struct tly_schema_registry *reg, const char *json, size_t len,
			    bool current, char *errstr, size_t errlen)
{
	int rc = TLY_E_SCHEMA;
	struct tly_schema *s = calloc(1, sizeof(*s));
	if (!s) {
		snprintf(errstr, errlen, "out of memory");
		return TLY_E_NOMEM;
	}
	s->current = current;
	if (!(s->text = strndup(json, len)))
		goto oom;
	if (!(s->pcf = tly_schema_canonical_form(json, len, errstr, errlen)))
		goto fail;
	s->fingerprint = tly_schema_fingerprint_pcf(s->pcf);
	json_error_t jerr;
	if (!(s->json = json_loadb(json, len, 0, &jerr))) {
		snprintf(errstr, errlen, "schema is not a JSON object: %s", jerr.text);
		goto fail;
	}
	if (avro_schema_from_json_length(json, len, &s->avro) != 0) {
		snprintf(errstr, errlen, "avro-c rejects the schema: %s", avro_strerror());
		goto fail;
	}
	const char *name = avro_schema_name(s->avro);
	const char *ns = avro_schema_namespace(s->avro);
	if (!name) {
		snprintf(errstr, errlen, "a top-level schema must be a named record");
		goto fail;
	}
	char full[512];
	fullname_of(name, ns, full, sizeof(full));
	if (!(s->fullname = strdup(full)))
		goto oom;
	if (!(s->iface = avro_generic_class_from_schema(s->avro))) {
		snprintf(errstr, errlen, "could not build a value class for \"%s\": %s", full,
			 avro_strerror());
		goto fail;
	}

	for (size_t i = 0; i < reg->n; i++) {
		struct tly_schema *o = reg->items[i];
		if (o->fingerprint == s->fingerprint) {
			if (current && !o->current) {
				if (tly_schema_current(reg, s->fullname))
					goto two_current;
				o->current = true;
			}
			schema_free(s);
			return 0;
		}
	}
	if (current && tly_schema_current(reg, s->fullname))
		goto two_current;
	if (reg->n == reg->cap) {
		size_t cap = reg->cap ? reg->cap * 2 : 32;
		struct tly_schema **grown = realloc(reg->items, cap * sizeof(*grown));
		if (!grown)
			goto oom;
		reg->items = grown;
		reg->cap = cap;
	}
	reg->items[reg->n++] = s;
	return 0;

two_current:
	snprintf(errstr, errlen, "two current schemas are named \"%s\"", s->fullname);
	goto fail;
oom:
	snprintf(errstr, errlen, "out of memory");
	rc = TLY_E_NOMEM;
fail:
	schema_free(s);
	return rc;
}

struct tly_schema_registry *tly_schema_registry_new(char *errstr, size_t errlen)
{
	struct tly_schema_registry *reg = tly_schema_registry_new_empty();
	char inner[512];
	if (!reg) {
		snprintf(errstr, errlen, "out of memory");
		return NULL;
	}
	for (const struct tly_embedded *e = tly_embedded_schemas; e->name; e++) {
		if (tly_schema_registry_add(reg, e->data, e->len, true, inner, sizeof(inner)) != 0)
			goto fail_file;
	}
	for (const struct tly_embedded *e = tly_embedded_released; e->name; e++) {
		if (tly_schema_registry_add(reg, e->data, e->len, false, inner, sizeof(inner)) != 0)
			goto fail_file;
	}
	return reg;

fail_file:
	snprintf(errstr, errlen, "could not load schema: %s", inner);
	tly_schema_registry_free(reg);
	return NULL;
}

const struct tly_schema *tly_schema_find(const struct tly_schema_registry *reg, uint64_t fingerprint)
{
	for (size_t i = 0; i < reg->n; i++) {
		if (reg->items[i]->fingerprint == fingerprint)
			return reg->items[i];
	}
	return NULL;
}

const struct tly_schema *tly_schema_current(const struct tly_schema_registry *reg,
					    const char *fullname)
{
	for (size_t i = 0; i < reg->n; i++) {
		if (reg->items[i]->current && strcmp(reg->items[i]->fullname, fullname) == 0)
			return reg->items[i];
	}
	return NULL;
}

size_t tly_schema_count(const struct tly_schema_registry *reg)
{
	return reg->n;
}

const struct tly_schema *tly_schema_at(const struct tly_schema_registry *reg, size_t i)
{
	return i < reg->n ? reg->items[i] : NULL;
}

const char *tly_schema_fullname(const struct tly_schema *s) { return s->fullname; }
const char *tly_schema_pcf(const struct tly_schema *s) { return s->pcf; }
const char *tly_schema_text(const struct tly_schema *s) { return s->text; }
uint64_t tly_schema_fingerprint(const struct tly_schema *s) { return s->fingerprint; }
bool tly_schema_is_current(const struct tly_schema *s) { return s->current; }
avro_schema_t tly_schema_avro(const struct tly_schema *s) { return s->avro; }
avro_value_iface_t *tly_schema_iface(const struct tly_schema *s) { return s->iface; }
const json_t *tly_schema_json(const struct tly_schema *s) { return s->json; }

static const json_t *find_field(const json_t *record, const char *name)
{
	const json_t *fields = json_object_get(record, "fields");
	for (size_t i = 0; i < json_array_size(fields); i++) {
		const json_t *f = json_array_get(fields, i);
		const char *fname = json_string_value(json_object_get(f, "name"));
		if (fname && strcmp(fname, name) == 0)
			return f;
	}
	return NULL;
}

const json_t *tly_schema_field_default(const struct tly_schema *s, const char *field)
{
	const json_t *f = find_field(s->json, field);
	return f ? json_object_get(f, "default") : NULL;
}

/* ---- compatibility -------------------------------------------------------------------------- */

static bool is_record(const json_t *t)
{
	const char *type = json_string_value(json_object_get(t, "type"));
	return type && strcmp(type, "record") == 0;
}

/*
 * Remove from reader record r the fields writer record w lacks, after checking each has a
 * default; recurse into records nested directly, in arrays or in maps.
 */
static int strip_defaulted(json_t *r, const json_t *w, char *errstr, size_t errlen)
{
	json_t *fields = json_object_get(r, "fields");
	const char *rname = json_string_value(json_object_get(r, "name"));
	for (size_t i = 0; i < json_array_size(fields);) {
		json_t *f = json_array_get(fields, i);
		const char *fname = json_string_value(json_object_get(f, "name"));
		const json_t *wf = fname ? find_field(w, fname) : NULL;
		if (!wf) {
			if (!json_object_get(f, "default")) {
				snprintf(errstr, errlen,
					 "field \"%s\" of \"%s\" is new and has no default, so data "
					 "written before it cannot be read",
					 fname ? fname : "?", rname ? rname : "?");
				return TLY_E_INCOMPATIBLE;
			}
			json_array_remove(fields, i);
			continue;
		}
		json_t *rt = json_object_get(f, "type");
		const json_t *wt = json_object_get(wf, "type");
		for (int depth = 0; depth < 2 && json_is_object(rt) && json_is_object(wt); depth++) {
			if (is_record(rt) && is_record(wt)) {
				int rc = strip_defaulted(rt, wt, errstr, errlen);
				if (rc != 0)
					return rc;
				break;
			}
			const char *key = json_object_get(rt, "items") ? "items" : "values";
			rt = json_object_get(rt, key);
			wt = json_object_get(wt, key);
		}
		i++;
	}
	return 0;
}

int tly_schema_check_compat(const char *writer_json, const char *reader_json, char *errstr,
			    size_t errlen)
{
	int rc = TLY_E_SCHEMA;
	json_error_t jerr;
	json_t *w = json_loads(writer_json, 0, &jerr);
	json_t *r = json_loads(reader_json, 0, &jerr);
	avro_schema_t ws = NULL, rs = NULL;
	char *stripped = NULL;
	if (!w || !r) {
		snprintf(errstr, errlen, "schema is not a JSON object: %s", jerr.text);
		goto out;
	}
	if (is_record(r) && is_record(w)) {
		rc = strip_defaulted(r, w, errstr, errlen);
		if (rc != 0)
			goto out;
		rc = TLY_E_SCHEMA;
	}
	if (!(stripped = json_dumps(r, JSON_COMPACT))) {
		snprintf(errstr, errlen, "out of memory");
		rc = TLY_E_NOMEM;
		goto out;
	}
	if (avro_schema_from_json_length(writer_json, strlen(writer_json), &ws) != 0 ||
	    avro_schema_from_json_length(stripped, strlen(stripped), &rs) != 0) {
		snprintf(errstr, errlen, "avro-c rejects the schema: %s", avro_strerror());
		goto out;
	}
	avro_value_iface_t *resolver = avro_resolved_writer_new(ws, rs);
	if (!resolver) {
		snprintf(errstr, errlen, "%s", avro_strerror());
		rc = TLY_E_INCOMPATIBLE;
		goto out;
	}
	avro_value_iface_decref(resolver);
	rc = 0;
out:
	if (ws)
		avro_schema_decref(ws);
	if (rs)
		avro_schema_decref(rs);
	free(stripped);
	json_decref(w);
	json_decref(r);
	return rc;
}
