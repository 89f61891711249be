/* JSON <-> struct tly_event, generic over the field descriptors of event.h. */
#include "event_json.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "arena.h"

#define US_PER_S 1000000LL

/* ---- timestamps ---------------------------------------------------------------------------- */

static int digits(const char *s, int n, int *out)
{
	int v = 0;
	for (int i = 0; i < n; i++) {
		if (!isdigit((unsigned char)s[i]))
			return -1;
		v = v * 10 + (s[i] - '0');
	}
	*out = v;
	return 0;
}

int tly_time_parse_rfc3339(const char *text, int64_t *out)
{
	int y, mo, d, h, mi, se;
	const char *s = text;
	if (strlen(s) < 20 || digits(s, 4, &y) || s[4] != '-' || digits(s + 5, 2, &mo) || s[7] != '-' ||
	    digits(s + 8, 2, &d) || (s[10] != 'T' && s[10] != 't' && s[10] != ' ') ||
	    digits(s + 11, 2, &h) || s[13] != ':' || digits(s + 14, 2, &mi) || s[16] != ':' ||
	    digits(s + 17, 2, &se))
		return TLY_E_INVALID;
	static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
	if (mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] || h > 23 || mi > 59 || se > 60)
		return TLY_E_INVALID;
	bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
	if (mo == 2 && d == 29 && !leap)
		return TLY_E_INVALID;
	s += 19;
	int64_t frac = 0;
	if (*s == '.') {
		int n = 0;
		s++;
		while (isdigit((unsigned char)s[n]))
			n++;
		if (n < 1 || n > 6)
			return TLY_E_INVALID; /* finer than a microsecond cannot be stored */
		for (int i = 0; i < 6; i++)
			frac = frac * 10 + (i < n ? s[i] - '0' : 0);
		s += n;
	}
	int64_t offset_s = 0;
	if ((*s == 'Z' || *s == 'z') && s[1] == '\0') {
		/* UTC */
	} else if ((*s == '+' || *s == '-') && strlen(s) == 6 && s[3] == ':') {
		int oh, om;
		if (digits(s + 1, 2, &oh) || digits(s + 4, 2, &om) || oh > 23 || om > 59)
			return TLY_E_INVALID;
		offset_s = (int64_t)(oh * 3600 + om * 60) * (*s == '-' ? -1 : 1);
	} else {
		return TLY_E_INVALID;
	}
	struct tm tm = {.tm_year = y - 1900, .tm_mon = mo - 1, .tm_mday = d, .tm_hour = h,
			.tm_min = mi, .tm_sec = se};
	time_t t = timegm(&tm);
	*out = ((int64_t)t - offset_s) * US_PER_S + frac;
	return 0;
}

void tly_time_format_rfc3339(int64_t us, char out[40])
{
	int64_t secs = us / US_PER_S, frac = us % US_PER_S;
	if (frac < 0) {
		frac += US_PER_S;
		secs -= 1;
	}
	time_t t = (time_t)secs;
	struct tm tm;
	if (!gmtime_r(&t, &tm)) {
		snprintf(out, 40, "%lld", (long long)us);
		return;
	}
	size_t n = strftime(out, 40, "%Y-%m-%dT%H:%M:%S", &tm);
	if (frac)
		snprintf(out + n, 40 - n, ".%06lldZ", (long long)frac);
	else
		snprintf(out + n, 40 - n, "Z");
}

/* ---- JSON -> event ------------------------------------------------------------------------- */

struct parse {
	struct tly_arena *arena;
	char *errstr;
	size_t errlen;
};

static int bad(struct parse *p, const char *prefix, const char *field, const char *why)
{
	snprintf(p->errstr, p->errlen, "field %s%s: %s", prefix, field, why);
	return TLY_E_INVALID;
}

static int nomem(struct parse *p)
{
	snprintf(p->errstr, p->errlen, "out of memory");
	return TLY_E_NOMEM;
}

static bool is_optional(enum tly_field_kind kind)
{
	switch (kind) {
	case TLY_F_OPT_UUID:
	case TLY_F_OPT_STR:
	case TLY_F_OPT_LONG:
	case TLY_F_OPT_TS:
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL:
	case TLY_F_RECORDS:
		return true;
	default:
		return false;
	}
}

static const char *dup_str(struct parse *p, const json_t *v)
{
	return tly_arena_strndup(p->arena, json_string_value(v), json_string_length(v));
}

static int parse_ts(struct parse *p, const char *prefix, const char *name, const json_t *v,
		    int64_t *out)
{
	if (json_is_integer(v)) {
		*out = json_integer_value(v);
		return 0;
	}
	if (!json_is_string(v))
		return bad(p, prefix, name, "expected an RFC 3339 timestamp or integer microseconds");
	if (tly_time_parse_rfc3339(json_string_value(v), out) != 0) {
		char why[160];
		snprintf(why, sizeof(why), "\"%.40s\" is not an RFC 3339 timestamp (2026-01-01T00:00:00Z)",
			 json_string_value(v));
		return bad(p, prefix, name, why);
	}
	return 0;
}

static int parse_map(struct parse *p, const struct tly_field *f, const char *prefix, const json_t *v,
		     struct tly_map *out)
{
	if (!json_is_object(v))
		return bad(p, prefix, f->name, "expected an object");
	size_t n = json_object_size(v);
	struct tly_map_entry *items = NULL;
	if (n) {
		items = tly_arena_alloc(p->arena, n * sizeof(*items));
		if (!items)
			return nomem(p);
		memset(items, 0, n * sizeof(*items));
	}
	size_t i = 0;
	const char *key;
	const json_t *val;
	json_object_foreach((json_t *)v, key, val)
	{
		struct tly_map_entry *e = &items[i++];
		if (!(e->key = tly_arena_strndup(p->arena, key, strlen(key))))
			return nomem(p);
		char why[200];
		switch (f->kind) {
		case TLY_F_MAP_LONG:
			if (!json_is_integer(val))
				goto wrong;
			e->i = json_integer_value(val);
			break;
		case TLY_F_MAP_STR:
			if (!json_is_string(val))
				goto wrong;
			if (!(e->s = dup_str(p, val)))
				return nomem(p);
			break;
		default:
			if (!json_is_boolean(val))
				goto wrong;
			e->b = json_is_true(val);
			break;
		}
		continue;
	wrong:
		snprintf(why, sizeof(why), "value of \"%.64s\": expected %s", key,
			 f->kind == TLY_F_MAP_LONG ? "an integer"
			 : f->kind == TLY_F_MAP_STR ? "a string"
						    : "true or false");
		return bad(p, prefix, f->name, why);
	}
	*out = (struct tly_map){items, n};
	return 0;
}

static int parse_record(struct parse *p, const struct tly_record_desc *rd, const json_t *obj,
			unsigned char *base, const char *prefix, unsigned flags, bool top);

static int parse_list(struct parse *p, const struct tly_field *f, const char *prefix, const json_t *v,
		      struct tly_list *out)
{
	if (!json_is_array(v))
		return bad(p, prefix, f->name, "expected an array");
	size_t n = json_array_size(v);
	unsigned char *items = NULL;
	if (n) {
		items = tly_arena_alloc(p->arena, n * f->sub->size);
		if (!items)
			return nomem(p);
		memset(items, 0, n * f->sub->size);
	}
	for (size_t i = 0; i < n; i++) {
		char sub[160];
		snprintf(sub, sizeof(sub), "%s%s[%zu].", prefix, f->name, i);
		const json_t *item = json_array_get(v, i);
		if (!json_is_object(item)) {
			snprintf(sub, sizeof(sub), "%s[%zu]", f->name, i);
			return bad(p, prefix, sub, "expected an object");
		}
		int rc = parse_record(p, f->sub, item, items + i * f->sub->size, sub, 0, false);
		if (rc != 0)
			return rc;
	}
	*out = (struct tly_list){items, n};
	return 0;
}

static int parse_field(struct parse *p, const struct tly_field *f, const json_t *v, void *dst,
		       const char *prefix)
{
	int64_t l;
	int32_t i32;
	bool b;
	const char *s;
	struct tly_opt_i64 o = {0};

	switch (f->kind) {
	case TLY_F_UUID:
	case TLY_F_OPT_UUID: {
		tly_uuid u;
		if (!json_is_string(v) || tly_uuid_parse(json_string_value(v), &u) != 0)
			return bad(p, prefix, f->name, "expected a UUID (\"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx\")");
		memcpy(dst, &u, sizeof(u));
		return 0;
	}
	case TLY_F_STR:
	case TLY_F_OPT_STR:
		if (!json_is_string(v))
			return bad(p, prefix, f->name, "expected a string");
		if (!(s = dup_str(p, v)))
			return nomem(p);
		memcpy(dst, &s, sizeof(s));
		return 0;
	case TLY_F_JSON:
		if (json_is_string(v)) {
			s = dup_str(p, v);
		} else {
			char *text = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
			if (!text)
				return nomem(p);
			s = tly_arena_strndup(p->arena, text, strlen(text));
			free(text);
		}
		if (!s)
			return nomem(p);
		memcpy(dst, &s, sizeof(s));
		return 0;
	case TLY_F_LONG:
		if (!json_is_integer(v))
			return bad(p, prefix, f->name, "expected an integer");
		l = json_integer_value(v);
		memcpy(dst, &l, sizeof(l));
		return 0;
	case TLY_F_INT:
		if (!json_is_integer(v) || json_integer_value(v) < INT32_MIN ||
		    json_integer_value(v) > INT32_MAX)
			return bad(p, prefix, f->name, "expected a 32-bit integer");
		i32 = (int32_t)json_integer_value(v);
		memcpy(dst, &i32, sizeof(i32));
		return 0;
	case TLY_F_BOOL:
		if (!json_is_boolean(v))
			return bad(p, prefix, f->name, "expected true or false");
		b = json_is_true(v);
		memcpy(dst, &b, sizeof(b));
		return 0;
	case TLY_F_TS:
		if (parse_ts(p, prefix, f->name, v, &l) != 0)
			return TLY_E_INVALID;
		memcpy(dst, &l, sizeof(l));
		return 0;
	case TLY_F_OPT_LONG:
		if (!json_is_integer(v))
			return bad(p, prefix, f->name, "expected an integer or null");
		o = (struct tly_opt_i64){true, json_integer_value(v)};
		memcpy(dst, &o, sizeof(o));
		return 0;
	case TLY_F_OPT_TS:
		if (parse_ts(p, prefix, f->name, v, &o.v) != 0)
			return TLY_E_INVALID;
		o.set = true;
		memcpy(dst, &o, sizeof(o));
		return 0;
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL:
		return parse_map(p, f, prefix, v, dst);
	case TLY_F_RECORDS:
		return parse_list(p, f, prefix, v, dst);
	case TLY_F_SHA256: {
		unsigned char h[32];
		const char *hex = json_string_value(v);
		if (!hex || strlen(hex) != 64)
			return bad(p, prefix, f->name, "expected 64 hex digits");
		for (int k = 0; k < 32; k++) {
			unsigned int byte;
			if (!isxdigit((unsigned char)hex[2 * k]) || !isxdigit((unsigned char)hex[2 * k + 1]) ||
			    sscanf(hex + 2 * k, "%2x", &byte) != 1)
				return bad(p, prefix, f->name, "expected 64 hex digits");
			h[k] = (unsigned char)byte;
		}
		memcpy(dst, h, sizeof(h));
		return 0;
	}
	}
	return bad(p, prefix, f->name, "has an unknown kind");
}

static const struct tly_field *find_field(const struct tly_record_desc *rd, const char *name)
{
	for (size_t i = 0; i < rd->n_fields; i++) {
		if (strcmp(rd->fields[i].name, name) == 0)
			return &rd->fields[i];
	}
	return NULL;
}

static int parse_record(struct parse *p, const struct tly_record_desc *rd, const json_t *obj,
			unsigned char *base, const char *prefix, unsigned flags, bool top)
{
	const char *key;
	const json_t *val;
	/* Unknown fields first, so a misspelt optional field is reported as such, not ignored. */
	json_object_foreach((json_t *)obj, key, val)
	{
		(void)val;
		if (top && strcmp(key, "type") == 0)
			continue;
		if (!find_field(rd, key)) {
			char why[160];
			snprintf(why, sizeof(why), "unknown field for %s", rd->name);
			return bad(p, prefix, key, why);
		}
	}
	for (size_t i = 0; i < rd->n_fields; i++) {
		const struct tly_field *f = &rd->fields[i];
		const json_t *v = json_object_get(obj, f->name);
		if (!v || json_is_null(v)) {
			if (top && !v && strcmp(f->name, "event_id") == 0 && (flags & TLY_EVJ_FILL_ID)) {
				tly_uuid_generate((tly_uuid *)(base + f->offset));
				continue;
			}
			if (top && !v && strcmp(f->name, "occurred_at") == 0 && (flags & TLY_EVJ_FILL_TIME)) {
				struct timespec ts;
				clock_gettime(CLOCK_REALTIME, &ts);
				int64_t now = (int64_t)ts.tv_sec * US_PER_S + ts.tv_nsec / 1000;
				memcpy(base + f->offset, &now, sizeof(now));
				continue;
			}
			if (is_optional(f->kind))
				continue; /* zeroed: nil UUID, NULL, unset, empty */
			return bad(p, prefix, f->name, v ? "must not be null" : "missing");
		}
		int rc = parse_field(p, f, v, base + f->offset, prefix);
		if (rc != 0)
			return rc;
	}
	return 0;
}

int tly_event_from_json(const json_t *obj, unsigned flags, struct tly_event *ev, char *errstr,
			size_t errlen)
{
	struct parse p = {NULL, errstr, errlen};
	tly_event_reset(ev);
	if (!json_is_object(obj)) {
		snprintf(errstr, errlen, "expected a JSON object");
		return TLY_E_INVALID;
	}
	const json_t *type = json_object_get(obj, "type");
	if (!json_is_string(type))
		return bad(&p, "", "type", type ? "expected a string" : "missing");
	const struct tly_event_desc *d = tly_event_desc_by_name(json_string_value(type));
	if (!d) {
		char why[160];
		snprintf(why, sizeof(why), "unknown event type \"%.64s\"", json_string_value(type));
		return bad(&p, "", "type", why);
	}
	tly_event_init(ev, d->type);
	if (!(p.arena = tly_event_arena(ev)))
		return nomem(&p);
	return parse_record(&p, &d->record, obj, (unsigned char *)ev, "", flags, true);
}

int tly_event_from_json_text(const char *text, size_t len, unsigned flags, struct tly_event *ev,
			     char *errstr, size_t errlen)
{
	json_error_t jerr;
	json_t *obj = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!obj) {
		tly_event_reset(ev);
		snprintf(errstr, errlen, "not JSON: %s (column %d)", jerr.text, jerr.column);
		return TLY_E_INVALID;
	}
	int rc = tly_event_from_json(obj, flags, ev, errstr, errlen);
	json_decref(obj);
	return rc;
}

/* ---- event -> JSON ------------------------------------------------------------------------- */

static json_t *record_to_json(const struct tly_record_desc *rd, const unsigned char *base,
			      const char *type);

static json_t *field_to_json(const struct tly_field *f, const unsigned char *src)
{
	char text[80];
	const char *s;
	int64_t l;
	int32_t i32;
	bool b;
	struct tly_opt_i64 o;

	switch (f->kind) {
	case TLY_F_UUID:
	case TLY_F_OPT_UUID:
		if (f->kind == TLY_F_OPT_UUID && tly_uuid_is_nil((const tly_uuid *)src))
			return json_null();
		tly_uuid_format((const tly_uuid *)src, text);
		return json_string(text);
	case TLY_F_STR:
	case TLY_F_OPT_STR:
	case TLY_F_JSON:
		memcpy(&s, src, sizeof(s));
		return s ? json_string(s) : json_null();
	case TLY_F_LONG:
		memcpy(&l, src, sizeof(l));
		return json_integer(l);
	case TLY_F_INT:
		memcpy(&i32, src, sizeof(i32));
		return json_integer(i32);
	case TLY_F_BOOL:
		memcpy(&b, src, sizeof(b));
		return json_boolean(b);
	case TLY_F_TS:
		memcpy(&l, src, sizeof(l));
		tly_time_format_rfc3339(l, text);
		return json_string(text);
	case TLY_F_OPT_LONG:
		memcpy(&o, src, sizeof(o));
		return o.set ? json_integer(o.v) : json_null();
	case TLY_F_OPT_TS:
		memcpy(&o, src, sizeof(o));
		if (!o.set)
			return json_null();
		tly_time_format_rfc3339(o.v, text);
		return json_string(text);
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL: {
		struct tly_map m;
		memcpy(&m, src, sizeof(m));
		json_t *obj = json_object();
		for (size_t i = 0; obj && i < m.n; i++) {
			const struct tly_map_entry *e = &m.items[i];
			json_t *v = f->kind == TLY_F_MAP_LONG  ? json_integer(e->i)
				    : f->kind == TLY_F_MAP_STR ? json_string(e->s ? e->s : "")
							       : json_boolean(e->b);
			if (json_object_set_new(obj, e->key, v) != 0) {
				json_decref(obj);
				return NULL;
			}
		}
		return obj;
	}
	case TLY_F_RECORDS: {
		struct tly_list list;
		memcpy(&list, src, sizeof(list));
		json_t *arr = json_array();
		for (size_t i = 0; arr && i < list.n; i++) {
			json_t *item = record_to_json(
				f->sub, (const unsigned char *)list.items + i * f->sub->size, NULL);
			if (json_array_append_new(arr, item) != 0) {
				json_decref(arr);
				return NULL;
			}
		}
		return arr;
	}
	case TLY_F_SHA256:
		for (int k = 0; k < 32; k++)
			snprintf(text + 2 * k, 3, "%02x", src[k]);
		return json_string(text);
	}
	return NULL;
}

static json_t *record_to_json(const struct tly_record_desc *rd, const unsigned char *base,
			      const char *type)
{
	json_t *obj = json_object();
	if (!obj)
		return NULL;
	if (type && json_object_set_new(obj, "type", json_string(type)) != 0)
		goto fail;
	for (size_t i = 0; i < rd->n_fields; i++) {
		const struct tly_field *f = &rd->fields[i];
		if (json_object_set_new(obj, f->name, field_to_json(f, base + f->offset)) != 0)
			goto fail;
	}
	return obj;
fail:
	json_decref(obj);
	return NULL;
}

json_t *tly_event_to_json(const struct tly_event *ev)
{
	const struct tly_event_desc *d = tly_event_desc(ev->type);
	if (!d)
		return NULL;
	return record_to_json(&d->record, (const unsigned char *)ev, d->name);
}

json_t *tly_event_field_to_json(const struct tly_event *ev, const char *name)
{
	const struct tly_event_desc *d = tly_event_desc(ev->type);
	for (size_t i = 0; d && i < d->record.n_fields; i++) {
		const struct tly_field *f = &d->record.fields[i];
		if (strcmp(f->name, name) == 0)
			return field_to_json(f, (const unsigned char *)ev + f->offset);
	}
	return NULL;
}

char *tly_event_to_json_text(const struct tly_event *ev)
{
	json_t *obj = tly_event_to_json(ev);
	if (!obj)
		return NULL;
	char *text = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(obj);
	return text;
}
