/* tallyctl balance: a tenant's wallet at any point of its ledger, with the entry it stands on. */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "entries.h"
#include "tallyctl.h"

static void balance_usage(void)
{
	fprintf(stderr, "tallyctl: usage: tallyctl balance TENANT [--at SEQ|TIME] [--json]\n");
}

struct found {
	bool as_json;
	bool any;
	int rc;
};

static int print_balance(const struct tly_event *entry, void *ud)
{
	struct found *f = ud;
	const struct tly_ledger_entry *e = &entry->u.ledger_entry;
	char tenant[37], hash[65], at[32], ps[32] = "", pe[32] = "";
	tly_uuid_format(&entry->tenant_id, tenant);
	for (int i = 0; i < 32; i++)
		snprintf(hash + 2 * i, 3, "%02x", e->hash[i]);
	tallyctl_format_time(e->ledger_time, at);
	if (e->period_start.set)
		tallyctl_format_time(e->period_start.v, ps);
	if (e->period_end.set)
		tallyctl_format_time(e->period_end.v, pe);
	int64_t available = e->allowance_remaining + e->credits_remaining - e->held;
	f->any = true;
	if (f->as_json) {
		json_t *doc = json_pack(
			"{s:s, s:I, s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:s?, s:s?}", "tenant", tenant,
			"seq", (json_int_t)e->seq, "kind", e->kind, "ledger_time", at, "hash", hash,
			"allowance_remaining", (json_int_t)e->allowance_remaining, "credits_remaining",
			(json_int_t)e->credits_remaining, "held", (json_int_t)e->held, "overage_tokens",
			(json_int_t)e->overage_tokens, "available", (json_int_t)available,
			"period_start", ps[0] ? ps : NULL, "period_end", pe[0] ? pe : NULL);
		if (!doc || json_dumpf(doc, stdout, JSON_COMPACT) != 0)
			f->rc = 1;
		json_decref(doc);
		printf("\n");
		return 0;
	}
	printf("tenant     %s\n"
	       "as of      seq %" PRId64 " (%s) at %s\n"
	       "hash       %s\n"
	       "allowance  %" PRId64 "\n"
	       "credits    %" PRId64 "\n"
	       "held       %" PRId64 "\n"
	       "overage    %" PRId64 "\n"
	       "available  %" PRId64 "\n"
	       "period     %s .. %s\n",
	       tenant, e->seq, e->kind, at, hash, e->allowance_remaining, e->credits_remaining,
	       e->held, e->overage_tokens, available, ps[0] ? ps : "-", pe[0] ? pe : "-");
	return 0;
}

int cmd_balance(struct app *app, int argc, char **argv)
{
	const char *tenant = NULL, *at = NULL;
	struct found f = {0};
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--json") == 0)
			f.as_json = true;
		else if (strcmp(argv[i], "--at") == 0 && i + 1 < argc)
			at = argv[++i];
		else if (!tenant && argv[i][0] != '-')
			tenant = argv[i];
		else {
			balance_usage();
			return 2;
		}
	}
	tly_uuid id;
	if (!tenant || tly_uuid_parse(tenant, &id) != 0) {
		balance_usage();
		return 2;
	}
	int rc = 1;
	PGresult *res = NULL;
	struct tly_pg_error err;
	PGconn *conn = tallyctl_connect_db(app);
	if (!conn)
		goto out;
	char bound[24] = "9223372036854775807";
	char *end = NULL;
	bool by_seq = true;
	if (at) {
		long long seq = strtoll(at, &end, 10);
		by_seq = *at && !*end && seq >= 0;
	}
	if (at && by_seq)
		snprintf(bound, sizeof(bound), "%s", at);
	int64_t t = 0;
	if (at && !by_seq) {
		if (tallyctl_time_us(conn, at, &t) != 0)
			goto out;
		snprintf(bound, sizeof(bound), "%" PRId64, t);
	}
	const char *v[] = {tenant, bound};
	res = tly_pg_query(conn,
			   by_seq ? "SELECT " TLY_ENTRIES_SELECT " FROM ledger_entries e "
				    "WHERE e.tenant_id = $1 AND e.seq <= $2::bigint "
				    "ORDER BY e.seq DESC LIMIT 1"
				  : "SELECT " TLY_ENTRIES_SELECT " FROM ledger_entries e "
				    "WHERE e.tenant_id = $1 AND e.ledger_time <= timestamptz 'epoch' + "
				    "$2::bigint * interval '1 microsecond' ORDER BY e.seq DESC LIMIT 1",
			   2, v, &err);
	if (!res) {
		fprintf(stderr, "tallyctl: could not read the ledger of tenant %s: %s\n", tenant,
			err.message);
		goto out;
	}
	if (tly_entries_each(res, print_balance, &f) != 0 || f.rc != 0) {
		fprintf(stderr, "tallyctl: could not read the ledger of tenant %s: a row does not read "
				"back as an entry\n", tenant);
		goto out;
	}
	if (!f.any) {
		fprintf(stderr, "tallyctl: tenant %s has no ledger entry%s%s\n", tenant,
			at ? " at or before " : "", at ? at : "");
		goto out;
	}
	rc = fflush(stdout) == 0 ? 0 : 1;
out:
	PQclear(res);
	if (conn)
		PQfinish(conn);
	return rc;
}
