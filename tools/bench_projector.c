/*
 * tally-bench-projector (make bench): the projections' apply rates side by side in one run, on a
 * durable throw-away PostgreSQL (fsync, full_page_writes, synchronous_commit on) and a dev broker:
 * a loadgen backlog goes through tally-ledger (timed: the ledger's rate on this workload), then
 * tally-projector consumes the whole backlog of tally.events, tally.ledger and tally.catalog
 * (steady-state apply rate), again from empty projections --projector-rounds times, then
 * `tallyctl rebuild all` folds it again into shadow tables and swaps them in (rebuild rate), then
 * the same rows are COPYed into empty copies of the tables with the same indexes (the raw COPY
 * rate), then tally-ledger runs again from an empty ledger --ledger-rounds times. Keep-up is the
 * median of the projector's runs against the median of the ledger's, the first runs included.
 * Every timed step starts after an untimed CHECKPOINT. Figures are printed, never asserted.
 */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <libpq-fe.h>

#include "clock.h"
#include "cli.h"
#include "compare.h"
#include "config.h"
#include "devpg.h"
#include "fold.h"
#include "kafka.h"
#include "log.h"
#include "migrate.h"
#include "pg.h"
#include "proc.h"

#define PARTITIONS "12"
#define TENANTS "200"
#define EVENTS "30000"
#define STEP_MS "600000"
#define DB "bench_projector"
#define WAIT_S 240
#define MAX_ROUNDS 15
#define PROJECTOR_ROUNDS 6 /* default --projector-rounds */
#define LEDGER_ROUNDS 6    /* default --ledger-rounds */

/*
 * What the bench has started, for die() to stop: the throw-away PostgreSQL, the dev broker, the
 * daemon being timed (one at a time) and the directory of their logs, which a failure keeps.
 */
static struct {
	struct tly_devpg *pg;
	pid_t broker, daemon;
	const char *dir;
} running = {NULL, -1, -1, NULL};

static void die(const char *what, const char *why)
{
	tly_proc_stop(running.daemon, 10000);
	tly_proc_stop(running.broker, 5000);
	tly_devpg_stop(running.pg);
	/* last: librdkafka's threads may log about the stopped broker meanwhile */
	fprintf(stderr, "tally-bench-projector: %s: %s\n", what, why);
	if (running.dir)
		fprintf(stderr, "tally-bench-projector: the logs are kept in %s\n", running.dir);
	exit(1);
}

struct stack {
	struct tly_devpg *pg;
	char db[1024];
	pid_t broker;
	char dir[64];
	char bootstraps[512];
	int partitions;
	PGconn *conn;
	rd_kafka_t *rk; /* watermarks */
};

static void stack_start(struct stack *s)
{
	char err[1024], exe[PATH_MAX], boot[128], parts[8], log[128];
	struct tly_pg_error pe;
	if (!(s->pg = tly_devpg_start_durable(NULL, true, err, sizeof(err))))
		die("PostgreSQL", err);
	running.pg = s->pg;
	PGconn *admin = tly_pg_connect(tly_devpg_conninfo(s->pg), "tally-bench-projector", err, sizeof(err));
	if (!admin)
		die("connect", err);
	if (tly_pg_exec_script(admin, "CREATE DATABASE " DB, &pe) != 0) /* a fixed identifier */
		die("create database", pe.message);
	PQfinish(admin);
	snprintf(s->db, sizeof(s->db), "host=%s port=%d user=postgres dbname=" DB, tly_devpg_dir(s->pg),
		 tly_devpg_port(s->pg));
	struct tly_migrate_set *set = tly_migrate_load_embedded(err, sizeof(err));
	if (!(s->conn = tly_pg_connect(s->db, "tally-bench-projector", err, sizeof(err))) || !set ||
	    tly_migrate_up(s->conn, set, NULL, err, sizeof(err)) != 0)
		die("migrate", err);
	tly_migrate_free(set);

	snprintf(s->dir, sizeof(s->dir), "/tmp/tally-bench-XXXXXX");
	if (!mkdtemp(s->dir))
		die("mkdtemp", strerror(errno));
	running.dir = s->dir;
	tly_proc_sibling("tally-devbroker", exe, sizeof(exe));
	snprintf(boot, sizeof(boot), "%s/bootstrap", s->dir);
	snprintf(parts, sizeof(parts), "%d", s->partitions);
	snprintf(log, sizeof(log), "%s/broker.log", s->dir);
	char *argv[] = {exe, "--partitions", parts, "--bootstrap-file", boot, NULL};
	if ((s->broker = tly_proc_spawn(argv, log, err, sizeof(err))) < 0)
		die("tally-devbroker", err);
	running.broker = s->broker;
	if (tly_proc_wait_file(boot, 10000) != 0)
		die("tally-devbroker", "did not start");
	FILE *f = fopen(boot, "r");
	if (!f || !fgets(s->bootstraps, sizeof(s->bootstraps), f))
		die("bootstrap file", "unreadable");
	fclose(f);
	s->bootstraps[strcspn(s->bootstraps, "\n")] = '\0';
	struct tly_config *cfg = tly_config_new();
	if (!cfg || tly_config_set(cfg, "kafka.bootstrap.servers", s->bootstraps, err, sizeof(err)) != 0)
		die("config", cfg ? err : "out of memory");
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, err, sizeof(err));
	tly_config_free(cfg);
	if (!conf || !(s->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err))))
		die("Kafka client", err);
	/* the daemons and tallyctl read these */
	setenv("TALLY_DATABASE_URL", s->db, 1);
	setenv("TALLY_KAFKA_BOOTSTRAP_SERVERS", s->bootstraps, 1);
	/* the mock cluster holds a fetch for fetch.wait.max.ms when it has little data */
	setenv("TALLY_KAFKA_FETCH_WAIT_MAX_MS", "10", 1);
	setenv("TALLY_HTTP_LISTEN", "127.0.0.1:0", 0); /* never collide with another bench's daemon */
}

static void stack_stop(struct stack *s)
{
	rd_kafka_destroy(s->rk);
	PQfinish(s->conn);
	if (tly_proc_stop(s->broker, 5000) < 0)
		fprintf(stderr, "tally-bench-projector: could not stop tally-devbroker\n");
	running.broker = -1;
	char *rm[] = {"rm", "-rf", s->dir, NULL};
	if (tly_proc_run(rm, NULL, 0) != 0)
		fprintf(stderr, "tally-bench-projector: could not remove \"%s\"\n", s->dir);
	running.dir = NULL;
	tly_devpg_stop(s->pg);
	running.pg = NULL;
}

/* Sum of the high watermarks of topic. */
static long topic_end(struct stack *s, const char *topic)
{
	long sum = 0;
	for (int p = 0; p < s->partitions; p++) {
		int64_t low = 0, high = 0;
		rd_kafka_resp_err_t e = rd_kafka_query_watermark_offsets(s->rk, topic, p, &low, &high, 10000);
		if (e)
			die("watermarks", rd_kafka_err2str(e));
		sum += (long)high;
	}
	return sum;
}

static long q_long(struct stack *s, const char *sql, const char *param)
{
	struct tly_pg_error pe;
	const char *const v[] = {param};
	PGresult *r = tly_pg_query(s->conn, sql, param ? 1 : 0, v, &pe);
	if (!r)
		die("query", pe.message);
	long n = atol(PQgetvalue(r, 0, 0));
	PQclear(r);
	return n;
}

static long stored(struct stack *s, const char *consumer)
{
	return q_long(s, "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE consumer = $1",
		      consumer);
}

/* Seconds from the first committed offset of consumer until it stored `total`; -1 on timeout. */
static double time_consumer(struct stack *s, const char *consumer, long total, long *first_v)
{
	double first_t = 0, give_up = tly_clock_s() + WAIT_S;
	*first_v = 0;
	while (tly_clock_s() < give_up) {
		long v = stored(s, consumer);
		if (v > 0 && first_t == 0) {
			first_t = tly_clock_s();
			*first_v = v;
		}
		if (v >= total)
			return tly_clock_s() - first_t;
		usleep(20000);
	}
	return -1;
}

/* "prefix table" into sql, for projection table i (tly_fold_tables), its name quoted. */
static void table_sql(struct stack *s, size_t i, const char *prefix, char *sql, size_t len)
{
	char *q = PQescapeIdentifier(s->conn, tly_fold_tables[i], strlen(tly_fold_tables[i]));
	if (!q)
		die("escape", "out of memory");
	snprintf(sql, len, "%s %s", prefix, q);
	PQfreemem(q);
}

static long projection_rows(struct stack *s)
{
	long rows = 0;
	for (size_t i = 0; i < tly_fold_n_tables; i++) {
		char sql[256];
		table_sql(s, i, "SELECT count(*) FROM", sql, sizeof(sql));
		rows += q_long(s, sql, NULL);
	}
	return rows;
}

/* The projections' digest (lib compare: one "table=ROWS:MD5" line per table, surrogate ids left out). */
static char *digest(struct stack *s)
{
	struct tly_pg_error pe;
	char *d = tly_compare_digest(s->conn, &pe);
	if (!d)
		die("digest", pe.message);
	return d;
}

/* A warning per table whose rows (contents, not only counts) a rebuild changed. */
static void warn_changed(const char *live, const char *rebuilt, const char *who)
{
	for (const char *a = live, *b = rebuilt; *a && *b;) {
		size_t la = strcspn(a, "\n"), lb = strcspn(b, "\n");
		if (la != lb || strncmp(a, b, la) != 0)
			printf("warning: %.*s (live) vs %.*s (after %s)\n", (int)la, a,
			       (int)(lb - strcspn(b, "=") - 1), b + strcspn(b, "=") + 1, who);
		a += la + (a[la] != '\0');
		b += lb + (b[lb] != '\0');
	}
}

/* Raw COPY of the projection rows into empty copies of the tables (indexes included): seconds. */
static double raw_copy(struct stack *s, long *rows_out)
{
	struct tly_pg_error pe;
	char sql[512];
	char **data = calloc(tly_fold_n_tables, sizeof(*data));
	size_t *lens = calloc(tly_fold_n_tables, sizeof(*lens));
	if (!data || !lens)
		die("copy", "out of memory");
	/* read every table out first (not timed) */
	for (size_t i = 0; i < tly_fold_n_tables; i++) {
		char *q = PQescapeIdentifier(s->conn, tly_fold_tables[i], strlen(tly_fold_tables[i]));
		char *qc;
		snprintf(sql, sizeof(sql), "bench_copy_%s", tly_fold_tables[i]);
		qc = PQescapeIdentifier(s->conn, sql, strlen(sql));
		if (!q || !qc)
			die("escape", "out of memory");
		snprintf(sql, sizeof(sql), "DROP TABLE IF EXISTS %s; CREATE TABLE %s (LIKE %s INCLUDING ALL)",
			 qc, qc, q);
		if (tly_pg_exec_script(s->conn, sql, &pe) != 0)
			die("copy tables", pe.message);
		snprintf(sql, sizeof(sql), "COPY %s TO STDOUT", q);
		PGresult *r = PQexec(s->conn, sql);
		if (PQresultStatus(r) != PGRES_COPY_OUT)
			die("copy out", PQerrorMessage(s->conn));
		PQclear(r);
		FILE *f = open_memstream(&data[i], &lens[i]);
		char *buf = NULL;
		int n;
		while ((n = PQgetCopyData(s->conn, &buf, 0)) > 0) {
			fwrite(buf, 1, (size_t)n, f);
			PQfreemem(buf);
		}
		if (fclose(f) != 0 || n != -1)
			die("copy out", PQerrorMessage(s->conn));
		r = PQgetResult(s->conn);
		if (PQresultStatus(r) != PGRES_COMMAND_OK)
			die("copy out", PQerrorMessage(s->conn));
		PQclear(r);
		while ((r = PQgetResult(s->conn)) != NULL)
			PQclear(r);
		PQfreemem(q);
		PQfreemem(qc);
	}
	double t0 = tly_clock_s();
	if (tly_pg_begin(s->conn, &pe) != 0)
		die("copy begin", pe.message);
	long rows = 0;
	for (size_t i = 0; i < tly_fold_n_tables; i++) {
		snprintf(sql, sizeof(sql), "bench_copy_%s", tly_fold_tables[i]);
		char *qc = PQescapeIdentifier(s->conn, sql, strlen(sql));
		if (!qc)
			die("escape", "out of memory");
		snprintf(sql, sizeof(sql), "COPY %s FROM STDIN", qc);
		PQfreemem(qc);
		PGresult *r = PQexec(s->conn, sql);
		if (PQresultStatus(r) != PGRES_COPY_IN)
			die("copy in", PQerrorMessage(s->conn));
		PQclear(r);
		if ((lens[i] && PQputCopyData(s->conn, data[i], (int)lens[i]) != 1) ||
		    PQputCopyEnd(s->conn, NULL) != 1)
			die("copy in", PQerrorMessage(s->conn));
		r = PQgetResult(s->conn);
		if (PQresultStatus(r) != PGRES_COMMAND_OK)
			die("copy in", PQerrorMessage(s->conn));
		rows += atol(PQcmdTuples(r));
		PQclear(r);
		while ((r = PQgetResult(s->conn)) != NULL)
			PQclear(r);
		free(data[i]);
	}
	if (tly_pg_commit(s->conn, &pe) != 0)
		die("copy commit", pe.message);
	double secs = tly_clock_s() - t0;
	free(data);
	free(lens);
	*rows_out = rows;
	return secs;
}

/*
 * Untimed, before each timed step: every projection table analyzed (a rebuild leaves statistics
 * to autovacuum, whose ANALYZE would otherwise run during the next step) and a checkpoint (the
 * step before's writes are not flushed during the next one).
 */
static void settle(struct stack *s)
{
	struct tly_pg_error pe;
	for (size_t i = 0; i < tly_fold_n_tables; i++) {
		char sql[256];
		table_sql(s, i, "ANALYZE", sql, sizeof(sql));
		if (tly_pg_exec_script(s->conn, sql, &pe) != 0)
			die("analyze", pe.message);
	}
	if (tly_pg_exec_script(s->conn, "CHECKPOINT", &pe) != 0)
		die("checkpoint", pe.message);
}

/* CPU seconds used so far by a step's two sides (struct cpu_now). */
struct cpu {
	double client; /* this process and its reaped children (a tallyctl run) */
	double server; /* the PostgreSQL cluster: postmaster, live and ended backends, workers */
};

static struct cpu cpu_now(struct stack *s)
{
	struct tly_proc_cpu live = {0};
	pid_t pm = tly_devpg_pid(s->pg);
	double self = tly_proc_cpu_s(getpid(), true), pm_all = tly_proc_cpu_s(pm, true),
	       pm_own = tly_proc_cpu_s(pm, false);
	if (self < 0 || pm_all < 0 || pm_own < 0 || tly_proc_cpu_add(pm, true, &live) != 0)
		die("CPU time", "could not read /proc");
	/* live: the postmaster and its running children; pm_all - pm_own: its reaped children */
	return (struct cpu){self, (double)live.on_cpu_us / 1e6 + pm_all - pm_own};
}

/*
 * After a tallyctl run: until its backends are gone and reaped (their CPU then counts in the
 * postmaster's children's), at most 5 s.
 */
static void backends_gone(struct stack *s)
{
	for (double give_up = tly_clock_s() + 5; tly_clock_s() < give_up; usleep(10000))
		if (q_long(s, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
			      "AND pid <> pg_backend_pid()", NULL) == 0)
			break;
	usleep(20000); /* the postmaster reaps an ended backend on SIGCHLD */
}

static struct cpu cpu_since(struct stack *s, struct cpu c0)
{
	struct cpu c = cpu_now(s);
	return (struct cpu){c.client - c0.client, c.server - c0.server};
}

/*
 * `ctl rebuild all` after settle(), timed to its exit (seconds; *cpu: CPU seconds of tallyctl and
 * of PostgreSQL meanwhile); warns of any table it changed.
 */
static double time_rebuild(struct stack *s, const char *ctl, const char *who, const char *live, char *out,
			   size_t outlen, struct cpu *cpu)
{
	char *argv[] = {(char *)ctl, "rebuild", "all", NULL};
	settle(s);
	struct cpu c0 = cpu_now(s);
	double t0 = tly_clock_s();
	if (tly_proc_run(argv, out, outlen) != 0)
		die(who, out);
	double secs = tly_clock_s() - t0;
	backends_gone(s);
	*cpu = cpu_since(s, c0);
	char *rebuilt = digest(s);
	warn_changed(live, rebuilt, who);
	free(rebuilt);
	return secs;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* The median of n figures (sorts a copy); n <= MAX_ROUNDS + 1 (a first run and its rounds). */
static double median(const double *v, int n)
{
	double s[MAX_ROUNDS + 1];
	memcpy(s, v, (size_t)n * sizeof(*s));
	qsort(s, (size_t)n, sizeof(*s), cmp_double);
	return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

/*
 * CPU seconds so far of the PostgreSQL backends whose application_name starts with app (a
 * daemon's connections: tally-ledger's are "tally-ledger" and "tally-ledger writer"); *n: how many.
 */
static double backends_cpu(struct stack *s, const char *app, int *n, double *waited)
{
	struct tly_pg_error qe;
	const char *const v[] = {app};
	PGresult *backends = tly_pg_query(s->conn, "SELECT pid FROM pg_stat_activity "
					  "WHERE starts_with(application_name, $1)", 1, v, &qe);
	if (!backends)
		die("backends", qe.message);
	double cpu = 0;
	*n = PQntuples(backends);
	struct tly_proc_cpu sched = {0};
	for (int i = 0; i < *n; i++) {
		pid_t pid = (pid_t)atol(PQgetvalue(backends, i, 0));
		cpu += tly_proc_cpu_s(pid, false);
		if (tly_proc_cpu_add(pid, false, &sched) != 0)
			die("backends", "could not read /proc");
	}
	if (waited)
		*waited = (double)sched.waiting_us / 1e6;
	PQclear(backends);
	return cpu;
}

/*
 * The cluster's WAL and buffer counters (pg_stat_wal, pg_stat_bgwriter, pg_statio_user_tables),
 * read around a daemon's run to say where its backends' work went: full-page images after a
 * checkpoint, buffers written by backends themselves, blocks read from outside shared_buffers.
 */
struct walstat {
	double v[10];
};

static const char *const walstat_names[] = {"WAL records", "full-page images", "WAL MB", "checkpoints",
					     "buffers written by backends", "by the checkpointer",
					     "by the bgwriter", "blocks read (tables + indexes)", "hit",
					     "fsyncs by backends"};

static struct walstat walstat_now(struct stack *s)
{
	static const char sql[] =
		"SELECT w.wal_records, w.wal_fpi, w.wal_bytes / 1048576.0, b.checkpoints_timed + "
		"b.checkpoints_req, b.buffers_backend, b.buffers_checkpoint, b.buffers_clean, "
		"(SELECT coalesce(sum(heap_blks_read + coalesce(idx_blks_read, 0)), 0) FROM pg_statio_user_tables), "
		"(SELECT coalesce(sum(heap_blks_hit + coalesce(idx_blks_hit, 0)), 0) FROM pg_statio_user_tables), "
		"b.buffers_backend_fsync "
		"FROM pg_stat_wal w, pg_stat_bgwriter b";
	struct tly_pg_error pe;
	struct walstat w = {{0}};
	if (tly_pg_exec_script(s->conn, "SELECT pg_stat_clear_snapshot()", &pe) != 0)
		die("statistics", pe.message);
	PGresult *r = tly_pg_query(s->conn, sql, 0, NULL, &pe);
	if (!r)
		die("statistics", pe.message);
	for (int i = 0; i < 10; i++)
		w.v[i] = atof(PQgetvalue(r, 0, i));
	PQclear(r);
	return w;
}

/* One line of what changed from w0 to w. */
static void walstat_print(const char *who, struct walstat w0, struct walstat w, long events)
{
	printf("  %s, cluster counters:", who);
	for (int i = 0; i < 10; i++)
		printf("%s %s %.0f", i ? "," : "", walstat_names[i], w.v[i] - w0.v[i]);
	printf(" (%.0f WAL bytes per tally.events record)\n", (w.v[2] - w0.v[2]) * 1048576.0 / (double)events);
}

/* One run of a tally-projector binary over the whole backlog, from empty projections. */
struct proj_run {
	double secs;        /* from its first stored offset to the last */
	long timed;         /* input records in that time (after the first stored offset) */
	double cpu;         /* CPU seconds of the process, the whole run */
	double backend_cpu; /* of its PostgreSQL backends, the whole run */
	int n_backends;
	double waited;         /* seconds the process's threads were runnable but not running */
	double backend_waited; /* the same for its backends: the cores were busy with other work */
};

/*
 * Start daemon (tally-ledger or tally-projector, exe) with its log in the stack's directory and
 * time it through total records by its stored offsets (time_consumer); *first: the records of
 * its first batch, outside the time. die() stops it on a failure; daemon_stop afterwards.
 */
static pid_t daemon_run(struct stack *s, const char *exe, const char *daemon, long total,
			double *secs, long *first)
{
	char err[512], log[256];
	snprintf(log, sizeof(log), "%s/%s.log", s->dir, daemon);
	char *argv[] = {(char *)exe, NULL};
	pid_t pid = tly_proc_spawn(argv, log, err, sizeof(err));
	if (pid < 0)
		die(daemon, err);
	running.daemon = pid;
	*secs = time_consumer(s, daemon, total, first);
	if (*secs <= 0)
		die(daemon, "did not finish the backlog (see its log)");
	return pid;
}

static void daemon_stop(pid_t pid, const char *daemon)
{
	if (tly_proc_stop(pid, 10000) < 0)
		fprintf(stderr, "tally-bench-projector: could not stop %s\n", daemon);
	running.daemon = -1;
}

static struct proj_run run_projector(struct stack *s, const char *exe, long inputs)
{
	struct proj_run run = {0};
	long first = 0;
	pid_t projector = daemon_run(s, exe, "tally-projector", inputs, &run.secs, &first);
	run.timed = inputs - first;
	/* CPU of the whole run (first batch included): the process, and its backends' */
	run.cpu = tly_proc_cpu_s(projector, false);
	run.backend_cpu = backends_cpu(s, "tally-projector", &run.n_backends, &run.backend_waited);
	struct tly_proc_cpu sched = {0};
	if (tly_proc_cpu_add(projector, false, &sched) != 0)
		die("tally-projector", "could not read /proc");
	run.waited = (double)sched.waiting_us / 1e6;
	daemon_stop(projector, "tally-projector");
	return run;
}

/*
 * The projections as before the first projector run (the migrations' seeded plans stay; the
 * backlog has no catalog records), no stored projector offsets, then a CHECKPOINT (untimed).
 * No ANALYZE: TRUNCATE leaves the tables unanalyzed, as before the first run. Analyzed empty,
 * the tables would keep plans made for empty tables (a backend keeps the plan of each foreign
 * key's check) until autovacuum analyzes them again: the message insert's key check alone took
 * 2 s of a 10 s run.
 */
static void reset_projections(struct stack *s)
{
	struct tly_pg_error pe;
	backends_gone(s);
	if (tly_pg_begin(s->conn, &pe) != 0 || tly_fold_truncate(s->conn, &pe) != 0)
		die("reset", pe.message);
	const char *const v[] = {"tally-projector"};
	if (tly_pg_exec(s->conn, "DELETE FROM consumer_offsets WHERE consumer = $1", 1, v, &pe) != 0 ||
	    tly_pg_commit(s->conn, &pe) != 0 || tly_pg_exec_script(s->conn, "CHECKPOINT", &pe) != 0)
		die("reset", pe.message);
}

/* One run of tally-ledger over the whole backlog of tally.events, from an empty ledger. */
struct ledger_run {
	double secs;        /* from its first stored offset to the last */
	double rate;        /* records of tally.events a second in that time */
	double cpu;         /* CPU seconds of the process, the whole run (publishing included) */
	double backend_cpu; /* of its PostgreSQL backends, the whole run */
	int n_backends;
	long entries;   /* rows of ledger_entries */
	long published; /* records it added to tally.ledger */
};

/* The ledger's entries: their count and the md5 of their (tenant_id, seq, hash) in order. */
static char *ledger_digest(struct stack *s)
{
	struct tly_pg_error pe;
	char *d = NULL;
	PGresult *r = tly_pg_query(s->conn, "SELECT count(*) || ':' || coalesce(md5(string_agg("
				   "tenant_id::text || ':' || seq::text || ':' || encode(hash, 'hex'), ',' "
				   "ORDER BY tenant_id, seq)), '') FROM ledger_entries", 0, NULL, &pe);
	if (!r || !(d = strdup(PQgetvalue(r, 0, 0))))
		die("ledger digest", r ? "out of memory" : pe.message);
	PQclear(r);
	return d;
}

static struct ledger_run run_ledger(struct stack *s, const char *exe, long events)
{
	struct ledger_run run = {0};
	long first = 0, base = topic_end(s, "tally.ledger");
	pid_t ledger = daemon_run(s, exe, "tally-ledger", events, &run.secs, &first);
	run.rate = (double)(events - first) / run.secs;
	run.entries = q_long(s, "SELECT count(*) FROM ledger_entries", NULL);
	/* every entry published to tally.ledger before its CPU is read and it stops */
	for (double give_up = tly_clock_s() + 60;
	     topic_end(s, "tally.ledger") < base + run.entries && tly_clock_s() < give_up;)
		usleep(50000);
	/* the ledger's CPU over its whole run (start-up and publishing included, as the projector's) */
	run.cpu = tly_proc_cpu_s(ledger, false);
	run.backend_cpu = backends_cpu(s, "tally-ledger", &run.n_backends, NULL);
	daemon_stop(ledger, "tally-ledger");
	run.published = topic_end(s, "tally.ledger") - base;
	backends_gone(s);
	return run;
}

/*
 * Untimed, before a rerun of tally-ledger: the ledger as before its first run. Its tables
 * emptied (entries, wallets, holds, input batches, published markers, quarantine), its stored
 * offsets deleted; topic_partitions (the partition count it recorded) kept, as tally.events
 * still has that many. Then a CHECKPOINT; no ANALYZE, for the reason reset_projections gives
 * (tally-ledger's generic plans too are made once, at their first use). What it re-publishes
 * goes to tally.ledger after nothing reads that topic any more.
 */
static void reset_ledger(struct stack *s)
{
	struct tly_pg_error pe;
	backends_gone(s);
	const char *const v[] = {"tally-ledger"};
	if (tly_pg_begin(s->conn, &pe) != 0 ||
	    tly_pg_exec_script(s->conn, "TRUNCATE ledger_entries, ledger_wallets, ledger_holds, "
				"ledger_input_batches, ledger_published, quarantine RESTART IDENTITY", &pe) != 0 ||
	    tly_pg_exec(s->conn, "DELETE FROM consumer_offsets WHERE consumer = $1", 1, v, &pe) != 0 ||
	    tly_pg_commit(s->conn, &pe) != 0 || tly_pg_exec_script(s->conn, "CHECKPOINT", &pe) != 0)
		die("reset the ledger", pe.message);
}

static const char help[] =
	"Usage: tally-bench-projector [--tenants N] [--events N] [--step-ms MS]\n"
	"                             [--partitions N] [--baseline TALLYCTL] [--rounds N]\n"
	"                             [--projector-rounds N] [--baseline-projector TALLY_PROJECTOR]\n"
	"                             [--ledger-rounds N]\n"
	"\n"
	"make bench: the ledger's rate on a loadgen backlog, tally-projector's rate on the whole\n"
	"backlog, `tallyctl rebuild all` and a raw COPY of the same rows, with the ratios. Starts its\n"
	"own durable PostgreSQL and dev broker; prints the figures, asserts nothing. Keep-up is\n"
	"printed twice: the projector's rate against the ledger's, and the ledger's CPU per record of\n"
	"tally.events (tally-ledger and its backends, whole run) against the projector's; each as\n"
	"the ratio of the medians of both sides' runs (first runs included), then of the first\n"
	"runs alone. Before each timed run of either daemon a CHECKPOINT is taken, untimed.\n"
	"--tenants, --events, --step-ms: the loadgen backlog (default " TENANTS " tenants, " EVENTS "\n"
	"events, " STEP_MS " ms, " PARTITIONS " partitions; the dev broker keeps about 5 MiB per\n"
	"partition: for more events, add partitions and shorten the step so that the hourly\n"
	"ClockTicks on every partition stay few).\n"
	"--baseline: another build's tallyctl, whose `rebuild all` runs on the same rows in each\n"
	"round, first in odd rounds, second in even ones.\n"
	"--rounds: rebuilds (and raw COPYs) this many times (default 5, at most 15) and prints\n"
	"each round and the medians. Before each timed step every projection table is analyzed\n"
	"and a CHECKPOINT taken, untimed.\n"
	"--projector-rounds: after the first projector run, empties the projections and runs\n"
	"tally-projector over the whole backlog again this many times (default 6, at most 15),\n"
	"each time with --baseline-projector (another build's tally-projector) if given, first in\n"
	"odd rounds and second in even ones, and\n"
	"prints each run's rate and CPU per input record (process and backends) and the medians.\n"
	"--ledger-rounds: after the raw COPYs (nothing reads the ledger's output any more), empties\n"
	"the ledger (its tables, quarantine and stored offsets; the recorded partition count stays)\n"
	"and runs tally-ledger over the same tally.events again this many times (default 6, at\n"
	"most 15), printing each run's rate and CPU and warning if its entries differ from the\n"
	"first run's (count and md5 of tenant_id, seq, hash).\n"
	"TALLY_BENCH_HOOK: a shell command run at the end, before the stack stops, with the\n"
	"stack's TALLY_* settings in its environment (to profile by hand); its output is printed.\n";

int main(int argc, char **argv)
{
	if (argc == 2) {
		int only = tly_cli_help_only(argc, argv, help);
		return only > 0 ? 0 : 2;
	}
	char exe[PATH_MAX], out[4096];
	const char *tenants = TENANTS, *nevents = EVENTS, *step = STEP_MS, *baseline = NULL;
	const char *partitions = PARTITIONS, *baseline_projector = NULL;
	int rounds = 5, proj_rounds = PROJECTOR_ROUNDS, ledger_rounds = LEDGER_ROUNDS;
	for (int a = 1; a + 1 < argc; a += 2) {
		if (strcmp(argv[a], "--tenants") == 0)
			tenants = argv[a + 1];
		else if (strcmp(argv[a], "--events") == 0)
			nevents = argv[a + 1];
		else if (strcmp(argv[a], "--partitions") == 0)
			partitions = argv[a + 1];
		else if (strcmp(argv[a], "--step-ms") == 0)
			step = argv[a + 1];
		else if (strcmp(argv[a], "--baseline") == 0)
			baseline = argv[a + 1];
		else if (strcmp(argv[a], "--rounds") == 0)
			rounds = atoi(argv[a + 1]);
		else if (strcmp(argv[a], "--projector-rounds") == 0)
			proj_rounds = atoi(argv[a + 1]);
		else if (strcmp(argv[a], "--ledger-rounds") == 0)
			ledger_rounds = atoi(argv[a + 1]);
		else if (strcmp(argv[a], "--baseline-projector") == 0)
			baseline_projector = argv[a + 1];
		else
			die("unexpected argument", argv[a]);
	}
	tly_log_init("tally-bench-projector", TLY_LOG_WARN);
	struct stack s = {.partitions = atoi(partitions)};
	if (s.partitions < 1)
		die("--partitions", "not a positive number");
	if (rounds < 1 || rounds > MAX_ROUNDS)
		die("--rounds", "not a number from 1 to 15");
	if (proj_rounds < 0 || proj_rounds > MAX_ROUNDS)
		die("--projector-rounds", "not a number from 0 to 15");
	if (ledger_rounds < 0 || ledger_rounds > MAX_ROUNDS)
		die("--ledger-rounds", "not a number from 0 to 15");
	stack_start(&s);

	/* the workload: loadgen as fast as it goes, with period closes and invoices */
	tly_proc_sibling("tally-loadgen", exe, sizeof(exe));
	char *lg[] = {exe, "--seed", "5", "--tenants", (char *)tenants, "--events", (char *)nevents, "--duplicates", "5",
		      "--step-ms", (char *)step, NULL};
	if (tly_proc_run(lg, out, sizeof(out)) != 0)
		die("tally-loadgen", out);
	long events = topic_end(&s, "tally.events"), catalog = topic_end(&s, "tally.catalog");

	/* the ledger on the backlog, after a CHECKPOINT (the migrations' writes flushed), untimed */
	char ledger_exe[PATH_MAX];
	struct tly_pg_error pe;
	tly_proc_sibling("tally-ledger", ledger_exe, sizeof(ledger_exe));
	if (tly_pg_exec_script(s.conn, "CHECKPOINT", &pe) != 0)
		die("checkpoint", pe.message);
	struct walstat ledger_w0 = walstat_now(&s);
	struct ledger_run lrun = run_ledger(&s, ledger_exe, events);
	struct walstat ledger_w1 = walstat_now(&s);
	char *entries_digest = ledger_digest(&s);
	/* events/s and CPU us per tally.events record of each ledger run, the first at [0] */
	double lrate[MAX_ROUNDS + 1], lcpu[MAX_ROUNDS + 1];
	lrate[0] = lrun.rate;
	lcpu[0] = (lrun.cpu + lrun.backend_cpu) / (double)events * 1e6;

	/*
	 * the projector on the whole backlog, prepared as every later projector run
	 * (reset_projections: the projections, already empty, truncated, then a CHECKPOINT, so that
	 * the ledger's dirty buffers are not flushed during the timed run)
	 */
	long inputs = events + lrun.published + catalog;
	tly_proc_sibling("tally-projector", exe, sizeof(exe));
	reset_projections(&s);
	struct walstat proj_w0 = walstat_now(&s);
	struct proj_run run = run_projector(&s, exe, inputs);
	backends_gone(&s);
	struct walstat proj_w1 = walstat_now(&s);
	long rows = projection_rows(&s);
	double proj_s = run.secs, proj_cpu = run.cpu, backend_cpu = run.backend_cpu;
	int n_backends = run.n_backends;
	double proj_rows = (double)rows * (double)run.timed / (double)inputs / proj_s;
	double proj_events = (double)events * (double)run.timed / (double)inputs / proj_s;
	double proj_records = (double)run.timed / proj_s;
	char *live_digest = digest(&s);

	/* again from empty projections, alternating with the baseline projector if any */
	/* events/s and CPU us per input record of each run: [0] this build, [1] the baseline; pev:
	 * this build's events/s and CPU us per tally.events record, its first run at [0] */
	double prate[2][MAX_ROUNDS], pcpu[2][MAX_ROUNDS], pev_rate[MAX_ROUNDS + 1], pev_cpu[MAX_ROUNDS + 1];
	pev_rate[0] = proj_events;
	pev_cpu[0] = (proj_cpu + backend_cpu) / (double)events * 1e6;
	for (int r = 0; r < proj_rounds; r++) {
		/* the baseline first in odd rounds, second in even ones, as the rebuild rounds: the
		 * order must not favour either build */
		for (int i = baseline_projector ? 0 : 1; i < 2; i++) {
			int k = baseline_projector && (i == 0) == (r % 2 == 0);
			reset_projections(&s);
			struct proj_run pr = run_projector(&s, k ? baseline_projector : exe, inputs);
			prate[k][r] = (double)events * (double)pr.timed / (double)inputs / pr.secs;
			pcpu[k][r] = (pr.cpu + pr.backend_cpu) / (double)pr.timed * 1e6;
			printf("projector round %d, %s: %.2f s, %.0f events/s; CPU tally-projector %.2f s + "
			       "%d backend(s) %.2f s = %.1f us per input record\n", r + 1,
			       k ? "baseline" : "this build", pr.secs, prate[k][r], pr.cpu,
			       pr.n_backends, pr.backend_cpu, pcpu[k][r]);
			if (!k) {
				pev_rate[r + 1] = prate[k][r];
				pev_cpu[r + 1] = (pr.cpu + pr.backend_cpu) / (double)events * 1e6;
				char *d = digest(&s);
				warn_changed(live_digest, d, "a projector round");
				free(d);
			}
		}
	}

	/* rebuilds of everything, each timed to the exit of tallyctl, and the raw COPY; with a
	 * baseline, the two tallyctls alternate which goes first from round to round */
	char ctl[PATH_MAX], base_out[4096] = "";
	double rebuild_t[MAX_ROUNDS], base_t[MAX_ROUNDS], copy_t[MAX_ROUNDS];
	/* CPU seconds per round: [0] client, [1] PostgreSQL */
	double rebuild_c[2][MAX_ROUNDS], base_c[2][MAX_ROUNDS], copy_c[2][MAX_ROUNDS];
	long copied = 0;
	tly_proc_sibling("tallyctl", ctl, sizeof(ctl));
	for (int r = 0; r < rounds; r++) {
		struct cpu c = {0};
		for (int k = 0; k < 2; k++) {
			bool base_now = (k == 0) == (r % 2 == 0);
			if (base_now && baseline) {
				base_t[r] = time_rebuild(&s, baseline, "the baseline's rebuild", live_digest,
							 base_out, sizeof(base_out), &c);
				base_c[0][r] = c.client;
				base_c[1][r] = c.server;
			} else if (!base_now) {
				rebuild_t[r] = time_rebuild(&s, ctl, "the rebuild", live_digest, out, sizeof(out), &c);
				rebuild_c[0][r] = c.client;
				rebuild_c[1][r] = c.server;
			}
		}
		settle(&s);
		struct cpu c0 = cpu_now(&s);
		copy_t[r] = raw_copy(&s, &copied);
		c = cpu_since(&s, c0);
		copy_c[0][r] = c.client;
		copy_c[1][r] = c.server;
		if (rounds > 1 && baseline)
			printf("round %d: rebuild %.2f s (CPU %.2f + %.2f s), baseline %.2f s (CPU %.2f + %.2f s), "
			       "raw COPY %.2f s (CPU %.2f + %.2f s)\n", r + 1, rebuild_t[r], rebuild_c[0][r],
			       rebuild_c[1][r], base_t[r], base_c[0][r], base_c[1][r], copy_t[r], copy_c[0][r],
			       copy_c[1][r]);
		else if (rounds > 1)
			printf("round %d: rebuild %.2f s (CPU %.2f + %.2f s), raw COPY %.2f s (CPU %.2f + %.2f s)\n",
			       r + 1, rebuild_t[r], rebuild_c[0][r], rebuild_c[1][r], copy_t[r], copy_c[0][r],
			       copy_c[1][r]);
	}
	free(live_digest);

	/* the ledger again, from an empty ledger on the same backlog, now that nothing reads its output */
	for (int r = 0; r < ledger_rounds; r++) {
		reset_ledger(&s);
		struct ledger_run lr = run_ledger(&s, ledger_exe, events);
		lrate[r + 1] = lr.rate;
		lcpu[r + 1] = (lr.cpu + lr.backend_cpu) / (double)events * 1e6;
		printf("ledger round %d: %.2f s, %.0f events/s; CPU tally-ledger %.2f s + %d backend(s) %.2f s = "
		       "%.1f us per tally.events record\n", r + 1, lr.secs, lr.rate, lr.cpu, lr.n_backends,
		       lr.backend_cpu, lcpu[r + 1]);
		char *d = ledger_digest(&s);
		if (strcmp(d, entries_digest) != 0 || lr.published != lrun.published)
			printf("warning: the ledger's round %d made entries %s (count:md5 of tenant_id, seq, hash) "
			       "and published %ld records; its first run %s and %ld\n", r + 1, d, lr.published,
			       entries_digest, lrun.published);
		free(d);
	}
	free(entries_digest);
	double rebuild_s = median(rebuild_t, rounds), base_s = baseline ? median(base_t, rounds) : 0;
	double rebuild_rows = (double)rows / rebuild_s, copy_rows = (double)copied / median(copy_t, rounds);
	if (rounds > 1)
		printf("medians of %d rounds below\n\n", rounds);

	printf("Projections (2 cores; PostgreSQL 15 with fsync=on, full_page_writes=on, "
	       "synchronous_commit=on;\ndev broker with %d partitions; kafka.fetch.wait.max.ms=10)\n\n",
	       s.partitions);
	printf("workload: tally-loadgen --tenants %s --events %s --duplicates 5 --step-ms %s\n"
	       "  %ld records on tally.events, %ld on tally.catalog; the ledger made %ld entries\n"
	       "  (%ld records on tally.ledger); %ld rows in the %zu projection tables\n\n",
	       tenants, nevents, step, events, catalog, lrun.entries, lrun.published, rows, tly_fold_n_tables);
	printf("tally-ledger on the backlog           %10.0f events/s   (first run, %.2f s)\n", lrun.rate,
	       lrun.secs);
	if (ledger_rounds > 0)
		printf("  median of %d runs (the first and %d more): %10.0f events/s, %.1f us CPU per "
		       "tally.events record\n", ledger_rounds + 1, ledger_rounds, median(lrate, ledger_rounds + 1),
		       median(lcpu, ledger_rounds + 1));
	printf("tally-projector on the backlog        %10.0f events/s   %10.0f input records/s   "
	       "%10.0f rows/s   (first run, %.2f s)\n", proj_events, proj_records, proj_rows, proj_s);
	printf("  CPU of the whole run: tally-projector %.2f s, its %d PostgreSQL backend(s) %.2f s "
	       "(%.1f us per input record)\n", proj_cpu, n_backends, backend_cpu,
	       (proj_cpu + backend_cpu) / (double)run.timed * 1e6);
	printf("  runnable but waiting for a core meanwhile: tally-projector %.2f s, its backends %.2f s\n",
	       run.waited, run.backend_waited);
	for (int k = 0; proj_rounds > 0 && k <= (baseline_projector ? 1 : 0); k++) {
		printf("  %s, median of %d more runs: %10.0f events/s, %.1f us CPU per input record\n",
		       k ? "baseline projector" : "this projector", proj_rounds,
		       median(prate[k], proj_rounds), median(pcpu[k], proj_rounds));
	}
	printf("tallyctl rebuild all (whole command)  %10.0f events/s   %10.0f input records/s   "
	       "%10.0f rows/s   (%.2f s)\n", (double)events / rebuild_s,
	       (double)(events + lrun.entries + catalog) / rebuild_s, rebuild_rows, rebuild_s);
	if (baseline)
		printf("baseline (%s) rebuild all        %10.0f rows/s   (%.2f s)\n", baseline,
		       (double)rows / base_s, base_s);
	printf("raw COPY of the same %ld rows into empty copies (same indexes), one transaction:\n"
	       "                                                                            "
	       "%10.0f rows/s\n\n", copied, copy_rows);
	/* the headline: medians of each side's runs, the first included (one run each when no rounds) */
	int ln = ledger_rounds + 1, pn = proj_rounds + 1;
	double ledger_med = median(lrate, ln), proj_med = median(pev_rate, pn);
	printf("steady state vs the ledger's rate:    %5.2fx  (target >= 1: the projector keeps up; medians: "
	       "tally-projector %.0f events/s of %d run(s), tally-ledger %.0f of %d)\n",
	       ledger_med > 0 ? proj_med / ledger_med : 0, proj_med, pn, ledger_med, ln);
	printf("  first runs alone (the headline before session 13, whose first projector run had no "
	       "CHECKPOINT before it): %5.2fx  (%.0f against %.0f events/s)\n",
	       lrun.rate > 0 ? proj_events / lrun.rate : 0, proj_events, lrun.rate);
	/* Both daemons are CPU-bound on these cores: the rate each can sustain follows its CPU per
	 * record of tally.events. Whole runs, the same backlog and database; unlike the rates above it
	 * does not depend on how a short run's few batches fell. */
	double ledger_us = lcpu[0], proj_us = pev_cpu[0];
	double ledger_us_med = median(lcpu, ln), proj_us_med = median(pev_cpu, pn);
	printf("  by CPU per tally.events record:     %5.2fx  (medians: tally-ledger and its backends %.1f us, "
	       "tally-projector and its backends %.1f us)\n", proj_us_med > 0 ? ledger_us_med / proj_us_med : 0,
	       ledger_us_med, proj_us_med);
	printf("  by CPU, first runs alone:           %5.2fx  (tally-ledger %.2f s + %d backend(s) %.2f s = "
	       "%.1f us; tally-projector %.1f us)\n", proj_us > 0 ? ledger_us / proj_us : 0, lrun.cpu,
	       lrun.n_backends, lrun.backend_cpu, ledger_us, proj_us);
	walstat_print("tally-ledger's first run", ledger_w0, ledger_w1, events);
	walstat_print("tally-projector's first run", proj_w0, proj_w1, events);
	printf("rebuild vs raw COPY (rows/s):         %5.1f%% (target >= 50%%)\n",
	       copy_rows > 0 ? 100 * rebuild_rows / copy_rows : 0);
	if (rounds > 1) { /* the same, round by round: each rebuild against the raw COPY of its round */
		double ratio[MAX_ROUNDS], base_ratio[MAX_ROUNDS];
		for (int r = 0; r < rounds; r++) {
			ratio[r] = 100 * copy_t[r] / rebuild_t[r];
			base_ratio[r] = baseline ? 100 * copy_t[r] / base_t[r] : 0;
		}
		printf("  median of the rounds' own ratios:   %5.1f%%", median(ratio, rounds));
		if (baseline)
			printf(" (baseline %.1f%%)", median(base_ratio, rounds));
		printf("\n");
	}
	if (baseline)
		printf("baseline rebuild vs raw COPY:         %5.1f%%\n",
		       copy_rows > 0 ? 100 * (double)rows / base_s / copy_rows : 0);
	printf("steady state vs raw COPY (rows/s):    %5.1f%%\n", copy_rows > 0 ? 100 * proj_rows / copy_rows : 0);
	printf("CPU seconds (client + PostgreSQL%s): rebuild %.2f + %.2f, ", rounds > 1 ? ", medians" : "",
	       median(rebuild_c[0], rounds), median(rebuild_c[1], rounds));
	if (baseline)
		printf("baseline rebuild %.2f + %.2f, ", median(base_c[0], rounds), median(base_c[1], rounds));
	printf("raw COPY %.2f + %.2f\n", median(copy_c[0], rounds), median(copy_c[1], rounds));
	printf("\ntallyctl rebuild all said: %s", out);
	if (baseline)
		printf("the baseline said: %s", base_out);
	/* for profiling by hand: a command run on the stack as it stands (TALLY_* set), its output shown */
	const char *hook = getenv("TALLY_BENCH_HOOK");
	if (hook && *hook) {
		static char hook_out[1 << 16];
		char *sh[] = {"sh", "-c", (char *)hook, NULL};
		int hrc = tly_proc_run(sh, hook_out, sizeof(hook_out));
		fputs(hook_out, stdout);
		if (hrc != 0)
			fprintf(stderr, "tally-bench-projector: TALLY_BENCH_HOOK exited %d\n", hrc);
	}
	stack_stop(&s);
	return 0;
}
