/*
 * tally-bench-projector (make bench): the projections' apply rates side by side in one run, on a
 * durable throw-away PostgreSQL (fsync, full_page_writes, synchronous_commit on) and a dev broker:
 * a loadgen backlog goes through tally-ledger (timed: the ledger's rate on this workload), then
 * tally-projector consumes the whole backlog of tally.events, tally.ledger and tally.catalog
 * (steady-state apply rate), then `tallyctl rebuild all` folds it again into shadow tables and
 * swaps them in (rebuild rate), then the same rows are COPYed into empty copies of the tables with
 * the same indexes (the raw COPY rate). Figures are printed, never asserted.
 */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
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

static void die(const char *what, const char *why)
{
	fprintf(stderr, "tally-bench-projector: %s: %s\n", what, why);
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
	tly_proc_sibling("tally-devbroker", exe, sizeof(exe));
	snprintf(boot, sizeof(boot), "%s/bootstrap", s->dir);
	snprintf(parts, sizeof(parts), "%d", s->partitions);
	snprintf(log, sizeof(log), "%s/broker.log", s->dir);
	char *argv[] = {exe, "--partitions", parts, "--bootstrap-file", boot, NULL};
	if ((s->broker = tly_proc_spawn(argv, log, err, sizeof(err))) < 0)
		die("tally-devbroker", err);
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
}

static void stack_stop(struct stack *s)
{
	rd_kafka_destroy(s->rk);
	PQfinish(s->conn);
	if (tly_proc_stop(s->broker, 5000) < 0)
		fprintf(stderr, "tally-bench-projector: could not stop tally-devbroker\n");
	char *rm[] = {"rm", "-rf", s->dir, NULL};
	if (tly_proc_run(rm, NULL, 0) != 0)
		fprintf(stderr, "tally-bench-projector: could not remove \"%s\"\n", s->dir);
	tly_devpg_stop(s->pg);
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

static long projection_rows(struct stack *s)
{
	long rows = 0;
	for (size_t i = 0; i < tly_fold_n_tables; i++) {
		char sql[256];
		char *q = PQescapeIdentifier(s->conn, tly_fold_tables[i], strlen(tly_fold_tables[i]));
		if (!q)
			die("escape", "out of memory");
		snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s", q);
		PQfreemem(q);
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

/* Raw COPY of the projection rows into empty copies of the tables (indexes included): rows/s. */
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
	return secs > 0 ? (double)rows / secs : 0;
}

static const char help[] =
	"Usage: tally-bench-projector [--tenants N] [--events N] [--step-ms MS]\n"
	"                             [--partitions N] [--baseline TALLYCTL]\n"
	"\n"
	"make bench: the ledger's rate on a loadgen backlog, tally-projector's rate on the whole\n"
	"backlog, `tallyctl rebuild all` and a raw COPY of the same rows, with the ratios. Starts its\n"
	"own durable PostgreSQL and dev broker; prints the figures, asserts nothing.\n"
	"--tenants, --events, --step-ms: the loadgen backlog (default " TENANTS " tenants, " EVENTS "\n"
	"events, " STEP_MS " ms, " PARTITIONS " partitions; the dev broker keeps about 5 MiB per\n"
	"partition: for more events, add partitions and shorten the step so that the hourly\n"
	"ClockTicks on every partition stay few).\n"
	"--baseline: another build's tallyctl, whose `rebuild all` runs first on the same rows.\n";

int main(int argc, char **argv)
{
	if (argc == 2) {
		int only = tly_cli_help_only(argc, argv, help);
		return only > 0 ? 0 : 2;
	}
	char err[512], exe[PATH_MAX], log[256], out[4096];
	const char *tenants = TENANTS, *nevents = EVENTS, *step = STEP_MS, *baseline = NULL;
	const char *partitions = PARTITIONS;
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
		else
			die("unexpected argument", argv[a]);
	}
	tly_log_init("tally-bench-projector", TLY_LOG_WARN);
	struct stack s = {.partitions = atoi(partitions)};
	if (s.partitions < 1)
		die("--partitions", "not a positive number");
	stack_start(&s);

	/* the workload: loadgen as fast as it goes, with period closes and invoices */
	tly_proc_sibling("tally-loadgen", exe, sizeof(exe));
	char *lg[] = {exe, "--seed", "5", "--tenants", (char *)tenants, "--events", (char *)nevents, "--duplicates", "5",
		      "--step-ms", (char *)step, NULL};
	if (tly_proc_run(lg, out, sizeof(out)) != 0)
		die("tally-loadgen", out);
	long events = topic_end(&s, "tally.events"), catalog = topic_end(&s, "tally.catalog");

	/* the ledger on the backlog */
	snprintf(log, sizeof(log), "%s/ledger.log", s.dir);
	tly_proc_sibling("tally-ledger", exe, sizeof(exe));
	char *la[] = {exe, NULL};
	pid_t ledger = tly_proc_spawn(la, log, err, sizeof(err));
	if (ledger < 0)
		die("tally-ledger", err);
	long first = 0;
	double ledger_s = time_consumer(&s, "tally-ledger", events, &first);
	if (ledger_s <= 0)
		die("tally-ledger", "did not finish the backlog (see its log)");
	double ledger_rate = (double)(events - first) / ledger_s;
	long entries = q_long(&s, "SELECT count(*) FROM ledger_entries", NULL);
	/* every entry published to tally.ledger before the projector starts */
	for (double give_up = tly_clock_s() + 60; topic_end(&s, "tally.ledger") < entries && tly_clock_s() < give_up;)
		usleep(50000);
	if (tly_proc_stop(ledger, 10000) < 0)
		fprintf(stderr, "tally-bench-projector: could not stop tally-ledger\n");
	long ledger_records = topic_end(&s, "tally.ledger");

	/* the projector on the whole backlog */
	long inputs = events + ledger_records + catalog;
	snprintf(log, sizeof(log), "%s/projector.log", s.dir);
	tly_proc_sibling("tally-projector", exe, sizeof(exe));
	char *pa[] = {exe, NULL};
	pid_t projector = tly_proc_spawn(pa, log, err, sizeof(err));
	if (projector < 0)
		die("tally-projector", err);
	double proj_s = time_consumer(&s, "tally-projector", inputs, &first);
	if (proj_s <= 0)
		die("tally-projector", "did not finish the backlog (see its log)");
	double proj_records = (double)(inputs - first) / proj_s;
	/* CPU of the whole run (first batch included): the process, and its backends' */
	double proj_cpu = tly_proc_cpu_s(projector, false), backend_cpu = 0;
	struct tly_pg_error qe;
	const char *const app_name[] = {"tally-projector"};
	PGresult *backends = tly_pg_query(s.conn, "SELECT pid FROM pg_stat_activity "
					  "WHERE application_name = $1", 1, app_name, &qe);
	if (!backends)
		die("backends", qe.message);
	int n_backends = PQntuples(backends);
	for (int i = 0; i < n_backends; i++)
		backend_cpu += tly_proc_cpu_s((pid_t)atol(PQgetvalue(backends, i, 0)), false);
	PQclear(backends);
	if (tly_proc_stop(projector, 10000) < 0)
		fprintf(stderr, "tally-bench-projector: could not stop tally-projector\n");
	long rows = projection_rows(&s);
	double proj_rows = (double)rows * (double)(inputs - first) / (double)inputs / proj_s;
	double proj_events = (double)events * (double)(inputs - first) / (double)inputs / proj_s;

	/* a rebuild of everything, timed to the exit of tallyctl; first by the baseline's tallyctl */
	char *live_digest = digest(&s);
	double base_s = 0;
	char base_out[4096] = "";
	if (baseline) {
		char *ba[] = {(char *)baseline, "rebuild", "all", NULL};
		double b0 = tly_clock_s();
		if (tly_proc_run(ba, base_out, sizeof(base_out)) != 0)
			die("baseline tallyctl rebuild all", base_out);
		base_s = tly_clock_s() - b0;
		char *rebuilt = digest(&s);
		warn_changed(live_digest, rebuilt, "the baseline's rebuild");
		free(rebuilt);
	}
	tly_proc_sibling("tallyctl", exe, sizeof(exe));
	char *ra[] = {exe, "rebuild", "all", NULL};
	double t0 = tly_clock_s();
	if (tly_proc_run(ra, out, sizeof(out)) != 0)
		die("tallyctl rebuild all", out);
	double rebuild_s = tly_clock_s() - t0;
	double rebuild_rows = (double)rows / rebuild_s;
	char *rebuilt = digest(&s);
	warn_changed(live_digest, rebuilt, "the rebuild");
	free(rebuilt);
	free(live_digest);

	/* the rebuild leaves statistics to autovacuum: gathered here, untimed, so that no autovacuum
	 * ANALYZE runs during the raw COPY below */
	for (size_t i = 0; i < tly_fold_n_tables; i++) {
		char sql[256];
		struct tly_pg_error pe;
		char *q = PQescapeIdentifier(s.conn, tly_fold_tables[i], strlen(tly_fold_tables[i]));
		if (!q)
			die("escape", "out of memory");
		snprintf(sql, sizeof(sql), "ANALYZE %s", q);
		PQfreemem(q);
		if (tly_pg_exec_script(s.conn, sql, &pe) != 0)
			die("analyze", pe.message);
	}
	long copied = 0;
	double copy_rows = raw_copy(&s, &copied);

	printf("Projections (2 cores; PostgreSQL 15 with fsync=on, full_page_writes=on, "
	       "synchronous_commit=on;\ndev broker with %d partitions; kafka.fetch.wait.max.ms=10)\n\n",
	       s.partitions);
	printf("workload: tally-loadgen --tenants %s --events %s --duplicates 5 --step-ms %s\n"
	       "  %ld records on tally.events, %ld on tally.catalog; the ledger made %ld entries\n"
	       "  (%ld records on tally.ledger); %ld rows in the %zu projection tables\n\n",
	       tenants, nevents, step, events, catalog, entries, ledger_records, rows, tly_fold_n_tables);
	printf("tally-ledger on the backlog           %10.0f events/s\n", ledger_rate);
	printf("tally-projector on the backlog        %10.0f events/s   %10.0f input records/s   "
	       "%10.0f rows/s   (%.2f s)\n", proj_events, proj_records, proj_rows, proj_s);
	printf("  CPU of the whole run: tally-projector %.2f s, its %d PostgreSQL backend(s) %.2f s\n",
	       proj_cpu, n_backends, backend_cpu);
	printf("tallyctl rebuild all (whole command)  %10.0f events/s   %10.0f input records/s   "
	       "%10.0f rows/s   (%.2f s)\n", (double)events / rebuild_s,
	       (double)(events + entries + catalog) / rebuild_s, rebuild_rows, rebuild_s);
	if (baseline)
		printf("baseline (%s) rebuild all        %10.0f rows/s   (%.2f s)\n", baseline,
		       (double)rows / base_s, base_s);
	printf("raw COPY of the same %ld rows into empty copies (same indexes), one transaction:\n"
	       "                                                                            "
	       "%10.0f rows/s\n\n", copied, copy_rows);
	printf("steady state vs the ledger's rate:    %5.2fx  (target >= 1: the projector keeps up)\n",
	       ledger_rate > 0 ? proj_events / ledger_rate : 0);
	printf("rebuild vs raw COPY (rows/s):         %5.1f%% (target >= 50%%)\n",
	       copy_rows > 0 ? 100 * rebuild_rows / copy_rows : 0);
	if (baseline)
		printf("baseline rebuild vs raw COPY:         %5.1f%%\n",
		       copy_rows > 0 ? 100 * (double)rows / base_s / copy_rows : 0);
	printf("steady state vs raw COPY (rows/s):    %5.1f%%\n", copy_rows > 0 ? 100 * proj_rows / copy_rows : 0);
	printf("\ntallyctl rebuild all said: %s", out);
	stack_stop(&s);
	return 0;
}
