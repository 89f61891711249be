/* Comparing projections: table digests and token balances against the ledger. */
#include "compare.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fold.h"

/* Rows of one table in a canonical order, without the surrogate id: "ROWS:MD5", malloc'd. */
static char *digest_table(PGconn *conn, const char *table, struct tly_pg_error *err)
{
	char *q = PQescapeIdentifier(conn, table, strlen(table));
	char sql[512];
	if (!q) {
		snprintf(err->message, sizeof(err->message), "could not quote \"%s\": %s", table,
			 PQerrorMessage(conn));
		return NULL;
	}
	bool surrogate = strcmp(table, "agent_messages") == 0 || strcmp(table, "plan_features") == 0 ||
			 strcmp(table, "token_balances") == 0;
	snprintf(sql, sizeof(sql),
		 "SELECT count(*) || ':' || md5(coalesce(string_agg(x, '|' ORDER BY x), '')) "
		 "FROM (SELECT (to_jsonb(t) %s)::text AS x FROM %s t) s",
		 surrogate ? "- 'id'" : "", q);
	PQfreemem(q);
	PGresult *res = tly_pg_query(conn, sql, 0, NULL, err);
	if (!res)
		return NULL;
	char *out = strdup(PQgetvalue(res, 0, 0));
	PQclear(res);
	if (!out)
		snprintf(err->message, sizeof(err->message), "out of memory");
	return out;
}

char *tly_compare_digest(PGconn *conn, struct tly_pg_error *err)
{
	char *out = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&out, &len);
	if (!f) {
		snprintf(err->message, sizeof(err->message), "out of memory");
		return NULL;
	}
	bool ok = true;
	for (size_t i = 0; ok && i < tly_fold_n_tables; i++) {
		char *d = digest_table(conn, tly_fold_tables[i], err);
		ok = d != NULL;
		if (ok)
			fprintf(f, "%s=%s\n", tly_fold_tables[i], d);
		free(d);
	}
	if (fclose(f) != 0 && ok) {
		snprintf(err->message, sizeof(err->message), "out of memory");
		ok = false;
	}
	if (!ok) {
		free(out);
		return NULL;
	}
	return out;
}

int tly_compare_balances(PGconn *conn, int64_t *mismatched, struct tly_pg_error *err)
{
	static const char sql[] =
		"SELECT count(*) FROM (SELECT DISTINCT ON (tenant_id) * FROM ledger_entries "
		"ORDER BY tenant_id, seq DESC) l WHERE NOT EXISTS (SELECT 1 FROM token_balances b "
		"WHERE b.tenant_id = l.tenant_id AND b.ledger_seq = l.seq "
		"AND b.held = l.held AND b.credits = l.credits_remaining "
		"AND b.tokens_remaining = GREATEST(l.allowance_remaining + l.credits_remaining - l.held, 0) "
		"AND b.overage_tokens = l.overage_tokens)";
	PGresult *res = tly_pg_query(conn, sql, 0, NULL, err);
	if (!res)
		return TLY_E_PG;
	*mismatched = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	PQclear(res);
	return 0;
}
