/* tallyctl audit: replay the ledger out of PostgreSQL through lib/audit and report every failure. */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "audit.h"
#include "audit_pg.h"
#include "tallyctl.h"

static void audit_usage(void)
{
	fprintf(stderr, "tallyctl: usage: tallyctl audit [--tenant T] [--from SEQ|TIME] [--to SEQ|TIME]\n"
			"                 [--source postgres] [--jobs N] [--json]\n");
}

int tallyctl_time_us(PGconn *conn, const char *text, int64_t *out)
{
	struct tly_pg_error err;
	const char *v[] = {text};
	PGresult *res = tly_pg_query(conn,
				     "SELECT (extract(epoch FROM $1::timestamptz) * 1000000)::bigint",
				     1, v, &err);
	if (!res) {
		fprintf(stderr, "tallyctl: could not read time \"%s\": %s\n", text, err.message);
		return -1;
	}
	*out = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	PQclear(res);
	return 0;
}

void tallyctl_format_time(int64_t us, char out[32])
{
	time_t s = (time_t)(us >= 0 ? us / 1000000 : (us - 999999) / 1000000);
	struct tm tm;
	gmtime_r(&s, &tm);
	size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(out + n, 32 - n, ".%06dZ", (int)(us - (int64_t)s * 1000000));
}

/* A bound: a seq when all digits, else a time PostgreSQL reads as timestamptz. */
static int parse_bound(PGconn *conn, const char *text, int64_t *seq, int64_t *time)
{
	char *end = NULL;
	long long v = strtoll(text, &end, 10);
	if (*text && !*end) {
		*seq = v;
		return 0;
	}
	return tallyctl_time_us(conn, text, time);
}

struct report {
	bool as_json;
	bool tty;
	json_t *failures; /* --json */
	int64_t printed;
};

static void on_failure(const struct tly_audit_failure *f, void *ud)
{
	struct report *r = ud;
	char tenant[37] = "";
	if (!tly_uuid_is_nil(&f->tenant))
		tly_uuid_format(&f->tenant, tenant);
	if (r->as_json) {
		json_t *o = json_pack("{s:s, s:s?, s:s}", "check", f->check, "tenant",
				      tenant[0] ? tenant : NULL, "message", f->message);
		if (o && ((f->seq && json_object_set_new(o, "seq", json_integer((json_int_t)f->seq))) ||
			  (f->partition >= 0 &&
			   json_object_set_new(o, "partition", json_integer(f->partition))) ||
			  (f->offset >= 0 &&
			   json_object_set_new(o, "offset", json_integer((json_int_t)f->offset))))) {
			json_decref(o);
			o = NULL;
		}
		if (!o || json_array_append_new(r->failures, o) != 0)
			fprintf(stderr, "tallyctl: could not keep a failure: out of memory\n");
		return;
	}
	if (r->tty)
		fprintf(stderr, "\r\033[K");
	printf("FAIL %-11s tenant=%s seq=%" PRId64, f->check, tenant[0] ? tenant : "-", f->seq);
	if (f->partition >= 0)
		printf(" input=%d/%" PRId64, (int)f->partition, f->offset);
	printf(": %s\n", f->message);
	r->printed++;
}

static void on_progress(const struct tly_audit_counts *c, void *ud)
{
	struct report *r = ud;
	if (r->tty)
		fprintf(stderr, "\raudit: %" PRId64 " entries, %" PRId64 " inputs, %" PRId64 " failures",
			c->entries, c->inputs, c->failures);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int cmd_audit(struct app *app, int argc, char **argv)
{
	const char *tenant_text = NULL, *from = NULL, *to = NULL, *source = "postgres";
	struct report rep = {0};
	long jobs = sysconf(_SC_NPROCESSORS_ONLN);
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--json") == 0)
			rep.as_json = true;
		else if (strcmp(argv[i], "--tenant") == 0 && i + 1 < argc)
			tenant_text = argv[++i];
		else if (strcmp(argv[i], "--from") == 0 && i + 1 < argc)
			from = argv[++i];
		else if (strcmp(argv[i], "--to") == 0 && i + 1 < argc)
			to = argv[++i];
		else if (strcmp(argv[i], "--source") == 0 && i + 1 < argc)
			source = argv[++i];
		else if (strcmp(argv[i], "--jobs") == 0 && i + 1 < argc && atoi(argv[i + 1]) > 0)
			jobs = atoi(argv[++i]);
		else {
			audit_usage();
			return 2;
		}
	}
	if (strcmp(source, "postgres") != 0) {
		fprintf(stderr, "tallyctl: could not audit from source \"%s\": only postgres is "
				"supported (the ledger keeps its applied inputs in ledger_input_batches; "
				"tally.events' retention is shorter than the ledger's life)\n",
			source);
		return 2;
	}
	tly_uuid tenant;
	if (tenant_text && tly_uuid_parse(tenant_text, &tenant) != 0) {
		fprintf(stderr, "tallyctl: --tenant \"%s\" is not a UUID\n", tenant_text);
		return 2;
	}
	int rc = 3;
	PGconn *conn = tallyctl_connect_db(app);
	if (!conn)
		goto out;
	struct tly_audit_opts opts = {
		.overdraft_limit = tly_config_int(app->cfg, "ledger.overdraft.limit"),
		.from_seq = 0, .to_seq = INT64_MAX, .from_time = INT64_MIN, .to_time = INT64_MAX,
		.on_failure = on_failure, .ud = &rep};
	if ((from && parse_bound(conn, from, &opts.from_seq, &opts.from_time) != 0) ||
	    (to && parse_bound(conn, to, &opts.to_seq, &opts.to_time) != 0)) {
		rc = 2;
		goto out;
	}
	rep.tty = !rep.as_json && isatty(STDERR_FILENO);
	if (rep.as_json && !(rep.failures = json_array())) {
		fprintf(stderr, "tallyctl: out of memory\n");
		goto out;
	}
	struct tly_audit_pg_opts pgo = {.conninfo = tly_config_str(app->cfg, "database.url"),
					.events_topic = tly_config_str(app->cfg, "topics.events"),
					.tenant = tenant_text ? &tenant : NULL,
					.jobs = jobs > 0 ? (int)jobs : 1,
					.progress = on_progress, .ud = &rep};
	struct tly_pg_error pgerr;
	struct tly_audit_counts c;
	double t0 = now_s();
	if (tly_audit_pg_run(&opts, &pgo, &c, &pgerr) != 0) {
		if (rep.tty)
			fprintf(stderr, "\r\033[K");
		fprintf(stderr, "tallyctl: could not audit the ledger: %s\n", pgerr.message);
		goto out;
	}
	double secs = now_s() - t0;
	if (rep.tty)
		fprintf(stderr, "\r\033[K");
	double rate = secs > 0 ? (double)c.entries / secs : 0;
	if (rep.as_json) {
		json_t *doc = json_pack("{s:b, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:O}",
					"ok", c.failures == 0, "tenants", (json_int_t)c.tenants,
					"entries", (json_int_t)c.entries, "inputs",
					(json_int_t)c.inputs, "reexecuted", (json_int_t)c.reexecuted,
					"rehashed", (json_int_t)c.rehashed, "checks",
					(json_int_t)c.checks, "failures", (json_int_t)c.failures,
					"projected", (json_int_t)c.projected, "behind",
					(json_int_t)c.behind, "seconds", secs, "failed", rep.failures);
		if (!doc || json_dumpf(doc, stdout, JSON_COMPACT) != 0) {
			fprintf(stderr, "tallyctl: could not write the audit as JSON\n");
			json_decref(doc);
			goto out;
		}
		json_decref(doc);
		printf("\n");
	} else {
		printf("audit %s: %" PRId64 " tenants, %" PRId64 " entries (%" PRId64
		       " proved by re-execution of %" PRId64 " inputs, %" PRId64
		       " hashes recomputed alone), %" PRId64 " checks, %" PRId64
		       " failures; %.2f s, %.0f entries/s\n",
		       c.failures ? "FAILED" : "passed", c.tenants, c.entries, c.reexecuted, c.inputs,
		       c.rehashed, c.checks, c.failures, secs, rate);
		if (c.projected || c.behind)
			printf("projections: token balances and invoices of %" PRId64 " tenants compared "
			       "with the ledger; %" PRId64 " tenants not compared (projector behind)\n",
			       c.projected, c.behind);
	}
	if (fflush(stdout) != 0) {
		fprintf(stderr, "tallyctl: could not write the audit\n");
		goto out;
	}
	rc = c.failures ? 1 : 0;
out:
	json_decref(rep.failures);
	if (conn)
		PQfinish(conn);
	return rc;
}
