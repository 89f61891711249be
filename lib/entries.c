/* Ledger entries read back from PostgreSQL rows into decoded LedgerEntry events. */
#include "entries.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "arena.h"

/* Network-order integer of len bytes (a binary-format int4 or int8). */
static int64_t be_int(const unsigned char *p, int len)
{
	uint64_t v = len == 4 && (p[0] & 0x80) ? ~(uint64_t)0xffffffff : 0;
	for (int i = 0; i < len; i++)
		v = v << 8 | p[i];
	return (int64_t)v;
}

#define TIMESTAMPTZOID 1184
#define PG_EPOCH_US 946684800000000LL /* 2000-01-01, where a binary timestamptz counts from */

/* A binary int4, int8 or timestamptz (as µs since the Unix epoch), or a text integer. */
static int64_t col_i64(const PGresult *res, int r, int c)
{
	if (PQfformat(res, c) == 1) {
		int64_t v = be_int((const unsigned char *)PQgetvalue(res, r, c), PQgetlength(res, r, c));
		return PQftype(res, c) == TIMESTAMPTZOID ? v + PG_EPOCH_US : v;
	}
	return strtoll(PQgetvalue(res, r, c), NULL, 10);
}

static struct tly_opt_i64 col_opt(const PGresult *res, int r, int c)
{
	struct tly_opt_i64 o = {false, 0};
	if (!PQgetisnull(res, r, c))
		o = (struct tly_opt_i64){true, col_i64(res, r, c)};
	return o;
}

static const char *col_str(struct tly_arena *arena, const PGresult *res, int r, int c)
{
	if (PQgetisnull(res, r, c))
		return NULL;
	return tly_arena_strndup(arena, PQgetvalue(res, r, c), (size_t)PQgetlength(res, r, c));
}

static int col_uuid(const PGresult *res, int r, int c, tly_uuid *out)
{
	memset(out, 0, sizeof(*out));
	if (PQgetisnull(res, r, c))
		return 0;
	if (PQfformat(res, c) == 1) {
		if (PQgetlength(res, r, c) != 16)
			return TLY_E_CORRUPT;
		memcpy(out->b, PQgetvalue(res, r, c), 16);
		return 0;
	}
	return tly_uuid_parse(PQgetvalue(res, r, c), out);
}

/* bytea of 32 bytes: raw in binary format, hex text ("\x00ab…") in text format. */
static int col_sha(const PGresult *res, int r, int c, unsigned char out[32])
{
	if (PQfformat(res, c) == 1) {
		if (PQgetlength(res, r, c) != 32)
			return TLY_E_CORRUPT;
		memcpy(out, PQgetvalue(res, r, c), 32);
		return 0;
	}
	size_t n = 0;
	unsigned char *bytes = PQunescapeBytea((const unsigned char *)PQgetvalue(res, r, c), &n);
	int rc = bytes && n == 32 ? 0 : TLY_E_CORRUPT;
	if (rc == 0)
		memcpy(out, bytes, 32);
	PQfreemem(bytes);
	return rc;
}

static int col_lines(struct tly_arena *arena, const PGresult *res, int r, int c, struct tly_list *out)
{
	*out = (struct tly_list){NULL, 0};
	if (PQgetisnull(res, r, c))
		return 0;
	json_error_t jerr;
	json_t *arr = json_loads(PQgetvalue(res, r, c), 0, &jerr);
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

int tly_entries_each(const PGresult *res, int (*fn)(const struct tly_event *entry, void *ud),
		     void *ud)
{
	struct tly_event ev = {0}; /* tly_event_init keeps ev.arena: it must start NULL */
	int rc = 0;
	if (PQnfields(res) != 27)
		return TLY_E_CORRUPT;
	for (int r = 0; r < PQntuples(res) && rc == 0; r++) {
		tly_event_reset(&ev);
		tly_event_init(&ev, TLY_EV_LEDGER_ENTRY);
		struct tly_arena *arena = tly_event_arena(&ev);
		struct tly_ledger_entry *e = &ev.u.ledger_entry;
		if (!arena) {
			rc = TLY_E_NOMEM;
			break;
		}
		e->seq = col_i64(res, r, 1);
		e->kind = col_str(arena, res, r, 2);
		e->cause_type = col_str(arena, res, r, 4);
		e->cause_partition = (int32_t)col_i64(res, r, 5);
		e->cause_offset = col_i64(res, r, 6);
		e->allowance_delta = col_i64(res, r, 10);
		e->credits_delta = col_i64(res, r, 11);
		e->held_delta = col_i64(res, r, 12);
		e->overage_delta = col_i64(res, r, 13);
		e->allowance_remaining = col_i64(res, r, 14);
		e->credits_remaining = col_i64(res, r, 15);
		e->held = col_i64(res, r, 16);
		e->overage_tokens = col_i64(res, r, 17);
		e->period_start = col_opt(res, r, 18);
		e->period_end = col_opt(res, r, 19);
		e->amount_cents = col_opt(res, r, 20);
		e->currency = col_str(arena, res, r, 21);
		e->reason = col_str(arena, res, r, 23);
		e->ledger_time = col_i64(res, r, 24);
		if (col_uuid(res, r, 0, &ev.tenant_id) != 0 || col_uuid(res, r, 3, &e->cause_event_id) != 0 ||
		    col_uuid(res, r, 8, &e->ref_id) != 0 || col_uuid(res, r, 9, &e->subscription_id) != 0 ||
		    col_sha(res, r, 7, e->cause_digest) != 0 || col_sha(res, r, 25, e->prev_hash) != 0 ||
		    col_sha(res, r, 26, e->hash) != 0 || !e->kind || !e->cause_type) {
			rc = TLY_E_CORRUPT;
			break;
		}
		if ((rc = col_lines(arena, res, r, 22, &e->lines)) != 0)
			break;
		rc = fn(&ev, ud);
	}
	tly_event_free(&ev);
	return rc;
}
