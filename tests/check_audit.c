/*
 * Suite "audit": lib/audit fed in process (each check on clean and on tampered entries), then
 * tallyctl audit, balance and statement on a real tally-ledger run (tally-loadgen traffic with
 * kill -9 restarts), logged in as a tally_auditor member, and on rows tampered in PostgreSQL.
 */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "audit.h"
#include "audit_ids.h"
#include "codec.h"
#include "config.h"
#include "decide.h"
#include "entries.h"
#include "fixtures.h"
#include "harness.h"
#include "kafka.h"
#include "lag.h"
#include "pg.h"
#include "proc.h"
#include "suites.h"
#include "wallet.h"

#define T0 1767225600000000LL /* 2026-01-01 */
#define MINUTE 60000000LL
#define MAX_INPUTS 32

/* ---- in process: a one-tenant ledger run through the decision core ----------------------- */

struct mini {
	struct tly_codec *codec;
	struct tly_ledger_config cfg;
	struct tly_wallet *w;
	tly_uuid tenant;
	struct tly_entries out;
	struct tly_buf bytes[MAX_INPUTS];
	tly_uuid ids[MAX_INPUTS];
	size_t n;
};

struct failure {
	char check[16];
	tly_uuid tenant;
	int64_t seq;
	int64_t offset;
	char message[256];
};

struct failures {
	struct failure f[64];
	size_t n;
};

static void mini_up(struct mini *m)
{
	char errstr[256];
	memset(m, 0, sizeof(*m));
	m->codec = tly_codec_new(errstr, sizeof(errstr));
	ck_assert_msg(m->codec != NULL, "%s", errstr);
	m->cfg = (struct tly_ledger_config){0, m->codec};
	ck_assert_int_eq(tly_uuid_parse("aaaaaaaa-0000-4000-8000-0000000000a6", &m->tenant), 0);
	m->w = tly_wallet_new(&m->tenant);
	ck_assert_ptr_nonnull(m->w);
}

static void mini_down(struct mini *m)
{
	for (size_t i = 0; i < m->n; i++)
		tly_buf_free(&m->bytes[i]);
	tly_entries_free(&m->out);
	tly_wallet_free(m->w);
	tly_codec_free(m->codec);
}

/* Decide ev as tally-ledger does (offset = its index) and keep its bytes as the stored input. */
static void mini_apply(struct mini *m, struct tly_event *ev, int64_t at)
{
	char errstr[256];
	ck_assert_uint_lt(m->n, MAX_INPUTS);
	ev->tenant_id = m->tenant;
	ev->occurred_at = at;
	struct tly_buf *b = &m->bytes[m->n];
	ck_assert_msg(tly_codec_encode(m->codec, ev, b, errstr, sizeof(errstr)) == 0, "%s", errstr);
	struct tly_cause cause = {ev->event_id, tly_event_desc(ev->type)->name, 0, (int64_t)m->n, {0}};
	unsigned int len = 0;
	ck_assert(EVP_Digest(b->data, b->len, cause.digest, &len, EVP_sha256(), NULL) == 1);
	struct tly_seen seen = {false, {0}};
	for (size_t i = 0; i < m->n; i++)
		if (memcmp(m->ids[i].b, ev->event_id.b, 16) == 0)
			seen.seen = true; /* the tests repeat events exactly: same digest */
	if (seen.seen)
		memcpy(seen.digest, cause.digest, 32);
	m->ids[m->n++] = ev->event_id;
	ck_assert_msg(tly_ledger_apply(&m->cfg, m->w, ev, &cause, &seen, &m->out, errstr,
				       sizeof(errstr)) == 0, "%s", errstr);
}

/* Subscribe, reserve R1 and R2, settle R1, release R2, release R2 again, debit, repeat the debit. */
static void mini_history(struct mini *m)
{
	struct tly_event ev, r1, r2, debit;
	tly_fixture_event(&ev, TLY_EV_SUBSCRIPTION_STARTED, 1);
	ev.u.subscription_started.period_start = T0;
	ev.u.subscription_started.period_end = T0 + 30LL * 24 * 60 * MINUTE;
	mini_apply(m, &ev, T0);
	tly_fixture_event(&r1, TLY_EV_TOKENS_RESERVED, 2);
	r1.u.tokens_reserved.tokens = 300;
	r1.u.tokens_reserved.expires_at = T0 + 60 * MINUTE;
	mini_apply(m, &r1, T0 + MINUTE);
	tly_fixture_event(&r2, TLY_EV_TOKENS_RESERVED, 3);
	r2.u.tokens_reserved.tokens = 200;
	r2.u.tokens_reserved.expires_at = T0 + 60 * MINUTE;
	mini_apply(m, &r2, T0 + 2 * MINUTE);
	tly_fixture_event(&ev, TLY_EV_RESERVATION_SETTLED, 4);
	ev.u.reservation_settled.reservation_id = r1.u.tokens_reserved.reservation_id;
	ev.u.reservation_settled.prompt_tokens = 250;
	ev.u.reservation_settled.completion_tokens = 0;
	ev.u.reservation_settled.reasoning_tokens = 0;
	mini_apply(m, &ev, T0 + 3 * MINUTE);
	for (unsigned i = 0; i < 2; i++) {
		tly_fixture_event(&ev, TLY_EV_RESERVATION_RELEASED, 5 + i);
		ev.u.reservation_released.reservation_id = r2.u.tokens_reserved.reservation_id;
		mini_apply(m, &ev, T0 + (4 + i) * MINUTE);
	}
	tly_fixture_event(&debit, TLY_EV_TOKENS_DEBITED, 7);
	debit.u.tokens_debited.tokens = 40;
	mini_apply(m, &debit, T0 + 6 * MINUTE);
	mini_apply(m, &debit, T0 + 6 * MINUTE); /* the same event again: a duplicate entry */
}

static void on_failure(const struct tly_audit_failure *f, void *ud)
{
	struct failures *fs = ud;
	if (fs->n == sizeof(fs->f) / sizeof(fs->f[0]))
		return;
	struct failure *x = &fs->f[fs->n++];
	snprintf(x->check, sizeof(x->check), "%s", f->check);
	x->tenant = f->tenant;
	x->seq = f->seq;
	x->offset = f->offset;
	snprintf(x->message, sizeof(x->message), "%s", f->message);
}

/* A copy of the run's entries the test may change (caller frees). */
static struct tly_event *mini_entries(const struct mini *m)
{
	struct tly_event *e = calloc(m->out.n + 4, sizeof(*e));
	ck_assert_ptr_nonnull(e);
	memcpy(e, m->out.items, m->out.n * sizeof(*e));
	return e;
}

/*
 * Audit n entries (in cause order) against the run's inputs; the inputs listed in skip are left
 * out (as if their rows were gone). partition_next >= 0 announces partition 0 with that stored
 * next offset and the quarantined offsets q.
 */
static struct tly_audit_counts audit_with(const struct mini *m, const struct tly_event *e, size_t n,
					  struct failures *fs, int64_t partition_next,
					  const int64_t *q, size_t nq, int64_t skip)
{
	char errstr[256];
	struct tly_audit_opts opts = {.from_seq = 0, .to_seq = INT64_MAX, .from_time = INT64_MIN,
				      .to_time = INT64_MAX, .on_failure = on_failure, .ud = fs};
	memset(fs, 0, sizeof(*fs));
	struct tly_audit *a = tly_audit_new(&opts, errstr, sizeof(errstr));
	ck_assert_msg(a != NULL, "%s", errstr);
	if (partition_next >= 0)
		ck_assert_int_eq(tly_audit_partition(a, 0, partition_next, q, nq), 0);
	size_t in = 0;
	for (size_t i = 0; i <= n; i++) {
		int64_t upto = i < n ? e[i].u.ledger_entry.cause_offset : (int64_t)m->n - 1;
		/* as lib/audit_pg does: a cause's stored entries offered before its input */
		bool first = i < n && (i == 0 || e[i - 1].u.ledger_entry.cause_offset != upto);
		size_t group = i;
		while (first && group < n && e[group].u.ledger_entry.cause_offset == upto)
			group++;
		if (group > i)
			tly_audit_expect(a, &e[i], group - i);
		for (; (int64_t)in <= upto && in < m->n; in++)
			if ((int64_t)in != skip)
				ck_assert_int_eq(tly_audit_input(a, 0, (int64_t)in, &m->tenant,
								 m->bytes[in].data, m->bytes[in].len), 0);
		if (i < n)
			ck_assert_int_eq(tly_audit_entry(a, &e[i]), 0);
	}
	ck_assert_int_eq(tly_audit_finish(a), 0);
	struct tly_audit_counts c;
	tly_audit_get_counts(a, &c);
	tly_audit_free(a);
	return c;
}

static bool has_failure(const struct failures *fs, const char *check, const tly_uuid *tenant,
			int64_t seq)
{
	for (size_t i = 0; i < fs->n; i++)
		if (strcmp(fs->f[i].check, check) == 0 && fs->f[i].seq == seq &&
		    (!tenant || memcmp(fs->f[i].tenant.b, tenant->b, 16) == 0))
			return true;
	return false;
}

static size_t find_kind(const struct tly_event *e, size_t n, const char *kind, size_t nth)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(e[i].u.ledger_entry.kind, kind) == 0 && nth-- == 0)
			return i;
	ck_abort_msg("no entry of kind %s", kind);
	return 0;
}

/* The verifier's id maps: every record found by its key after growth, absent keys not found. */
struct id_rec {
	tly_uuid id;
	int n;
};

START_TEST(test_audit_ids)
{
	enum { N = 5000 };
	struct id_rec *recs = calloc(N, sizeof(*recs));
	struct tly_audit_ids *m = tly_audit_ids_new();
	ck_assert_ptr_nonnull(recs);
	ck_assert_ptr_nonnull(m);
	for (int i = 0; i < N; i++) {
		/* ids alike but for a few bytes, as time-based UUIDs are */
		recs[i].id.b[0] = (unsigned char)(i & 0xff);
		recs[i].id.b[15] = (unsigned char)(i >> 8);
		recs[i].n = i;
		ck_assert_ptr_null(tly_audit_ids_get(m, &recs[i].id));
		ck_assert_int_eq(tly_audit_ids_add(m, &recs[i]), 0);
	}
	for (int i = 0; i < N; i++) {
		struct id_rec *r = tly_audit_ids_get(m, &recs[i].id);
		ck_assert_ptr_eq(r, &recs[i]);
	}
	tly_uuid absent = recs[7].id;
	absent.b[8] = 1;
	ck_assert_ptr_null(tly_audit_ids_get(m, &absent));
	int seen = 0;
	for (size_t i = 0; i < tly_audit_ids_capacity(m); i++)
		seen += tly_audit_ids_slot(m, i) != NULL;
	ck_assert_int_eq(seen, N);
	tly_audit_ids_free(m);
	free(recs);
}
END_TEST

START_TEST(test_verifier_clean)
{
	struct mini m;
	mini_up(&m);
	mini_history(&m);
	struct tly_event *e = mini_entries(&m);
	struct failures fs;
	struct tly_audit_counts c = audit_with(&m, e, m.out.n, &fs, (int64_t)m.n, NULL, 0, -1);
	ck_assert_msg(c.failures == 0 && fs.n == 0, "clean history: %zu failures, first %s seq %lld",
		      fs.n, fs.n ? fs.f[0].check : "", fs.n ? (long long)fs.f[0].seq : 0LL);
	ck_assert_int_eq(c.entries, (int64_t)m.out.n);
	ck_assert_int_eq(c.reexecuted, (int64_t)m.out.n);
	ck_assert_int_eq(c.inputs, (int64_t)m.n);
	ck_assert_int_eq(c.tenants, 1);
	/* the history has what the checks look at */
	find_kind(e, m.out.n, TLY_KIND_DUPLICATE, 0);
	find_kind(e, m.out.n, TLY_KIND_HOLD_RELEASED, 1);
	find_kind(e, m.out.n, TLY_KIND_REJECTED, 0);
	free(e);
	mini_down(&m);
}
END_TEST

/* A forged entry with a correct hash chain: only re-execution can tell. */
START_TEST(test_verifier_forged_valid_chain)
{
	struct mini m;
	mini_up(&m);
	mini_history(&m);
	struct tly_event *e = mini_entries(&m);
	size_t n = m.out.n;
	struct tly_event *f = &e[n], *last = &e[n - 1];
	*f = *last;
	struct tly_ledger_entry *x = &f->u.ledger_entry;
	x->seq = last->u.ledger_entry.seq + 1;
	x->kind = TLY_KIND_CREDITS_GRANTED;
	x->allowance_delta = x->held_delta = x->overage_delta = 0;
	x->credits_delta = 5000;
	x->credits_remaining += 5000;
	memcpy(x->prev_hash, last->u.ledger_entry.hash, 32);
	ck_assert_int_eq(tly_ledger_entry_hash(m.codec, f, x->hash), 0);
	struct failures fs;
	struct tly_audit_counts c = audit_with(&m, e, n + 1, &fs, -1, NULL, 0, -1);
	ck_assert_msg(has_failure(&fs, "reexec", &m.tenant, x->seq), "forged entry not named");
	/* its chain and balances hold: nothing but re-execution (and its cause's event id, already
	 * applied by that input) gives it away */
	for (size_t i = 0; i < fs.n; i++)
		ck_assert_msg(fs.f[i].seq == x->seq && (strcmp(fs.f[i].check, "reexec") == 0 ||
							strcmp(fs.f[i].check, "idempotency") == 0),
			      "unexpected %s failure at seq %lld", fs.f[i].check,
			      (long long)fs.f[i].seq);
	ck_assert_int_eq(c.failures, (int64_t)fs.n);
	free(e);
	mini_down(&m);
}
END_TEST

/* One stored field changed: the re-execution names it; the recomputed hash no longer matches. */
START_TEST(test_verifier_amount_and_hash)
{
	struct mini m;
	mini_up(&m);
	mini_history(&m);
	struct tly_event *e = mini_entries(&m);
	size_t i = find_kind(e, m.out.n, TLY_KIND_DEBIT, 0);
	int64_t seq = e[i].u.ledger_entry.seq;
	e[i].u.ledger_entry.allowance_delta -= 1;
	struct failures fs;
	audit_with(&m, e, m.out.n, &fs, -1, NULL, 0, -1);
	ck_assert(has_failure(&fs, "reexec", &m.tenant, seq));
	ck_assert(has_failure(&fs, "chain", &m.tenant, seq));
	ck_assert(has_failure(&fs, "identity", &m.tenant, seq));
	/* a hash changed alone: its own check and the next entry's prev_hash */
	free(e);
	e = mini_entries(&m);
	e[2].u.ledger_entry.hash[5] ^= 1;
	audit_with(&m, e, m.out.n, &fs, -1, NULL, 0, -1);
	ck_assert(has_failure(&fs, "chain", &m.tenant, e[2].u.ledger_entry.seq));
	ck_assert(has_failure(&fs, "chain", &m.tenant, e[3].u.ledger_entry.seq));
	free(e);
	mini_down(&m);
}
END_TEST

/*
 * Stored entries offered to the decoding of their input (tly_audit_expect) are never trusted: an
 * entry naming another event id or another reservation than its input is still reported, by
 * field, although its ids were offered as the input's.
 */
START_TEST(test_verifier_expect_not_trusted)
{
	struct mini m;
	mini_up(&m);
	mini_history(&m);
	struct tly_event *e = mini_entries(&m);
	size_t i = find_kind(e, m.out.n, TLY_KIND_HOLD_PLACED, 0);
	struct tly_ledger_entry *le_i = &e[i].u.ledger_entry;
	int64_t seq = le_i->seq;
	le_i->ref_id.b[3] ^= 0x10;
	struct failures fs;
	audit_with(&m, e, m.out.n, &fs, -1, NULL, 0, -1);
	ck_assert(has_failure(&fs, "reexec", &m.tenant, seq));
	bool named = false;
	for (size_t k = 0; k < fs.n; k++)
		named = named || (fs.f[k].seq == seq && strstr(fs.f[k].message, "field ref_id"));
	ck_assert_msg(named, "the reservation id is not named");
	free(e);
	e = mini_entries(&m);
	le_i = &e[i].u.ledger_entry;
	le_i->cause_event_id.b[9] ^= 0x01;
	audit_with(&m, e, m.out.n, &fs, -1, NULL, 0, -1);
	named = false;
	for (size_t k = 0; k < fs.n; k++)
		named = named || (fs.f[k].seq == seq && strstr(fs.f[k].message, "field cause_event_id"));
	ck_assert_msg(named, "the event id is not named");
	free(e);
	mini_down(&m);
}
END_TEST

/* A hold ended twice and an event id applied twice, each named by its own check. */
START_TEST(test_verifier_holds_and_idempotency)
{
	struct mini m;
	mini_up(&m);
	mini_history(&m);
	struct tly_event *e = mini_entries(&m);
	size_t second = find_kind(e, m.out.n, TLY_KIND_REJECTED, 0); /* the second release */
	ck_assert_str_eq(e[second].u.ledger_entry.reason, TLY_REASON_RESERVATION_ENDED);
	e[second].u.ledger_entry.kind = TLY_KIND_HOLD_RELEASED;
	struct failures fs;
	audit_with(&m, e, m.out.n, &fs, -1, NULL, 0, -1);
	ck_assert(has_failure(&fs, "hold", &m.tenant, e[second].u.ledger_entry.seq));
	free(e);
	e = mini_entries(&m);
	size_t dup = find_kind(e, m.out.n, TLY_KIND_DUPLICATE, 0);
	e[dup].u.ledger_entry.kind = TLY_KIND_DEBIT;
	audit_with(&m, e, m.out.n, &fs, -1, NULL, 0, -1);
	ck_assert(has_failure(&fs, "idempotency", &m.tenant, e[dup].u.ledger_entry.seq));
	free(e);
	mini_down(&m);
}
END_TEST

/* Every consumed offset has its outcome: applied (an input row) or quarantined. */
START_TEST(test_verifier_offsets)
{
	struct mini m;
	mini_up(&m);
	mini_history(&m);
	struct tly_event *e = mini_entries(&m);
	struct failures fs;
	/* two more records consumed after the inputs: one quarantined, one with no outcome */
	int64_t q[] = {(int64_t)m.n};
	struct tly_audit_counts c = audit_with(&m, e, m.out.n, &fs, (int64_t)m.n + 2, q, 1, -1);
	ck_assert_msg(c.failures == 1, "%lld failures, first %s offset %lld", (long long)c.failures,
		      fs.f[0].check, (long long)fs.f[0].offset);
	ck_assert_str_eq(fs.f[0].check, "offsets");
	ck_assert_int_eq(fs.f[0].offset, (int64_t)m.n + 1);
	/* an input row gone: its offset has no outcome and its entries no cause */
	int64_t gone = e[find_kind(e, m.out.n, TLY_KIND_DEBIT, 0)].u.ledger_entry.cause_offset;
	audit_with(&m, e, m.out.n, &fs, (int64_t)m.n, NULL, 0, gone);
	bool offsets = false;
	for (size_t i = 0; i < fs.n; i++)
		offsets |= strcmp(fs.f[i].check, "offsets") == 0 && fs.f[i].offset == gone;
	ck_assert_msg(offsets, "the missing input %lld is not reported", (long long)gone);
	ck_assert(has_failure(&fs, "reexec", &m.tenant,
			      e[find_kind(e, m.out.n, TLY_KIND_DEBIT, 0)].u.ledger_entry.seq));
	/* an applied input also quarantined: two outcomes for one offset */
	int64_t both[] = {gone};
	c = audit_with(&m, e, m.out.n, &fs, (int64_t)m.n, both, 1, -1);
	ck_assert_int_eq(c.failures, 1);
	ck_assert_str_eq(fs.f[0].check, "offsets");
	ck_assert_int_eq(fs.f[0].offset, gone);
	free(e);
	mini_down(&m);
}
END_TEST

/* A stored input changed: what it decides now differs from the stored entry. */
START_TEST(test_verifier_input_tampered)
{
	struct mini m;
	mini_up(&m);
	mini_history(&m);
	struct tly_event *e = mini_entries(&m);
	size_t i = find_kind(e, m.out.n, TLY_KIND_DEBIT, 1); /* the direct debit */
	int64_t off = e[i].u.ledger_entry.cause_offset;
	struct tly_event ev = {0};
	char errstr[256];
	ck_assert_int_eq(tly_codec_decode(m.codec, m.bytes[off].data, m.bytes[off].len, &ev, errstr,
					  sizeof(errstr)), 0);
	ev.u.tokens_debited.tokens += 1;
	ck_assert_int_eq(tly_codec_encode(m.codec, &ev, &m.bytes[off], errstr, sizeof(errstr)), 0);
	tly_event_free(&ev);
	struct failures fs;
	audit_with(&m, e, m.out.n, &fs, -1, NULL, 0, -1);
	ck_assert(has_failure(&fs, "reexec", &m.tenant, e[i].u.ledger_entry.seq));
	free(e);
	mini_down(&m);
}
END_TEST

/* ---- the real ledger: tally-loadgen traffic, kill -9 restarts, tallyctl as an auditor ------ */

#define PARTITIONS 4

struct env {
	struct tly_test_broker b;
	struct tly_test_db db;
	char log[400];
	char auditor[1400]; /* database.url=… as a tally_auditor member */
};

static int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sql(PGconn *conn, const char *text)
{
	struct tly_pg_error err;
	ck_assert_msg(tly_pg_exec_script(conn, text, &err) == 0, "%s: %s", text, err.message);
}

/* The ledger's lag on tally.events (lib/lag): 0 when every record is consumed and committed. */
static int64_t ledger_lag(const struct env *e)
{
	char errstr[512];
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert(tly_config_set(cfg, "kafka.bootstrap.servers", e->b.bootstraps, errstr,
				 sizeof(errstr)) == 0);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	ck_assert_msg(conf != NULL, "%s", errstr);
	rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	struct tly_lag_report report = {0};
	const struct tly_lag_expect expect[] = {{"tally-ledger", "tally.events"}};
	ck_assert_msg(tly_lag_collect(e->db.conn, rk, expect, 1, 5000, &report, errstr,
				      sizeof(errstr)) == 0, "%s", errstr);
	/* unknown until every partition has a stored offset */
	int stored = 0;
	for (size_t i = 0; i < report.count; i++)
		stored += strcmp(report.rows[i].consumer, "tally-ledger") == 0 &&
			  strcmp(report.rows[i].topic, "tally.events") == 0 && report.rows[i].stored >= 0;
	int64_t lag = stored == PARTITIONS ? tly_lag_total(&report, "tally-ledger", "tally.events") : -1;
	tly_lag_report_free(&report);
	rd_kafka_destroy(rk);
	tly_config_free(cfg);
	return lag;
}

/* tallyctl (as the auditor) with args; its exit code, and its --json output parsed into *doc. */
static int tallyctl(const struct env *e, char *out, size_t outlen, const char *const *args)
{
	char *argv[16] = {(char *)tly_test_bin("tallyctl"), "-s", (char *)e->auditor};
	int n = 3;
	for (; *args && n < 15; args++)
		argv[n++] = (char *)*args;
	argv[n] = NULL;
	return tly_proc_run(argv, out, outlen);
}

/* tallyctl audit --json (of one tenant, or with jobs workers when jobs > 0), parsed. */
static json_t *audit_json_jobs(const struct env *e, int want_rc, const char *tenant, int jobs)
{
	static char out[1 << 20];
	char jt[16];
	snprintf(jt, sizeof(jt), "%d", jobs);
	const char *all[] = {"audit", "--json", jobs > 0 ? "--jobs" : NULL, jt, NULL};
	const char *one[] = {"audit", "--json", "--tenant", tenant, NULL};
	int rc = tallyctl(e, out, sizeof(out), tenant ? one : all);
	ck_assert_msg(rc == want_rc, "tallyctl audit exited %d, want %d: %.2000s", rc, want_rc, out);
	json_error_t jerr;
	json_t *doc = json_loads(out, 0, &jerr);
	ck_assert_msg(doc != NULL, "tallyctl audit --json printed no JSON: %.500s", out);
	return doc;
}

static json_t *audit_json(const struct env *e, int want_rc, const char *tenant)
{
	return audit_json_jobs(e, want_rc, tenant, 0);
}

/*
 * The audit fails and one of its failures is check with the two named fields (seq or offset:
 * integers) equal to a and b (tenant: a string).
 */
static void expect_failure(const struct env *e, const char *check, const char *fa, const char *a,
			   const char *fb, long b)
{
	json_t *doc = audit_json(e, 1, NULL);
	ck_assert(json_is_false(json_object_get(doc, "ok")));
	json_t *f;
	size_t i;
	bool named = false;
	json_array_foreach(json_object_get(doc, "failed"), i, f)
	{
		json_t *va = json_object_get(f, fa);
		named |= va &&
			 (json_is_string(va) ? strcmp(json_string_value(va), a) == 0
					     : json_integer_value(va) == atol(a)) &&
			 json_integer_value(json_object_get(f, fb)) == b &&
			 strcmp(json_string_value(json_object_get(f, "check")), check) == 0;
	}
	ck_assert_msg(named, "no %s failure names %s %s %s %ld: %s", check, fa, a, fb, b,
		      json_dumps(json_object_get(doc, "failed"), JSON_COMPACT));
	json_decref(doc);
}

/* The audit fails and one of its failures is check at tenant and seq. */
static void expect_named(const struct env *e, const char *tenant, long seq, const char *check)
{
	expect_failure(e, check, "tenant", tenant, "seq", seq);
}

static void expect_clean_jobs(const struct env *e, int jobs)
{
	json_t *doc = audit_json_jobs(e, 0, NULL, jobs);
	ck_assert(json_is_true(json_object_get(doc, "ok")));
	long entries = tly_test_q_long(e->db.conn, "SELECT count(*) FROM ledger_entries", 0, NULL);
	ck_assert_int_gt(entries, 0);
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "entries")), entries);
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "reexecuted")), entries);
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "inputs")),
			 tly_test_q_long(e->db.conn, "SELECT count(*) FROM ledger_inputs", 0, NULL));
	/* every tenant's token balances and invoices were compared with the ledger */
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "projected")),
			 tly_test_q_long(e->db.conn, "SELECT count(DISTINCT tenant_id) FROM ledger_entries", 0,
				NULL));
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "behind")), 0);
	json_decref(doc);
}

static void expect_clean(const struct env *e)
{
	expect_clean_jobs(e, 0);
}

static void env_up(struct env *e)
{
	memset(e, 0, sizeof(*e));
	tly_test_broker_start(&e->b, 1, PARTITIONS);
	tly_test_db_up(&e->db, "check_audit");
	snprintf(e->log, sizeof(e->log), "%s/ledger.log", e->b.dir);
	sql(e->db.conn, "DO $$ BEGIN "
			"IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tly_audit_reader') THEN "
			"CREATE ROLE tly_audit_reader LOGIN IN ROLE tally_auditor; END IF; "
			"EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$");
	snprintf(e->auditor, sizeof(e->auditor), "database.url=%s user='tly_audit_reader'",
		 e->db.conninfo);
}

static void env_down(struct env *e)
{
	tly_test_db_down(&e->db);
	tly_test_broker_stop(&e->b);
}

/* tally-loadgen traffic through the real ledger, killed with SIGKILL twice on the way. */
static void loadgen_run_with_kills(struct env *e)
{
	char errstr[512], kset[600], glog[400];
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", e->b.bootstraps);
	snprintf(glog, sizeof(glog), "%s/loadgen.log", e->b.dir);
	char plog[400];
	snprintf(plog, sizeof(plog), "%s/projector.log", e->b.dir);
	pid_t projector = tly_test_projector_spawn(e->b.bootstraps, e->db.conninfo, plog);
	pid_t ledger = tly_test_ledger_spawn(e->b.bootstraps, e->db.conninfo, "audit-test", PARTITIONS,
					     e->log);
	char *const gargv[] = {(char *)tly_test_bin("tally-loadgen"), "-s", kset, "-s",
			       "topics.partitions=4", "--seed", "6", "--tenants", "24", "--events",
			       "6000", "--rate", "250", "--duplicates", "3", "--bad", "2",
			       "--step-ms", "1800000", NULL};
	pid_t gen = tly_proc_spawn(gargv, glog, errstr, sizeof(errstr));
	ck_assert_msg(gen > 0, "could not start tally-loadgen: %s", errstr);
	static const char consumed_sql[] = "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
					   "WHERE consumer = 'tally-ledger'";
	for (int k = 0; k < 2; k++) {
		/* once this ledger has committed something of its own, kill it mid-stream */
		long from = tly_test_q_long(e->db.conn, consumed_sql, 0, NULL);
		int64_t deadline = mono_ms() + 40000;
		while (mono_ms() < deadline && tly_test_q_long(e->db.conn, consumed_sql, 0, NULL) <= from)
			usleep(100000);
		ck_assert_msg(tly_test_q_long(e->db.conn, consumed_sql, 0, NULL) > from,
			      "the ledger made no progress; see %s", e->log);
		usleep(300000);
		ck_assert_int_eq(kill(ledger, SIGKILL), 0);
		int status;
		ck_assert(tly_proc_wait(ledger, 5000, &status) == 0);
		ledger = tly_test_ledger_spawn(e->b.bootstraps, e->db.conninfo, "audit-test",
					       PARTITIONS, e->log);
	}
	int status;
	ck_assert_msg(tly_proc_wait(gen, 90000, &status) == 0 && WIFEXITED(status) &&
			      WEXITSTATUS(status) == 0, "tally-loadgen failed; see %s", glog);
	int64_t deadline = mono_ms() + 60000, lag = -1;
	while (mono_ms() < deadline && (lag = ledger_lag(e)) != 0)
		usleep(200000);
	ck_assert_msg(lag == 0, "the ledger did not catch up (lag %lld); see %s", (long long)lag, e->log);
	tly_test_ledger_stop(ledger, e->log);
	/* the projector has applied every tenant's whole ledger */
	static const char behind_sql[] =
		"SELECT count(*) FROM (SELECT tenant_id, max(seq) AS seq FROM ledger_entries "
		"GROUP BY tenant_id) l WHERE NOT EXISTS (SELECT 1 FROM "
		"projector_ledger_applied a WHERE a.tenant_id = l.tenant_id AND a.seq = l.seq)";
	deadline = mono_ms() + 60000;
	while (mono_ms() < deadline && tly_test_q_long(e->db.conn, behind_sql, 0, NULL) != 0)
		usleep(200000);
	ck_assert_msg(tly_test_q_long(e->db.conn, behind_sql, 0, NULL) == 0,
		      "tally-projector did not catch up; see %s", plog);
	tly_test_projector_stop(projector, plog);
}

/* A tenant with at least 20 entries; its text into out. */
static void busy_tenant(const struct env *e, char out[37])
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(e->db.conn,
				     "SELECT tenant_id FROM ledger_entries GROUP BY tenant_id "
				     "HAVING max(seq) >= 20 ORDER BY tenant_id LIMIT 1", 0, NULL, &err);
	ck_assert_msg(res && PQntuples(res) == 1, "no tenant with 20 entries");
	snprintf(out, 37, "%s", PQgetvalue(res, 0, 0));
	PQclear(res);
}

static void exec_params(PGconn *conn, const char *text, const char *tenant)
{
	struct tly_pg_error err;
	const char *v[] = {tenant};
	ck_assert_msg(tly_pg_exec(conn, text, 1, v, &err) == 0, "%s: %s", text, err.message);
}

static int read_cause_partition(const struct tly_event *entry, void *ud)
{
	*(int32_t *)ud = entry->u.ledger_entry.cause_partition;
	return 0;
}

/*
 * An entry read back from a binary result keeps the sign of a negative int4 (lib/entries; the
 * table's CHECK keeps cause_partition >= 0, a copy without it does not).
 */
static void binary_int4_sign(PGconn *conn)
{
	sql(conn, "CREATE TEMP TABLE negative_partition AS SELECT * FROM ledger_entries LIMIT 1; "
		  "UPDATE negative_partition SET cause_partition = -3");
	PGresult *res = PQexecParams(conn, "SELECT " TLY_ENTRIES_SELECT_BINARY
				     " FROM negative_partition e", 0, NULL, NULL, NULL, NULL, 1);
	ck_assert_msg(PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1, "%s",
		      PQerrorMessage(conn));
	int32_t partition = 0;
	ck_assert_int_eq(tly_entries_each(res, read_cause_partition, &partition), 0);
	ck_assert_int_eq(partition, -3);
	PQclear(res);
	sql(conn, "DROP TABLE negative_partition");
}

/*
 * tallyctl statement --csv of the period that ends with the invoice at seq: every entry of the
 * period once, the opening balance as after the entry before it, the closing one as after the
 * invoice's period's last entry, and the invoice's amount.
 */
static void statement_matches(const struct env *e, const char *tenant, long seq)
{
	static char out[1 << 20];
	char seqt[24], period[64];
	snprintf(seqt, sizeof(seqt), "%ld", seq);
	const char *v[] = {tenant, seqt};
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(e->db.conn,
				     "SELECT to_char(period_start AT TIME ZONE 'UTC', "
				     "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), amount_cents FROM ledger_entries "
				     "WHERE tenant_id = $1 AND seq = $2::bigint",
				     2, v, &err);
	ck_assert_msg(res && PQntuples(res) == 1, "no invoice entry");
	snprintf(period, sizeof(period), "%s", PQgetvalue(res, 0, 0));
	long amount = atol(PQgetvalue(res, 0, 1));
	PQclear(res);
	const char *args[] = {"statement", tenant, "--period", period, "--csv", NULL};
	ck_assert_msg(tallyctl(e, out, sizeof(out), args) == 0, "tallyctl statement: %.500s", out);
	const char *pv[] = {tenant, period};
	long first = tly_test_q_long(e->db.conn, "SELECT min(seq) FROM ledger_entries WHERE tenant_id = $1 "
				       "AND period_start = $2::timestamptz", 2, pv);
	long last = tly_test_q_long(e->db.conn, "SELECT max(seq) FROM ledger_entries WHERE tenant_id = $1 "
				      "AND period_start = $2::timestamptz", 2, pv);
	long n = tly_test_q_long(e->db.conn, "SELECT count(*) FROM ledger_entries WHERE tenant_id = $1 "
				   "AND period_start = $2::timestamptz", 2, pv);
	long rows = 0, opening_seq = -1, closing_seq = -1, invoice_amount = -1;
	for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
		long s = atol(line);
		if (strstr(line, ",opening_balance,"))
			opening_seq = s;
		else if (strstr(line, ",closing_balance,"))
			closing_seq = s;
		else if (strncmp(line, "seq,", 4) != 0)
			rows++;
		if (strstr(line, ",invoice,")) {
			char *f = line;
			for (int k = 0; k < 14 && f; k++) /* amount_cents is the 15th field */
				f = strchr(f, ',') ? strchr(f, ',') + 1 : NULL;
			invoice_amount = f ? atol(f) : -1;
		}
	}
	ck_assert_int_eq(rows, n);
	ck_assert_int_eq(opening_seq, first - 1);
	ck_assert_int_eq(closing_seq, last);
	ck_assert_int_eq(invoice_amount, amount);
}

/* The audit fails with an "offsets" failure at partition/offset. */
static void expect_offsets(const struct env *e, long partition, long offset)
{
	char p[24];
	snprintf(p, sizeof(p), "%ld", partition);
	expect_failure(e, "offsets", "partition", p, "offset", offset);
}

/*
 * Applied inputs tampered in their packed rows (migration 0010): one record taken out of the
 * middle of a batch, then one stored twice (a batch of its own after the one holding it). Each
 * is an offsets failure at that record; putting the batch back makes the audit clean again.
 */
static void tamper_inputs(const struct env *e)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(e->db.conn,
				     "SELECT partition, first_offset, offsets[2] FROM ledger_input_batches "
				     "WHERE cardinality(offsets) >= 3 ORDER BY partition, first_offset "
				     "LIMIT 1", 0, NULL, &err);
	ck_assert_msg(res && PQntuples(res) == 1, "no batch of 3 inputs");
	long partition = atol(PQgetvalue(res, 0, 0)), offset = atol(PQgetvalue(res, 0, 2));
	const char *v[] = {PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1), PQgetvalue(res, 0, 2)};
	static const char where[] = " WHERE partition = $1::integer AND first_offset = $2::bigint";
	char q[512];
	snprintf(q, sizeof(q), "CREATE TABLE tamper_saved AS SELECT * FROM ledger_input_batches%s", where);
	ck_assert(tly_pg_exec(e->db.conn, q, 2, v, &err) == 0);
	snprintf(q, sizeof(q), "UPDATE ledger_input_batches SET offsets = offsets[:1] || offsets[3:], "
		 "tenant_ids = tenant_ids[:1] || tenant_ids[3:], record_values = record_values[:1] || "
		 "record_values[3:]%s", where);
	ck_assert_msg(tly_pg_exec(e->db.conn, q, 2, v, &err) == 0, "%s", err.message);
	expect_offsets(e, partition, offset);
	snprintf(q, sizeof(q), "DELETE FROM ledger_input_batches%s", where);
	ck_assert(tly_pg_exec(e->db.conn, q, 2, v, &err) == 0);
	sql(e->db.conn, "INSERT INTO ledger_input_batches SELECT * FROM tamper_saved");
	expect_clean(e);
	/* the record at offsets[2] once more, as a batch of its own */
	ck_assert_msg(tly_pg_exec(e->db.conn, "INSERT INTO ledger_input_batches SELECT partition, "
				  "$1::bigint, $1::bigint, offsets[2:2], tenant_ids[2:2], record_values[2:2] "
				  "FROM tamper_saved", 1, &v[2], &err) == 0, "%s", err.message);
	expect_offsets(e, partition, offset);
	const char *twice[] = {v[0], v[2]};
	snprintf(q, sizeof(q), "DELETE FROM ledger_input_batches%s", where);
	ck_assert(tly_pg_exec(e->db.conn, q, 2, twice, &err) == 0);
	sql(e->db.conn, "DROP TABLE tamper_saved");
	PQclear(res);
	expect_clean(e);
}

/* Swap two entries' seq (through a free seq: the primary key is checked row by row). */
static void swap_seqs(const struct env *e, const char *tenant, int a, int b)
{
	char sa[16], sb[16];
	snprintf(sa, sizeof(sa), "%d", a);
	snprintf(sb, sizeof(sb), "%d", b);
	const char *steps[][2] = {{sa, "1000000"}, {sb, sa}, {"1000000", sb}};
	for (int k = 0; k < 3; k++) {
		struct tly_pg_error err;
		const char *v[] = {tenant, steps[k][0], steps[k][1]};
		ck_assert_msg(tly_pg_exec(e->db.conn, "UPDATE ledger_entries SET seq = $3::bigint "
					  "WHERE tenant_id = $1 AND seq = $2::bigint", 3, v, &err) == 0,
			      "%s", err.message);
	}
}

START_TEST(test_loadgen_kill9_then_tampers)
{
	struct env e;
	env_up(&e);
	loadgen_run_with_kills(&e);
	/* the run has what the audit checks: quarantine, duplicates, ticks, holds of every end */
	ck_assert_int_gt(tly_test_q_long(e.db.conn, "SELECT count(*) FROM quarantine", 0, NULL), 0);
	ck_assert_int_gt(tly_test_q_long(e.db.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'duplicate'",
				0, NULL), 0);
	ck_assert_int_gt(tly_test_q_long(e.db.conn, "SELECT count(*) FROM ledger_inputs WHERE tenant_id IS NULL",
				0, NULL), 0);
	ck_assert_int_gt(tly_test_q_long(e.db.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'hold_expired'",
				0, NULL), 0);
	ck_assert_int_gt(tly_test_q_long(e.db.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'invoice'",
				0, NULL), 0);
	expect_clean(&e);
	/*
	 * The run has tenants whose entries interleave by offset in one partition (what an audit
	 * that read tenant by tenant would have to merge), and the audit proves them clean with one
	 * worker (all partitions in one range) and with more workers than partitions (a range a
	 * partition).
	 */
	ck_assert_int_gt(tly_test_q_long(e.db.conn, "WITH s AS (SELECT tenant_id, min(cause_partition) AS p, "
				 "min(cause_offset) AS lo, max(cause_offset) AS hi FROM ledger_entries "
				 "GROUP BY tenant_id) SELECT count(*) FROM s a JOIN s b ON a.p = b.p AND "
				 "a.tenant_id < b.tenant_id AND a.lo < b.hi AND b.lo < a.hi", 0, NULL), 0);
	expect_clean_jobs(&e, 1);
	expect_clean_jobs(&e, PARTITIONS + 2);

	char t[37];
	busy_tenant(&e, t);
	const char *v[] = {t};
	/* one tenant's audit counts its entries only */
	json_t *doc = audit_json(&e, 0, t);
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "entries")),
			 tly_test_q_long(e.db.conn, "SELECT count(*) FROM ledger_entries WHERE tenant_id = $1", 1, v));
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "tenants")), 1);
	json_decref(doc);
	/* a seq range counts (and reports) only its entries; re-execution still starts at seq 1 */
	char out[1 << 16];
	const char *range[] = {"audit", "--json", "--tenant", t, "--from", "5", "--to", "9", NULL};
	ck_assert_int_eq(tallyctl(&e, out, sizeof(out), range), 0);
	doc = json_loads(out, 0, NULL);
	ck_assert_ptr_nonnull(doc);
	ck_assert_int_eq(json_integer_value(json_object_get(doc, "entries")), 5);
	json_decref(doc);

	/* an amount changed */
	exec_params(e.db.conn, "UPDATE ledger_entries SET held_delta = held_delta + 7 "
			       "WHERE tenant_id = $1 AND seq = 10", t);
	expect_named(&e, t, 10, "reexec");
	expect_named(&e, t, 10, "chain");
	exec_params(e.db.conn, "UPDATE ledger_entries SET held_delta = held_delta - 7 "
			       "WHERE tenant_id = $1 AND seq = 10", t);
	expect_clean(&e);

	/* an entry deleted */
	exec_params(e.db.conn, "CREATE TABLE tamper_saved AS SELECT * FROM ledger_entries "
			       "WHERE tenant_id = $1 AND seq = 12", t);
	exec_params(e.db.conn, "DELETE FROM ledger_entries WHERE tenant_id = $1 AND seq = 12", t);
	expect_named(&e, t, 12, "reexec");
	expect_named(&e, t, 13, "seq");
	sql(e.db.conn, "INSERT INTO ledger_entries SELECT * FROM tamper_saved; DROP TABLE tamper_saved");
	expect_clean(&e);

	/* two entries reordered */
	swap_seqs(&e, t, 14, 15);
	expect_named(&e, t, 14, "reexec");
	expect_named(&e, t, 15, "reexec");
	swap_seqs(&e, t, 14, 15);
	expect_clean(&e);

	/* a hash altered */
	exec_params(e.db.conn, "CREATE TABLE tamper_saved AS SELECT hash FROM ledger_entries "
			       "WHERE tenant_id = $1 AND seq = 16", t);
	exec_params(e.db.conn, "UPDATE ledger_entries SET hash = sha256('forged') "
			       "WHERE tenant_id = $1 AND seq = 16", t);
	expect_named(&e, t, 16, "chain");
	expect_named(&e, t, 17, "chain");
	exec_params(e.db.conn, "UPDATE ledger_entries SET hash = (SELECT hash FROM tamper_saved) "
			       "WHERE tenant_id = $1 AND seq = 16", t);
	sql(e.db.conn, "DROP TABLE tamper_saved");
	expect_clean(&e);

	/* a forged entry appended: more credits, chained to the last one */
	long last = tly_test_q_long(e.db.conn, "SELECT max(seq) FROM ledger_entries WHERE tenant_id = $1", 1, v);
	exec_params(e.db.conn, "INSERT INTO ledger_entries (tenant_id, seq, kind, cause_event_id, "
			       "cause_type, cause_partition, cause_offset, ref_id, subscription_id, "
			       "allowance_delta, credits_delta, held_delta, overage_delta, "
			       "allowance_remaining, credits_remaining, held, overage_tokens, "
			       "period_start, period_end, amount_cents, currency, lines, reason, "
			       "ledger_time, prev_hash, hash, cause_digest) "
			       "SELECT tenant_id, seq + 1, 'credits_granted', "
			       "cause_event_id, cause_type, cause_partition, cause_offset, ref_id, "
			       "subscription_id, 0, 1000000, 0, 0, allowance_remaining, "
			       "credits_remaining + 1000000, held, overage_tokens, period_start, "
			       "period_end, amount_cents, currency, lines, reason, ledger_time, hash, "
			       "sha256(hash), cause_digest FROM ledger_entries WHERE tenant_id = $1 "
			       "ORDER BY seq DESC LIMIT 1", t);
	expect_named(&e, t, last + 1, "reexec");
	exec_params(e.db.conn, "DELETE FROM ledger_entries WHERE tenant_id = $1 AND seq = "
			       "(SELECT max(seq) FROM ledger_entries WHERE tenant_id = $1)", t);
	expect_clean(&e);

	/* projections that disagree with the ledger: a balance and an invoice */
	exec_params(e.db.conn, "UPDATE token_balances SET held = held + 5 WHERE tenant_id = $1", t);
	expect_named(&e, t, tly_test_q_long(e.db.conn, "SELECT max(seq) FROM ledger_entries WHERE tenant_id = $1",
				   1, v), "projection");
	exec_params(e.db.conn, "UPDATE token_balances SET held = held - 5 WHERE tenant_id = $1", t);
	char it[37];
	struct tly_pg_error perr;
	PGresult *inv = tly_pg_query(e.db.conn, "SELECT tenant_id, ledger_seq FROM subscription_invoices "
				     "ORDER BY id LIMIT 1", 0, NULL, &perr);
	ck_assert_msg(inv && PQntuples(inv) == 1, "no invoice projected");
	snprintf(it, sizeof(it), "%s", PQgetvalue(inv, 0, 0));
	long iseq = atol(PQgetvalue(inv, 0, 1));
	PQclear(inv);
	exec_params(e.db.conn, "UPDATE subscription_invoices SET amount_cents = amount_cents + 100 "
			       "WHERE tenant_id = $1", it);
	expect_named(&e, it, iseq, "projection");
	exec_params(e.db.conn, "UPDATE subscription_invoices SET amount_cents = amount_cents - 100 "
			       "WHERE tenant_id = $1", it);
	expect_clean(&e);

	tamper_inputs(&e);

	/* balance and statement read the same ledger */
	const char *bal[] = {"balance", t, "--at", "10", "--json", NULL};
	ck_assert_int_eq(tallyctl(&e, out, sizeof(out), bal), 0);
	json_t *b = json_loads(out, 0, NULL);
	ck_assert_ptr_nonnull(b);
	ck_assert_int_eq(json_integer_value(json_object_get(b, "seq")), 10);
	ck_assert_int_eq(json_integer_value(json_object_get(b, "held")),
			 tly_test_q_long(e.db.conn, "SELECT held FROM ledger_entries WHERE tenant_id = $1 "
					   "AND seq = 10", 1, v));
	ck_assert_int_eq(json_integer_value(json_object_get(b, "available")),
			 tly_test_q_long(e.db.conn, "SELECT allowance_remaining + credits_remaining - held "
					   "FROM ledger_entries WHERE tenant_id = $1 AND seq = 10", 1, v));
	json_decref(b);
	statement_matches(&e, it, iseq);
	binary_int4_sign(e.db.conn);
	env_down(&e);
}
END_TEST

Suite *audit_suite(void)
{
	Suite *s = suite_create("audit");
	TCase *tc = tcase_create("verifier");
	tcase_add_test(tc, test_audit_ids);
	tcase_add_test(tc, test_verifier_clean);
	tcase_add_test(tc, test_verifier_forged_valid_chain);
	tcase_add_test(tc, test_verifier_amount_and_hash);
	tcase_add_test(tc, test_verifier_expect_not_trusted);
	tcase_add_test(tc, test_verifier_holds_and_idempotency);
	tcase_add_test(tc, test_verifier_offsets);
	tcase_add_test(tc, test_verifier_input_tampered);
	suite_add_tcase(s, tc);
	tc = tcase_create("ledger");
	tcase_set_timeout(tc, 180);
	tcase_add_test(tc, test_loadgen_kill9_then_tampers);
	suite_add_tcase(s, tc);
	return s;
}
