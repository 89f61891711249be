/*
 * Suite "decision": waiting for the ledger's decision on a reservation (lib/decision) through the
 * real tally-ledger, a dev broker and a fresh database per test: accept, reject, timeout then a
 * later wait on the same ticket, 200 outstanding reservations on one waiter from several threads,
 * the ledger killed (-9) and restarted while callers wait, and tallyctl reserve --wait exit codes.
 * Every answer is checked against the ledger's own rows in PostgreSQL.
 */
#include <check.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "decide.h"
#include "decision.h"
#include "fixtures.h"
#include "harness.h"
#include "migrate.h"
#include "pg.h"
#include "proc.h"
#include "producer.h"
#include "suites.h"

#define PARTITIONS 4
#define HOUR 3600000000LL
#define DECIDE_MS 30000 /* a running ledger decides well within this */

struct env {
	struct tly_test_broker b;
	char *db;
	PGconn *conn;
	struct tly_config *cfg;
	int64_t base;          /* wall clock at the start (µs): the subscription's period holds it */
	char log[400];
};

static int64_t wall_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void env_up(struct env *e)
{
	char errstr[1024];
	memset(e, 0, sizeof(*e));
	e->base = wall_us();
	tly_test_broker_start(&e->b, 1, PARTITIONS);
	struct tly_test_db d;
	tly_test_db_up(&d, "check_decision");
	e->db = d.conninfo;
	e->conn = d.conn;
	snprintf(e->log, sizeof(e->log), "%s/ledger.log", e->b.dir);
	ck_assert_ptr_nonnull(e->cfg = tly_config_new());
	ck_assert_msg(tly_config_set(e->cfg, "kafka.bootstrap.servers", e->b.bootstraps, errstr,
				     sizeof(errstr)) == 0, "%s", errstr);
}

static void env_down(struct env *e)
{
	tly_config_free(e->cfg);
	PQfinish(e->conn);
	free(e->db);
	tly_test_broker_stop(&e->b);
}

static pid_t ledger_start(const struct env *e)
{
	return tly_test_ledger_spawn(e->b.bootstraps, e->db, "decision-test", PARTITIONS, e->log);
}

static void ledger_stop(const struct env *e, pid_t pid)
{
	tly_test_ledger_stop(pid, e->log);
}

static struct tly_decision_waiter *waiter_new(const struct env *e)
{
	char errstr[512];
	struct tly_decision_waiter *w = tly_decision_waiter_new(e->cfg, errstr, sizeof(errstr));
	ck_assert_msg(w != NULL, "%s", errstr);
	return w;
}

static void tenant_of(unsigned n, tly_uuid *t)
{
	struct tly_event ev;
	tly_fixture_event(&ev, TLY_EV_TENANT_CREATED, 2000 + n);
	*t = ev.tenant_id;
}

/* A subscription of tokens tokens whose period holds e->base, no overage; delivered on return. */
static void subscribe(const struct env *e, const tly_uuid *tenant, int64_t tokens)
{
	char errstr[512];
	struct tly_producer *p = tly_producer_new(e->cfg, NULL, NULL, errstr, sizeof(errstr));
	ck_assert_msg(p != NULL, "%s", errstr);
	struct tly_event ev;
	tly_fixture_event(&ev, TLY_EV_SUBSCRIPTION_STARTED, 7);
	tly_uuid_generate(&ev.event_id);
	ev.tenant_id = *tenant;
	ev.occurred_at = e->base - HOUR;
	ev.u.subscription_started.period_start = e->base - HOUR;
	ev.u.subscription_started.period_end = e->base + 720 * HOUR;
	ev.u.subscription_started.trial_ends_at.set = false;
	ev.u.subscription_started.terms.tokens_per_period = tokens;
	ev.u.subscription_started.terms.rollover_cap_tokens = 0;
	ev.u.subscription_started.terms.overage_price_micros_per_1k_tokens.set = false;
	ck_assert_msg(tly_producer_publish(p, &ev, NULL, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_msg(tly_producer_flush(p, 15000) == 0, "subscription not delivered");
	tly_producer_free(p, 1000);
}

static void reserve_event(const struct env *e, struct tly_event *ev, const tly_uuid *tenant,
			  int64_t tokens, int64_t i)
{
	tly_fixture_event(ev, TLY_EV_TOKENS_RESERVED, 9);
	tly_uuid_generate(&ev->event_id);
	tly_uuid_generate(&ev->u.tokens_reserved.reservation_id);
	ev->tenant_id = *tenant;
	ev->occurred_at = e->base + i;
	ev->u.tokens_reserved.tokens = tokens;
	ev->u.tokens_reserved.expires_at = e->base + 700 * HOUR;
}

static void reserve(const struct env *e, struct tly_decision_waiter *w, const tly_uuid *tenant,
		    int64_t tokens, int64_t i, struct tly_decision_ticket *t)
{
	char errstr[512];
	struct tly_event ev;
	reserve_event(e, &ev, tenant, tokens, i);
	ck_assert_msg(tly_decision_reserve(w, &ev, t, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert(memcmp(&t->event_id, &ev.event_id, sizeof(tly_uuid)) == 0);
}

/*
 * The ledger's row for the ticket's event (the hold_placed / rejected / duplicate / conflict one):
 * kind, reason and seq must equal the answer. The truth, read from the system of record.
 */
static void check_against_db(PGconn *conn, const struct tly_decision_ticket *t,
			     const struct tly_decision *d)
{
	char tenant[37], event[37];
	tly_uuid_format(&t->tenant_id, tenant);
	tly_uuid_format(&t->event_id, event);
	const char *v[] = {tenant, event};
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, "SELECT kind, coalesce(reason, ''), seq, "
				     "allowance_remaining + credits_remaining - held FROM ledger_entries "
				     "WHERE tenant_id = $1 AND cause_event_id = $2 AND kind IN "
				     "('hold_placed', 'rejected', 'duplicate', 'conflict')", 2, v, &err);
	ck_assert_msg(res != NULL, "%s", err.message);
	ck_assert_msg(PQntuples(res) == 1, "%d decisions stored for event %s", PQntuples(res), event);
	ck_assert_str_eq(d->kind, PQgetvalue(res, 0, 0));
	ck_assert_str_eq(d->reason, PQgetvalue(res, 0, 1));
	ck_assert_int_eq(d->seq, atoll(PQgetvalue(res, 0, 2)));
	ck_assert_int_eq(d->available, atoll(PQgetvalue(res, 0, 3)));
	PQclear(res);
}

/* ---- tests ------------------------------------------------------------------------------- */

START_TEST(test_accept_reject)
{
	struct env e;
	env_up(&e);
	tly_uuid t, stranger;
	tenant_of(1, &t);
	tenant_of(2, &stranger);
	pid_t pid = ledger_start(&e);
	subscribe(&e, &t, 1000);
	struct tly_decision_waiter *w = waiter_new(&e);
	struct tly_decision_ticket a, b, c;
	struct tly_decision d;

	reserve(&e, w, &t, 600, 1, &a);
	ck_assert_int_eq(tly_decision_wait(w, &a, DECIDE_MS, &d), 0);
	ck_assert_int_eq(d.outcome, TLY_DECISION_ACCEPTED);
	ck_assert_str_eq(d.kind, "hold_placed");
	ck_assert_str_eq(d.reason, "");
	ck_assert_int_eq(d.allowance_remaining, 1000);
	ck_assert_int_eq(d.credits_remaining, 0);
	ck_assert_int_eq(d.held, 600);
	ck_assert_int_eq(d.available, 400);
	ck_assert_int_eq(d.partition, a.partition);
	ck_assert_int_ge(d.offset, a.from_offset);
	check_against_db(e.conn, &a, &d);

	reserve(&e, w, &t, 600, 2, &b);
	ck_assert_int_eq(tly_decision_wait(w, &b, DECIDE_MS, &d), 0);
	ck_assert_int_eq(d.outcome, TLY_DECISION_REJECTED);
	ck_assert_str_eq(d.reason, "insufficient_tokens");
	ck_assert_int_eq(d.held, 600);
	ck_assert_int_eq(d.available, 400);
	check_against_db(e.conn, &b, &d);

	reserve(&e, w, &stranger, 1, 3, &c);
	ck_assert_int_eq(tly_decision_wait(w, &c, DECIDE_MS, &d), 0);
	ck_assert_int_eq(d.outcome, TLY_DECISION_REJECTED);
	ck_assert_str_eq(d.reason, "no_active_subscription");
	check_against_db(e.conn, &c, &d);
	ck_assert_uint_eq(tly_decision_waiter_pending(w), 0);

	/* Not a reservation, or invalid: refused, nothing published. */
	char errstr[256];
	struct tly_event ev;
	struct tly_decision_ticket x;
	tly_fixture_event(&ev, TLY_EV_TOKENS_DEBITED, 1);
	ck_assert_int_eq(tly_decision_reserve(w, &ev, &x, errstr, sizeof(errstr)), TLY_E_INVALID);
	reserve_event(&e, &ev, &t, 0, 4);
	ck_assert_int_eq(tly_decision_reserve(w, &ev, &x, errstr, sizeof(errstr)), TLY_E_INVALID);
	ck_assert_msg(strstr(errstr, "tokens"), "%s", errstr);
	tly_decision_waiter_free(w);
	ledger_stop(&e, pid);
	env_down(&e);
}
END_TEST

/* No ledger: timeout. Then the ledger starts: the same ticket gets its outcome, in this waiter and in a fresh one. */
START_TEST(test_timeout_then_decided)
{
	struct env e;
	env_up(&e);
	tly_uuid t;
	tenant_of(3, &t);
	subscribe(&e, &t, 500);
	struct tly_decision_waiter *w = waiter_new(&e);
	struct tly_decision_ticket a;
	struct tly_decision d;
	reserve(&e, w, &t, 300, 1, &a);
	int64_t t0 = wall_us();
	ck_assert_int_eq(tly_decision_wait(w, &a, 1500, &d), TLY_E_TIMEOUT);
	ck_assert_int_ge(wall_us() - t0, 1400000);
	ck_assert_uint_eq(tly_decision_waiter_pending(w), 0); /* a timeout leaves nothing behind */

	pid_t pid = ledger_start(&e);
	ck_assert_int_eq(tly_decision_wait(w, &a, DECIDE_MS, &d), 0);
	ck_assert_int_eq(d.outcome, TLY_DECISION_ACCEPTED);
	ck_assert_int_eq(d.held, 300);
	check_against_db(e.conn, &a, &d);
	int64_t seq = d.seq;

	/* Decided before this wait began: read again from the ticket's offset (rewinds the partition). */
	ck_assert_int_eq(tly_decision_wait(w, &a, DECIDE_MS, &d), 0);
	ck_assert_int_eq(d.outcome, TLY_DECISION_ACCEPTED);
	ck_assert_int_eq(d.seq, seq);
	/* Another waiter, as another process holding only the ticket's fields. */
	struct tly_decision_waiter *w2 = waiter_new(&e);
	ck_assert_int_eq(tly_decision_wait(w2, &a, DECIDE_MS, &d), 0);
	ck_assert_int_eq(d.outcome, TLY_DECISION_ACCEPTED);
	ck_assert_int_eq(d.seq, seq);
	tly_decision_waiter_free(w2);
	tly_decision_waiter_free(w);
	ledger_stop(&e, pid);
	env_down(&e);
}
END_TEST

enum { THREADS = 8, PER_THREAD = 25, AMOUNT = 40, BALANCE = 3000 };

struct caller {
	const struct env *e;
	struct tly_decision_waiter *w;
	const tly_uuid *tenant;
	int index;
	struct tly_decision_ticket tickets[PER_THREAD];
	struct tly_decision answers[PER_THREAD];
	int rcs[PER_THREAD];
	int bad_reserve;
};

/* One caller thread: reserve all its tickets, then wait for each (all outstanding at once). */
static void *caller_main(void *arg)
{
	struct caller *c = arg;
	char errstr[256];
	for (int i = 0; i < PER_THREAD; i++) {
		struct tly_event ev;
		reserve_event(c->e, &ev, c->tenant, AMOUNT, c->index * PER_THREAD + i + 1);
		if (tly_decision_reserve(c->w, &ev, &c->tickets[i], errstr, sizeof(errstr)) != 0)
			c->bad_reserve++;
		if (i % 5 == 0)
			usleep(2000);
	}
	for (int i = 0; i < PER_THREAD; i++)
		c->rcs[i] = tly_decision_wait(c->w, &c->tickets[i], 45000, &c->answers[i]);
	return NULL;
}

/* Run THREADS callers on one waiter; if kill_ledger, kill -9 the ledger mid-way and start it again. */
static void run_callers(struct env *e, int tenant_no, bool kill_ledger)
{
	tly_uuid t;
	tenant_of((unsigned)tenant_no, &t);
	subscribe(e, &t, BALANCE);
	pid_t pid = ledger_start(e);
	struct tly_decision_waiter *w = waiter_new(e);
	if (kill_ledger) {
		/* let it decide a first few, so the kill lands while callers wait */
		struct tly_decision_ticket first;
		struct tly_decision d;
		reserve(e, w, &t, AMOUNT, 0, &first);
		ck_assert_int_eq(tly_decision_wait(w, &first, DECIDE_MS, &d), 0);
		ck_assert_int_eq(d.outcome, TLY_DECISION_ACCEPTED);
	}
	static struct caller callers[THREADS];
	pthread_t th[THREADS];
	for (int k = 0; k < THREADS; k++) {
		callers[k] = (struct caller){.e = e, .w = w, .tenant = &t, .index = k};
		ck_assert_int_eq(pthread_create(&th[k], NULL, caller_main, &callers[k]), 0);
	}
	if (kill_ledger) {
		usleep(150000);
		kill(pid, SIGKILL);
		int status;
		ck_assert(tly_proc_wait(pid, 5000, &status) == 0);
		usleep(300000);
		pid = ledger_start(e);
	}
	for (int k = 0; k < THREADS; k++)
		ck_assert_int_eq(pthread_join(th[k], NULL), 0);
	int accepted = kill_ledger ? 1 : 0, rejected = 0;
	for (int k = 0; k < THREADS; k++) {
		ck_assert_int_eq(callers[k].bad_reserve, 0);
		for (int i = 0; i < PER_THREAD; i++) {
			const struct tly_decision *d = &callers[k].answers[i];
			ck_assert_msg(callers[k].rcs[i] == 0, "caller %d ticket %d: %s (see %s)", k, i,
				      tly_err_name(callers[k].rcs[i]), e->log);
			check_against_db(e->conn, &callers[k].tickets[i], d);
			if (d->outcome == TLY_DECISION_ACCEPTED) {
				accepted++;
			} else {
				ck_assert_int_eq(d->outcome, TLY_DECISION_REJECTED);
				ck_assert_str_eq(d->reason, "insufficient_tokens");
				rejected++;
			}
		}
	}
	ck_assert_int_eq(accepted, BALANCE / AMOUNT);
	ck_assert_int_eq(accepted + rejected, THREADS * PER_THREAD + (kill_ledger ? 1 : 0));
	ck_assert_uint_eq(tly_decision_waiter_pending(w), 0);
	tly_decision_waiter_free(w);
	ledger_stop(e, pid);
}

START_TEST(test_many_waiters)
{
	struct env e;
	env_up(&e);
	run_callers(&e, 4, false);
	env_down(&e);
}
END_TEST

START_TEST(test_ledger_killed_while_waiting)
{
	struct env e;
	env_up(&e);
	run_callers(&e, 5, true);
	env_down(&e);
}
END_TEST

/* Run tallyctl reserve; returns its exit code and its JSON line (caller decrefs). */
static int tallyctl_reserve(const struct env *e, char *const *extra, json_t **line)
{
	char kset[600], out[8192];
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", e->b.bootstraps);
	char *argv[32] = {(char *)tly_test_bin("tallyctl"), "-s", kset, "reserve"};
	int n = 4;
	for (int i = 0; extra[i] && n < 31; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	int rc = tly_proc_run(argv, out, sizeof(out));
	char *at = strstr(out, "{\"tenant_id\"");
	ck_assert_msg(at != NULL, "no JSON line from tallyctl reserve (exit %d): %s", rc, out);
	at[strcspn(at, "\n")] = '\0';
	json_error_t jerr;
	*line = json_loads(at, 0, &jerr);
	ck_assert_msg(*line != NULL, "%s: %s", jerr.text, at);
	return rc;
}

START_TEST(test_tallyctl_reserve)
{
	struct env e;
	env_up(&e);
	tly_uuid t;
	char tenant[37];
	tenant_of(6, &t);
	tly_uuid_format(&t, tenant);
	subscribe(&e, &t, 100);
	json_t *line;
	/* no ledger: timeout, exit 4 */
	char *slow[] = {"--tenant", tenant, "--tokens", "60", "--wait", "--timeout-ms", "1500", NULL};
	ck_assert_int_eq(tallyctl_reserve(&e, slow, &line), 4);
	ck_assert_str_eq(json_string_value(json_object_get(line, "outcome")), "timeout");
	char event[64], rid[64], part[16], from[24];
	snprintf(event, sizeof(event), "%s", json_string_value(json_object_get(line, "event_id")));
	snprintf(rid, sizeof(rid), "%s", json_string_value(json_object_get(line, "reservation_id")));
	snprintf(part, sizeof(part), "%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(line, "partition")));
	snprintf(from, sizeof(from), "%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(line, "from_offset")));
	json_decref(line);

	pid_t pid = ledger_start(&e);
	/* the same reservation, waited on again from the timeout line's fields: accepted, exit 0 */
	char *again[] = {"--tenant", tenant, "--event-id", event, "--reservation-id", rid, "--partition",
			 part, "--from-offset", from, "--wait", "--timeout-ms", "30000", NULL};
	ck_assert_int_eq(tallyctl_reserve(&e, again, &line), 0);
	ck_assert_str_eq(json_string_value(json_object_get(line, "outcome")), "accepted");
	ck_assert_int_eq(json_integer_value(json_object_get(line, "held")), 60);
	ck_assert_int_eq(json_integer_value(json_object_get(line, "available")), 40);
	json_decref(line);
	/* 60 more do not fit: rejected, exit 3, with the reason */
	char *more[] = {"--tenant", tenant, "--tokens", "60", "--model", "gpt-4o", "--expires-in", "60",
			"--wait", "--timeout-ms", "30000", NULL};
	ck_assert_int_eq(tallyctl_reserve(&e, more, &line), 3);
	ck_assert_str_eq(json_string_value(json_object_get(line, "outcome")), "rejected");
	ck_assert_str_eq(json_string_value(json_object_get(line, "reason")), "insufficient_tokens");
	json_decref(line);
	/* 40 fit exactly: accepted, exit 0; without --wait it only publishes */
	char *fit[] = {"--tenant", tenant, "--tokens", "40", "--wait", NULL};
	ck_assert_int_eq(tallyctl_reserve(&e, fit, &line), 0);
	ck_assert_int_eq(json_integer_value(json_object_get(line, "available")), 0);
	json_decref(line);
	char *nowait[] = {"--tenant", tenant, "--tokens", "1", NULL};
	ck_assert_int_eq(tallyctl_reserve(&e, nowait, &line), 0);
	ck_assert_str_eq(json_string_value(json_object_get(line, "outcome")), "published");
	json_decref(line);
	/* usage errors: exit 2 */
	char kset[600];
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", e.b.bootstraps);
	char *const bad[] = {(char *)tly_test_bin("tallyctl"), "-s", kset, "reserve", "--tenant", tenant,
			     "--tokens", "0", "--wait", NULL};
	ck_assert_int_eq(tly_proc_run(bad, NULL, 0), 2);
	ledger_stop(&e, pid);
	env_down(&e);
}
END_TEST

Suite *decision_suite(void)
{
	Suite *s = suite_create("decision");
	TCase *tc = tcase_create("decision");
	tcase_set_timeout(tc, 90);
	tcase_add_test(tc, test_accept_reject);
	tcase_add_test(tc, test_timeout_then_decided);
	tcase_add_test(tc, test_many_waiters);
	tcase_add_test(tc, test_ledger_killed_while_waiting);
	tcase_add_test(tc, test_tallyctl_reserve);
	suite_add_tcase(s, tc);
	return s;
}
