/* tallyctl statement: every entry of a tenant's period with opening and closing balances and the invoice. */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entries.h"
#include "tallyctl.h"

static void statement_usage(void)
{
	fprintf(stderr, "tallyctl: usage: tallyctl statement TENANT --period TIME|FROM..TO [--csv]\n"
			"  TIME: the subscription period that contains TIME; FROM..TO: ledger time in "
			"[FROM, TO)\n");
}

struct out {
	bool csv;
	bool invoices_only;
	int64_t invoices;
};

/* A CSV field: quoted when it holds a comma, a quote or a line break (RFC 4180). */
static void csv_field(const char *s, bool last)
{
	if (s && strpbrk(s, ",\"\r\n")) {
		putchar('"');
		for (; *s; s++) {
			if (*s == '"')
				putchar('"');
			putchar(*s);
		}
		putchar('"');
	} else if (s) {
		fputs(s, stdout);
	}
	putchar(last ? '\n' : ',');
}

static void row(const struct out *o, const char *label, const struct tly_event *entry, bool balances_only)
{
	const struct tly_ledger_entry *e = &entry->u.ledger_entry;
	char at[32], cause[37], ref[37] = "", amount[32] = "";
	char n[8][24];
	tallyctl_format_time(e->ledger_time, at);
	tly_uuid_format(&e->cause_event_id, cause);
	if (!tly_uuid_is_nil(&e->ref_id))
		tly_uuid_format(&e->ref_id, ref);
	if (e->amount_cents.set)
		snprintf(amount, sizeof(amount), "%" PRId64, e->amount_cents.v);
	const int64_t v[8] = {e->allowance_delta, e->credits_delta, e->held_delta, e->overage_delta,
			      e->allowance_remaining, e->credits_remaining, e->held, e->overage_tokens};
	for (int i = 0; i < 8; i++)
		snprintf(n[i], sizeof(n[i]), "%" PRId64, v[i]);
	if (balances_only)
		for (int i = 0; i < 4; i++)
			n[i][0] = '\0';
	if (o->csv) {
		char seq[24];
		snprintf(seq, sizeof(seq), "%" PRId64, e->seq);
		const char *f[] = {seq, at, label, balances_only ? "" : e->cause_type,
				   balances_only ? "" : cause, balances_only ? "" : ref,
				   n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7],
				   balances_only ? "" : amount, balances_only ? "" : e->currency,
				   balances_only ? "" : e->reason};
		for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++)
			csv_field(f[i] ? f[i] : "", i + 1 == sizeof(f) / sizeof(f[0]));
		return;
	}
	printf("%6" PRId64 "  %-27s  %-22s %9s %9s %9s %9s  %10s %10s %9s %9s  %s%s%s%s%s\n", e->seq,
	       at, label, n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7],
	       balances_only ? "" : e->cause_type, amount[0] && !balances_only ? " " : "",
	       balances_only ? "" : amount, e->reason && !balances_only ? " " : "",
	       e->reason && !balances_only ? e->reason : "");
}

static int print_entry(const struct tly_event *entry, void *ud)
{
	struct out *o = ud;
	const struct tly_ledger_entry *e = &entry->u.ledger_entry;
	if (!o->invoices_only) {
		row(o, e->kind, entry, false);
		return 0;
	}
	if (strcmp(e->kind, "invoice") != 0 || o->csv)
		return 0;
	char ref[37];
	tly_uuid_format(&e->ref_id, ref);
	printf("invoice %s (seq %" PRId64 "): %" PRId64 " %s\n", ref, e->seq,
	       e->amount_cents.set ? e->amount_cents.v : 0, e->currency ? e->currency : "");
	const struct tly_invoice_line *l = e->lines.items;
	for (size_t i = 0; i < e->lines.n; i++)
		printf("  %-8s %-16s %12" PRId64 " x %10" PRId64 " micros = %10" PRId64 " cents\n",
		       l[i].kind, l[i].feature_key ? l[i].feature_key : "", l[i].quantity,
		       l[i].unit_price_micros, l[i].amount_cents);
	o->invoices++;
	return 0;
}

/* A balances-only row for the last of n entries walked (n 0: every one). */
struct balance_row {
	const struct out *o;
	const char *label;
	int n, seen;
};

static int print_balance_row(const struct tly_event *entry, void *ud)
{
	struct balance_row *b = ud;
	if (b->n == 0 || ++b->seen == b->n)
		row(b->o, b->label, entry, true);
	return 0;
}

/* The period's bounds (µs) as text for the statement's query. */
static int resolve_period(PGconn *conn, const char *tenant, const char *period, char from[24],
			  char to[24], bool *by_label)
{
	const char *dots = strstr(period, "..");
	int64_t a, b;
	if (dots) {
		char left[64];
		snprintf(left, sizeof(left), "%.*s", (int)(dots - period), period);
		if (tallyctl_time_us(conn, left, &a) != 0 || tallyctl_time_us(conn, dots + 2, &b) != 0)
			return -1;
		*by_label = false;
	} else {
		struct tly_pg_error err;
		char t[24];
		if (tallyctl_time_us(conn, period, &a) != 0)
			return -1;
		snprintf(t, sizeof(t), "%" PRId64, a);
		const char *v[] = {tenant, t};
		PGresult *res = tly_pg_query(
			conn,
			"SELECT (extract(epoch FROM period_start) * 1000000)::bigint, "
			"(extract(epoch FROM period_end) * 1000000)::bigint FROM ledger_entries "
			"WHERE tenant_id = $1 AND period_start <= timestamptz 'epoch' + $2::bigint * "
			"interval '1 microsecond' AND period_end > timestamptz 'epoch' + $2::bigint * "
			"interval '1 microsecond' ORDER BY seq LIMIT 1",
			2, v, &err);
		if (!res) {
			fprintf(stderr, "tallyctl: could not find the period: %s\n", err.message);
			return -1;
		}
		if (PQntuples(res) == 0) {
			fprintf(stderr, "tallyctl: no subscription period of tenant %s contains %s\n",
				tenant, period);
			PQclear(res);
			return -1;
		}
		a = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
		b = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
		PQclear(res);
		*by_label = true;
	}
	snprintf(from, 24, "%" PRId64, a);
	snprintf(to, 24, "%" PRId64, b);
	return 0;
}

int cmd_statement(struct app *app, int argc, char **argv)
{
	const char *tenant = NULL, *period = NULL;
	struct out o = {0};
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--csv") == 0)
			o.csv = true;
		else if (strcmp(argv[i], "--period") == 0 && i + 1 < argc)
			period = argv[++i];
		else if (!tenant && argv[i][0] != '-')
			tenant = argv[i];
		else {
			statement_usage();
			return 2;
		}
	}
	tly_uuid id;
	if (!tenant || !period || tly_uuid_parse(tenant, &id) != 0) {
		statement_usage();
		return 2;
	}
	int rc = 1;
	PGresult *res = NULL, *open = NULL;
	struct tly_pg_error err;
	char from[24], to[24], first[24];
	bool by_label = false;
	PGconn *conn = tallyctl_connect_db(app);
	if (!conn || resolve_period(conn, tenant, period, from, to, &by_label) != 0)
		goto out;
	const char *v[] = {tenant, from, to};
	res = tly_pg_query(conn,
			   by_label ? "SELECT " TLY_ENTRIES_SELECT " FROM ledger_entries e "
				      "WHERE e.tenant_id = $1 "
				      "AND e.period_start = timestamptz 'epoch' + $2::bigint * interval '1 microsecond' "
				      "AND e.period_end = timestamptz 'epoch' + $3::bigint * interval '1 microsecond' "
				      "ORDER BY e.seq"
				    : "SELECT " TLY_ENTRIES_SELECT " FROM ledger_entries e "
				      "WHERE e.tenant_id = $1 "
				      "AND e.ledger_time >= timestamptz 'epoch' + $2::bigint * interval '1 microsecond' "
				      "AND e.ledger_time < timestamptz 'epoch' + $3::bigint * interval '1 microsecond' "
				      "ORDER BY e.seq",
			   3, v, &err);
	if (!res) {
		fprintf(stderr, "tallyctl: could not read the ledger of tenant %s: %s\n", tenant,
			err.message);
		goto out;
	}
	if (PQntuples(res) == 0) {
		fprintf(stderr, "tallyctl: tenant %s has no ledger entry in the period %s\n", tenant,
			period);
		goto out;
	}
	snprintf(first, sizeof(first), "%lld", strtoll(PQgetvalue(res, 0, 1), NULL, 10) - 1);
	const char *ov[] = {tenant, first};
	if (!(open = tly_pg_query(conn,
				  "SELECT " TLY_ENTRIES_SELECT " FROM ledger_entries e "
				  "WHERE e.tenant_id = $1 AND e.seq = $2::bigint",
				  2, ov, &err))) {
		fprintf(stderr, "tallyctl: could not read the opening balance: %s\n", err.message);
		goto out;
	}
	char ps[32], pe[32];
	tallyctl_format_time(strtoll(from, NULL, 10), ps);
	tallyctl_format_time(strtoll(to, NULL, 10), pe);
	if (o.csv)
		printf("seq,ledger_time,kind,cause_type,cause_event_id,ref_id,allowance_delta,"
		       "credits_delta,held_delta,overage_delta,allowance_remaining,credits_remaining,"
		       "held,overage_tokens,amount_cents,currency,reason\n");
	else
		printf("statement of tenant %s, %s %s .. %s\n\n%6s  %-27s  %-22s %9s %9s %9s %9s  %10s "
		       "%10s %9s %9s  %s\n",
		       tenant, by_label ? "subscription period" : "ledger time", ps, pe, "SEQ", "TIME",
		       "KIND", "ΔALLOW", "ΔCRED", "ΔHELD", "ΔOVER", "ALLOWANCE", "CREDITS", "HELD",
		       "OVERAGE", "CAUSE AMOUNT REASON");
	struct balance_row opening = {&o, "opening_balance", 0, 0};
	struct balance_row closing = {&o, "closing_balance", 0, 0};
	if (PQntuples(open) == 0) {
		if (!o.csv)
			printf("%6s  %-27s  %-22s %9s %9s %9s %9s  %10d %10d %9d %9d\n", "0", "",
			       "opening_balance", "", "", "", "", 0, 0, 0, 0);
		else
			printf("0,,opening_balance,,,,,,,,0,0,0,0,,,\n");
	}
	struct out inv = o;
	inv.invoices_only = true;
	closing.n = PQntuples(res);
	if (tly_entries_each(open, print_balance_row, &opening) != 0 ||
	    tly_entries_each(res, print_entry, &o) != 0 ||
	    tly_entries_each(res, print_balance_row, &closing) != 0) {
		fprintf(stderr, "tallyctl: could not read the ledger of tenant %s: a row does not read "
				"back as an entry\n", tenant);
		goto out;
	}
	if (!o.csv)
		printf("\n");
	if (tly_entries_each(res, print_entry, &inv) != 0)
		goto out;
	if (!o.csv && inv.invoices == 0)
		printf("no invoice in this period\n");
	rc = fflush(stdout) == 0 ? 0 : 1;
out:
	PQclear(res);
	PQclear(open);
	if (conn)
		PQfinish(conn);
	return rc;
}
