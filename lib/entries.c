/* Ledger entries read back from PostgreSQL rows into decoded LedgerEntry events. */
#include "entries.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "arena.h"
#include "copyout.h"

/* One row's values: a result's row, or a binary COPY row of TLY_ENTRIES_SELECT_BINARY. */
struct row {
	const PGresult *res; /* NULL: a COPY row */
	int r;
	const char *const *values;
	const int *lengths;  /* -1: NULL */
};

#define TIMESTAMPTZOID 1184
#define PG_EPOCH_US 946684800000000LL /* 2000-01-01, where a binary timestamptz counts from */

static bool is_null(const struct row *w, int c)
{
	return w->res ? PQgetisnull(w->res, w->r, c) : w->lengths[c] < 0;
}

static const char *value(const struct row *w, int c)
{
	return w->res ? PQgetvalue(w->res, w->r, c) : w->values[c];
}

static int length(const struct row *w, int c)
{
	return w->res ? PQgetlength(w->res, w->r, c) : w->lengths[c];
}

static bool binary(const struct row *w, int c)
{
	return w->res ? PQfformat(w->res, c) == 1 : true;
}

/* The columns of TLY_ENTRIES_SELECT_BINARY that are timestamps. */
static bool timestamp(const struct row *w, int c)
{
	return w->res ? PQftype(w->res, c) == TIMESTAMPTZOID : c == 18 || c == 19 || c == 24;
}

/* Network-order signed integer of len bytes, 1 to 8 (a binary-format int2). */
static int64_t be_int(const unsigned char *p, int len)
{
	uint64_t v = len > 0 && (p[0] & 0x80) ? ~(uint64_t)0 : 0; /* the sign, extended */
	for (int i = 0; i < len; i++)
		v = v << 8 | p[i];
	return (int64_t)v;
}

/* A binary int4, int8 or timestamptz (as µs since the Unix epoch), or a text integer. */
static int64_t col_i64(const struct row *w, int c)
{
	if (binary(w, c)) {
		const char *p = value(w, c);
		int len = length(w, c);
		int64_t v = len == 8   ? tly_copyout_int8(p)
			    : len == 4 ? tly_copyout_int4(p)
				       : be_int((const unsigned char *)p, len);
		return timestamp(w, c) ? v + PG_EPOCH_US : v;
	}
	return strtoll(value(w, c), NULL, 10);
}

static struct tly_opt_i64 col_opt(const struct row *w, int c)
{
	struct tly_opt_i64 o = {false, 0};
	if (!is_null(w, c))
		o = (struct tly_opt_i64){true, col_i64(w, c)};
	return o;
}

static const char *col_str(struct tly_arena *arena, const struct row *w, int c)
{
	if (is_null(w, c))
		return NULL;
	return tly_arena_strndup(arena, value(w, c), (size_t)length(w, c));
}

static int col_uuid(const struct row *w, int c, tly_uuid *out)
{
	memset(out, 0, sizeof(*out));
	if (is_null(w, c))
		return 0;
	if (binary(w, c)) {
		if (length(w, c) != 16)
			return TLY_E_CORRUPT;
		memcpy(out->b, value(w, c), 16);
		return 0;
	}
	return tly_uuid_parse(value(w, c), out);
}

/* bytea of 32 bytes: raw in binary format, hex text ("\x00ab…") in text format. */
static int col_sha(const struct row *w, int c, unsigned char out[32])
{
	if (is_null(w, c))
		return TLY_E_CORRUPT;
	if (binary(w, c)) {
		if (length(w, c) != 32)
			return TLY_E_CORRUPT;
		memcpy(out, value(w, c), 32);
		return 0;
	}
	size_t n = 0;
	unsigned char *bytes = PQunescapeBytea((const unsigned char *)value(w, c), &n);
	int rc = bytes && n == 32 ? 0 : TLY_E_CORRUPT;
	if (rc == 0)
		memcpy(out, bytes, 32);
	PQfreemem(bytes);
	return rc;
}

static int col_lines(struct tly_arena *arena, const struct row *w, int c, struct tly_list *out)
{
	*out = (struct tly_list){NULL, 0};
	if (is_null(w, c))
		return 0;
	json_error_t jerr;
	json_t *arr = json_loadb(value(w, c), (size_t)length(w, c), 0, &jerr);
	int rc = TLY_E_CORRUPT;
	if (!arr || !json_is_array(arr))
		goto out;
	size_t n = json_array_size(arr);
	struct tly_invoice_line *lines = tly_arena_alloc(arena, n * sizeof(*lines) + 1);
	if (!lines) {
		rc = TLY_E_NOMEM;
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		const char *kind = NULL, *feature = NULL;
		json_t *fk = NULL; /* the ledger stores JSON null for a line without a feature */
		json_int_t q = 0, up = 0, amt = 0;
		if (json_unpack(json_array_get(arr, i), "{s:s, s?o, s:I, s:I, s:I}", "kind", &kind,
				"feature_key", &fk, "quantity", &q, "unit_price_micros", &up,
				"amount_cents", &amt) != 0 ||
		    (fk && !json_is_null(fk) && !json_is_string(fk)))
			goto out;
		feature = json_is_string(fk) ? json_string_value(fk) : NULL;
		lines[i].kind = tly_arena_strndup(arena, kind, strlen(kind));
		lines[i].feature_key = feature ? tly_arena_strndup(arena, feature, strlen(feature)) : NULL;
		lines[i].quantity = q;
		lines[i].unit_price_micros = up;
		lines[i].amount_cents = amt;
		if (!lines[i].kind || (feature && !lines[i].feature_key)) {
			rc = TLY_E_NOMEM;
			goto out;
		}
	}
	*out = (struct tly_list){lines, n};
	rc = 0;
out:
	json_decref(arr);
	return rc;
}

/* The row as a LedgerEntry into ev (reset first). 0, TLY_E_CORRUPT or TLY_E_NOMEM. */
static int fill(const struct row *w, struct tly_event *ev)
{
	tly_event_reset(ev);
	tly_event_init(ev, TLY_EV_LEDGER_ENTRY);
	struct tly_arena *arena = tly_event_arena(ev);
	struct tly_ledger_entry *e = &ev->u.ledger_entry;
	if (!arena)
		return TLY_E_NOMEM;
	e->seq = col_i64(w, 1);
	e->kind = col_str(arena, w, 2);
	e->cause_type = col_str(arena, w, 4);
	e->cause_partition = (int32_t)col_i64(w, 5);
	e->cause_offset = col_i64(w, 6);
	e->allowance_delta = col_i64(w, 10);
	e->credits_delta = col_i64(w, 11);
	e->held_delta = col_i64(w, 12);
	e->overage_delta = col_i64(w, 13);
	e->allowance_remaining = col_i64(w, 14);
	e->credits_remaining = col_i64(w, 15);
	e->held = col_i64(w, 16);
	e->overage_tokens = col_i64(w, 17);
	e->period_start = col_opt(w, 18);
	e->period_end = col_opt(w, 19);
	e->amount_cents = col_opt(w, 20);
	e->currency = col_str(arena, w, 21);
	e->reason = col_str(arena, w, 23);
	e->ledger_time = col_i64(w, 24);
	if (col_uuid(w, 0, &ev->tenant_id) != 0 || col_uuid(w, 3, &e->cause_event_id) != 0 ||
	    col_uuid(w, 8, &e->ref_id) != 0 || col_uuid(w, 9, &e->subscription_id) != 0 ||
	    col_sha(w, 7, e->cause_digest) != 0 || col_sha(w, 25, e->prev_hash) != 0 ||
	    col_sha(w, 26, e->hash) != 0 || !e->kind || !e->cause_type)
		return TLY_E_CORRUPT;
	return col_lines(arena, w, 22, &e->lines);
}

int tly_entries_each(const PGresult *res, int (*fn)(const struct tly_event *entry, void *ud),
		     void *ud)
{
	struct tly_event ev = {0}; /* tly_event_init keeps ev.arena: it must start NULL */
	int rc = 0;
	if (PQnfields(res) != TLY_ENTRIES_NFIELDS)
		return TLY_E_CORRUPT;
	for (int r = 0; r < PQntuples(res) && rc == 0; r++) {
		struct row w = {res, r, NULL, NULL};
		rc = fill(&w, &ev);
		if (rc == 0)
			rc = fn(&ev, ud);
	}
	tly_event_free(&ev);
	return rc;
}

int tly_entries_from_copy(const char *const *values, const int *lengths, int nfields,
			  struct tly_event *ev)
{
	static const int fixed[TLY_ENTRIES_NFIELDS] = {
		[0] = 16, [1] = 8, [3] = 16, [5] = 4, [6] = 8, [8] = 16, [9] = 16, [10] = 8, [11] = 8,
		[12] = 8, [13] = 8, [14] = 8, [15] = 8, [16] = 8, [17] = 8, [18] = 8, [19] = 8,
		[20] = 8, [24] = 8};
	if (nfields != TLY_ENTRIES_NFIELDS)
		return TLY_E_CORRUPT;
	for (int c = 0; c < nfields; c++) {
		if (fixed[c] && lengths[c] >= 0 && lengths[c] != fixed[c])
			return TLY_E_CORRUPT;
	}
	struct row w = {NULL, 0, values, lengths};
	return fill(&w, ev);
}
