/* Invariant checks over ledger_entries: chain, limit, conservation, causes applied once. */
#include "ledgercheck.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decide.h"
#include "entries.h"
#include "event.h"

static void violation(struct tly_ledgercheck *out, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void violation(struct tly_ledgercheck *out, const char *fmt, ...)
{
	if (out->violations++ == 0) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(out->first, sizeof(out->first), fmt, ap);
		va_end(ap);
	}
}

struct chain {
	struct tly_codec *codec;
	struct tly_ledgercheck *out;
	tly_uuid tenant;
	int64_t seq;            /* last seq of tenant; 0 before its first entry */
	unsigned char hash[32]; /* last hash of tenant */
};

static int chain_entry(const struct tly_event *ev, void *ud)
{
	struct chain *c = ud;
	const struct tly_ledger_entry *e = &ev->u.ledger_entry;
	char tenant[37];
	tly_uuid_format(&ev->tenant_id, tenant);
	if (c->out->checked == 0 || memcmp(c->tenant.b, ev->tenant_id.b, 16) != 0) {
		c->tenant = ev->tenant_id;
		c->seq = 0;
		memset(c->hash, 0, sizeof(c->hash));
	}
	c->out->checked++;
	if (e->seq != c->seq + 1)
		violation(c->out, "tenant %s: seq %" PRId64 " follows seq %" PRId64, tenant, e->seq, c->seq);
	if (memcmp(e->prev_hash, c->hash, 32) != 0)
		violation(c->out, "tenant %s seq %" PRId64 ": prev_hash is not the previous entry's hash",
			  tenant, e->seq);
	unsigned char hash[32];
	if (tly_ledger_entry_hash(c->codec, ev, hash) != 0)
		violation(c->out, "tenant %s seq %" PRId64 ": could not encode the entry", tenant, e->seq);
	else if (memcmp(hash, e->hash, 32) != 0)
		violation(c->out, "tenant %s seq %" PRId64 ": stored hash is not the hash of the entry",
			  tenant, e->seq);
	c->seq = e->seq;
	memcpy(c->hash, e->hash, 32);
	return 0;
}

int tly_ledgercheck_chain(PGconn *conn, struct tly_codec *codec, struct tly_ledgercheck *out,
			  struct tly_pg_error *err)
{
	memset(out, 0, sizeof(*out));
	PGresult *res = tly_pg_query(conn,
				     "SELECT " TLY_ENTRIES_SELECT " FROM ledger_entries e "
				     "ORDER BY e.tenant_id, e.seq",
				     0, NULL, err);
	if (!res)
		return TLY_E_PG;
	struct chain c = {.codec = codec, .out = out};
	int rc = tly_entries_each(res, chain_entry, &c);
	PQclear(res);
	if (rc != 0) {
		snprintf(err->message, sizeof(err->message), "could not read ledger entries back: %s",
			 tly_err_name(rc));
		return rc;
	}
	return 0;
}

/* Run sql (returning count, then a description of the first violating row or NULL) into out. */
static int count_query(PGconn *conn, const char *sql, int n, const char *const *values,
		       struct tly_ledgercheck *out, struct tly_pg_error *err)
{
	memset(out, 0, sizeof(*out));
	PGresult *res = tly_pg_query(conn, sql, n, values, err);
	if (!res)
		return TLY_E_PG;
	out->checked = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	out->violations = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
	if (!PQgetisnull(res, 0, 2))
		snprintf(out->first, sizeof(out->first), "%s", PQgetvalue(res, 0, 2));
	PQclear(res);
	return 0;
}

int tly_ledgercheck_limit(PGconn *conn, int64_t overdraft_limit, struct tly_ledgercheck *out,
			  struct tly_pg_error *err)
{
	char limit[32];
	snprintf(limit, sizeof(limit), "%" PRId64, overdraft_limit);
	const char *const v[] = {limit};
	return count_query(conn,
			   "SELECT count(*), count(*) FILTER (WHERE bad), "
			   "min(CASE WHEN bad THEN 'tenant ' || tenant_id || ' seq ' || seq || ' (' || kind || "
			   "'): available ' || available END) FROM (SELECT tenant_id, seq, kind, "
			   "allowance_remaining + credits_remaining - held AS available, "
			   "allowance_remaining + credits_remaining - held < -$1::bigint AS bad "
			   "FROM ledger_entries) x",
			   1, v, out, err);
}

int tly_ledgercheck_conservation(PGconn *conn, struct tly_ledgercheck *out,
				 struct tly_ledgercheck_totals *totals, struct tly_pg_error *err)
{
	static const char per_tenant[] =
		"WITH sums AS (SELECT tenant_id, sum(allowance_delta + credits_delta) AS tokens, "
		"  sum(held_delta) AS held FROM ledger_entries GROUP BY tenant_id), "
		"last AS (SELECT DISTINCT ON (tenant_id) tenant_id, seq, "
		"  allowance_remaining + credits_remaining AS tokens, held FROM ledger_entries "
		"  ORDER BY tenant_id, seq DESC) "
		"SELECT count(*), count(*) FILTER (WHERE s.tokens <> l.tokens OR s.held <> l.held), "
		"min(CASE WHEN s.tokens <> l.tokens OR s.held <> l.held THEN 'tenant ' || l.tenant_id || "
		"  ': deltas sum to ' || s.tokens || ' tokens, ' || s.held || ' held; its last entry (seq ' "
		"  || l.seq || ') has ' || l.tokens || ', ' || l.held END) "
		"FROM sums s JOIN last l USING (tenant_id)";
	static const char total[] =
		"SELECT (SELECT coalesce(sum(GREATEST(allowance_delta, 0) + GREATEST(credits_delta, 0)), 0) "
		"  FROM ledger_entries), "
		"(SELECT coalesce(-sum(LEAST(allowance_delta, 0) + LEAST(credits_delta, 0)), 0) "
		"  FROM ledger_entries), "
		"(SELECT coalesce(sum(held_delta), 0) FROM ledger_entries), "
		"(SELECT coalesce(sum(allowance_remaining + credits_remaining - held), 0) FROM "
		"  (SELECT DISTINCT ON (tenant_id) * FROM ledger_entries ORDER BY tenant_id, seq DESC) l)";
	int rc = count_query(conn, per_tenant, 0, NULL, out, err);
	if (rc != 0)
		return rc;
	PGresult *res = tly_pg_query(conn, total, 0, NULL, err);
	if (!res)
		return TLY_E_PG;
	totals->granted = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	totals->spent = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
	totals->held = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
	totals->balances = strtoll(PQgetvalue(res, 0, 3), NULL, 10);
	PQclear(res);
	if (totals->granted - totals->spent - totals->held != totals->balances)
		violation(out, "granted %" PRId64 " - spent %" PRId64 " - held %" PRId64 " <> balances %" PRId64,
			  totals->granted, totals->spent, totals->held, totals->balances);
	return 0;
}

int tly_ledgercheck_causes(PGconn *conn, struct tly_ledgercheck *out, struct tly_pg_error *err)
{
	return count_query(conn,
			   "SELECT count(*), count(*) FILTER (WHERE max - min + 1 <> n), "
			   "min(CASE WHEN max - min + 1 <> n THEN 'tenant ' || tenant_id || ': record ' || "
			   "cause_partition || '/' || cause_offset || ' caused seqs ' || min || '..' || max || "
			   "' but ' || n || ' entries' END) "
			   "FROM (SELECT tenant_id, cause_partition, cause_offset, min(seq), max(seq), "
			   "count(*) AS n FROM ledger_entries GROUP BY 1, 2, 3) x",
			   0, NULL, out, err);
}
