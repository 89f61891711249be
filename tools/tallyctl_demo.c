/*
 * tallyctl demo: the whole product on the embedded default in one command (dev stack, tally-ledger,
 * tally-projector, a bounded tally-loadgen run, a report), kept up until Ctrl-C or `tallyctl demo
 * stop`; the state dir holds the pid file that stop reads and the list of every process started.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "pg.h"
#include "proc.h"
#include "tallyctl.h"

#define DEFAULT_SECONDS 30
#define DEFAULT_RATE 1000
#define DEFAULT_TENANTS 20
#define DEMO_STEP_MS "120000" /* mean simulated time per event: a month in about 22,000 events */
#define START_TIMEOUT_MS 30000
#define CATCH_UP_TIMEOUT_MS 120000
#define STOP_TIMEOUT_MS 20000
#define LAG_TIMEOUT_MS 3000

static volatile sig_atomic_t demo_stop;

static void on_demo_stop(int sig)
{
	(void)sig;
	demo_stop = 1;
}

/* One process the demo started and stops. */
struct child {
	const char *name;
	pid_t pid;           /* -1: not running (never started, or reaped) */
	char log[PATH_MAX];
	char http[128];      /* its /metrics address, "" when it serves none */
};

enum { C_LEDGER, C_PROJECTOR, C_LOADGEN, N_CHILDREN };

struct demo {
	struct app *app;
	char dir[1024];      /* the state dir: pid, pids, env, logs, the broker's files */
	struct devstack ds;
	struct child c[N_CHILDREN];
	PGconn *conn;        /* owned */
	rd_kafka_t *rk;      /* owned; metadata and watermarks for the lag */
	bool tty;            /* stdout is a terminal: draw the progress line */
};

struct progress {
	int64_t published;    /* records on tally.events (sum of high watermarks) */
	int64_t ledger_done;  /* records of tally.events the ledger committed */
	int64_t ledger_lag;   /* -1: unknown */
	int64_t projector_lag;
	int64_t entries;
	bool both_seen;       /* both consumers have stored offsets */
};

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	nanosleep(&ts, NULL); /* a signal cuts it short: the caller looks at demo_stop */
}

static void demo_usage(void)
{
	fprintf(stderr, "tallyctl: usage: tallyctl demo [--seconds N] [--rate R] [--tenants N] [--seed N]\n"
			"                [--partitions N] [--state-dir DIR] [--no-wait]\n"
			"       tallyctl demo stop [--state-dir DIR]\n");
}

static void default_state_dir(char *out, size_t outlen)
{
	snprintf(out, outlen, "/tmp/tally-demo-%u", (unsigned)getuid());
}

/* ---- the state dir ---------------------------------------------------------------------------- */

/* The pid in dir/pid when that process is alive, else -1. */
static pid_t running_demo(const char *dir)
{
	char path[PATH_MAX + 8];
	snprintf(path, sizeof(path), "%s/pid", dir);
	pid_t pid = tly_proc_read_pid(path);
	return tly_proc_alive(pid) ? pid : -1;
}

/* Write text to dir/name through a temp file and a rename. 0 or -1 after printing why. */
static int write_state(const struct demo *d, const char *name, const char *text)
{
	char path[PATH_MAX + 32], tmp[PATH_MAX + 40];
	snprintf(path, sizeof(path), "%s/%s", d->dir, name);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f || fputs(text, f) == EOF || fclose(f) != 0 || rename(tmp, path) != 0) {
		fprintf(stderr, "tallyctl: could not write \"%s\": %s\n", path, strerror(errno));
		return -1;
	}
	return 0;
}

/* dir/pids: "NAME PID" per running process, the demo itself first (read by tests and operators). */
static int write_pids(const struct demo *d)
{
	char text[1024];
	int n = snprintf(text, sizeof(text), "tallyctl %d\n", (int)getpid());
	pid_t pg = tly_devpg_pid(d->ds.pg);
	if (pg > 0)
		n += snprintf(text + n, sizeof(text) - (size_t)n, "postgres %d\n", (int)pg);
	if (d->ds.broker > 0)
		n += snprintf(text + n, sizeof(text) - (size_t)n, "tally-devbroker %d\n", (int)d->ds.broker);
	for (int i = 0; i < N_CHILDREN; i++)
		if (d->c[i].pid > 0)
			n += snprintf(text + n, sizeof(text) - (size_t)n, "%s %d\n", d->c[i].name,
				      (int)d->c[i].pid);
	return write_state(d, "pids", text);
}

/* ---- processes -------------------------------------------------------------------------------- */

/* Start c's program with argv (argv[0] is replaced by the program's path), logging to c->log. */
static int spawn(struct child *c, char **argv)
{
	char err[512], exe[PATH_MAX];
	tly_proc_sibling(c->name, exe, sizeof(exe));
	argv[0] = exe;
	if (unlink(c->log) != 0 && errno != ENOENT) {
		fprintf(stderr, "tallyctl: could not remove \"%s\": %s\n", c->log, strerror(errno));
		return -1;
	}
	if ((c->pid = tly_proc_spawn(argv, c->log, err, sizeof(err))) < 0) {
		fprintf(stderr, "tallyctl: could not start %s: %s\n", c->name, err);
		return -1;
	}
	return 0;
}

/* True (and c reaped, with why printed unless a stop was asked) when c exited. */
static bool exited(struct child *c)
{
	int status;
	if (c->pid <= 0 || tly_proc_wait(c->pid, 0, &status) != 0)
		return false;
	c->pid = -1;
	if (demo_stop)
		return true; /* Ctrl-C reached the whole process group: it stopped as asked */
	if (WIFEXITED(status))
		fprintf(stderr, "\ntallyctl: %s exited with status %d (see %s)\n", c->name,
			WEXITSTATUS(status), c->log);
	else
		fprintf(stderr, "\ntallyctl: %s was killed by signal %d (see %s)\n", c->name,
			WIFSIGNALED(status) ? WTERMSIG(status) : 0, c->log);
	return true;
}

/* SIGTERM c and wait for it; prints how it ended. True when it exited 0 (or was not running). */
static bool stop_child(struct child *c)
{
	if (c->pid <= 0)
		return true;
	int status = tly_proc_stop(c->pid, STOP_TIMEOUT_MS);
	c->pid = -1;
	bool clean = status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
	printf("  %-16s %s\n", c->name, clean ? "stopped (exit 0)" : "stopped (not cleanly; see its log)");
	if (!clean)
		fprintf(stderr, "tallyctl: %s did not exit 0 (status %d); see %s\n", c->name, status, c->log);
	return clean;
}

/* A daemon's HTTP address from its `msg="http listening" address=…` log line, once it is there. */
static bool find_listening(struct child *c)
{
	static const char mark[] = "msg=\"http listening\" address=";
	char line[2048];
	FILE *f = fopen(c->log, "r");
	if (!f)
		return false;
	bool found = false;
	while (!found && fgets(line, sizeof(line), f)) {
		char *at = strstr(line, mark);
		if (!at)
			continue;
		at += sizeof(mark) - 1;
		at[strcspn(at, " \r\n")] = '\0';
		snprintf(c->http, sizeof(c->http), "%s", at);
		found = true;
	}
	fclose(f);
	return found;
}

/* Start tally-ledger or tally-projector on the dev stack; wait until it serves HTTP. */
static int start_daemon(struct demo *d, struct child *c)
{
	char db[1100], kafka[600];
	snprintf(db, sizeof(db), "database.url=%s", tly_config_str(d->app->cfg, "database.url"));
	snprintf(kafka, sizeof(kafka), "kafka.bootstrap.servers=%s", d->ds.bootstraps);
	char *argv[] = {NULL, "-s", db, "-s", kafka, "-s", "http.listen=127.0.0.1:0", "-s",
			"log.level=info", NULL};
	if (spawn(c, argv) != 0 || write_pids(d) != 0)
		return -1;
	for (int64_t deadline = tly_clock_ms() + START_TIMEOUT_MS; !demo_stop;) {
		if (find_listening(c))
			return 0;
		if (exited(c))
			return -1;
		if (tly_clock_ms() > deadline) {
			fprintf(stderr, "tallyctl: %s did not start within %d s (see %s)\n", c->name,
				START_TIMEOUT_MS / 1000, c->log);
			return -1;
		}
		sleep_ms(100);
	}
	return -1;
}

/* ---- progress ---------------------------------------------------------------------------------- */

static int64_t query_count(struct demo *d, const char *sql)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(d->conn, sql, 0, NULL, &err);
	if (!res)
		return -1;
	int64_t v = PQntuples(res) == 1 ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : -1;
	PQclear(res);
	return v;
}

/* Where the ledger and the projector are; 0, or -1 when the broker or the database did not answer. */
static int read_progress(struct demo *d, struct progress *p)
{
	char err[1024];
	struct tly_lag_report report = {0};
	memset(p, 0, sizeof(*p));
	if (tallyctl_lag_collect(d->app, d->conn, d->rk, LAG_TIMEOUT_MS, &report, err, sizeof(err)) != 0)
		return -1;
	bool ledger = false, projector = false;
	for (size_t i = 0; i < report.count; i++) {
		const struct tly_lag_row *r = &report.rows[i];
		if (strcmp(r->consumer, "tally-ledger") == 0) {
			ledger = true;
			p->published += r->high > 0 ? r->high : 0;
			p->ledger_done += r->stored > 0 ? r->stored : 0;
		} else if (strcmp(r->consumer, "tally-projector") == 0) {
			projector = true;
		}
	}
	p->ledger_lag = tly_lag_total(&report, "tally-ledger", NULL);
	p->projector_lag = tly_lag_total(&report, "tally-projector", NULL);
	p->both_seen = ledger && projector;
	tly_lag_report_free(&report);
	p->entries = query_count(d, "SELECT count(*) FROM ledger_entries");
	return 0;
}

static void draw_progress(const struct demo *d, const char *phase, int64_t elapsed_s,
			  const struct progress *p)
{
	if (!d->tty)
		return;
	printf("\r  %-10s %4" PRId64 " s   published %" PRId64 "   ledger applied %" PRId64
	       " (lag %" PRId64 ")   entries %" PRId64 "   projector lag %" PRId64 "\033[K",
	       phase, elapsed_s, p->published, p->ledger_done, p->ledger_lag, p->entries,
	       p->projector_lag);
	fflush(stdout);
}

/* Run tally-loadgen for seconds, drawing the progress line; 0 when it finished and exited 0. */
static int run_load(struct demo *d, int seconds, int rate, int tenants, const char *seed)
{
	char kafka[600], secs[32], rates[32], tens[32];
	snprintf(kafka, sizeof(kafka), "kafka.bootstrap.servers=%s", d->ds.bootstraps);
	snprintf(secs, sizeof(secs), "%d", seconds);
	snprintf(rates, sizeof(rates), "%d", rate);
	snprintf(tens, sizeof(tens), "%d", tenants);
	char *argv[] = {NULL, "--seed", (char *)seed, "--tenants", tens, "--duration", secs, "--rate",
			rates, "--duplicates", "2", "--bad", "1", "--step-ms", DEMO_STEP_MS, "-s", kafka,
			NULL};
	struct child *c = &d->c[C_LOADGEN];
	if (spawn(c, argv) != 0 || write_pids(d) != 0)
		return -1;
	int64_t start = tly_clock_ms();
	while (!demo_stop) {
		int status;
		if (tly_proc_wait(c->pid, 0, &status) == 0) {
			c->pid = -1;
			if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
				fprintf(stderr, "\ntallyctl: tally-loadgen failed (status %d); see %s\n",
					status, c->log);
				return -1;
			}
			return write_pids(d);
		}
		if (exited(&d->c[C_LEDGER]) || exited(&d->c[C_PROJECTOR]))
			return -1;
		struct progress p;
		if (read_progress(d, &p) == 0)
			draw_progress(d, "load", (tly_clock_ms() - start) / 1000, &p);
		sleep_ms(500);
	}
	return -1;
}

/* Wait until both consumers have read everything (twice in a row, a second apart). */
static int catch_up(struct demo *d)
{
	int64_t start = tly_clock_ms();
	int quiet = 0;
	while (!demo_stop && quiet < 2) {
		if (exited(&d->c[C_LEDGER]) || exited(&d->c[C_PROJECTOR]))
			return -1;
		if (tly_clock_ms() - start > CATCH_UP_TIMEOUT_MS) {
			fprintf(stderr, "\ntallyctl: the consumers did not catch up within %d s; the report "
					"shows where they are\n", CATCH_UP_TIMEOUT_MS / 1000);
			return 0;
		}
		struct progress p;
		if (read_progress(d, &p) != 0) {
			sleep_ms(500);
			continue;
		}
		draw_progress(d, "catch-up", (tly_clock_ms() - start) / 1000, &p);
		quiet = p.both_seen && p.ledger_lag == 0 && p.projector_lag == 0 ? quiet + 1 : 0;
		if (quiet < 2)
			sleep_ms(1000);
	}
	if (d->tty)
		printf("\r\033[K");
	return demo_stop ? -1 : 0;
}

/* ---- the report -------------------------------------------------------------------------------- */

/* Print each row of a query's result as "  col0   col1 …" under title; false when it failed. */
static bool print_rows(struct demo *d, const char *title, const char *sql, const char *empty)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(d->conn, sql, 0, NULL, &err);
	if (!res) {
		printf("%s: could not query: %s\n", title, err.message);
		return false;
	}
	printf("%s\n", title);
	for (int r = 0; r < PQntuples(res); r++) {
		printf("  %-34s", PQgetvalue(res, r, 0));
		for (int f = 1; f < PQnfields(res); f++)
			printf(" %12s", PQgetvalue(res, r, f));
		printf("\n");
	}
	if (PQntuples(res) == 0)
		printf("  %s\n", empty);
	PQclear(res);
	return true;
}

/* What tally-loadgen says it published (its own report, on its stdout). */
static void report_events(const struct demo *d)
{
	char line[512];
	printf("Events published by tally-loadgen (by type)\n");
	FILE *f = fopen(d->c[C_LOADGEN].log, "r");
	if (!f) {
		printf("  could not read \"%s\": %s\n", d->c[C_LOADGEN].log, strerror(errno));
		return;
	}
	while (fgets(line, sizeof(line), f))
		printf("  %s", line);
	fclose(f);
}

/*
 * The audit: `tallyctl audit` on the demo's database, its output and its verdict by exit status.
 */
static void report_audit(struct demo *d)
{
	char self[PATH_MAX], db[1100], kafka[600], out[16384];
	tly_proc_sibling("tallyctl", self, sizeof(self));
	snprintf(db, sizeof(db), "database.url=%s", tly_config_str(d->app->cfg, "database.url"));
	snprintf(kafka, sizeof(kafka), "kafka.bootstrap.servers=%s", d->ds.bootstraps);
	char *argv[] = {self, "-s", db, "-s", kafka, "audit", NULL};
	int rc = tly_proc_run(argv, out, sizeof(out));
	printf("audit: %s (tallyctl audit exited %d)\n", rc == 0 ? "passed" : "FAILED", rc);
	for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n"))
		printf("  %s\n", line);
}

static void report_lag(struct demo *d)
{
	char err[1024];
	struct tly_lag_report report = {0};
	printf("Consumer lag (records not yet consumed; tallyctl status shows each partition)\n");
	if (tallyctl_lag_collect(d->app, d->conn, d->rk, LAG_TIMEOUT_MS, &report, err, sizeof(err)) != 0) {
		printf("  could not read the lag: %s\n", err);
		return;
	}
	for (size_t i = 0; i < report.count; i++) {
		const struct tly_lag_row *r = &report.rows[i];
		if (i + 1 < report.count && strcmp(report.rows[i + 1].consumer, r->consumer) == 0 &&
		    strcmp(report.rows[i + 1].topic, r->topic) == 0)
			continue; /* one line per consumer and topic */
		int64_t lag = tly_lag_total(&report, r->consumer, r->topic);
		printf("  %-16s %-18s %12" PRId64 "\n", r->consumer, r->topic, lag);
	}
	tly_lag_report_free(&report);
}

static void report(struct demo *d, int seconds)
{
	char self[PATH_MAX];
	tly_proc_sibling("tallyctl", self, sizeof(self));
	printf("\n==== Tally demo report (%d s of traffic) ====\n\n", seconds);
	report_events(d);
	printf("\n");
	/* One decision per input record (partition, offset): rejected, duplicate or conflict if any
	 * entry it caused says so, else accepted. */
	print_rows(d, "Decisions of tally-ledger (input records)",
		   "WITH rec AS (SELECT bool_or(kind = 'rejected') AS rej, bool_or(kind = 'duplicate') AS dup,"
		   "                    bool_or(kind = 'conflict') AS con"
		   "             FROM ledger_entries GROUP BY cause_partition, cause_offset) "
		   "SELECT 'accepted', count(*) FILTER (WHERE NOT (rej OR dup OR con)) FROM rec "
		   "UNION ALL SELECT 'rejected', count(*) FILTER (WHERE rej) FROM rec "
		   "UNION ALL SELECT 'duplicates', count(*) FILTER (WHERE dup) FROM rec "
		   "UNION ALL SELECT 'conflicts', count(*) FILTER (WHERE con) FROM rec "
		   "UNION ALL SELECT 'quarantined', count(*) FROM quarantine "
		   "UNION ALL SELECT 'ledger entries', count(*) FROM ledger_entries",
		   "none");
	print_rows(d, "Rejected, by reason",
		   "SELECT reason, count(*) FROM ledger_entries WHERE kind = 'rejected' "
		   "GROUP BY reason ORDER BY 2 DESC, 1",
		   "none");
	print_rows(d, "Quarantined, by reason",
		   "SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY 2 DESC, 1", "none");
	printf("\n");
	print_rows(d, "Top tenants by tokens spent (slug, tokens, of which overage)",
		   "SELECT coalesce(t.slug, e.tenant_id::text), "
		   "       sum(-e.allowance_delta - e.credits_delta + e.overage_delta), sum(e.overage_delta) "
		   "FROM ledger_entries e LEFT JOIN tenant_accounts t ON t.id = e.tenant_id "
		   "WHERE e.kind = 'debit' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5",
		   "no tokens spent");
	print_rows(d, "Invoices issued (currency, invoices, total in minor units)",
		   "SELECT currency, count(*), sum(amount_cents) FROM ledger_entries "
		   "WHERE kind = 'invoice' GROUP BY currency ORDER BY 1",
		   "none (no billing period closed yet: run longer, e.g. DEMO_SECONDS=60)");
	printf("\n");
	report_audit(d);
	printf("\n");
	report_lag(d);
	printf("\nLook further (the stack stays up)\n"
	       "  psql             psql \"%s\"\n"
	       "                     e.g. SELECT kind, count(*) FROM ledger_entries GROUP BY kind;\n"
	       "  environment      . %s   (then %s status, or any tallyctl command)\n",
	       tly_config_str(d->app->cfg, "database.url"), d->ds.envfile, self);
	printf("  balance          %s balance TENANT_ID [--at SEQ|TIME]   (a tenant from the list above)\n"
	       "  statement        %s statement TENANT_ID --period TIME [--csv]\n"
	       "  audit            %s audit [--tenant TENANT_ID] [--json]\n",
	       self, self, self);
	for (int i = C_LEDGER; i <= C_PROJECTOR; i++)
		printf("  %-16s http://%s/metrics   /healthz   /readyz\n", d->c[i].name, d->c[i].http);
	printf("  logs             %s/*.log\n", d->dir);
	fflush(stdout);
}

/* ---- demo and demo stop ----------------------------------------------------------------------- */

static int demo_stop_cmd(const char *dir)
{
	pid_t pid = running_demo(dir);
	if (pid < 0) {
		printf("no demo is running (no live pid in %s/pid)\n", dir);
		return 0;
	}
	if (kill(pid, SIGTERM) != 0) {
		fprintf(stderr, "tallyctl: could not signal the demo (pid %d): %s\n", (int)pid,
			strerror(errno));
		return 1;
	}
	/* The demo stops everything it started, then exits. */
	for (int64_t deadline = tly_clock_ms() + 3 * STOP_TIMEOUT_MS + 60000; tly_clock_ms() < deadline;) {
		if (!tly_proc_alive(pid)) {
			printf("demo stopped (pid %d)\n", (int)pid);
			return 0;
		}
		sleep_ms(100);
	}
	fprintf(stderr, "tallyctl: the demo (pid %d) is still running; see %s\n", (int)pid, dir);
	return 1;
}

static bool parse_int(const char *s, int lo, int hi, int *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || *end || v < lo || v > hi)
		return false;
	*out = (int)v;
	return true;
}

int cmd_demo(struct app *app, int argc, char **argv)
{
	int seconds = DEFAULT_SECONDS, rate = DEFAULT_RATE, tenants = DEFAULT_TENANTS, partitions = 12;
	const char *seed = "1";
	bool wait = true, stop = false;
	char dir[1024];
	default_state_dir(dir, sizeof(dir));
	for (int i = 1; i < argc; i++) {
		bool has_value = i + 1 < argc;
		if (i == 1 && strcmp(argv[i], "stop") == 0)
			stop = true;
		else if (strcmp(argv[i], "--no-wait") == 0)
			wait = false;
		else if (strcmp(argv[i], "--state-dir") == 0 && has_value)
			snprintf(dir, sizeof(dir), "%s", argv[++i]);
		else if (strcmp(argv[i], "--seed") == 0 && has_value)
			seed = argv[++i];
		else if (!(has_value &&
			   ((strcmp(argv[i], "--seconds") == 0 && parse_int(argv[i + 1], 1, 86400, &seconds)) ||
			    (strcmp(argv[i], "--rate") == 0 && parse_int(argv[i + 1], 1, 1000000, &rate)) ||
			    (strcmp(argv[i], "--tenants") == 0 && parse_int(argv[i + 1], 1, 100000, &tenants)) ||
			    (strcmp(argv[i], "--partitions") == 0 &&
			     parse_int(argv[i + 1], 1, 1024, &partitions))))) {
			demo_usage();
			return 2;
		} else
			i++;
	}
	if (stop)
		return demo_stop_cmd(dir);

	struct demo d = {.app = app, .tty = isatty(STDOUT_FILENO) == 1};
	d.ds.broker = -1;
	static const char *const names[N_CHILDREN] = {"tally-ledger", "tally-projector", "tally-loadgen"};
	snprintf(d.dir, sizeof(d.dir), "%s", dir);
	for (int i = 0; i < N_CHILDREN; i++) {
		d.c[i].name = names[i];
		d.c[i].pid = -1;
		snprintf(d.c[i].log, sizeof(d.c[i].log), "%s/%s.log", dir, names[i]);
	}
	if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
		fprintf(stderr, "tallyctl: could not create \"%s\": %s\n", dir, strerror(errno));
		return 1;
	}
	pid_t other = running_demo(dir);
	if (other > 0) {
		fprintf(stderr, "tallyctl: a demo is already running (pid %d, state in %s); stop it with "
				"\"tallyctl demo stop\" or \"make demo-stop\"\n", (int)other, dir);
		return 1;
	}
	char pidtext[32];
	snprintf(pidtext, sizeof(pidtext), "%d\n", (int)getpid());
	if (write_state(&d, "pid", pidtext) != 0)
		return 1;

	if (tly_proc_on_signals(on_demo_stop, NULL) != 0) {
		fprintf(stderr, "tallyctl: could not install the signal handlers: %s\n", strerror(errno));
		return 1;
	}
	int rc = 1;
	printf("Starting the dev stack (tally-devbroker, throw-away PostgreSQL) in %s\n", dir);
	fflush(stdout);
	if (tallyctl_devstack_up(app, dir, partitions, &d.ds) != 0 || write_pids(&d) != 0 || demo_stop)
		goto out;
	printf("  migrated (%d migrations), %d partitions per topic\n", d.ds.applied, partitions);
	if (!(d.conn = tallyctl_connect_db(app)) || !(d.rk = tallyctl_kafka_client(app)))
		goto out;
	printf("Starting tally-ledger and tally-projector\n");
	fflush(stdout);
	if (start_daemon(&d, &d.c[C_LEDGER]) != 0 || start_daemon(&d, &d.c[C_PROJECTOR]) != 0)
		goto out;
	printf("  tally-ledger on http://%s, tally-projector on http://%s\n", d.c[C_LEDGER].http,
	       d.c[C_PROJECTOR].http);
	printf("Running tally-loadgen for %d s (%d events/s, %d tenants, seed %s, 2%% duplicates, 1%% bad)\n",
	       seconds, rate, tenants, seed);
	fflush(stdout);
	if (run_load(&d, seconds, rate, tenants, seed) != 0)
		goto out;
	if (d.tty)
		printf("\n");
	printf("Waiting for tally-ledger and tally-projector to catch up\n");
	fflush(stdout);
	if (catch_up(&d) != 0)
		goto out;
	report(&d, seconds);
	rc = 0;
	if (wait) {
		printf("\nThe stack stays up. Stop it with Ctrl-C or \"make demo-stop\" (tallyctl demo stop).\n");
		fflush(stdout);
		while (!demo_stop) {
			if (exited(&d.c[C_LEDGER]) || exited(&d.c[C_PROJECTOR])) {
				rc = demo_stop ? 0 : 1; /* Ctrl-C may have stopped it just now */
				break;
			}
			sleep_ms(200);
		}
	}
out:
	printf("\nStopping the demo\n");
	bool clean = true;
	for (int i = N_CHILDREN - 1; i >= 0; i--)
		clean &= stop_child(&d.c[i]);
	if (d.rk)
		rd_kafka_destroy(d.rk);
	if (d.conn)
		PQfinish(d.conn);
	tallyctl_devstack_down(&d.ds);
	printf("  %-16s stopped\n  %-16s stopped and removed\n", "tally-devbroker", "PostgreSQL");
	char path[PATH_MAX + 8];
	snprintf(path, sizeof(path), "%s/pids", dir);
	unlink(path);
	snprintf(path, sizeof(path), "%s/pid", dir);
	unlink(path);
	fflush(stdout);
	return rc == 0 && clean ? 0 : 1;
}
