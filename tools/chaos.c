/*
 * tally-chaos (make chaos; a short run in make check): seeded loadgen traffic through tally-ledger
 * and tally-projector while faults drawn from the same seed strike at random moments: kill -9 of
 * the ledger and the projector, PostgreSQL restarted (fast or crashed), dev brokers taken down and
 * up, request errors injected through the dev broker, a second ledger joining and leaving the
 * group. After quiescence it checks the ledger and the projections against the topics and against
 * a fault-free replay, prints every fault and check, and exits 1 when a check fails.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <libpq-fe.h>

#include "clock.h"
#include "codec.h"
#include "compare.h"
#include "config.h"
#include "devbroker_ctl.h"
#include "devpg.h"
#include "devstack.h"
#include "kafka.h"
#include "lag.h"
#include "ledgercheck.h"
#include "log.h"
#include "pg.h"
#include "proc.h"

#define PROG "tally-chaos"
/* 12 partitions keep a 300 s run well inside the dev broker's ~5 MiB per partition */
#define PARTITIONS 12
#define BROKERS 3
#define QUIESCE_S 240
#define WARMUP_S 3.0

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static void sleep_s(double s)
{
	struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR && !stop_requested)
		;
}

/* The fault schedule's generator: splitmix64, so a seed gives the same draws on every machine. */
static uint64_t rng_next(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static double rng_between(uint64_t *s, double lo, double hi)
{
	return lo + (hi - lo) * (double)(rng_next(s) >> 11) / (double)(1ULL << 53);
}

/* ---- the run ------------------------------------------------------------------------------- */

/* A daemon the driver keeps running (or, for the second ledger, runs when it chooses). */
struct daemon {
	const char *name;      /* as printed: "ledger", "ledger-2", "projector" */
	const char *program;
	const char *log;       /* file name in the stack's dir */
	pid_t pid;             /* 0: not running */
	double restart_at;     /* run-relative time to start it again; 0: none due */
	bool wanted;           /* restarted when it exits */
	int starts, kills, exits;
	int crashes;           /* deaths by a signal the driver did not send */
};

enum fault {
	F_KILL_LEDGER,
	F_KILL_PROJECTOR,
	F_PG_RESTART,
	F_BROKER_DOWN,
	F_REQUEST_ERRORS,
	F_SECOND_LEDGER,
	F__COUNT
};

static const struct {
	const char *name;
	int weight;
} faults[F__COUNT] = {
	[F_KILL_LEDGER] = {"kill -9 ledger", 4},
	[F_KILL_PROJECTOR] = {"kill -9 projector", 4},
	[F_PG_RESTART] = {"PostgreSQL restart", 2},
	[F_BROKER_DOWN] = {"broker down", 2},
	[F_REQUEST_ERRORS] = {"request errors", 2},
	[F_SECOND_LEDGER] = {"second ledger joins or leaves", 2},
};

/* Retriable errors a client must ride out, injected into the next COUNT requests of one API. */
static const char *const request_errors[] = {
	"Produce 5 NOT_LEADER_FOR_PARTITION",
	"Produce 3 REQUEST_TIMED_OUT",
	"Fetch 5 NOT_LEADER_FOR_PARTITION",
	"Fetch 3 UNKNOWN_TOPIC_OR_PART",
	"Heartbeat 3 REBALANCE_IN_PROGRESS",
	"Heartbeat 2 NOT_COORDINATOR",
	"Metadata 3 LEADER_NOT_AVAILABLE",
	"OffsetCommit 3 REQUEST_TIMED_OUT",
	"JoinGroup 2 COORDINATOR_LOAD_IN_PROGRESS",
	"ListOffsets 3 NOT_LEADER_FOR_PARTITION",
};
#define N_REQUEST_ERRORS (sizeof(request_errors) / sizeof(request_errors[0]))

struct chaos {
	uint64_t seed;
	int seconds;          /* of traffic and faults */
	int rate, tenants;
	bool keep;            /* keep the dir (logs) also on success */
	uint64_t rng;
	double t0;
	struct tly_devstack stack;
	struct daemon ledger, ledger2, projector;
	pid_t loadgen;
	int loadgen_status;
	double broker_up_at[BROKERS + 1]; /* 0: up */
	double pg_up_at;                  /* 0: up */
	int count[F__COUNT];   /* faults struck, by kind */
	int idle;              /* faults drawn while their target was already down */
	int checks, failed;
	rd_kafka_t *rk;        /* watermarks */
	PGconn *conn;          /* the run's database, for the checks */
	struct tly_codec *codec;
};

static double now(const struct chaos *c)
{
	return tly_clock_s() - c->t0;
}

static void say(const struct chaos *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void say(const struct chaos *c, const char *fmt, ...)
{
	va_list ap;
	printf("[%8.3f s] ", now(c));
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static void daemon_start(struct chaos *c, struct daemon *d)
{
	char err[512], parts[32];
	snprintf(parts, sizeof(parts), "topics.partitions=%d", PARTITIONS);
	/* short batches, one-second heartbeats and quick fetches, as the test harness runs them */
	const char *const extra[] = {"-s", parts, "-s", "ledger.batch.max.ms=20",
				     "-s", "kafka.heartbeat.interval.ms=1000",
				     "-s", "kafka.fetch.wait.max.ms=10", NULL};
	d->restart_at = 0;
	d->pid = tly_devstack_spawn(&c->stack, d->program, c->stack.db, extra, d->log, err, sizeof(err));
	if (d->pid < 0) {
		say(c, "could not start %s: %s", d->name, err);
		d->pid = 0;
		d->restart_at = now(c) + 1;
		return;
	}
	d->starts++;
	say(c, "start %s (pid %d)", d->name, (int)d->pid);
}

static void daemon_kill(struct chaos *c, struct daemon *d, double restart_after)
{
	int status = 0;
	if (d->pid <= 0)
		return;
	if (kill(d->pid, SIGKILL) != 0 || tly_proc_wait(d->pid, 10000, &status) != 0)
		say(c, "could not kill -9 %s (pid %d): %s", d->name, (int)d->pid, strerror(errno));
	else if (d->wanted)
		say(c, "kill -9 %s (pid %d); restart in %.2f s", d->name, (int)d->pid, restart_after);
	else
		say(c, "kill -9 %s (pid %d)", d->name, (int)d->pid);
	d->kills++;
	d->pid = 0;
	if (d->wanted)
		d->restart_at = now(c) + restart_after;
}

/* SIGTERM: the daemon finishes its batch and exits 0 (a failed check otherwise). */
static bool daemon_stop(struct chaos *c, struct daemon *d)
{
	if (d->pid <= 0)
		return true;
	int status = tly_proc_stop(d->pid, 30000);
	bool clean = status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
	say(c, "stop %s (pid %d): %s", d->name, (int)d->pid,
	    clean ? "exited 0" : "did not exit 0 on SIGTERM");
	d->pid = 0;
	d->wanted = false;
	d->restart_at = 0;
	return clean;
}

/* Reap a daemon that exited on its own (a daemon refuses to start while PostgreSQL is down). */
static void daemon_reap(struct chaos *c, struct daemon *d)
{
	int status = 0;
	if (d->pid > 0 && tly_proc_wait(d->pid, 0, &status) == 0) {
		d->exits++;
		if (WIFSIGNALED(status)) {
			d->crashes++;
			say(c, "%s (pid %d) died of signal %d (see %s/%s)", d->name, (int)d->pid,
			    WTERMSIG(status), c->stack.dir, d->log);
		} else {
			say(c, "%s (pid %d) exited with status %d", d->name, (int)d->pid,
			    WEXITSTATUS(status));
		}
		d->pid = 0;
		if (d->wanted)
			d->restart_at = now(c) + 1.0;
	}
	if (d->pid == 0 && d->wanted && d->restart_at > 0 && now(c) >= d->restart_at)
		daemon_start(c, d);
}

static void broker_cmd(struct chaos *c, const char *cmd)
{
	char reply[TLY_DEVBROKER_LINE_MAX + 1];
	int rc = tly_devbroker_ctl(c->stack.ctl_path, cmd, reply, sizeof(reply));
	say(c, "dev broker: %s -> %s", cmd, rc == 0 ? "ok" : reply);
}

static void pg_up(struct chaos *c)
{
	char err[512];
	if (tly_devpg_resume(c->stack.pg, err, sizeof(err)) != 0)
		say(c, "could not start PostgreSQL again: %s", err);
	else
		say(c, "PostgreSQL up again");
	c->pg_up_at = 0;
}

/*
 * One fault. Every fault draws the same number of values whatever the state, so the schedule
 * (times, kinds, parameters) depends on the seed only.
 */
static void strike(struct chaos *c)
{
	int total = 0;
	for (int f = 0; f < F__COUNT; f++)
		total += faults[f].weight;
	int pick = (int)(rng_next(&c->rng) % (uint64_t)total), f = 0;
	while (pick >= faults[f].weight)
		pick -= faults[f++].weight;
	uint64_t param = rng_next(&c->rng);
	double delay = rng_between(&c->rng, 0.2, 4.0);
	bool struck = true;
	char cmd[128];
	switch ((enum fault)f) {
	case F_KILL_LEDGER:
		if (c->ledger.pid > 0)
			daemon_kill(c, &c->ledger, delay / 2);
		else
			struck = false;
		break;
	case F_KILL_PROJECTOR:
		if (c->projector.pid > 0)
			daemon_kill(c, &c->projector, delay / 2);
		else
			struck = false;
		break;
	case F_PG_RESTART: {
		char err[512];
		if (c->pg_up_at > 0) {
			struck = false;
			break;
		}
		bool crash = param & 1;
		if (tly_devpg_halt(c->stack.pg, crash, err, sizeof(err)) != 0) {
			say(c, "could not stop PostgreSQL: %s", err);
			break;
		}
		say(c, "PostgreSQL %s; up again in %.2f s", crash ? "crashed (immediate shutdown)" :
			"stopped (fast shutdown)", delay);
		c->pg_up_at = now(c) + delay;
		break;
	}
	case F_BROKER_DOWN: {
		int id = 1 + (int)(param % BROKERS);
		if (c->broker_up_at[id] > 0) {
			struck = false;
			break;
		}
		snprintf(cmd, sizeof(cmd), "broker-down %d", id);
		broker_cmd(c, cmd);
		c->broker_up_at[id] = now(c) + delay;
		break;
	}
	case F_REQUEST_ERRORS:
		snprintf(cmd, sizeof(cmd), "errors %s", request_errors[param % N_REQUEST_ERRORS]);
		broker_cmd(c, cmd);
		break;
	case F_SECOND_LEDGER:
		if (c->ledger2.pid > 0) {
			c->ledger2.wanted = false;
			if (param & 1) {
				daemon_kill(c, &c->ledger2, 0);
			} else {
				say(c, "second ledger leaves the group");
				(void)daemon_stop(c, &c->ledger2);
			}
		} else {
			c->ledger2.wanted = true;
			say(c, "second ledger joins the group");
			daemon_start(c, &c->ledger2);
		}
		break;
	case F__COUNT:
		break;
	}
	if (!struck)
		say(c, "%s: its target is already down", faults[f].name);
	c->count[f] += struck;
	c->idle += !struck;
}

/* Bring everything that is due back up: brokers, PostgreSQL, daemons. */
static void tend(struct chaos *c, bool all_now)
{
	char cmd[64];
	for (int id = 1; id <= BROKERS; id++) {
		if (c->broker_up_at[id] > 0 && (all_now || now(c) >= c->broker_up_at[id])) {
			snprintf(cmd, sizeof(cmd), "broker-up %d", id);
			broker_cmd(c, cmd);
			c->broker_up_at[id] = 0;
		}
	}
	if (c->pg_up_at > 0 && (all_now || now(c) >= c->pg_up_at))
		pg_up(c);
	daemon_reap(c, &c->ledger);
	daemon_reap(c, &c->ledger2);
	daemon_reap(c, &c->projector);
}

static void loadgen_start(struct chaos *c)
{
	char err[512], seed[32], tenants[16], rate[16], duration[16];
	snprintf(seed, sizeof(seed), "%" PRIu64, c->seed);
	snprintf(tenants, sizeof(tenants), "%d", c->tenants);
	snprintf(rate, sizeof(rate), "%d", c->rate);
	snprintf(duration, sizeof(duration), "%d", c->seconds);
	const char *const extra[] = {"--seed", seed, "--tenants", tenants, "--rate", rate,
				     "--duration", duration, "--duplicates", "5", "--bad", "1",
				     "--step-ms", "180000", NULL};
	/* loadgen takes -s too; the database and HTTP settings it ignores */
	c->loadgen = tly_devstack_spawn(&c->stack, "tally-loadgen", c->stack.db, extra, "loadgen.log",
					err, sizeof(err));
	if (c->loadgen < 0) {
		fprintf(stderr, PROG ": could not start tally-loadgen: %s\n", err);
		exit(1);
	}
	say(c, "start tally-loadgen (seed %" PRIu64 ", %d tenants, %d events/s for %d s)", c->seed,
	    c->tenants, c->rate, c->seconds);
}

/* ---- checks -------------------------------------------------------------------------------- */

static void check(struct chaos *c, const char *name, bool ok, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void check(struct chaos *c, const char *name, bool ok, const char *fmt, ...)
{
	char detail[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	c->checks++;
	c->failed += !ok;
	printf("check %-34s %s  %s\n", name, ok ? "ok    " : "FAILED", detail);
	fflush(stdout);
}

/*
 * Run `tallyctl VERB ARGS...` on the run's database and broker; its output into out. Returns its
 * exit status (0..255), or -1 when it could not run or died of a signal.
 */
static int tallyctl(struct chaos *c, const char *const *args, char *out, size_t outlen)
{
	char exe[4096], dbset[1100], kset[600];
	char *argv[32];
	int n = 0;
	tly_proc_sibling("tallyctl", exe, sizeof(exe));
	snprintf(dbset, sizeof(dbset), "database.url=%s", c->stack.db);
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", c->stack.bootstraps);
	argv[n++] = exe;
	argv[n++] = "-s";
	argv[n++] = dbset;
	argv[n++] = "-s";
	argv[n++] = kset;
	for (int i = 0; args[i] && n < 31; i++)
		argv[n++] = (char *)args[i];
	argv[n] = NULL;
	return tly_proc_run(argv, out, outlen);
}

/* A check that is one tallyctl verb: passes when it exits 0. */
static void check_tallyctl(struct chaos *c, const char *const *args)
{
	char out[16384], name[64];
	int rc = tallyctl(c, args, out, sizeof(out));
	snprintf(name, sizeof(name), "tallyctl %s", args[0]);
	out[strcspn(out, "\n")] = '\0';
	check(c, name, rc == 0, "exit status %d: %.300s", rc, out);
}

static int64_t q_int(PGconn *conn, const char *sql, const char *param)
{
	struct tly_pg_error pe;
	const char *const v[] = {param};
	PGresult *r = tly_pg_query(conn, sql, param ? 1 : 0, v, &pe);
	if (!r) {
		fprintf(stderr, PROG ": %s: %s\n", sql, pe.message);
		return -1;
	}
	int64_t n = PQgetisnull(r, 0, 0) ? -1 : strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	PQclear(r);
	return n;
}

static char *q_text(PGconn *conn, const char *sql)
{
	struct tly_pg_error pe;
	PGresult *r = tly_pg_query(conn, sql, 0, NULL, &pe);
	char *out = strdup(!r ? pe.message : PQgetisnull(r, 0, 0) ? "" : PQgetvalue(r, 0, 0));
	PQclear(r);
	return out;
}

static char *digest(PGconn *conn)
{
	struct tly_pg_error pe;
	char *d = tly_compare_digest(conn, &pe);
	if (!d)
		fprintf(stderr, PROG ": could not digest the projections: %s\n", pe.message);
	return d;
}

static const struct tly_lag_expect lag_expect[] = {
	{"tally-ledger", "tally.events"},    {"tally-projector", "tally.events"},
	{"tally-projector", "tally.ledger"}, {"tally-projector", "tally.catalog"},
};

/* Lag of the consumers over conn (-1: unknown or a consumer not yet seen); n: how many expects. */
static int64_t lag_of(struct chaos *c, PGconn *conn, size_t n)
{
	char err[512];
	struct tly_lag_report report = {0};
	if (tly_lag_collect(conn, c->rk, lag_expect, n, 5000, &report, err, sizeof(err)) != 0)
		return -1;
	int64_t lag = report.count > 0 ? tly_lag_total(&report, NULL, NULL) : -1;
	for (size_t i = 0; lag >= 0 && i < n; i++)
		if (tly_lag_total(&report, lag_expect[i].consumer, lag_expect[i].topic) < 0)
			lag = -1;
	tly_lag_report_free(&report);
	return lag;
}

/* Quiescence: no lag anywhere and the projections unchanged over a second. */
static bool quiesce(struct chaos *c)
{
	char *prev = NULL;
	double deadline = now(c) + QUIESCE_S;
	int64_t lag = -1;
	while (now(c) < deadline && !stop_requested) {
		tend(c, false);
		lag = lag_of(c, c->conn, 4);
		if (lag == 0) {
			char *d = digest(c->conn);
			if (d && prev && strcmp(d, prev) == 0) {
				free(d);
				free(prev);
				say(c, "quiescent: every consumer at the end of its topics");
				return true;
			}
			free(prev);
			prev = d;
		}
		sleep_s(1.0);
	}
	free(prev);
	say(c, "no quiescence in %d s (lag %" PRId64 ")", QUIESCE_S, lag);
	return false;
}

static int64_t topic_end(struct chaos *c, const char *topic)
{
	int64_t sum = 0;
	for (int p = 0; p < PARTITIONS; p++) {
		int64_t low = 0, high = 0;
		if (rd_kafka_query_watermark_offsets(c->rk, topic, p, &low, &high, 10000) != 0)
			return -1;
		sum += high;
	}
	return sum;
}

static void check_ledger(struct chaos *c)
{
	struct tly_pg_error pe;
	struct tly_ledgercheck r;
	struct tly_ledgercheck_totals t;
	if (tly_ledgercheck_chain(c->conn, c->codec, &r, &pe) != 0)
		check(c, "seq gap-free, hash chain valid", false, "%s", pe.message);
	else
		check(c, "seq gap-free, hash chain valid", r.violations == 0 && r.checked > 0,
		      "%" PRId64 " entries, %" PRId64 " violation(s) %s", r.checked, r.violations, r.first);
	if (tly_ledgercheck_limit(c->conn, 0, &r, &pe) != 0)
		check(c, "no tenant below its limit", false, "%s", pe.message);
	else
		check(c, "no tenant below its limit", r.violations == 0,
		      "%" PRId64 " entries, %" PRId64 " below %s", r.checked, r.violations, r.first);
	if (tly_ledgercheck_conservation(c->conn, &r, &t, &pe) != 0)
		check(c, "granted - spent - held = balances", false, "%s", pe.message);
	else
		check(c, "granted - spent - held = balances", r.violations == 0,
		      "%" PRId64 " - %" PRId64 " - %" PRId64 " = %" PRId64 " over %" PRId64 " tenants %s",
		      t.granted, t.spent, t.held, t.balances, r.checked, r.first);
	if (tly_ledgercheck_causes(c->conn, &r, &pe) != 0)
		check(c, "each record applied once", false, "%s", pe.message);
	else
		check(c, "each record applied once", r.violations == 0 && r.checked > 0,
		      "%" PRId64 " (tenant, record) pairs, %" PRId64 " applied twice %s", r.checked,
		      r.violations, r.first);
}

static void check_projections(struct chaos *c)
{
	struct tly_pg_error pe;
	int64_t mismatched = -1;
	if (tly_compare_balances(c->conn, &mismatched, &pe) != 0)
		check(c, "balances = last ledger entry", false, "%s", pe.message);
	else
		check(c, "balances = last ledger entry", mismatched == 0, "%" PRId64 " tenant(s) differ",
		      mismatched);
	char *live = digest(c->conn);
	const char *const rebuild[] = {"rebuild", "all", NULL};
	char out[16384];
	int rc = tallyctl(c, rebuild, out, sizeof(out));
	char *folded = rc == 0 ? digest(c->conn) : NULL;
	bool same = live && folded && strcmp(live, folded) == 0;
	const char *w = live ? live : "", *h = folded ? folded : "";
	while (*w && *w == *h)
		w++, h++;
	out[strcspn(out, "\n")] = '\0';
	if (same)
		check(c, "projections = fold of the log", true, "tallyctl rebuild all changed no row");
	else if (rc != 0)
		check(c, "projections = fold of the log", false, "tallyctl rebuild all exited %d: %.300s",
		      rc, out);
	else
		check(c, "projections = fold of the log", false, "first difference: live %.80s, fold %.80s",
		      w, h);
	free(live);
	free(folded);
}

/*
 * The fault-free replay: a fresh tally-ledger on a fresh database reads the same tally.events.
 * Determinism makes its ledger byte-identical to this run's when every record got exactly one
 * outcome here: same last seq and hash per tenant (the chain covers every entry and its cause),
 * same quarantined records. It republishes its entries to tally.ledger, so it runs last.
 */
static void check_replay(struct chaos *c)
{
	char err[512], refdb[1024];
	if (tly_devstack_new_db(&c->stack, "chaos_reference", refdb, sizeof(refdb), err, sizeof(err)) != 0) {
		check(c, "outcomes = fault-free replay", false, "%s", err);
		return;
	}
	PGconn *ref = tly_pg_connect(refdb, PROG, err, sizeof(err));
	char parts[32];
	snprintf(parts, sizeof(parts), "topics.partitions=%d", PARTITIONS);
	const char *const extra[] = {"-s", parts, "-s", "ledger.group.id=chaos-reference",
				     "-s", "kafka.fetch.wait.max.ms=10", NULL};
	pid_t pid = ref ? tly_devstack_spawn(&c->stack, "tally-ledger", refdb, extra, "reference.log",
					     err, sizeof(err)) : -1;
	if (pid < 0) {
		check(c, "outcomes = fault-free replay", false, "%s", err);
		PQfinish(ref);
		return;
	}
	say(c, "start the reference ledger on a fresh database (pid %d)", (int)pid);
	double deadline = now(c) + QUIESCE_S;
	while (lag_of(c, ref, 1) != 0 && now(c) < deadline && !stop_requested)
		sleep_s(0.5);
	int status = tly_proc_stop(pid, 30000);
	say(c, "reference ledger stopped (%s)", status != -1 && WIFEXITED(status) &&
	    WEXITSTATUS(status) == 0 ? "exited 0" : "did not exit 0");
	static const char heads[] =
		"SELECT count(*) || ' ' || md5(coalesce(string_agg(tenant_id || ':' || seq || ':' || "
		"encode(hash, 'hex'), ',' ORDER BY tenant_id), '')) FROM (SELECT DISTINCT ON (tenant_id) "
		"tenant_id, seq, hash FROM ledger_entries ORDER BY tenant_id, seq DESC) l";
	static const char quarantined[] =
		"SELECT count(*) || ' ' || md5(coalesce(string_agg(partition || '/' || \"offset\" || ':' || "
		"reason, ',' ORDER BY partition, \"offset\"), '')) FROM quarantine WHERE topic = 'tally.events'";
	static const char records[] =
		"SELECT count(*) FROM (SELECT DISTINCT cause_partition, cause_offset FROM ledger_entries) x";
	char *h_run = q_text(c->conn, heads), *h_ref = q_text(ref, heads);
	char *q_run = q_text(c->conn, quarantined), *q_ref = q_text(ref, quarantined);
	int64_t r_run = q_int(c->conn, records, NULL), r_ref = q_int(ref, records, NULL);
	check(c, "ledger = fault-free replay", strcmp(h_run, h_ref) == 0,
	      "tenants and last (seq, hash): run %s, replay %s", h_run, h_ref);
	check(c, "quarantine = fault-free replay", strcmp(q_run, q_ref) == 0,
	      "run %s, replay %s", q_run, q_ref);
	check(c, "records with entries = replay", r_run == r_ref && r_run > 0,
	      "run %" PRId64 ", replay %" PRId64, r_run, r_ref);
	free(h_run);
	free(h_ref);
	free(q_run);
	free(q_ref);
	PQfinish(ref);
}

static void check_all(struct chaos *c, bool quiet, bool clean_ledger, bool clean_projector)
{
	printf("\nchecks\n");
	check(c, "quiescence", quiet, "every consumer reached the end of its topics");
	int crashes = c->ledger.crashes + c->ledger2.crashes + c->projector.crashes;
	check(c, "no daemon crashed", crashes == 0, "%d death(s) by a signal not sent by the driver",
	      crashes);
	check(c, "clean shutdown at the end", clean_ledger && clean_projector,
	      "SIGTERM: ledger %s, projector %s", clean_ledger ? "exit 0" : "NOT exit 0",
	      clean_projector ? "exit 0" : "NOT exit 0");
	check(c, "loadgen delivered everything", WIFEXITED(c->loadgen_status) &&
	      WEXITSTATUS(c->loadgen_status) == 0, "wait status %d (see loadgen.log)", c->loadgen_status);

	/* every record of tally.events consumed, none past the end */
	int64_t events = topic_end(c, "tally.events");
	int64_t consumed = q_int(c->conn, "SELECT sum(next_offset) FROM consumer_offsets WHERE "
				 "consumer = 'tally-ledger' AND topic = 'tally.events'", NULL);
	int64_t beyond = q_int(c->conn, "SELECT count(*) FROM ledger_entries e JOIN consumer_offsets o "
			       "ON o.consumer = 'tally-ledger' AND o.topic = 'tally.events' AND "
			       "o.partition = e.cause_partition WHERE e.cause_offset >= o.next_offset", NULL);
	check(c, "consumed offsets = topic end", events > 0 && consumed == events && beyond == 0,
	      "%" PRId64 " records in tally.events, %" PRId64 " consumed, %" PRId64
	      " entries caused past the stored offset", events, consumed, beyond);
	int64_t both = q_int(c->conn, "SELECT count(*) FROM quarantine q WHERE topic = 'tally.events' "
			     "AND EXISTS (SELECT 1 FROM ledger_entries e WHERE e.cause_partition = q.partition "
			     "AND e.cause_offset = q.\"offset\")", NULL);
	check(c, "no record both quarantined and applied", both == 0, "%" PRId64 " record(s)", both);

	/*
	 * The rebuild and the replay read tally.events and tally.catalog from the start: they must
	 * still hold it. (tally.ledger may lose its head: a rebuild reads the entries from PostgreSQL.)
	 */
	static const char *const topics[] = {"tally.events", "tally.catalog", "tally.ledger"};
	int64_t dropped[3] = {0, 0, 0};
	for (size_t t = 0; t < 3; t++)
		for (int p = 0; p < PARTITIONS; p++) {
			int64_t low = 0, high = 0;
			if (rd_kafka_query_watermark_offsets(c->rk, topics[t], p, &low, &high, 10000) != 0)
				low = 1;
			dropped[t] += low;
		}
	check(c, "input topics kept their history", dropped[0] + dropped[1] == 0,
	      "records dropped by the dev broker's retention: tally.events %" PRId64 ", tally.catalog %"
	      PRId64 "%s (tally.ledger %" PRId64 ", allowed)", dropped[0], dropped[1],
	      dropped[0] + dropped[1] ? ": a run too large for it, give fewer --seconds or --rate" : "",
	      dropped[2]);

	check_ledger(c);
	check_projections(c);
	check_tallyctl(c, (const char *const[]){"status", NULL});
	check_tallyctl(c, (const char *const[]){"audit", NULL});
	check_replay(c);
}

/* ---- main ---------------------------------------------------------------------------------- */

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: " PROG " [OPTIONS]\n"
		"\n"
		"Loadgen traffic through tally-ledger and tally-projector under faults (kill -9 of the\n"
		"daemons, PostgreSQL restarts, dev brokers down, injected request errors, a second\n"
		"ledger joining and leaving), all drawn from --seed; then the end checks. Exit 0 when\n"
		"every check passes, 1 when one fails, 2 on a usage error.\n"
		"\n"
		"  --seed N       seed of the traffic and of the fault schedule (default 1)\n"
		"  --seconds S    traffic and faults for S seconds (default $CHAOS_SECONDS, else 60)\n"
		"  --rate R       events per second (default 150)\n"
		"  --tenants N    tenants (default 100)\n"
		"  --keep         keep the run's dir (logs) also when every check passes\n"
		"  -h, --help     this help\n");
}

static int parse_int(const char *opt, const char *s, long lo, long hi, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || *end || v < lo || v > hi) {
		fprintf(stderr, PROG ": invalid %s \"%s\": expected %ld..%ld\n", opt, s, lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

int main(int argc, char **argv)
{
	struct chaos c = {.seed = 1, .seconds = 60, .rate = 150, .tenants = 100};
	char err[1024];
	long v;
	const char *env = getenv("CHAOS_SECONDS");
	if (env && parse_int("CHAOS_SECONDS", env, 10, 86400, &v) == 0)
		c.seconds = (int)v;
	static const struct option opts[] = {
		{"seed", required_argument, NULL, 'S'}, {"seconds", required_argument, NULL, 'T'},
		{"rate", required_argument, NULL, 'R'}, {"tenants", required_argument, NULL, 'N'},
		{"keep", no_argument, NULL, 'k'},       {"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0}};
	int opt;
	while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (opt) {
		case 'S':
			if (parse_int("--seed", optarg, 0, LONG_MAX, &v))
				return 2;
			c.seed = (uint64_t)v;
			break;
		case 'T':
			if (parse_int("--seconds", optarg, 10, 86400, &v))
				return 2;
			c.seconds = (int)v;
			break;
		case 'R':
			if (parse_int("--rate", optarg, 1, 100000, &v))
				return 2;
			c.rate = (int)v;
			break;
		case 'N':
			if (parse_int("--tenants", optarg, 1, 100000, &v))
				return 2;
			c.tenants = (int)v;
			break;
		case 'k': c.keep = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		usage(stderr);
		return 2;
	}
	tly_log_init(PROG, TLY_LOG_WARN);
	c.rng = c.seed ^ 0x6368616f73ULL; /* "chaos": not the loadgen's stream */
	c.ledger = (struct daemon){.name = "ledger", .program = "tally-ledger", .log = "ledger.log",
				   .wanted = true};
	c.ledger2 = (struct daemon){.name = "ledger-2", .program = "tally-ledger", .log = "ledger-2.log"};
	c.projector = (struct daemon){.name = "projector", .program = "tally-projector",
				      .log = "projector.log", .wanted = true};
	if (tly_proc_on_signals(on_stop, NULL) != 0) {
		fprintf(stderr, PROG ": could not install the signal handlers: %s\n", strerror(errno));
		return 1;
	}

	printf(PROG ": seed %" PRIu64 ", %d s of traffic and faults, %d events/s, %d tenants, "
	       "%d brokers, %d partitions\n", c.seed, c.seconds, c.rate, c.tenants, BROKERS, PARTITIONS);
	if (tly_devstack_start(&c.stack, "chaos", BROKERS, PARTITIONS, false, err, sizeof(err)) != 0) {
		fprintf(stderr, PROG ": %s\n", err);
		return 1;
	}
	printf("logs in %s\n\n", c.stack.dir);
	struct tly_config *cfg = tly_config_new();
	rd_kafka_conf_t *conf = NULL;
	if (!cfg || tly_config_set(cfg, "kafka.bootstrap.servers", c.stack.bootstraps, err, sizeof(err)) != 0 ||
	    !(conf = tly_kafka_conf_new(cfg, err, sizeof(err))) ||
	    /* its "brokers are down" while a broker is down is the fault, not news */
	    tly_kafka_conf_set(conf, "log_level", "2", err, sizeof(err)) != 0 ||
	    !(c.rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err))) ||
	    !(c.codec = tly_codec_new(err, sizeof(err)))) {
		fprintf(stderr, PROG ": %s\n", cfg ? err : "out of memory");
		tly_devstack_stop(&c.stack, false);
		return 1;
	}
	tly_config_free(cfg);

	c.t0 = tly_clock_s();
	daemon_start(&c, &c.ledger);
	daemon_start(&c, &c.projector);
	loadgen_start(&c);
	double next = WARMUP_S + rng_between(&c.rng, 0.3, 2.5);
	while (now(&c) < c.seconds && !stop_requested) {
		tend(&c, false);
		if (now(&c) >= next) {
			strike(&c);
			next = now(&c) + rng_between(&c.rng, 0.3, 2.5);
		}
		sleep_s(0.05);
	}

	say(&c, "faults end: everything up again, the second ledger leaves");
	tend(&c, true);
	static const char *const apis[] = {"Produce", "Fetch", "Heartbeat", "Metadata", "OffsetCommit",
					   "JoinGroup", "ListOffsets"};
	for (size_t i = 0; i < sizeof(apis) / sizeof(apis[0]); i++) {
		char cmd[64];
		snprintf(cmd, sizeof(cmd), "clear-errors %s", apis[i]);
		broker_cmd(&c, cmd);
	}
	c.ledger2.wanted = false;
	if (c.ledger2.pid > 0)
		(void)daemon_stop(&c, &c.ledger2);
	if (tly_proc_wait(c.loadgen, 120000, &c.loadgen_status) != 0) {
		say(&c, "tally-loadgen still running after 120 s: stopping it");
		c.loadgen_status = tly_proc_stop(c.loadgen, 5000);
	}
	say(&c, "tally-loadgen exited (wait status %d)", c.loadgen_status);
	/* the checks' own connection, once PostgreSQL is surely up */
	c.conn = tly_pg_connect(c.stack.db, PROG, err, sizeof(err));
	bool quiet = c.conn && quiesce(&c);
	bool clean_ledger = daemon_stop(&c, &c.ledger);
	bool clean_projector = daemon_stop(&c, &c.projector);

	printf("\nfaults (seed %" PRIu64 ")\n", c.seed);
	int total = 0;
	for (int f = 0; f < F__COUNT; f++) {
		printf("  %-32s %d\n", faults[f].name, c.count[f]);
		total += c.count[f];
	}
	printf("  %-32s %d\n", "total", total);
	printf("  %-32s %d\n", "drawn while already down", c.idle);
	printf("  %-32s ledger %d, ledger-2 %d, projector %d\n", "starts", c.ledger.starts,
	       c.ledger2.starts, c.projector.starts);
	printf("  %-32s ledger %d, projector %d\n", "exits on their own", c.ledger.exits,
	       c.projector.exits);
	if (c.conn) {
		printf("\nevents: tally.events %" PRId64 ", tally.ledger %" PRId64 ", entries %" PRId64
		       ", quarantined %" PRId64 "\n", topic_end(&c, "tally.events"),
		       topic_end(&c, "tally.ledger"),
		       q_int(c.conn, "SELECT count(*) FROM ledger_entries", NULL),
		       q_int(c.conn, "SELECT count(*) FROM quarantine", NULL));
		char *kinds = q_text(c.conn, "SELECT string_agg(kind || ' ' || n, ', ' ORDER BY n DESC) "
					     "FROM (SELECT kind, count(*) AS n FROM ledger_entries GROUP BY 1) k");
		printf("entries by kind: %s\n", kinds);
		free(kinds);
		check_all(&c, quiet, clean_ledger, clean_projector);
	} else {
		check(&c, "connect to the run's database", false, "%s", err);
	}
	bool pass = c.failed == 0 && !stop_requested;
	printf("\nresult: %s (%d checks, %d failed; seed %" PRIu64 ", %d faults: kill -9 ledger %d, "
	       "kill -9 projector %d, PostgreSQL restarts %d, broker outages %d, request errors %d, "
	       "second ledger %d)\n",
	       pass ? "PASS" : "FAIL", c.checks, c.failed, c.seed, total, c.ledger.kills,
	       c.projector.kills, c.count[F_PG_RESTART], c.count[F_BROKER_DOWN],
	       c.count[F_REQUEST_ERRORS], c.count[F_SECOND_LEDGER]);
	if (!pass || c.keep)
		printf("logs kept in %s\n", c.stack.dir);
	fflush(stdout);
	PQfinish(c.conn);
	tly_codec_free(c.codec);
	rd_kafka_destroy(c.rk);
	tly_devstack_stop(&c.stack, !pass || c.keep);
	return pass ? 0 : 1;
}
