/*
 * tally-bench-audit (make bench): the audit's speed on at least a million ledger entries, next to
 * the rate of simply reading the same rows out of PostgreSQL, in one run. The ledger is written
 * by tally-ledger's own decide-and-commit path (consumers/ledger_partition.c, ledger_store.c: group
 * commit, binary COPY of entries and packed inputs) run in process over tally-loadgen's model, so
 * no million events go through Kafka. Then: raw binary COPY of ledger_entries (and of the inputs),
 * and lib/audit_pg + lib/audit (what `tallyctl audit` runs) over the same rows. Figures are
 * printed, never asserted; the audit must pass.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "audit.h"
#include "audit_pg.h"
#include "codec.h"
#include "devpg.h"
#include "kafka.h"
#include "../consumers/ledger_partition.h"
#include "../producers/loadgen.h"
#include "log.h"
#include "migrate.h"
#include "pg.h"
#include "proc.h"

#define PROG "tally-bench-audit"
#define PARTITIONS 12
#define TENANTS 2000
#define DEFAULT_ENTRIES 1000000
#define BATCH_RECORDS 20000 /* records per group commit */

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct tly_devpg *running_pg; /* the throw-away PostgreSQL, for die() to stop */

static void die(const char *what, const char *why)
{
	tly_devpg_stop(running_pg);
	fprintf(stderr, PROG ": %s: %s\n", what, why);
	exit(1);
}

static long count(PGconn *conn, const char *sql)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, 0, NULL, &err);
	if (!res)
		die(sql, err.message);
	long n = atol(PQgetvalue(res, 0, 0));
	PQclear(res);
	return n;
}

/* Commit every partition's open batch in one group; the entries it wrote. */
static size_t commit_all(struct tly_ledger_partition **parts, const struct tly_ledger_ctx *ctx)
{
	struct tly_ledger_group_item items[PARTITIONS];
	struct tly_pg_error err;
	for (int p = 0; p < PARTITIONS; p++)
		items[p] = (struct tly_ledger_group_item){.part = parts[p], .published_offset = -1};
	if (tly_ledger_partition_commit(items, PARTITIONS, ctx, &err) != 0)
		die("commit", err.message);
	size_t n = 0;
	for (int p = 0; p < PARTITIONS; p++)
		n += items[p].out.n_entries;
	return n;
}

/* tally-loadgen's traffic through the ledger's batch step until target entries are committed. */
static void generate(PGconn *conn, long target, long *records, long *entries, double *secs)
{
	char err[512];
	struct tly_codec *codec = tly_codec_new(err, sizeof(err));
	if (!codec)
		die("codec", err);
	struct tly_ledger_ctx ctx = {conn, codec, {0, codec}, "tally.events", "tally.ledger",
				     PARTITIONS, TLY_LEDGER_KEYS_LOCK_TIMEOUT_MS};
	struct tly_ledger_partition *parts[PARTITIONS];
	int64_t next[PARTITIONS] = {0};
	struct tly_pg_error pe;
	for (int p = 0; p < PARTITIONS; p++)
		if (!(parts[p] = tly_ledger_partition_open(&ctx, p, &pe)))
			die("open partition", pe.message);
	struct loadgen_opts o = {.seed = 11, .tenants = TENANTS, .duplicate_pct = 2, .bad_pct = 1,
				 .start_us = 1767225600000000LL, .step_us = 2000000};
	struct loadgen *lg = loadgen_new(&o, err, sizeof(err));
	if (!lg)
		die("loadgen", err);
	long recs = 0, ents = 0, pending = 0;
	double t0 = now_s();
	while (ents < target) {
		struct loadgen_item it;
		if (loadgen_next(lg, &it, err, sizeof(err)) != 0)
			die("loadgen", err);
		int from = 0, to = PARTITIONS; /* a ClockTick goes to every partition */
		if (it.key)
			to = (from = tly_kafka_partition_for_key(it.key, 36, PARTITIONS)) + 1;
		for (int p = from; p < to; p++) {
			bool added;
			if (tly_ledger_partition_add(parts[p], next[p]++, it.key, it.key ? 36 : 0, it.bytes,
						     it.len, 0, &added) != 0)
				die("add", "out of memory");
			recs++;
			pending++;
		}
		if (pending >= BATCH_RECORDS) {
			ents += (long)commit_all(parts, &ctx);
			pending = 0;
		}
	}
	if (pending)
		ents += (long)commit_all(parts, &ctx);
	*secs = now_s() - t0;
	*records = recs;
	*entries = ents;
	loadgen_free(lg);
	for (int p = 0; p < PARTITIONS; p++)
		tly_ledger_partition_free(parts[p]);
	tly_codec_free(codec);
}

/* CPU seconds this process used so far (the audit's verifier threads when it runs). */
static double cpu_self(void)
{
	struct rusage ru;
	if (getrusage(RUSAGE_SELF, &ru) != 0)
		return -1;
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* Seconds to read a COPY ... TO STDOUT (FORMAT binary) to the end, discarding the bytes. */
static double copy_out(PGconn *conn, const char *sql, long *bytes)
{
	double t0 = now_s();
	PGresult *res = PQexec(conn, sql);
	if (PQresultStatus(res) != PGRES_COPY_OUT)
		die(sql, PQerrorMessage(conn));
	PQclear(res);
	char *buf;
	int n;
	*bytes = 0;
	while ((n = PQgetCopyData(conn, &buf, 0)) > 0) {
		*bytes += n;
		PQfreemem(buf);
	}
	if (n != -1)
		die(sql, PQerrorMessage(conn));
	res = PQgetResult(conn);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
		die(sql, PQerrorMessage(conn));
	PQclear(res);
	return now_s() - t0;
}

int main(int argc, char **argv)
{
	char err[1024], db[1024];
	struct tly_pg_error pe;
	long target = DEFAULT_ENTRIES;
	const char *given = NULL; /* an empty database to use instead of a throw-away cluster */
	bool reuse = false;       /* given holds the ledger of an earlier run: audit it again */
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--entries") == 0 && i + 1 < argc && atol(argv[i + 1]) > 0)
			target = atol(argv[++i]);
		else if (strcmp(argv[i], "--db") == 0 && i + 1 < argc)
			given = argv[++i];
		else if (strcmp(argv[i], "--reuse") == 0)
			reuse = true;
		else {
			fprintf(stderr, "usage: " PROG " [--entries N] [--db CONNINFO [--reuse]]\n"
					"  N entries (default %d) into a throw-away PostgreSQL, or into the "
					"empty database CONNINFO (kept); --reuse: CONNINFO holds the ledger "
					"of an earlier --db run, read and audit it again\n", DEFAULT_ENTRIES);
			return 2;
		}
	}
	tly_log_init(PROG, TLY_LOG_ERROR); /* the workload's bad records are quarantined: expected */
	struct tly_devpg *pg = NULL;
	if (given) {
		snprintf(db, sizeof(db), "%s", given);
	} else {
		if (!(pg = tly_devpg_start(NULL, err, sizeof(err))))
			die("PostgreSQL", err);
		running_pg = pg;
		PGconn *admin = tly_pg_connect(tly_devpg_conninfo(pg), PROG, err, sizeof(err));
		if (!admin || tly_pg_exec_script(admin, "CREATE DATABASE bench_audit", &pe) != 0)
			die("create database", admin ? pe.message : err);
		PQfinish(admin);
		snprintf(db, sizeof(db), "host=%s port=%d user=postgres dbname=bench_audit",
			 tly_devpg_dir(pg), tly_devpg_port(pg));
	}
	PGconn *conn = tly_pg_connect(db, PROG, err, sizeof(err));
	struct tly_migrate_set *set = tly_migrate_load_embedded(err, sizeof(err));
	if (!conn || !set || tly_migrate_up(conn, set, NULL, err, sizeof(err)) != 0)
		die("migrate", err);
	tly_migrate_free(set);

	long records, entries;
	double gen_s = 0;
	if (reuse && given) {
		entries = count(conn, "SELECT count(*) FROM ledger_entries");
		records = count(conn, "SELECT (SELECT count(*) FROM ledger_inputs) + "
				      "(SELECT count(*) FROM quarantine)");
	} else {
		fprintf(stderr, PROG ": writing a ledger of %ld entries\n", target);
		generate(conn, target, &records, &entries, &gen_s);
	}
	if (tly_pg_exec_script(conn, "VACUUM ANALYZE", &pe) != 0)
		die("vacuum", pe.message);
	long inputs = count(conn, "SELECT count(*) FROM ledger_inputs");
	long entries_mb = count(conn, "SELECT pg_total_relation_size('ledger_entries') >> 20");
	long batches = count(conn, "SELECT count(*) FROM ledger_input_batches");
	long inputs_mb = count(conn, "SELECT pg_total_relation_size('ledger_input_batches') >> 20");
	/* what keeping the inputs costs the ledger: the same rows stored again */
	double st0 = now_s();
	if (gen_s > 0 &&
	    tly_pg_exec_script(conn, "CREATE TABLE bench_inputs (LIKE ledger_input_batches INCLUDING ALL); "
				     "INSERT INTO bench_inputs SELECT * FROM ledger_input_batches; "
				     "DROP TABLE bench_inputs", &pe) != 0)
		die("store inputs", pe.message);
	double store_s = now_s() - st0;

	fprintf(stderr, PROG ": reading it raw\n");
	/* raw reads, warm: once to load the cache, then timed */
	long bytes_e, bytes_i;
	copy_out(conn, "COPY ledger_entries TO STDOUT (FORMAT binary)", &bytes_e);
	double raw_cpu0 = tly_proc_cpu_s(PQbackendPID(conn), false);
	double raw_e = copy_out(conn, "COPY ledger_entries TO STDOUT (FORMAT binary)", &bytes_e);
	double raw_cpu = raw_cpu0 < 0 ? -1 : tly_proc_cpu_s(PQbackendPID(conn), false) - raw_cpu0;
	/* the inputs as stored: packed, a partition's records of one group commit in a row */
	copy_out(conn, "COPY ledger_input_batches TO STDOUT (FORMAT binary)", &bytes_i);
	double raw_i = copy_out(conn, "COPY ledger_input_batches TO STDOUT (FORMAT binary)", &bytes_i);

	/* the audit: what tallyctl audit runs, over the same rows, with 1 worker and its default */
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	int jobs_n = cpus > 1 ? (int)cpus : 2;
	struct tly_audit_opts ao = {.from_seq = 0, .to_seq = INT64_MAX, .from_time = INT64_MIN,
				    .to_time = INT64_MAX};
	struct tly_audit_counts c, c1;
	double audit_s = 0, audit1_s = 0;
	double cpu_v = -1, cpu_pg = -1; /* CPU of the audit with jobs_n workers: verifier, server */
	pid_t postmaster = tly_proc_parent(PQbackendPID(conn)); /* a local server: else no CPU figures */
	fprintf(stderr, PROG ": auditing it\n");
	for (int jobs = 1; jobs <= jobs_n; jobs += jobs_n - 1) {
		struct tly_audit_pg_opts po = {.conninfo = db, .events_topic = "tally.events",
					       .jobs = jobs};
		double v0 = cpu_self(), pg0 = tly_proc_cpu_s(postmaster, true);
		double at0 = now_s();
		if (tly_audit_pg_run(&ao, &po, jobs == 1 ? &c1 : &c, &pe) != 0)
			die("audit", pe.message);
		*(jobs == 1 ? &audit1_s : &audit_s) = now_s() - at0;
		cpu_v = cpu_self() - v0;
		usleep(300000); /* the workers' backends end and are reaped by the postmaster */
		cpu_pg = pg0 < 0 ? -1 : tly_proc_cpu_s(postmaster, true) - pg0;
	}
	if (c.failures != 0 || c.entries != entries || c1.failures != 0)
		fprintf(stderr, PROG ": the audit FAILED: %" PRId64 " failures over %" PRId64
			" of %ld entries\n", c.failures, c.entries, entries);

	double audit_rate = (double)c.entries / audit_s, raw_rate = (double)entries / raw_e;
	double audit1_rate = (double)c1.entries / audit1_s;
	double both_rate = (double)entries / (raw_e + raw_i);
	printf("\nAudit (%ld cores shared; throw-away PostgreSQL 15, unix socket, data in cache)\n", cpus);
	printf("workload: tally-loadgen model, %d tenants, %d partitions, 2%% duplicates, 1%% bad, "
	       "through tally-ledger's batch step in process (%d records per group commit)\n",
	       TENANTS, PARTITIONS, BATCH_RECORDS);
	if (gen_s > 0) {
		printf("ledger written                        %10ld entries from %ld input records "
		       "(%ld applied, kept in %ld rows of ledger_input_batches) in %.1f s: %.0f "
		       "records/s\n", entries, records, inputs, batches, gen_s, (double)records / gen_s);
		printf("keeping the inputs                    ledger_input_batches %ld MiB beside "
		       "ledger_entries %ld MiB; storing those rows again takes %.2f s (%.0f%% of the "
		       "write time above)\n",
		       inputs_mb, entries_mb, store_s, 100 * store_s / gen_s);
	} else {
		printf("ledger of an earlier run (--reuse)    %10ld entries from %ld input records "
		       "(%ld applied, kept in %ld rows of ledger_input_batches)\n", entries, records,
		       inputs, batches);
	}
	printf("raw read, COPY ledger_entries binary  %10.0f entries/s  (%.2f s, %.0f MiB)\n",
	       raw_rate, raw_e, (double)bytes_e / (1 << 20));
	printf("raw read, COPY ledger_input_batches   %10.0f inputs/s   (%.2f s, %.0f MiB; binary)\n",
	       (double)inputs / raw_i, raw_i, (double)bytes_i / (1 << 20));
	printf("raw read, entries + inputs            %10.0f entries/s  (%.2f s: the rows the audit "
	       "reads)\n", both_rate, raw_e + raw_i);
	printf("audit (re-execution of every input, chain, identities, holds, offsets; binary COPY "
	       "of inputs and entries in (partition, offset) order):\n");
	printf("  1 worker                            %10.0f entries/s  (%.2f s; %" PRId64
	       " proved by re-execution, %" PRId64 " failures)\n",
	       audit1_rate, audit1_s, c1.reexecuted, c1.failures);
	printf("  %d workers (the default: one a CPU)  %10.0f entries/s  (%.2f s; %" PRId64
	       " proved by re-execution, %" PRId64 " failures)\n",
	       jobs_n, audit_rate, audit_s, c.reexecuted, c.failures);
	printf("audit vs raw read of the entries:     %5.1f%% with %d workers, %.1f%% with 1 "
	       "(the target: >= 50%%, %s)\n",
	       100 * audit_rate / raw_rate, jobs_n, 100 * audit1_rate / raw_rate,
	       audit_rate >= raw_rate / 2 ? "met" : "not met");
	printf("audit vs raw read of entries+inputs:  %5.1f%% with %d workers, %.1f%% with 1\n",
	       100 * audit_rate / both_rate, jobs_n, 100 * audit1_rate / both_rate);
	if (raw_cpu >= 0 && cpu_pg >= 0)
		printf("CPU (the machine is shared: judge by these): raw read of the entries %.2f s in "
		       "the server; audit with %d workers %.2f s in the verifier + %.2f s in the server "
		       "= %.2f s, %.1fx the raw read's\n",
		       raw_cpu, jobs_n, cpu_v, cpu_pg, cpu_v + cpu_pg, (cpu_v + cpu_pg) / raw_cpu);
	else
		printf("CPU: audit with %d workers %.2f s in the verifier (the server's is not readable "
		       "from here)\n", jobs_n, cpu_v);
	printf("tally.ledger: not read here (the dev broker keeps about 5 MiB per partition, far "
	       "less than these entries)\n");
	PQfinish(conn);
	if (pg)
		tly_devpg_stop(pg);
	return c.failures == 0 ? 0 : 1;
}
