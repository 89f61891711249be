/* The audit's projection check: token balances and invoices against the ledger's entries. */
#include "audit_proj.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Tenants (all, or $1) whose applied seq is the ledger's last: their projections are complete. */
#define CAUGHT                                                                                     \
	"caught AS (SELECT a.tenant_id FROM projector_ledger_applied a "                           \
	"  WHERE ($1::uuid IS NULL OR a.tenant_id = $1::uuid) AND a.seq = "                        \
	"  (SELECT max(e.seq) FROM ledger_entries e WHERE e.tenant_id = a.tenant_id)) "

#define NIL_UUID "'00000000-0000-0000-0000-000000000000'::uuid"

static const char counts_sql[] =
	"WITH " CAUGHT
	"SELECT (SELECT count(*) FROM caught), CASE WHEN EXISTS (SELECT 1 FROM "
	"  projector_ledger_applied) THEN (SELECT count(*) FROM ledger_wallets w "
	"  WHERE ($1::uuid IS NULL OR w.tenant_id = $1::uuid) AND EXISTS (SELECT 1 FROM "
	"  ledger_entries e WHERE e.tenant_id = w.tenant_id)) ELSE 0 END";

/* Rows of (tenant, seq, message): one per difference. */
static const char balances_sql[] =
	"WITH " CAUGHT ", "
	"last AS (SELECT DISTINCT ON (e.tenant_id, s.sub) e.tenant_id, s.sub, e.seq, "
	"  e.allowance_remaining AS a, e.credits_remaining AS c, e.held AS h, e.overage_tokens AS o, "
	"  e.period_start AS ps, e.period_end AS pe "
	"  FROM caught JOIN ledger_entries e USING (tenant_id) CROSS JOIN LATERAL (SELECT CASE "
	"    WHEN e.subscription_id IS NOT NULL THEN e.subscription_id "
	"    WHEN e.kind = 'subscription_ended' THEN e.ref_id END AS sub) s "
	"  ORDER BY e.tenant_id, s.sub, e.seq DESC), "
	"bal AS (SELECT b.* FROM caught JOIN token_balances b USING (tenant_id)) "
	"SELECT coalesce(l.tenant_id, b.tenant_id), coalesce(l.seq, b.ledger_seq), "
	"  CASE WHEN b.tenant_id IS NULL THEN format('token_balances has no row for subscription %s "
	"    (the ledger''s last entry for it is seq %s)', coalesce(l.sub::text, 'none'), l.seq) "
	"  WHEN l.tenant_id IS NULL THEN format('token_balances row %s (subscription %s) has no "
	"    entry in the ledger', b.id, coalesce(b.subscription_id::text, 'none')) "
	"  ELSE format('token_balances of subscription %s differ from the ledger after seq %s: %s', "
	"    coalesce(l.sub::text, 'none'), l.seq, concat_ws(', ', "
	"    CASE WHEN b.held <> l.h THEN format('held %s (ledger %s)', b.held, l.h) END, "
	"    CASE WHEN b.credits <> l.c THEN format('credits %s (ledger %s)', b.credits, l.c) END, "
	"    CASE WHEN b.overage_tokens <> l.o THEN format('overage_tokens %s (ledger %s)', "
	"      b.overage_tokens, l.o) END, "
	"    CASE WHEN b.tokens_remaining <> greatest(l.a + l.c - l.h, 0) THEN "
	"      format('tokens_remaining %s (ledger %s)', b.tokens_remaining, "
	"      greatest(l.a + l.c - l.h, 0)) END, "
	"    CASE WHEN b.ledger_seq <> l.seq THEN format('ledger_seq %s', b.ledger_seq) END, "
	"    CASE WHEN b.period_start IS DISTINCT FROM l.ps OR b.period_end IS DISTINCT FROM l.pe "
	"      THEN 'period' END)) END "
	"FROM last l FULL JOIN bal b ON b.tenant_id = l.tenant_id "
	"  AND coalesce(b.subscription_id, " NIL_UUID ") = coalesce(l.sub, " NIL_UUID ") "
	"WHERE l.tenant_id IS NULL OR b.tenant_id IS NULL OR (b.held, b.credits, b.overage_tokens, "
	"  b.tokens_remaining, b.ledger_seq) <> (l.h, l.c, l.o, greatest(l.a + l.c - l.h, 0), l.seq) "
	"  OR b.period_start IS DISTINCT FROM l.ps OR b.period_end IS DISTINCT FROM l.pe "
	"ORDER BY 1, 2";

static const char invoices_sql[] =
	"WITH " CAUGHT ", "
	"inv AS (SELECT e.* FROM caught JOIN ledger_entries e USING (tenant_id) "
	"  WHERE e.kind = 'invoice'), "
	"pro AS (SELECT i.* FROM caught JOIN subscription_invoices i USING (tenant_id)) "
	"SELECT coalesce(inv.tenant_id, pro.tenant_id), coalesce(inv.seq, pro.ledger_seq), "
	"  CASE WHEN pro.id IS NULL THEN format('invoice %s is missing from subscription_invoices', "
	"    inv.ref_id) "
	"  WHEN inv.ref_id IS NULL THEN format('subscription_invoices row %s has no invoice entry in "
	"    the ledger', pro.id) "
	"  ELSE format('invoice %s differs from its ledger entry: %s', inv.ref_id, concat_ws(', ', "
	"    CASE WHEN pro.amount_cents IS DISTINCT FROM inv.amount_cents THEN "
	"      format('amount_cents %s (ledger %s)', pro.amount_cents, inv.amount_cents) END, "
	"    CASE WHEN pro.currency IS DISTINCT FROM inv.currency THEN 'currency' END, "
	"    CASE WHEN pro.tenant_id <> inv.tenant_id OR pro.ledger_seq <> inv.seq THEN "
	"      format('tenant or ledger_seq %s', pro.ledger_seq) END, "
	"    CASE WHEN pro.subscription_id IS DISTINCT FROM inv.subscription_id THEN "
	"      'subscription_id' END, "
	"    CASE WHEN pro.period_start IS DISTINCT FROM inv.period_start OR "
	"      pro.period_end IS DISTINCT FROM inv.period_end THEN 'period' END, "
	"    CASE WHEN pro.overage_tokens <> -inv.overage_delta THEN "
	"      format('overage_tokens %s (ledger %s)', pro.overage_tokens, -inv.overage_delta) END, "
	"    CASE WHEN pro.lines <> coalesce(inv.lines, '[]') THEN 'lines' END)) END "
	"FROM inv FULL JOIN pro ON pro.id = inv.ref_id "
	"WHERE inv.ref_id IS NULL OR pro.id IS NULL OR (pro.amount_cents, pro.currency, "
	"  pro.tenant_id, pro.ledger_seq, pro.overage_tokens, pro.lines) IS DISTINCT FROM "
	"  (inv.amount_cents, inv.currency, inv.tenant_id, inv.seq, -inv.overage_delta, "
	"  coalesce(inv.lines, '[]')) OR pro.subscription_id IS DISTINCT FROM inv.subscription_id "
	"  OR pro.period_start IS DISTINCT FROM inv.period_start "
	"  OR pro.period_end IS DISTINCT FROM inv.period_end "
	"ORDER BY 1, 2";

/* Report each (tenant, seq, message) row of sql as a projection failure. */
static int report_rows(PGconn *conn, const char *sql, const char *const *v,
		       const struct tly_audit_opts *opts, struct tly_audit_counts *counts,
		       struct tly_pg_error *err)
{
	PGresult *res = tly_pg_query(conn, sql, 1, v, err);
	if (!res)
		return TLY_E_PG;
	for (int i = 0; i < PQntuples(res); i++) {
		struct tly_audit_failure f = {"projection", {{0}}, 0, -1, -1, PQgetvalue(res, i, 2)};
		if (tly_uuid_parse(PQgetvalue(res, i, 0), &f.tenant) != 0)
			memset(&f.tenant, 0, sizeof(f.tenant));
		f.seq = strtoll(PQgetvalue(res, i, 1), NULL, 10);
		counts->failures++;
		if (opts->on_failure)
			opts->on_failure(&f, opts->ud);
	}
	PQclear(res);
	return 0;
}

int tly_audit_projections(PGconn *conn, const tly_uuid *tenant, const struct tly_audit_opts *opts,
			  struct tly_audit_counts *counts, struct tly_pg_error *err)
{
	char text[37];
	const char *v[] = {NULL};
	if (tenant) {
		tly_uuid_format(tenant, text);
		v[0] = text;
	}
	PGresult *res = tly_pg_query(conn, counts_sql, 1, v, err);
	if (!res)
		return TLY_E_PG;
	int64_t projected = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	int64_t with_entries = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
	PQclear(res);
	counts->projected += projected;
	counts->behind += with_entries > projected ? with_entries - projected : 0;
	if (projected == 0)
		return 0;
	counts->checks += 2 * projected;
	int rc = report_rows(conn, balances_sql, v, opts, counts, err);
	return rc ? rc : report_rows(conn, invoices_sql, v, opts, counts, err);
}
