/* tally-ledger's statements: guard, offsets, snapshots, seen lookup, fenced batch commit, republish. */
#include "ledger_store.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "arena.h"
#include "entries.h"
#include "log.h"
#include "pgarray.h"
#include "pgcopy.h"
#include "wallet.h"

#define SEEN_KEYS_PER_STATEMENT 8192 /* a group's keys in one statement (4x ledger.batch.max.events) */
#define ENTRY_ROW_BYTES 512 /* room reserved per entry row (a row is about 400 bytes) */
#define ENTRY_COLS 28

#define ENTRY_COLUMNS_TEXT                                                                          \
	"tenant_id, seq, kind, cause_event_id, cause_type, cause_partition, cause_offset, "          \
	"cause_digest, ref_id, subscription_id, allowance_delta, credits_delta, held_delta, "        \
	"overage_delta, allowance_remaining, credits_remaining, held, overage_tokens, period_start, " \
	"period_end, amount_cents, currency, lines, reason, ledger_time, prev_hash, hash, cause_first"

/*
 * The fixed statements of a group's transaction and of the "seen" lookup, prepared once per
 * connection (tly_pg_prepare: again on a new one): each group parsed and planned every one of
 * them again. The COPY statement is not here (COPY cannot be prepared).
 */
enum stmt {
	STMT_NONE = -1, /* a statement built for the group, sent as text */
	STMT_BEGIN,
	STMT_COMMIT,
	STMT_OFFSETS_ADVANCE,
	STMT_INPUTS,
	STMT_HOLDS_FORGET,
	STMT_HOLDS_SAVE,
	STMT_WALLETS,
	STMT_QUARANTINE,
	STMT_PUBLISHED,
	STMT_GENERIC_PLANS,
	STMT_CUSTOM_PLANS,
	STMT_START,
	STMT_SEEN,
	STMT_COUNT
};

static const struct tly_pg_stmt stmts[STMT_COUNT] = {
	[STMT_BEGIN] = {"tly_ledger_begin", "BEGIN"},
	[STMT_COMMIT] = {"tly_ledger_commit", "COMMIT"},
	/*
	 * the offsets' compare-and-set, every partition of the group (migration 0013): it fails
	 * the transaction (SQLSTATE TL001) when one did not advance, since the COMMIT is sent
	 * with it; it locks the stored rows first, so behind a transaction of the same partitions
	 * that still runs (tly_ledger_store_run_gated) it waits for its end and sees its offsets
	 */
	[STMT_OFFSETS_ADVANCE] = {"tly_ledger_offsets_advance",
				  "SELECT tly_ledger_offsets_advance($1, $2, $3::int[], $4::bigint[], "
				  "$5::bigint[])"},
	/*
	 * one row per partition of the group that applied records: b's row k is partition k's
	 * records, elements lo..hi of the group's flat arrays $4-$6 (see build_inputs); a slice's
	 * subscripts start at 1, as the table's check asks
	 */
	[STMT_INPUTS] = {"tly_ledger_inputs",
			 "INSERT INTO ledger_input_batches (partition, first_offset, last_offset, "
			 "offsets, tenant_ids, record_values) "
			 "SELECT b.partition::int, ($4::bigint[])[b.lo::int], ($4::bigint[])[b.hi::int], "
			 "($4::bigint[])[b.lo::int:b.hi::int], ($5::uuid[])[b.lo::int:b.hi::int], "
			 "($6::bytea[])[b.lo::int:b.hi::int] "
			 "FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS b (partition, lo, hi)"},
	[STMT_HOLDS_FORGET] = {"tly_ledger_holds_forget",
			       "DELETE FROM ledger_holds h USING unnest($1::uuid[], $2::bigint[]) AS d "
			       "(tenant_id, ord) WHERE h.tenant_id = d.tenant_id AND h.ord = d.ord"},
	[STMT_HOLDS_SAVE] = {"tly_ledger_holds_save",
			     "INSERT INTO ledger_holds (tenant_id, ord, reservation_id, tokens, "
			     "expires_at, ended_at) SELECT * FROM unnest($1::uuid[], $2::bigint[], "
			     "$3::uuid[], $4::bigint[], $5::bigint[], $6::bigint[]) "
			     "ON CONFLICT (tenant_id, ord) DO UPDATE SET ended_at = EXCLUDED.ended_at"},
	[STMT_WALLETS] = {"tly_ledger_wallets",
			  "INSERT INTO ledger_wallets (tenant_id, partition, seq, state, as_of_offset) "
			  "SELECT w.tenant_id, w.partition, w.seq, w.state::jsonb, w.as_of FROM "
			  "unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[]) "
			  "AS w (tenant_id, partition, seq, state, as_of) ON CONFLICT (tenant_id) DO "
			  "UPDATE SET partition = EXCLUDED.partition, seq = EXCLUDED.seq, state = "
			  "EXCLUDED.state, as_of_offset = EXCLUDED.as_of_offset, updated_at = now()"},
	[STMT_QUARANTINE] = {"tly_ledger_quarantine",
			     "INSERT INTO quarantine (topic, partition, \"offset\", key, value, reason, "
			     "detail) VALUES ($1, $2, $3, $4, $5, $6, $7) "
			     "ON CONFLICT (topic, partition, \"offset\") DO NOTHING"},
	[STMT_PUBLISHED] = {"tly_ledger_published",
			    "INSERT INTO ledger_published (topic, partition, next_offset) "
			    "SELECT $1, k.partition, k.next_offset FROM unnest($2::int[], $3::bigint[]) "
			    "AS k (partition, next_offset) ON CONFLICT (topic, partition) DO UPDATE SET "
			    "next_offset = GREATEST(ledger_published.next_offset, EXCLUDED.next_offset), "
			    "updated_at = now()"},
	/* the rest of the transaction's statements on generic plans (see prepare) */
	[STMT_GENERIC_PLANS] = {"tly_ledger_generic_plans",
				"SELECT pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', true)"},
	/* back to custom plans for the compare-and-sets and the holds' delete (see build) */
	[STMT_CUSTOM_PLANS] = {"tly_ledger_custom_plans",
			       "SELECT pg_catalog.set_config('plan_cache_mode', 'force_custom_plan', true)"},
	/*
	 * the transaction's first statement: generic plans, as STMT_GENERIC_PLANS, and a bound on
	 * any one lock wait of the transaction but the compare-and-set's (its function waits
	 * without one, see migration 0013; the bound is back once it returned, for the holds,
	 * snapshots, markers and COMMIT, whose rows the partitions' owner alone writes once it
	 * passed the compare-and-set, so a wait there is short, and one that outlasts the bound
	 * fails as retriable). Before it, a transaction inserts only new keys, which wait only for
	 * another owner's transaction inserting the same ones (a stale owner, or the new owner of
	 * the same records); the one after it on the lane may meanwhile hold its own new keys and
	 * wait in the writer, not in PostgreSQL, for this one's compare-and-set (ledger_writer.c):
	 * a cycle through that wait is one PostgreSQL cannot detect, and would stall both owners.
	 * The bound ends such a wait (SQLSTATE 55P03, retriable: the group reloads). $1: the bound in
	 * ms (ledger.lock.timeout.ms), as text.
	 */
	[STMT_START] = {"tly_ledger_start",
			"SELECT pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', true), "
			"pg_catalog.set_config('lock_timeout', $1, true)"},
	/* see lookup_chunk */
	[STMT_SEEN] = {"tly_ledger_seen",
		       "SELECT k.i, x.seq, x.cause_digest, x.cause_offset FROM unnest($1::uuid[], "
		       "$2::uuid[]) WITH ORDINALITY AS k (tenant_id, event_id, i) CROSS JOIN LATERAL "
		       "(SELECT e.seq, e.cause_digest, e.cause_offset FROM ledger_entries e "
		       "WHERE e.tenant_id = k.tenant_id AND e.cause_event_id = k.event_id AND "
		       "e.cause_first OFFSET 0) x"},
};

/* ---- small helpers ------------------------------------------------------------------------ */
/*
 * stmts prepared on conn, the first time on each connection. The session's plans are custom
 * (made for each execution's arrays, as unprepared statements' are): a generic plan is made
 * once, from the table sizes of that moment (a fresh ledger's empty ledger_holds), and with
 * every statement on generic plans the latency at 20,000/s was worse in 4 of 6 runs (p50
 * 33-1,257 ms against 26-54 ms). That matters for the statements that join a table (the
 * offsets' compare-and-set, the holds' delete, the "seen" lookup). The others insert or upsert
 * the rows of unnest() or VALUES: their plan has one shape whatever the sizes, and planning it
 * again for every group was most of the planning (6.7% of the writer's backend at 22,000/s). So each transaction runs
 * them after STMT_GENERIC_PLANS, a transaction-local setting that its COMMIT or ROLLBACK undoes.
 */
static int prepare(PGconn *conn, struct tly_pg_error *err)
{
	static const char *const custom[] = {"plan_cache_mode"};
	if (!tly_pg_prepared(conn, stmts) &&
	    tly_pg_exec(conn, "SELECT pg_catalog.set_config($1, 'force_custom_plan', false)", 1,
			custom, err) != 0)
		return TLY_E_PG;
	return tly_pg_prepare(conn, stmts, STMT_COUNT, err);
}


static void set_err(struct tly_pg_error *err, enum tly_errclass cls, const char *msg)
{
	if (!err)
		return;
	err->errclass = cls;
	err->sqlstate[0] = '\0';
	snprintf(err->message, sizeof(err->message), "%s", msg);
}

/* Invoice lines as a JSON array (jsonb text), or NULL for an entry without lines. */
static char *arena_lines(struct tly_arena *arena, const struct tly_list *lines, bool *oom)
{
	*oom = false;
	if (lines->n == 0)
		return NULL;
	char *out = NULL;
	json_t *arr = json_array();
	if (!arr)
		goto fail;
	const struct tly_invoice_line *l = lines->items;
	for (size_t i = 0; i < lines->n; i++) {
		json_t *o = json_pack("{s:s, s:o, s:I, s:I, s:I}", "kind", l[i].kind, "feature_key",
				      l[i].feature_key ? json_string(l[i].feature_key) : json_null(),
				      "quantity", (json_int_t)l[i].quantity, "unit_price_micros",
				      (json_int_t)l[i].unit_price_micros, "amount_cents",
				      (json_int_t)l[i].amount_cents);
		if (!o || json_array_append_new(arr, o) != 0)
			goto fail;
	}
	char *text = json_dumps(arr, JSON_COMPACT | JSON_SORT_KEYS);
	if (!text)
		goto fail;
	out = tly_arena_strndup(arena, text, strlen(text));
	free(text);
	if (!out)
		goto fail;
	json_decref(arr);
	return out;
fail:
	json_decref(arr);
	*oom = true;
	return NULL;
}

/* Command tag row count ("INSERT 0 1" -> 1). */
/* ---- partition guard ---------------------------------------------------------------------- */

int tly_ledger_store_check_partitions(PGconn *conn, const char *topic, int32_t count,
				      char *errstr, size_t errlen)
{
	struct tly_pg_error err;
	char n[16];
	snprintf(n, sizeof(n), "%d", (int)count);
	const char *const ins[] = {topic, n};
	if (tly_pg_exec(conn,
			"INSERT INTO topic_partitions (topic, partition_count) VALUES ($1, $2) "
			"ON CONFLICT (topic) DO NOTHING",
			2, ins, &err) != 0) {
		snprintf(errstr, errlen, "could not record the partition count of \"%s\": %s", topic,
			 err.message);
		return TLY_E_PG;
	}
	const char *const sel[] = {topic};
	PGresult *res = tly_pg_query(conn,
				     "SELECT partition_count, recorded_at FROM topic_partitions "
				     "WHERE topic = $1",
				     1, sel, &err);
	if (!res) {
		snprintf(errstr, errlen, "could not read the partition count of \"%s\": %s", topic,
			 err.message);
		return TLY_E_PG;
	}
	int rc = 0;
	long recorded = PQntuples(res) == 1 ? strtol(PQgetvalue(res, 0, 0), NULL, 10) : -1;
	if (recorded != count) {
		snprintf(errstr, errlen,
			 "topic \"%s\" has %d partitions, but the ledger was built with %ld (recorded %s)\n"
			 "  why: a tenant's partition is murmur2(tenant id) %% partitions; with another count\n"
			 "  its new events land on another partition than its history, so the order of its\n"
			 "  ledger and the one-writer-per-tenant guarantee would break (double spend).\n"
			 "  what to do: restore the topic to %ld partitions, or create a new topic with the new\n"
			 "  count, migrate the events to it in ledger order per tenant, and start the ledger\n"
			 "  on a new database; never change the partition count of a live tally.events",
			 topic, (int)count, recorded, PQntuples(res) == 1 ? PQgetvalue(res, 0, 1) : "?",
			 recorded);
		rc = TLY_E_CONFIG;
	}
	PQclear(res);
	return rc;
}

/* ---- offsets and snapshots ---------------------------------------------------------------- */

int tly_ledger_store_load_offset(PGconn *conn, const char *topic, int32_t partition,
				 int64_t *next_offset, struct tly_pg_error *err)
{
	char p[16];
	snprintf(p, sizeof(p), "%d", (int)partition);
	const char *const v[] = {TLY_LEDGER_CONSUMER, topic, p};
	PGresult *res = tly_pg_query(conn,
				     "SELECT next_offset FROM consumer_offsets "
				     "WHERE consumer = $1 AND topic = $2 AND partition = $3",
				     3, v, err);
	if (!res)
		return TLY_E_PG;
	*next_offset = PQntuples(res) == 1 ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : -1;
	PQclear(res);
	return 0;
}

/* Row r of the holds result as a hold row: 0, or TLY_E_CORRUPT. */
static int hold_row(PGresult *res, int r, struct tly_hold_row *row)
{
	char *end;
	row->order = strtoll(PQgetvalue(res, r, 1), &end, 10);
	if (tly_uuid_parse(PQgetvalue(res, r, 2), &row->id) != 0)
		return TLY_E_CORRUPT;
	row->tokens = strtoll(PQgetvalue(res, r, 3), NULL, 10);
	row->expires_at = strtoll(PQgetvalue(res, r, 4), NULL, 10);
	row->ended_at = PQgetisnull(res, r, 5) ? -1 : strtoll(PQgetvalue(res, r, 5), NULL, 10);
	return 0;
}

int tly_ledger_store_load_wallets(PGconn *conn, int32_t partition,
				  int (*fn)(struct tly_wallet *w, void *ud), void *ud,
				  struct tly_pg_error *err)
{
	char p[16], errstr[256];
	snprintf(p, sizeof(p), "%d", (int)partition);
	const char *const v[] = {p};
	PGresult *holds = NULL;
	PGresult *res = tly_pg_query(conn,
				     "SELECT tenant_id, state::text, as_of_offset FROM ledger_wallets "
				     "WHERE partition = $1 ORDER BY tenant_id",
				     1, v, err);
	if (!res)
		return TLY_E_PG;
	/* Both sorted by tenant (uuid order is the order of its text): merged below. */
	holds = tly_pg_query(conn,
			     "SELECT h.tenant_id, h.ord, h.reservation_id, h.tokens, h.expires_at, "
			     "h.ended_at FROM ledger_holds h JOIN ledger_wallets w "
			     "ON w.tenant_id = h.tenant_id WHERE w.partition = $1 "
			     "ORDER BY h.tenant_id, h.ord",
			     1, v, err);
	if (!holds) {
		PQclear(res);
		return TLY_E_PG;
	}
	int rc = 0, h = 0, nh = PQntuples(holds);
	for (int i = 0; i < PQntuples(res) && rc == 0; i++) {
		const char *tenant = PQgetvalue(res, i, 0);
		struct tly_wallet *w = tly_wallet_from_json(PQgetvalue(res, i, 1), errstr, sizeof(errstr));
		for (; w && h < nh && strcmp(PQgetvalue(holds, h, 0), tenant) == 0; h++) {
			struct tly_hold_row row;
			int hrc = hold_row(holds, h, &row);
			if (hrc == 0)
				hrc = tly_wallet_load_hold(w, &row);
			if (hrc != 0) {
				snprintf(errstr, sizeof(errstr), "%s", hrc == TLY_E_NOMEM ? "out of memory"
								 : "a saved hold is malformed or out of order");
				tly_wallet_free(w);
				w = NULL;
			}
		}
		if (w)
			tly_wallet_saving(w)->as_of =
				PQgetisnull(res, i, 2) ? -1 : strtoll(PQgetvalue(res, i, 2), NULL, 10);
		if (w && tly_wallet_loaded(w) != 0) {
			snprintf(errstr, sizeof(errstr), "out of memory");
			tly_wallet_free(w);
			w = NULL;
		}
		if (!w) {
			tly_error("could not load wallet snapshot", "partition=%d tenant=%s reason=\"%s\"",
				  (int)partition, tenant, errstr);
			set_err(err, TLY_ERRCLASS_FATAL, "wallet snapshot does not load");
			rc = TLY_E_CORRUPT;
			break;
		}
		rc = fn(w, ud);
	}
	PQclear(res);
	PQclear(holds);
	return rc;
}

/* n uuids, stride bytes apart from first, as a PostgreSQL array literal (malloc'd), or NULL. */
static char *uuid_array(const tly_uuid *first, size_t n, size_t stride)
{
	char *text = malloc(n * 37 + 3);
	if (!text)
		return NULL;
	size_t at = 0;
	text[at++] = '{';
	for (size_t i = 0; i < n; i++) {
		if (i)
			text[at++] = ',';
		tly_uuid_format((const tly_uuid *)((const char *)first + i * stride), text + at);
		at += 36;
	}
	text[at++] = '}';
	text[at] = '\0';
	return text;
}

static int64_t be64(const char *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | (unsigned char)p[i];
	return (int64_t)v;
}

int tly_ledger_store_load_inputs(PGconn *conn, int32_t partition, int64_t from, int64_t to,
				 const tly_uuid *tenants, size_t n,
				 int (*fn)(int64_t offset, const void *value, size_t len, void *ud),
				 void *ud, struct tly_pg_error *err)
{
	char p[16], f[24], t[24];
	char *ids = uuid_array(tenants, n, sizeof(*tenants));
	if (!ids) {
		set_err(err, TLY_ERRCLASS_FATAL, "out of memory");
		return TLY_E_NOMEM;
	}
	snprintf(p, sizeof(p), "%d", (int)partition);
	snprintf(f, sizeof(f), "%" PRId64, from);
	snprintf(t, sizeof(t), "%" PRId64, to);
	const char *const v[] = {p, f, t, ids};
	PGresult *res = tly_pg_query_params(conn,
					    "SELECT u.o, u.v FROM ledger_input_batches b CROSS JOIN "
					    "LATERAL unnest(b.offsets, b.tenant_ids, b.record_values) "
					    "AS u (o, t, v) WHERE b.partition = $1 AND b.first_offset < $3 "
					    "AND b.first_offset >= coalesce((SELECT max(first_offset) FROM "
					    "ledger_input_batches WHERE partition = $1 AND first_offset <= "
					    "$2), 0) AND u.o >= $2 AND u.o < $3 "
					    "AND (u.t IS NULL OR u.t = ANY ($4::uuid[])) ORDER BY u.o",
					    4, v, NULL, NULL, 1, err);
	free(ids);
	if (!res)
		return TLY_E_PG;
	int rc = 0;
	for (int r = 0; r < PQntuples(res) && rc == 0; r++) {
		if (PQgetlength(res, r, 0) != 8) {
			set_err(err, TLY_ERRCLASS_FATAL, "ledger_input_batches returned a malformed offset");
			rc = TLY_E_PG;
			break;
		}
		rc = fn(be64(PQgetvalue(res, r, 0)), PQgetvalue(res, r, 1),
			(size_t)PQgetlength(res, r, 1), ud);
	}
	PQclear(res);
	return rc;
}

int tly_ledger_store_load_heads(PGconn *conn, const tly_uuid *tenants, size_t n, int64_t *seq,
				unsigned char (*hash)[32], struct tly_pg_error *err)
{
	char *ids = uuid_array(tenants, n, sizeof(*tenants));
	if (!ids) {
		set_err(err, TLY_ERRCLASS_FATAL, "out of memory");
		return TLY_E_NOMEM;
	}
	const char *const v[] = {ids};
	PGresult *res = tly_pg_query_params(conn,
					    "SELECT k.i, x.seq, x.hash FROM unnest($1::uuid[]) "
					    "WITH ORDINALITY AS k (tenant_id, i) CROSS JOIN LATERAL "
					    "(SELECT e.seq, e.hash FROM ledger_entries e "
					    "WHERE e.tenant_id = k.tenant_id ORDER BY e.seq DESC LIMIT 1) x",
					    1, v, NULL, NULL, 1, err);
	free(ids);
	if (!res)
		return TLY_E_PG;
	for (size_t i = 0; i < n; i++)
		seq[i] = 0;
	int rc = 0;
	for (int r = 0; r < PQntuples(res); r++) {
		int64_t i = be64(PQgetvalue(res, r, 0)) - 1;
		if (PQgetlength(res, r, 0) != 8 || PQgetlength(res, r, 1) != 8 ||
		    PQgetlength(res, r, 2) != 32 || i < 0 || (size_t)i >= n) {
			set_err(err, TLY_ERRCLASS_FATAL, "ledger_entries returned a malformed head");
			rc = TLY_E_PG;
			break;
		}
		seq[i] = be64(PQgetvalue(res, r, 1));
		memcpy(hash[i], PQgetvalue(res, r, 2), 32);
	}
	PQclear(res);
	return rc;
}

/* ---- seen lookup -------------------------------------------------------------------------- */

/*
 * One index probe per key (LATERAL, kept a subquery by OFFSET 0): a join against the whole
 * batch is planned as a hash join over all of ledger_entries (seen with 4,000 keys), whose cost
 * grows with history. The keys go as two binary uuid arrays in the index's order (tenant, event
 * id: neighbouring probes share pages) and the answers come back binary, every first entry of a
 * key with its seq: the lowest seq is kept here, not sorted for by the server per key (a sort
 * node per probe). No uuid text to format or parse, no hex digest to unescape: the lookup is on
 * the consumer's critical path (the group is decided once it is answered); for 4,000 keys the
 * sorted keys without the sort took about a third less of the server's time (docs/ledger-speed.md).
 */
static int lookup_chunk(PGconn *conn, struct tly_pgarray *const arr[2],
			struct tly_ledger_seen_key *const *keys, size_t n, struct tly_pg_error *err)
{
	static const int binary[2] = {1, 1};
	const char *values[2];
	int lengths[2];
	tly_pgarray_begin(arr[0], TLY_PGARRAY_UUID);
	tly_pgarray_begin(arr[1], TLY_PGARRAY_UUID);
	for (size_t i = 0; i < n; i++) {
		keys[i]->seen.seen = false;
		tly_pgarray_add(arr[0], keys[i]->tenant_id.b, 16);
		tly_pgarray_add(arr[1], keys[i]->event_id.b, 16);
	}
	for (int k = 0; k < 2; k++) {
		size_t len;
		if (!(values[k] = tly_pgarray_value(arr[k], &len))) {
			set_err(err, TLY_ERRCLASS_FATAL, "out of memory");
			return TLY_E_NOMEM;
		}
		lengths[k] = (int)len;
	}
	PGresult *res = tly_pg_query_prepared(conn, stmts[STMT_SEEN].name, 2, values, lengths,
					      binary, 1, err);
	if (!res)
		return TLY_E_PG;
	int rc = 0;
	int64_t *best = calloc(n ? n : 1, sizeof(*best)); /* the seq kept for each key */
	for (int r = 0; best && r < PQntuples(res); r++) {
		int64_t i = be64(PQgetvalue(res, r, 0)) - 1, seq = be64(PQgetvalue(res, r, 1));
		if (PQgetlength(res, r, 0) != 8 || PQgetlength(res, r, 1) != 8 ||
		    PQgetlength(res, r, 2) != 32 || PQgetlength(res, r, 3) != 8 || i < 0 ||
		    (size_t)i >= n) {
			set_err(err, TLY_ERRCLASS_FATAL, "ledger_entries returned a malformed cause");
			rc = TLY_E_PG;
			break;
		}
		struct tly_ledger_seen_key *key = keys[i];
		if (key->seen.seen && best[i] <= seq)
			continue;
		best[i] = seq;
		key->seen.seen = true;
		memcpy(key->seen.digest, PQgetvalue(res, r, 2), 32);
		key->first_offset = be64(PQgetvalue(res, r, 3));
	}
	if (!best) {
		set_err(err, TLY_ERRCLASS_FATAL, "out of memory");
		rc = TLY_E_NOMEM;
	}
	free(best);
	PQclear(res);
	return rc;
}

/* (tenant, event id) order of two keys, the order of the "seen" index (uuid compares as bytes). */
static int cmp_seen_key(const void *a, const void *b)
{
	const struct tly_ledger_seen_key *x = *(struct tly_ledger_seen_key *const *)a;
	const struct tly_ledger_seen_key *y = *(struct tly_ledger_seen_key *const *)b;
	int d = memcmp(x->tenant_id.b, y->tenant_id.b, sizeof(x->tenant_id.b));
	return d ? d : memcmp(x->event_id.b, y->event_id.b, sizeof(x->event_id.b));
}

int tly_ledger_store_lookup_seen(PGconn *conn, struct tly_ledger_seen_key *keys, size_t n,
				 struct tly_pg_error *err)
{
	struct tly_pgarray *arr[2] = {tly_pgarray_new(), tly_pgarray_new()};
	struct tly_ledger_seen_key **sorted = malloc((n ? n : 1) * sizeof(*sorted));
	int rc = arr[0] && arr[1] && sorted ? 0 : TLY_E_NOMEM;
	if (rc != 0)
		set_err(err, TLY_ERRCLASS_FATAL, "out of memory");
	else
		rc = prepare(conn, err);
	for (size_t i = 0; rc == 0 && i < n; i++)
		sorted[i] = &keys[i];
	if (rc == 0)
		qsort(sorted, n, sizeof(*sorted), cmp_seen_key);
	for (size_t i = 0; rc == 0 && i < n; i += SEEN_KEYS_PER_STATEMENT) {
		size_t m = n - i < SEEN_KEYS_PER_STATEMENT ? n - i : SEEN_KEYS_PER_STATEMENT;
		rc = lookup_chunk(conn, arr, sorted + i, m, err);
	}
	free(sorted);
	tly_pgarray_free(arr[0]);
	tly_pgarray_free(arr[1]);
	return rc;
}

/* ---- commit: built on the consumer's thread, run on the writer's ---------------------------- */

/*
 * One statement of a group's transaction, its text and parameters owned by the transaction
 * (in its arena), so that running it reads nothing the consumer goes on changing.
 */
enum step_kind {
	STEP_EXEC,    /* rows not needed */
	STEP_OFFSETS, /* the compare-and-set: fails unless every partition advanced */
	STEP_COPY,    /* a binary COPY: the entries, the inputs */
};

struct step {
	enum step_kind kind;
	enum stmt stmt;  /* prepared, or STMT_NONE: sql sent as text */
	const char *sql;
	int nparams;
	const char **values;
	const int *lengths, *formats; /* NULL: text parameters */
	struct tly_pgcopy *copy;      /* STEP_COPY: its rows, owned by the step */
};

struct tly_ledger_txn {
	struct tly_arena *arena;   /* every string and array below */
	struct step *steps;
	size_t n_steps, cap_steps;
	struct tly_pgarray **arrays; /* binary array parameters of the steps, owned */
	size_t n_arrays, cap_arrays;
	int32_t *partitions;       /* of each commit, in order */
	int64_t *old_offsets;      /* of each commit: its compare-and-set's old offset */
	const char *topic;         /* the input topic (in arena) */
	size_t cas_from;           /* steps[cas_from]: the compare-and-set; the rest follow it */
	bool inserts_offsets;      /* one of them inserts a partition's first row */
	bool *fenced;              /* out, per commit */
	size_t n;
	bool oom;
};

static const char *arena_text(struct tly_ledger_txn *t, const char *s, size_t len)
{
	char *d = tly_arena_strndup(t->arena, s, len);
	if (!d)
		t->oom = true;
	return d;
}

/* A step running sql, or the prepared statement stmt when sql is NULL. */
static struct step *add_step(struct tly_ledger_txn *t, enum step_kind kind, enum stmt stmt,
			     const char *sql, int nparams)
{
	if (t->n_steps == t->cap_steps) {
		size_t cap = t->cap_steps ? 2 * t->cap_steps : 16;
		struct step *s = realloc(t->steps, cap * sizeof(*s));
		if (!s) {
			t->oom = true;
			return NULL;
		}
		t->steps = s;
		t->cap_steps = cap;
	}
	const char **values = nparams ? tly_arena_alloc(t->arena, (size_t)nparams * sizeof(*values))
				      : NULL;
	if (nparams && !values) {
		t->oom = true;
		return NULL;
	}
	struct step *s = &t->steps[t->n_steps++];
	*s = (struct step){kind, sql ? STMT_NONE : stmt, sql ? sql : stmts[stmt].sql, nparams,
			   values, NULL, NULL, NULL};
	return s;
}

/* A memstream's text copied into the transaction's arena (and the stream's buffer freed). */
struct text {
	FILE *f;
	char *buf;
	size_t len;
};

static bool text_open(struct text *x)
{
	x->buf = NULL;
	x->len = 0;
	return (x->f = open_memstream(&x->buf, &x->len)) != NULL;
}

static const char *text_close(struct tly_ledger_txn *t, struct text *x)
{
	const char *out = NULL;
	if (x->f && fclose(x->f) == 0)
		out = arena_text(t, x->buf, x->len);
	else
		t->oom = true;
	x->f = NULL;
	free(x->buf);
	x->buf = NULL;
	return out;
}

/* One entry as a binary COPY row, in ENTRY_COLUMNS order. */
/*
 * prev: the entry before ev in its commit, or NULL. ev is cause_first (migration 0008: the
 * "seen" lookup's partial index) when it is the first entry its input record yields for its
 * tenant: an input's entries for a tenant are contiguous in a commit and never span two.
 */
static int copy_entry(struct tly_pgcopy *copy, struct tly_arena *arena, const struct tly_event *ev,
		      const struct tly_event *prev)
{
	const struct tly_ledger_entry *e = &ev->u.ledger_entry;
	bool oom = false;
	const char *lines = arena_lines(arena, &e->lines, &oom);
	if (oom)
		return TLY_E_NOMEM;
	tly_pgcopy_row(copy, ENTRY_COLS);
	tly_pgcopy_uuid(copy, &ev->tenant_id);
	tly_pgcopy_int8(copy, e->seq);
	tly_pgcopy_text(copy, e->kind);
	tly_pgcopy_uuid(copy, &e->cause_event_id);
	tly_pgcopy_text(copy, e->cause_type);
	tly_pgcopy_int4(copy, e->cause_partition);
	tly_pgcopy_int8(copy, e->cause_offset);
	tly_pgcopy_bytea(copy, e->cause_digest, 32);
	if (tly_uuid_is_nil(&e->ref_id))
		tly_pgcopy_null(copy);
	else
		tly_pgcopy_uuid(copy, &e->ref_id);
	if (tly_uuid_is_nil(&e->subscription_id))
		tly_pgcopy_null(copy);
	else
		tly_pgcopy_uuid(copy, &e->subscription_id);
	tly_pgcopy_int8(copy, e->allowance_delta);
	tly_pgcopy_int8(copy, e->credits_delta);
	tly_pgcopy_int8(copy, e->held_delta);
	tly_pgcopy_int8(copy, e->overage_delta);
	tly_pgcopy_int8(copy, e->allowance_remaining);
	tly_pgcopy_int8(copy, e->credits_remaining);
	tly_pgcopy_int8(copy, e->held);
	tly_pgcopy_int8(copy, e->overage_tokens);
	if (e->period_start.set)
		tly_pgcopy_timestamptz(copy, e->period_start.v);
	else
		tly_pgcopy_null(copy);
	if (e->period_end.set)
		tly_pgcopy_timestamptz(copy, e->period_end.v);
	else
		tly_pgcopy_null(copy);
	if (e->amount_cents.set)
		tly_pgcopy_int8(copy, e->amount_cents.v);
	else
		tly_pgcopy_null(copy);
	tly_pgcopy_text(copy, e->currency);
	tly_pgcopy_jsonb(copy, lines);
	tly_pgcopy_text(copy, e->reason);
	tly_pgcopy_timestamptz(copy, e->ledger_time);
	tly_pgcopy_bytea(copy, e->prev_hash, 32);
	tly_pgcopy_bytea(copy, e->hash, 32);
	tly_pgcopy_bool(copy, !prev || prev->u.ledger_entry.cause_offset != e->cause_offset ||
				      memcmp(prev->tenant_id.b, ev->tenant_id.b, sizeof(ev->tenant_id.b)) != 0);
	return 0;
}

/*
 * Every row of a table goes out in one COPY statement per group. Each COPY statement costs a
 * start in the server (parse, the table's constraints and indexes set up) and two round trips,
 * during which the writer's backend waits. PostgreSQL 15 also remembers the table's tuple
 * descriptor once per buffered row slot of a COPY in a resource array that hashes them all to
 * one place (its cost grows with the square of the slots), but a COPY keeps at most 1,000
 * slots (MAX_BUFFERED_TUPLES) and reuses them after each flush, so that cost stops growing at
 * 1,000 rows; 200-row statements paid it on every statement, plus 30 statement starts and 60
 * round trips for a group of 6,000 entries. A new payload reserves bytes (an estimate).
 */
static struct tly_pgcopy *copy_step(struct tly_ledger_txn *t, const char *sql, size_t bytes)
{
	struct tly_pgcopy *copy = tly_pgcopy_new();
	struct step *s = copy && tly_pgcopy_reserve(copy, bytes) == 0 ? add_step(t, STEP_COPY, STMT_NONE, sql, 0)
								       : NULL;
	if (!s) {
		tly_pgcopy_free(copy);
		t->oom = true;
		return NULL;
	}
	s->copy = copy;
	return copy;
}

/* The entries of every commit of the group as binary COPY payloads (no per-row parse or plan). */
static void build_entries(struct tly_ledger_txn *t, const struct tly_ledger_commit *c, size_t n)
{
	static const char sql[] = "COPY ledger_entries (" ENTRY_COLUMNS_TEXT ") FROM STDIN (FORMAT binary)";
	size_t rows = 0;
	for (size_t i = 0; i < n; i++)
		rows += c[i].n_entries;
	if (rows == 0)
		return;
	struct tly_arena *scratch = tly_arena_new();
	struct tly_pgcopy *copy = scratch ? copy_step(t, sql, rows * ENTRY_ROW_BYTES) : NULL;
	if (!copy) {
		tly_arena_free(scratch);
		t->oom = true;
		return;
	}
	for (size_t i = 0; i < n; i++) {
		for (size_t r = 0; r < c[i].n_entries; r++) {
			if (copy_entry(copy, scratch, &c[i].entries[r], r ? &c[i].entries[r - 1] : NULL) != 0) {
				t->oom = true;
				goto out;
			}
			tly_arena_reset(scratch);
		}
	}
out:
	tly_arena_free(scratch);
}

/*
 * A statement whose parameters are n binary arrays arr[0..n-1] (taken over by the transaction:
 * the caller's pointers are set to NULL, also on failure) after `text` text parameters, which
 * the caller fills in: the arrays are sent from where they were built, not copied.
 */
static struct step *add_array_step(struct tly_ledger_txn *t, enum stmt stmt, int text,
				   struct tly_pgarray **arr, int n)
{
	struct step *s = add_step(t, STEP_EXEC, stmt, NULL, text + n);
	int *len = tly_arena_alloc(t->arena, (size_t)(text + n) * sizeof(*len));
	int *fmt = tly_arena_alloc(t->arena, (size_t)(text + n) * sizeof(*fmt));
	if (t->n_arrays + (size_t)n > t->cap_arrays) {
		size_t cap = t->cap_arrays ? 2 * t->cap_arrays : 16;
		while (cap < t->n_arrays + (size_t)n)
			cap *= 2;
		struct tly_pgarray **grown = realloc(t->arrays, cap * sizeof(*grown));
		if (grown) {
			t->arrays = grown;
			t->cap_arrays = cap;
		} else {
			s = NULL;
		}
	}
	for (int k = 0; k < n; k++) {
		size_t l;
		const void *v = s && len && fmt && arr[k] ? tly_pgarray_value(arr[k], &l) : NULL;
		if (!v || l > INT32_MAX) {
			s = NULL;
			tly_pgarray_free(arr[k]);
		} else {
			s->values[text + k] = v;
			len[text + k] = (int)l;
			fmt[text + k] = 1;
			t->arrays[t->n_arrays++] = arr[k];
		}
		arr[k] = NULL;
	}
	if (!s || !len || !fmt) {
		t->oom = true;
		return NULL;
	}
	for (int k = 0; k < text; k++)
		len[k] = fmt[k] = 0;
	s->lengths = len;
	s->formats = fmt;
	return s;
}

/*
 * n new arrays of types[0..n) begun in arr (all NULL before); false (t->oom set) when out of
 * memory, the ones made left in arr for the caller to free.
 */
static bool arrays_begin(struct tly_ledger_txn *t, struct tly_pgarray **arr, const uint32_t *types,
			 int n)
{
	for (int j = 0; j < n; j++) {
		if (!(arr[j] = tly_pgarray_new())) {
			t->oom = true;
			return false;
		}
		tly_pgarray_begin(arr[j], types[j]);
	}
	return true;
}

/*
 * The applied input records of the group, packed (migration 0010): one ledger_input_batches
 * row per commit (partition) that applied any, its records as three arrays in offset order, so
 * a record costs no heap row and no index tuple of its own. Every row of the group comes from
 * one INSERT in the last pipeline, of binary array parameters: the group's records as three
 * flat arrays, partition after partition, and for each partition the first and last element of
 * its records in them (one statement a group, not one a partition: at moderate rates a group
 * touches most partitions with a few records each, and each statement has its own start, bind
 * and executor in the server).
 */
static void build_inputs(struct tly_ledger_txn *t, const struct tly_ledger_commit *c, size_t n)
{
	struct tly_pgarray *arr[6] = {NULL}; /* partition, lo, hi; offsets, tenant_ids, values */
	static const uint32_t types[6] = {TLY_PGARRAY_INT8, TLY_PGARRAY_INT8, TLY_PGARRAY_INT8,
					  TLY_PGARRAY_INT8, TLY_PGARRAY_UUID, TLY_PGARRAY_BYTEA};
	int64_t next = 1; /* subscript of the next record in the flat arrays */
	if (!arrays_begin(t, arr, types, 6))
		goto out;
	for (size_t i = 0; i < n; i++) {
		const struct tly_ledger_input *in = c[i].inputs;
		size_t k = c[i].n_inputs;
		if (k == 0)
			continue;
		tly_pgarray_int8(arr[0], c[i].partition);
		tly_pgarray_int8(arr[1], next);
		tly_pgarray_int8(arr[2], next + (int64_t)k - 1);
		next += (int64_t)k;
		for (size_t r = 0; r < k; r++) {
			tly_pgarray_int8(arr[3], in[r].offset);
			if (in[r].tenant_id)
				tly_pgarray_add(arr[4], in[r].tenant_id->b, 16);
			else
				tly_pgarray_null(arr[4]);
			tly_pgarray_add(arr[5], in[r].value, in[r].valuelen);
		}
	}
	if (next > 1)
		(void)add_array_step(t, STMT_INPUTS, 0, arr, 6); /* takes the arrays, or sets t->oom */
out:
	for (int j = 0; j < 6; j++)
		tly_pgarray_free(arr[j]);
}

/*
 * The snapshots of every saved wallet of the group in one upsert of binary array parameters
 * (prepared: an upsert of VALUES rows was parsed and planned again for every group, with five
 * parameters a wallet). A wallet is in one commit only (its tenant's partition).
 */
static void build_wallets(struct tly_ledger_txn *t, const struct tly_ledger_commit *c, size_t n)
{
	static const uint32_t types[5] = {TLY_PGARRAY_UUID, TLY_PGARRAY_INT8, TLY_PGARRAY_INT8,
					  TLY_PGARRAY_TEXT, TLY_PGARRAY_INT8};
	struct tly_pgarray *arr[5] = {NULL};
	size_t k = 0;
	if (!arrays_begin(t, arr, types, 5))
		goto out;
	for (size_t i = 0; i < n; i++) {
		for (size_t j = 0; j < c[i].n_wallets; j++, k++) {
			const struct tly_wallet *w = c[i].wallets[j];
			struct tly_balance bal;
			char *state = tly_wallet_to_json(w, false);
			if (!state) {
				t->oom = true;
				goto out;
			}
			tly_wallet_balance(w, &bal);
			tly_pgarray_add(arr[0], tly_wallet_tenant(w)->b, 16);
			tly_pgarray_int8(arr[1], c[i].partition);
			tly_pgarray_int8(arr[2], bal.seq);
			tly_pgarray_add(arr[3], state, strlen(state));
			tly_pgarray_int8(arr[4], c[i].new_offset);
			free(state);
		}
	}
	if (k)
		(void)add_array_step(t, STMT_WALLETS, 0, arr, 5);
out:
	for (int j = 0; j < 5; j++)
		tly_pgarray_free(arr[j]);
}

/* The columns of the hold rows of one unnest() statement, as binary arrays (lib/pgarray). */
struct hold_arrays {
	struct tly_pgarray *col[6]; /* tenant, order, reservation, tokens, expires, ended */
	const tly_uuid *tenant;
	size_t n;
};

static int add_hold_row(const struct tly_hold_row *row, void *ud)
{
	struct hold_arrays *a = ud;
	tly_pgarray_add(a->col[0], a->tenant->b, 16);
	tly_pgarray_int8(a->col[1], row->order);
	tly_pgarray_add(a->col[2], row->id.b, 16);
	tly_pgarray_int8(a->col[3], row->tokens);
	tly_pgarray_int8(a->col[4], row->expires_at);
	if (row->ended_at < 0)
		tly_pgarray_null(a->col[5]);
	else
		tly_pgarray_int8(a->col[5], row->ended_at);
	a->n++;
	return 0;
}

/*
 * The holds placed or ended in the group, upserted by (tenant, order), and the forgotten ones
 * deleted: two statements whatever the group's size, and nothing for holds that did not change.
 * Their arrays go as binary parameters: no text to format here or to parse in the server. The
 * delete, which joins a table, runs on a custom plan between STMT_CUSTOM_PLANS and
 * STMT_GENERIC_PLANS (three statements only for a group that forgets holds: most do not).
 */
static void build_holds(struct tly_ledger_txn *t, const struct tly_ledger_commit *c, size_t n)
{
	static const uint32_t types[8] = {TLY_PGARRAY_UUID, TLY_PGARRAY_INT8, TLY_PGARRAY_UUID,
					  TLY_PGARRAY_INT8, TLY_PGARRAY_INT8, TLY_PGARRAY_INT8,
					  TLY_PGARRAY_UUID, TLY_PGARRAY_INT8};
	struct tly_pgarray *arr[8] = {NULL};
	struct hold_arrays a = {.n = 0};
	size_t n_forgotten = 0;
	if (!arrays_begin(t, arr, types, 8))
		goto out;
	memcpy(a.col, arr, sizeof(a.col));
	for (size_t i = 0; i < n; i++) {
		for (size_t j = 0; j < c[i].n_wallets; j++) {
			const struct tly_wallet *w = c[i].wallets[j];
			size_t nf;
			const int64_t *forgotten = tly_wallet_forgotten(w, &nf);
			a.tenant = tly_wallet_tenant(w);
			(void)tly_wallet_changed_holds(w, add_hold_row, &a);
			for (size_t k = 0; k < nf; k++, n_forgotten++) {
				tly_pgarray_add(arr[6], a.tenant->b, 16);
				tly_pgarray_int8(arr[7], forgotten[k]);
			}
		}
	}
	if (n_forgotten) {
		(void)add_step(t, STEP_EXEC, STMT_CUSTOM_PLANS, NULL, 0);
		(void)add_array_step(t, STMT_HOLDS_FORGET, 0, arr + 6, 2);
		(void)add_step(t, STEP_EXEC, STMT_GENERIC_PLANS, NULL, 0);
	}
	if (a.n)
		(void)add_array_step(t, STMT_HOLDS_SAVE, 0, arr, 6);
out:
	for (int k = 0; k < 8; k++)
		tly_pgarray_free(arr[k]);
}

/* One insert per quarantined record (raw key and value as binary parameters). */
static void build_quarantined(struct tly_ledger_txn *t, const struct tly_ledger_quarantined *q,
			      size_t n)
{
	static const int fmt[] = {0, 0, 0, 1, 1, 0, 0};
	for (size_t i = 0; i < n; i++) {
		char p[16], off[24];
		snprintf(p, sizeof(p), "%d", (int)q[i].partition);
		snprintf(off, sizeof(off), "%" PRId64, q[i].offset);
		struct step *s = add_step(t, STEP_EXEC, STMT_QUARANTINE, NULL, 7);
		int *len = tly_arena_alloc(t->arena, 7 * sizeof(*len));
		if (!s || !len) {
			t->oom = true;
			return;
		}
		const char *v[] = {arena_text(t, q[i].topic, strlen(q[i].topic)),
				   arena_text(t, p, strlen(p)),
				   arena_text(t, off, strlen(off)),
				   q[i].key ? arena_text(t, q[i].key, q[i].keylen) : NULL,
				   q[i].value ? arena_text(t, q[i].value, q[i].valuelen) : NULL,
				   arena_text(t, q[i].reason, strlen(q[i].reason)),
				   q[i].detail ? arena_text(t, q[i].detail, strlen(q[i].detail)) : NULL};
		memcpy(s->values, v, sizeof(v));
		memset(len, 0, 7 * sizeof(*len));
		len[3] = (int)q[i].keylen;
		len[4] = (int)q[i].valuelen;
		s->lengths = len;
		s->formats = fmt;
	}
}

int tly_ledger_store_save_published(PGconn *conn, const char *ledger_topic, int32_t partition,
				    int64_t next_offset, struct tly_pg_error *err)
{
	char p[16], off[24];
	snprintf(p, sizeof(p), "%d", (int)partition);
	snprintf(off, sizeof(off), "%" PRId64, next_offset);
	const char *const v[] = {ledger_topic, p, off};
	return tly_pg_exec(conn,
			   "INSERT INTO ledger_published (topic, partition, next_offset) "
			   "VALUES ($1, $2, $3) ON CONFLICT (topic, partition) DO UPDATE SET "
			   "next_offset = GREATEST(ledger_published.next_offset, EXCLUDED.next_offset), "
			   "updated_at = now()",
			   3, v, err);
}

int tly_ledger_store_load_published(PGconn *conn, const char *ledger_topic, int32_t partition,
				    int64_t *next_offset, struct tly_pg_error *err)
{
	char p[16];
	snprintf(p, sizeof(p), "%d", (int)partition);
	const char *const v[] = {ledger_topic, p};
	PGresult *res = tly_pg_query(conn,
				     "SELECT next_offset FROM ledger_published "
				     "WHERE topic = $1 AND partition = $2",
				     2, v, err);
	if (!res)
		return TLY_E_PG;
	*next_offset = PQntuples(res) == 1 ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : 0;
	PQclear(res);
	return 0;
}

/*
 * The offsets' compare-and-set, every partition of the group in one statement (its function
 * inserts the rows of partitions with nothing stored yet, old offset -1).
 */
static void build_offsets(struct tly_ledger_txn *t, const struct tly_ledger_commit *c, size_t n)
{
	struct text x[3];
	int opened = 0;
	for (; opened < 3 && text_open(&x[opened]); opened++)
		fputc('{', x[opened].f);
	if (opened == 3) {
		for (size_t i = 0; i < n; i++) {
			const char *sep = i ? "," : "";
			fprintf(x[0].f, "%s%d", sep, (int)c[i].partition);
			fprintf(x[1].f, "%s%" PRId64, sep, c[i].old_offset < 0 ? -1 : c[i].old_offset);
			fprintf(x[2].f, "%s%" PRId64, sep, c[i].new_offset);
			t->inserts_offsets = t->inserts_offsets || c[i].old_offset < 0;
		}
	}
	const char *v[3];
	for (int j = 0; j < opened; j++) {
		fputc('}', x[j].f);
		v[j] = text_close(t, &x[j]);
	}
	struct step *s = opened == 3 ? add_step(t, STEP_OFFSETS, STMT_OFFSETS_ADVANCE, NULL, 5) : NULL;
	if (!s) {
		t->oom = true;
		return;
	}
	s->values[0] = TLY_LEDGER_CONSUMER;
	s->values[1] = t->topic;
	memcpy(s->values + 2, v, sizeof(v));
}

/* Advance the published markers of the group's partitions that carry one, in one statement. */
static void build_published(struct tly_ledger_txn *t, const struct tly_ledger_commit *c, size_t n)
{
	struct text p, o;
	size_t k = 0;
	bool ok_p = text_open(&p), ok_o = text_open(&o);
	if (ok_p && ok_o) {
		for (size_t i = 0; i < n; i++) {
			if (c[i].published_offset < 0)
				continue;
			const char *sep = k++ ? "," : "{";
			fprintf(p.f, "%s%d", sep, (int)c[i].partition);
			fprintf(o.f, "%s%" PRId64, sep, c[i].published_offset);
		}
		fputc('}', p.f);
		fputc('}', o.f);
	}
	const char *parts = ok_p ? text_close(t, &p) : NULL, *offs = ok_o ? text_close(t, &o) : NULL;
	if (!ok_p || !ok_o) {
		t->oom = true;
		return;
	}
	struct step *s;
	if (k && (s = add_step(t, STEP_EXEC, STMT_PUBLISHED, NULL, 3))) {
		s->values[0] = arena_text(t, c[0].ledger_topic, strlen(c[0].ledger_topic));
		s->values[1] = parts;
		s->values[2] = offs;
	}
}

void tly_ledger_store_txn_free(struct tly_ledger_txn *t)
{
	if (!t)
		return;
	tly_arena_free(t->arena);
	for (size_t k = 0; k < t->n_steps; k++)
		tly_pgcopy_free(t->steps[k].copy);
	for (size_t k = 0; k < t->n_arrays; k++)
		tly_pgarray_free(t->arrays[k]);
	free(t->arrays);
	free(t->steps);
	free(t->partitions);
	free(t->old_offsets);
	free(t->fenced);
	free(t);
}

struct tly_ledger_txn *tly_ledger_store_build(const struct tly_ledger_commit *c, size_t n,
					      int64_t lock_timeout_ms, struct tly_pg_error *err)
{
	struct tly_ledger_txn *t = calloc(1, sizeof(*t));
	if (!t || !(t->arena = tly_arena_new()) ||
	    !(t->partitions = calloc(n ? n : 1, sizeof(*t->partitions))) ||
	    !(t->old_offsets = calloc(n ? n : 1, sizeof(*t->old_offsets))) ||
	    !(t->fenced = calloc(n ? n : 1, sizeof(*t->fenced))))
		goto fail;
	t->n = n;
	for (size_t i = 0; i < n; i++) {
		t->partitions[i] = c[i].partition;
		t->old_offsets[i] = c[i].old_offset;
	}
	if (n) {
		/*
		 * What only adds new keys first (the packed inputs on a generic plan, the entries'
		 * COPY): a transaction started while the one before it on the same partitions still
		 * runs (tly_ledger_store_run_gated) neither reads nor waits on what that one writes.
		 * Then the compare-and-set (its function plans its own statements for each call), then
		 * what reads or upserts rows the one before wrote.
		 */
		char ms[24];
		snprintf(ms, sizeof(ms), "%" PRId64, lock_timeout_ms);
		t->topic = arena_text(t, c[0].topic, strlen(c[0].topic));
		struct step *start = add_step(t, STEP_EXEC, STMT_START, NULL, 1);
		if (start)
			start->values[0] = arena_text(t, ms, strlen(ms));
		build_inputs(t, c, n);
		build_entries(t, c, n);
		t->cas_from = t->n_steps;
		build_offsets(t, c, n);
		build_holds(t, c, n);
		build_wallets(t, c, n);
		for (size_t i = 0; i < n; i++)
			build_quarantined(t, c[i].quarantined, c[i].n_quarantined);
		build_published(t, c, n);
	}
	if (t->oom)
		goto fail;
	return t;
fail:
	tly_ledger_store_txn_free(t);
	set_err(err, TLY_ERRCLASS_FATAL, "could not build the group's transaction: out of memory");
	return NULL;
}

bool tly_ledger_store_txn_fenced(const struct tly_ledger_txn *t, size_t i)
{
	return i < t->n && t->fenced[i];
}

bool tly_ledger_store_txn_shares(const struct tly_ledger_txn *a, const struct tly_ledger_txn *b)
{
	for (size_t i = 0; a && b && i < a->n; i++)
		for (size_t j = 0; j < b->n; j++)
			if (a->partitions[i] == b->partitions[j])
				return true;
	return false;
}

void tly_ledger_store_txn_unfence(struct tly_ledger_txn *t)
{
	for (size_t i = 0; i < t->n; i++)
		t->fenced[i] = false;
}

/* Read one pipelined statement's results: its last result (caller PQclears), or NULL on failure. */
static PGresult *pipeline_result(PGconn *conn, bool *failed, struct tly_pg_error *err)
{
	PGresult *res, *last = NULL;
	while ((res = PQgetResult(conn)) != NULL) {
		ExecStatusType st = PQresultStatus(res);
		if (!*failed && st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
			*failed = true;
			if (st != PGRES_PIPELINE_ABORTED)
				tly_pg_error_set(err, conn, res);
		}
		PQclear(last);
		last = res;
	}
	if (*failed) {
		PQclear(last);
		return NULL;
	}
	return last;
}

/*
 * Steps [from, to) in one pipeline (one round trip), after a BEGIN and before a COMMIT when asked:
 * every result is read. The compare-and-set is followed by a flush request, so that its result
 * comes back while the server goes on with the rest: once it succeeded *cas_ok is set and
 * gate->after_cas called (not when it inserts a partition's first row; see the gate).
 */
static int run_pipeline(PGconn *conn, struct tly_ledger_txn *t, size_t from, size_t to, bool begin,
			bool commit, const struct tly_ledger_store_gate *gate, bool *cas_ok,
			struct tly_pg_error *err)
{
	bool failed = false, sent = PQenterPipelineMode(conn) == 1;
	if (sent && begin)
		sent = PQsendQueryPrepared(conn, stmts[STMT_BEGIN].name, 0, NULL, NULL, NULL, 0) == 1;
	for (size_t k = from; sent && k < to; k++) {
		const struct step *s = &t->steps[k];
		sent = (s->stmt == STMT_NONE ? PQsendQueryParams(conn, s->sql, s->nparams, NULL,
								  s->values, s->lengths, s->formats, 0)
					     : PQsendQueryPrepared(conn, stmts[s->stmt].name, s->nparams,
								   s->values, s->lengths, s->formats,
								   0)) == 1;
		if (sent && s->kind == STEP_OFFSETS && k + 1 < to)
			sent = PQsendFlushRequest(conn) == 1;
	}
	if (sent && commit)
		sent = PQsendQueryPrepared(conn, stmts[STMT_COMMIT].name, 0, NULL, NULL, NULL, 0) == 1;
	if (!sent || PQpipelineSync(conn) != 1) {
		tly_pg_error_set(err, conn, NULL);
		return TLY_E_PG; /* the connection is unusable: the caller's check reconnects */
	}
	if (begin)
		PQclear(pipeline_result(conn, &failed, err));
	for (size_t k = from; k < to; k++) {
		PGresult *res = pipeline_result(conn, &failed, err);
		if (res && t->steps[k].kind == STEP_OFFSETS) {
			*cas_ok = true;
			if (gate && gate->after_cas && !t->inserts_offsets)
				gate->after_cas(gate->ud);
		}
		PQclear(res);
	}
	if (commit) {
		PGresult *res = pipeline_result(conn, &failed, err);
		/* COMMIT of a failed transaction "succeeds" with the tag ROLLBACK: nothing was committed. */
		if (res && strcmp(PQcmdStatus(res), "ROLLBACK") == 0) {
			failed = true;
			set_err(err, TLY_ERRCLASS_FATAL, "transaction was rolled back instead of committed");
		}
		PQclear(res);
	}
	PGresult *res = PQgetResult(conn); /* the sync */
	if (PQresultStatus(res) != PGRES_PIPELINE_SYNC && !failed) {
		failed = true;
		tly_pg_error_set(err, conn, res);
	}
	PQclear(res);
	if (PQexitPipelineMode(conn) != 1 && !failed) {
		failed = true;
		tly_pg_error_set(err, conn, NULL);
	}
	return failed ? TLY_E_PG : 0;
}

/*
 * After a failure before the compare-and-set succeeded: its own (SQLSTATE TL001, migration
 * 0013: a partition did not advance), or an earlier one (a stale owner's COPY can meet the new
 * owner's keys first: a unique violation, or a wait on its rows that ends in one once it
 * committed). The partitions whose stored offset moved are fenced and the failure is a
 * permanent one, with its SQLSTATE and message kept (TL001, 23505, 55P03, 40P01…). Otherwise
 * err stays.
 */
static void fence_moved(PGconn *conn, struct tly_ledger_txn *t, struct tly_pg_error *err)
{
	struct tly_pg_error qerr;
	bool moved = false;
	for (size_t i = 0; i < t->n; i++) {
		char p[16];
		snprintf(p, sizeof(p), "%d", (int)t->partitions[i]);
		const char *const v[] = {TLY_LEDGER_CONSUMER, t->topic, p};
		PGresult *res = tly_pg_query(conn, "SELECT next_offset FROM consumer_offsets WHERE "
						   "consumer = $1 AND topic = $2 AND partition = $3",
					     3, v, &qerr);
		if (!res)
			return; /* the first failure is the one reported */
		int64_t stored = PQntuples(res) ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : -1;
		PQclear(res);
		if (stored != t->old_offsets[i]) {
			t->fenced[i] = true;
			moved = true;
		}
	}
	if (moved && err) {
		/* the SQLSTATE and message of the failure stay: they say how the owners met */
		static const char prefix[] = "the stored offset moved: another process committed this "
					     "partition; the batch failed with: ";
		char was[sizeof(err->message)];
		snprintf(was, sizeof(was), "%s", err->message);
		int len = snprintf(err->message, sizeof(err->message), "%s%s", prefix, was);
		if (len >= (int)sizeof(err->message) && err->sqlstate[0]) {
			char tail[32];
			int tn = snprintf(tail, sizeof(tail), "... (SQLSTATE %s)", err->sqlstate);
			memcpy(err->message + sizeof(err->message) - 1 - tn, tail, (size_t)tn + 1);
		}
		err->errclass = TLY_ERRCLASS_PERMANENT;
	}
}

/*
 * Three round trips (after stmts were prepared, the first time on a connection): BEGIN and the
 * packed inputs in one pipeline, the COPY of the entries (both only add new keys), then, once
 * gate->before_cas allows it, the compare-and-set, every other statement (the holds, the
 * snapshots, quarantine rows and published markers) and the COMMIT in one more pipeline. The
 * compare-and-set fails the transaction unless every partition advanced, so a fenced group's
 * COMMIT only ends a failed transaction; nothing of it is committed.
 */
int tly_ledger_store_run_gated(PGconn *conn, struct tly_ledger_txn *t,
			       const struct tly_ledger_store_gate *gate, struct tly_pg_error *err)
{
	struct tly_pg_error rberr;
	bool cas_ok = false, gated = false;
	size_t k = 0;
	int rc;
	for (size_t i = 0; i < t->n; i++)
		t->fenced[i] = false;
	while (k < t->cas_from && t->steps[k].kind != STEP_COPY)
		k++;
	rc = prepare(conn, err);
	if (rc == 0)
		rc = run_pipeline(conn, t, 0, k, true, false, NULL, &cas_ok, err);
	for (; rc == 0 && k < t->cas_from; k++)
		rc = tly_pgcopy_send(conn, t->steps[k].copy, t->steps[k].sql, err);
	if (rc == 0 && gate && gate->before_cas && gate->before_cas(gate->ud) != 0) {
		rc = TLY_E_PG;
		set_err(err, TLY_ERRCLASS_RETRIABLE, "not run: the transaction before it failed");
		gated = true; /* nothing to look up: the one before is ours */
	}
	if (rc == 0)
		rc = run_pipeline(conn, t, t->cas_from, t->n_steps, false, true, gate, &cas_ok, err);
	if (rc != 0 && PQstatus(conn) == CONNECTION_OK &&
	    PQtransactionStatus(conn) != PQTRANS_IDLE && tly_pg_rollback(conn, &rberr) != 0)
		tly_warn("could not roll back the batch", "partitions=%zu reason=\"%s\"", t->n,
			 rberr.message);
	if (rc == TLY_E_PG && !gated && !cas_ok && PQstatus(conn) == CONNECTION_OK &&
	    PQtransactionStatus(conn) == PQTRANS_IDLE)
		fence_moved(conn, t, err);
	return rc == 0 ? 0 : rc == TLY_E_NOMEM ? TLY_E_NOMEM : TLY_E_PG;
}

int tly_ledger_store_run(PGconn *conn, struct tly_ledger_txn *t, struct tly_pg_error *err)
{
	return tly_ledger_store_run_gated(conn, t, NULL, err);
}

int tly_ledger_store_commit(PGconn *conn, const struct tly_ledger_commit *c, size_t n,
			    bool *fenced, struct tly_pg_error *err)
{
	struct tly_ledger_txn *t = tly_ledger_store_build(c, n, TLY_LEDGER_KEYS_LOCK_TIMEOUT_MS, err);
	for (size_t i = 0; i < n; i++)
		fenced[i] = false;
	if (!t)
		return TLY_E_NOMEM;
	int rc = tly_ledger_store_run(conn, t, err);
	for (size_t i = 0; i < n; i++)
		fenced[i] = t->fenced[i];
	tly_ledger_store_txn_free(t);
	return rc;
}

/* ---- republish ---------------------------------------------------------------------------- */

int tly_ledger_store_load_entries(PGconn *conn, int32_t partition, int64_t from_offset,
				  int (*fn)(const struct tly_event *entry, void *ud), void *ud,
				  struct tly_pg_error *err)
{
	char p[16], off[24];
	snprintf(p, sizeof(p), "%d", (int)partition);
	snprintf(off, sizeof(off), "%" PRId64, from_offset);
	const char *const v[] = {p, off};
	PGresult *res = tly_pg_query(conn,
				     "SELECT " TLY_ENTRIES_SELECT " FROM ledger_entries e "
				     "WHERE e.cause_partition = $1 AND e.cause_offset >= $2 "
				     "ORDER BY e.cause_offset, e.tenant_id, e.seq",
				     2, v, err);
	if (!res)
		return TLY_E_PG;
	int rc = tly_entries_each(res, fn, ud);
	if (rc == TLY_E_CORRUPT)
		tly_error("could not read a stored ledger entry", "partition=%d", (int)partition);
	if (rc == TLY_E_NOMEM || rc == TLY_E_CORRUPT)
		set_err(err, TLY_ERRCLASS_FATAL, rc == TLY_E_NOMEM ? "out of memory" : "corrupt entry");
	PQclear(res);
	return rc;
}
