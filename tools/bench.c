/*
 * tally-bench (make bench): decisions per second end to end, side by side in one run with the
 * seeds' design (per deduction: BEGIN; SELECT ... FOR UPDATE; UPDATE; INSERT usage; COMMIT, from 8
 * concurrent clients), plus the rate of a bare librdkafka consumer on the same topic and the
 * publish -> committed decision latency at half the ledger's rate. PostgreSQL runs with fsync,
 * full_page_writes and synchronous_commit on.
 */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <libpq-fe.h>

#include "clock.h"
#include "cli.h"
#include "codec.h"
#include "config.h"
#include "devpg.h"
#include "event.h"
#include "kafka.h"
#include "log.h"
#include "migrate.h"
#include "pg.h"
#include "proc.h"
#include "producer.h"

#define CLIENTS 8
#define SEEDS_SECONDS 5
#define PARTITIONS 12 /* of every topic of each run's dev broker, unless --partitions */
#define FETCH_WAIT_MS "10" /* tally-ledger's fetch.wait.max.ms on the mock cluster (see start_ledger) */
/*
 * fetch.wait.max.ms of the latency run's reader of tally.ledger. The mock holds a fetch that found
 * nothing for the whole wait, even when data comes meanwhile (Apache Kafka answers as soon as it
 * has fetch.min.bytes); entries come in bursts after each COMMIT, so most of the reader's
 * fetches find nothing and every burst waited on average half the hold: a 2 ms hold measures
 * closer to what a reader of a real broker sees, for some more empty fetches.
 */
#define READ_WAIT_MS "2"
/*
 * linger.ms of the latency run's producer (the gateway publishing reservations at tens of
 * thousands a second): twice librdkafka's default of 5 (the Java client's since Kafka 4.0), as a
 * producer tuned for throughput sets it. The latency is measured from before the publish, so the
 * wait is part of every figure. Each linger ends one batch per partition, and every batch costs
 * a produce request, a fetch by tally-ledger and, on the mock cluster, a walk of the partition's
 * batches from the oldest (librdkafka 2.0.2, rd_kafka_mock_msgset_find): at 22,000/s over 12
 * partitions that walk alone was a quarter of a core by the end of a run with linger 5, and it
 * grows with the square of the batches. --linger-ms sets another (5: the setting before).
 */
#define LINGER_MS 10
#define READ_MAX 512 /* ledger entries the latency run takes from its consumer's queue in one call */
/* model calls (two decisions each) of the 1,000-tenant and the hot-tenant runs, unless --calls-* */
#define CALLS_MANY 60000
#define CALLS_HOT 12000
#define STR_(x) #x
#define STR(x) STR_(x) /* a number's digits, for the help text */

static int64_t wall_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/*
 * What the bench started and has not stopped yet, for die() to stop before it exits: the
 * throw-away PostgreSQL, the run's dev broker and its directory, the run's tally-ledger.
 */
struct stack;
static void stack_stop(struct stack *s);
static struct {
	struct tly_devpg *pg;
	struct stack *stack;
	pid_t ledger; /* 0: none */
} running;
static pthread_mutex_t dying = PTHREAD_MUTEX_INITIALIZER;

static void die(const char *what, const char *why)
{
	/* the seeds' clients die on their threads: the first one stops everything, the rest wait */
	pthread_mutex_lock(&dying);
	tly_proc_stop(running.ledger, 10000);
	if (running.stack)
		stack_stop(running.stack);
	tly_devpg_stop(running.pg);
	/* last: librdkafka's threads may log about the stopped broker meanwhile */
	fprintf(stderr, "tally-bench: %s: %s\n", what, why);
	exit(1);
}

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* ---- the seeds' design ---------------------------------------------------------------------- */

struct seeds_arg {
	const char *conninfo;
	int tenants;
	int seed;
	double until;
	long done;
};

static void *seeds_client(void *p)
{
	struct seeds_arg *a = p;
	char err[512];
	PGconn *conn = tly_pg_connect(a->conninfo, "seeds-client", err, sizeof(err));
	if (!conn)
		die("seeds client", err);
	uint64_t rng = (uint64_t)a->seed;
	while (tly_clock_s() < a->until) {
		char tenant[16], amount[16] = "10";
		snprintf(tenant, sizeof(tenant), "%d", (int)(splitmix(&rng) % (uint64_t)a->tenants));
		const char *params[] = {tenant, amount};
		struct tly_pg_error pe;
		if (tly_pg_begin(conn, &pe) != 0)
			die("seeds begin", pe.message);
		PGresult *r = tly_pg_query(conn,
					   "SELECT tokens_remaining FROM subscriptions WHERE tenant = $1 FOR UPDATE",
					   1, params, &pe);
		if (!r)
			die("seeds select", pe.message);
		long remaining = atol(PQgetvalue(r, 0, 0));
		PQclear(r);
		if (remaining >= 10) {
			if (tly_pg_exec(conn,
					"UPDATE subscriptions SET tokens_used = tokens_used + $2, "
					"tokens_remaining = tokens_remaining - $2 WHERE tenant = $1",
					2, params, &pe) != 0 ||
			    tly_pg_exec(conn,
					"INSERT INTO api_usage_seed (tenant, provider, model, total_tokens, cost_micros) "
					"VALUES ($1, 'openai', 'gpt-4o', $2, 100)",
					2, params, &pe) != 0)
				die("seeds update", pe.message);
		}
		if (tly_pg_commit(conn, &pe) != 0)
			die("seeds commit", pe.message);
		a->done++;
	}
	PQfinish(conn);
	return NULL;
}

/* Deductions per second of the seeds' design on `tenants` subscription rows. */
static double bench_seeds(const char *conninfo, int tenants)
{
	char err[512];
	struct tly_pg_error pe;
	PGconn *conn = tly_pg_connect(conninfo, "tally-bench", err, sizeof(err));
	if (!conn)
		die("connect", err);
	if (tly_pg_exec_script(conn,
			       "DROP TABLE IF EXISTS subscriptions, api_usage_seed;"
			       "CREATE TABLE subscriptions (tenant int PRIMARY KEY, tokens_used bigint NOT NULL,"
			       " tokens_remaining bigint NOT NULL);"
			       "CREATE TABLE api_usage_seed (id bigserial PRIMARY KEY, tenant int NOT NULL,"
			       " provider text, model text, total_tokens bigint, cost_micros bigint,"
			       " created_at timestamptz DEFAULT now());",
			       &pe) != 0)
		die("seeds schema", pe.message);
	char n[16];
	snprintf(n, sizeof(n), "%d", tenants);
	const char *params[] = {n};
	if (tly_pg_exec(conn,
			"INSERT INTO subscriptions SELECT g, 0, 1000000000000 FROM generate_series(0, $1::int - 1) g",
			1, params, &pe) != 0)
		die("seeds rows", pe.message);
	PQfinish(conn);

	pthread_t th[CLIENTS];
	struct seeds_arg args[CLIENTS];
	double start = tly_clock_s();
	for (int i = 0; i < CLIENTS; i++) {
		args[i] = (struct seeds_arg){conninfo, tenants, i + 1, start + SEEDS_SECONDS, 0};
		pthread_create(&th[i], NULL, seeds_client, &args[i]);
	}
	long total = 0;
	for (int i = 0; i < CLIENTS; i++) {
		pthread_join(th[i], NULL);
		total += args[i].done;
	}
	return (double)total / (tly_clock_s() - start);
}

/* ---- Tally ------------------------------------------------------------------------------------ */

struct stack {
	pid_t broker;
	char dir[64];
	char bootstraps[512];
	struct tly_config *cfg;
};

static int brokers = 3; /* --brokers: of each run's dev broker */
static int partitions = PARTITIONS; /* --partitions: of every topic of each run's dev broker */
static const char *ledger_fetch_wait = FETCH_WAIT_MS; /* --ledger-fetch-wait-ms: tally-ledger's */
static const char *read_wait = READ_WAIT_MS; /* --read-wait-ms: the latency run's reader's */

static void stack_start(struct stack *s, const char *db)
{
	char err[512], exe[PATH_MAX], boot[128], parts[8], nbrokers[8];
	snprintf(s->dir, sizeof(s->dir), "/tmp/tally-bench-XXXXXX");
	s->broker = -1;
	s->cfg = NULL;
	if (!mkdtemp(s->dir))
		die("mkdtemp", strerror(errno));
	running.stack = s;
	tly_proc_sibling("tally-devbroker", exe, sizeof(exe));
	snprintf(boot, sizeof(boot), "%s/bootstrap", s->dir);
	snprintf(parts, sizeof(parts), "%d", partitions);
	snprintf(nbrokers, sizeof(nbrokers), "%d", brokers);
	char log[128];
	snprintf(log, sizeof(log), "%s/broker.log", s->dir);
	char *argv[] = {exe, "--partitions", parts, "--brokers", nbrokers, "--bootstrap-file", boot, NULL};
	if ((s->broker = tly_proc_spawn(argv, log, err, sizeof(err))) < 0)
		die("tally-devbroker", err);
	if (tly_proc_wait_file(boot, 10000) != 0)
		die("tally-devbroker", "did not start");
	FILE *f = fopen(boot, "r");
	if (!f || !fgets(s->bootstraps, sizeof(s->bootstraps), f))
		die("bootstrap file", "unreadable");
	fclose(f);
	s->bootstraps[strcspn(s->bootstraps, "\n")] = '\0';
	s->cfg = tly_config_new();
	if (tly_config_set(s->cfg, "kafka.bootstrap.servers", s->bootstraps, err, sizeof(err)) != 0 ||
	    tly_config_set(s->cfg, "database.url", db, err, sizeof(err)) != 0)
		die("config", err);
}

static bool keep_logs; /* --keep: leave each run's directory (broker and ledger logs) behind */

static void stack_stop(struct stack *s)
{
	running.stack = NULL;
	tly_proc_stop(s->broker, 5000);
	tly_config_free(s->cfg);
	if (keep_logs) {
		fprintf(stderr, "tally-bench: logs kept in %s\n", s->dir);
		return;
	}
	char *rm[] = {"rm", "-rf", s->dir, NULL};
	(void)tly_proc_run(rm, NULL, 0);
}

static void uuid_n(tly_uuid *u, uint64_t a, uint64_t b)
{
	/*
	 * b's low 7 bytes after the variant's byte, least significant first: a b that differs only
	 * in its top bits (big-endian) would leave uuidmap's low hash bits alike for every id.
	 */
	for (int i = 0; i < 8; i++)
		u->b[i] = (unsigned char)(a >> (8 * i));
	u->b[8] = 0;
	for (int i = 0; i < 7; i++)
		u->b[9 + i] = (unsigned char)(b >> (8 * i));
	u->b[6] = (unsigned char)((u->b[6] & 0x0F) | 0x40);
	u->b[8] = (unsigned char)((u->b[8] & 0x3F) | 0x80);
	if (tly_uuid_is_nil(u))
		u->b[15] = 1;
}

/*
 * Publish subscriptions for `tenants` tenants, then n model calls spread over them: a reservation,
 * and 20 calls later its settlement (both are decisions), as an LLM gateway would.
 */
static void publish_workload(struct stack *s, int tenants, long n, int64_t t0)
{
	char err[512];
	struct tly_producer *p = tly_producer_new(s->cfg, NULL, NULL, err, sizeof(err));
	if (!p)
		die("producer", err);
	struct tly_event ev = {0};
	for (int t = 0; t < tenants; t++) {
		tly_event_init(&ev, TLY_EV_SUBSCRIPTION_STARTED);
		uuid_n(&ev.event_id, 1, (uint64_t)t);
		uuid_n(&ev.tenant_id, 2, (uint64_t)t);
		ev.occurred_at = t0;
		struct tly_ev_subscription_started *e = &ev.u.subscription_started;
		uuid_n(&e->subscription_id, 3, (uint64_t)t);
		e->terms = (struct tly_plan_terms){"pro", 1000000000000LL, "year", 10, 9900, "USD",
						   {false, 0}, 0, {NULL, 0}};
		e->period_start = t0;
		e->period_end = t0 + 3650LL * 86400 * 1000000;
		e->seat_count = 1;
		e->auto_renew = true;
		if (tly_producer_publish(p, &ev, NULL, err, sizeof(err)) != 0)
			die("publish", err);
	}
	uint64_t rng = 42;
	uint64_t *tenant_of = calloc((size_t)n + 1, sizeof(*tenant_of));
	if (!tenant_of)
		die("publish", "out of memory");
	for (long i = 0; i < n + 20; i++) {
		if (i < n) {
			tly_event_init(&ev, TLY_EV_TOKENS_RESERVED);
			uuid_n(&ev.event_id, 4, (uint64_t)i);
			tenant_of[i] = splitmix(&rng) % (uint64_t)tenants;
			uuid_n(&ev.tenant_id, 2, tenant_of[i]);
			ev.occurred_at = t0 + i;
			uuid_n(&ev.u.tokens_reserved.reservation_id, 5, (uint64_t)i);
			ev.u.tokens_reserved.tokens = 2000;
			ev.u.tokens_reserved.expires_at = t0 + 3600LL * 1000000;
			ev.u.tokens_reserved.model = "gpt-4o";
			if (tly_producer_publish(p, &ev, NULL, err, sizeof(err)) != 0)
				die("publish", err);
		}
		long j = i - 20;
		if (j >= 0 && j < n) {
			tly_event_init(&ev, TLY_EV_RESERVATION_SETTLED);
			uuid_n(&ev.event_id, 8, (uint64_t)j);
			uuid_n(&ev.tenant_id, 2, tenant_of[j]);
			ev.occurred_at = t0 + i;
			uuid_n(&ev.u.reservation_settled.reservation_id, 5, (uint64_t)j);
			ev.u.reservation_settled.provider = "openai";
			ev.u.reservation_settled.model = "gpt-4o";
			ev.u.reservation_settled.prompt_tokens = 900;
			ev.u.reservation_settled.completion_tokens = 400;
			ev.u.reservation_settled.reasoning_tokens = 100;
			ev.u.reservation_settled.cost_micros = 2100;
			if (tly_producer_publish(p, &ev, NULL, err, sizeof(err)) != 0)
				die("publish", err);
		}
		if (i % 1000 == 0)
			tly_producer_poll(p, 0);
	}
	free(tenant_of);
	if (tly_producer_flush(p, 60000) != 0)
		die("publish", "flush timed out");
	tly_producer_free(p, 10000);
	tly_event_free(&ev);
}

/*
 * Messages per second a bare librdkafka consumer reads tally.events from the beginning; -1 if the
 * dev broker no longer has the backlog's first records.
 */
static double bench_bare_consumer(struct stack *s, long expect)
{
	char err[512];
	rd_kafka_conf_t *conf = tly_kafka_conf_new(s->cfg, err, sizeof(err));
	if (!conf || tly_kafka_conf_set(conf, "auto.offset.reset", "earliest", err, sizeof(err)) != 0)
		die("consumer conf", err);
	rd_kafka_t *rk = tly_kafka_consumer_new(conf, "bench-bare", err, sizeof(err));
	if (!rk)
		die("consumer", err);
	rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(partitions);
	for (int i = 0; i < partitions; i++) {
		/*
		 * The mock cluster keeps about 5 MB a partition and drops the oldest batches beyond: the
		 * ledger would start past them, and the stored offsets would still add up to the total.
		 */
		int64_t low, high;
		if (rd_kafka_query_watermark_offsets(rk, "tally.events", i, &low, &high, 10000) !=
		    RD_KAFKA_RESP_ERR_NO_ERROR)
			die("bare consumer", "could not read the offsets of tally.events");
		if (low > 0) {
			fprintf(stderr, "tally-bench: the dev broker dropped offsets 0..%" PRId64 " of partition %d "
				"of tally.events (%" PRId64 " records): fewer model calls\n", low - 1, i, high);
			rd_kafka_topic_partition_list_destroy(parts);
			tly_kafka_consumer_destroy(rk);
			return -1;
		}
		rd_kafka_topic_partition_list_add(parts, "tally.events", i)->offset = RD_KAFKA_OFFSET_BEGINNING;
	}
	if (rd_kafka_assign(rk, parts) != RD_KAFKA_RESP_ERR_NO_ERROR)
		die("assign", "failed");
	rd_kafka_topic_partition_list_destroy(parts);
	long got = 0;
	double first = 0, last = 0, give_up = tly_clock_s() + 60;
	while (got < expect && tly_clock_s() < give_up) {
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
		if (!m)
			continue;
		if (!m->err) {
			if (got++ == 0)
				first = tly_clock_s();
			last = tly_clock_s();
		}
		rd_kafka_message_destroy(m);
	}
	tly_kafka_consumer_destroy(rk);
	return got > 1 ? (double)(got - 1) / (last - first) : 0;
}

static long committed_offsets(PGconn *conn)
{
	struct tly_pg_error pe;
	PGresult *r = tly_pg_query(conn,
				   "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
				   "WHERE consumer = 'tally-ledger' AND topic = 'tally.events'",
				   0, NULL, &pe);
	if (!r)
		die("offsets", pe.message);
	long v = atol(PQgetvalue(r, 0, 0));
	PQclear(r);
	return v;
}

/* PostgreSQL's WAL insert position, in bytes. */
static double wal_lsn(PGconn *conn)
{
	struct tly_pg_error pe;
	PGresult *r = tly_pg_query(conn, "SELECT pg_current_wal_lsn() - '0/0'", 0, NULL, &pe);
	if (!r)
		die("wal position", pe.message);
	double v = atof(PQgetvalue(r, 0, 0));
	PQclear(r);
	return v;
}

static pid_t start_ledger(struct stack *s, const char *db, const char *log)
{
	char err[512], exe[PATH_MAX];
	tly_proc_sibling("tally-ledger", exe, sizeof(exe));
	setenv("TALLY_DATABASE_URL", db, 1);
	setenv("TALLY_KAFKA_BOOTSTRAP_SERVERS", s->bootstraps, 1);
	/* The mock cluster answers a fetch only after fetch.wait.max.ms (500 ms by default) when it
	 * has little data; Apache Kafka answers as soon as fetch.min.bytes are there. */
	setenv("TALLY_KAFKA_FETCH_WAIT_MAX_MS", ledger_fetch_wait, 1);
	setenv("TALLY_HTTP_LISTEN", "127.0.0.1:0", 0); /* never collide with a running daemon */
	char *argv[] = {exe, NULL};
	pid_t pid = tly_proc_spawn(argv, log, err, sizeof(err));
	if (pid < 0)
		die("tally-ledger", err);
	running.ledger = pid;
	return pid;
}

static void stop_ledger(pid_t pid)
{
	running.ledger = 0;
	tly_proc_stop(pid, 10000);
}

static char *fresh_db(struct tly_devpg *pg, const char *name)
{
	char err[512];
	struct tly_pg_error pe;
	PGconn *admin = tly_pg_connect(tly_devpg_conninfo(pg), "tally-bench", err, sizeof(err));
	if (!admin)
		die("connect", err);
	char sql[128];
	snprintf(sql, sizeof(sql), "CREATE DATABASE %s", name); /* a fixed identifier, not a value */
	if (tly_pg_exec_script(admin, sql, &pe) != 0)
		die("create database", pe.message);
	PQfinish(admin);
	char *info = malloc(1024);
	snprintf(info, 1024, "host=%s port=%d user=postgres dbname=%s", tly_devpg_dir(pg),
		 tly_devpg_port(pg), name);
	PGconn *conn = tly_pg_connect(info, "tally-bench", err, sizeof(err));
	struct tly_migrate_set *set = tly_migrate_load_embedded(err, sizeof(err));
	if (!conn || !set || tly_migrate_up(conn, set, NULL, err, sizeof(err)) != 0)
		die("migrate", err);
	tly_migrate_free(set);
	PQfinish(conn);
	return info;
}

/* CPU spent per record committed in a throughput run, of each process that does the work. */
struct ledger_cpu {
	double ledger_us;  /* tally-ledger, every thread */
	double writer_us;  /* the PostgreSQL backends of its writer connections (the COPYs and COMMITs) */
	double pg_us;      /* every PostgreSQL process (the writer, the "seen" lookups, WAL, checkpoints) */
	double wal_bytes;  /* WAL written a record */
};

/* ledger.writers' upper bound (lib/config.c), two connections a lane (consumers/ledger_writer.c) */
#define WRITERS_MAX (2 * 16)

/* The PostgreSQL backends of tally-ledger's writer lanes (two a lane). */
struct writer_pids {
	pid_t pid[WRITERS_MAX];
	int n;
};

/* The writers' backends (application_name of consumers/ledger_writer.h); n is 0 if none yet. */
static struct writer_pids writer_backends(PGconn *conn)
{
	struct tly_pg_error pe;
	struct writer_pids w = {.n = 0};
	PGresult *r = tly_pg_query(conn,
				   "SELECT pid FROM pg_stat_activity WHERE application_name = 'tally-ledger writer'",
				   0, NULL, &pe);
	if (!r)
		die("pg_stat_activity", pe.message);
	for (int i = 0; i < PQntuples(r) && w.n < WRITERS_MAX; i++)
		w.pid[w.n++] = (pid_t)atol(PQgetvalue(r, i, 0));
	PQclear(r);
	return w;
}

/* On-CPU microseconds so far of the ledger, its writers' backends and all of PostgreSQL. */
static void ledger_cpu_now(pid_t ledger, const struct writer_pids *w, struct tly_devpg *pg, int64_t us[3])
{
	struct tly_proc_cpu c[3] = {{0}};
	if (tly_proc_cpu_add(ledger, false, &c[0]) != 0 || tly_proc_cpu_add(tly_devpg_pid(pg), true, &c[2]) != 0)
		die("cpu", "could not read /proc");
	for (int i = 0; i < w->n; i++)
		if (tly_proc_cpu_add(w->pid[i], false, &c[1]) != 0)
			die("cpu", "could not read /proc");
	for (int i = 0; i < 3; i++)
		us[i] = c[i].on_cpu_us;
}

/*
 * The commits' times, from tally.ledger: tally-ledger hands a committed batch's entries to its
 * producer right after the COMMIT returned (finish_flight in consumers/ledger_main.c), so an
 * entry's CreateTime (ms) is its commit's time, read the same way for the first commit and the
 * last, with nothing polling PostgreSQL tighter meanwhile. The first commit's entries are read
 * while the run goes (the mock cluster drops a partition's oldest entries beyond about 5 MB),
 * the last commit's after it (the newest entry of each partition).
 */
struct stamps {
	rd_kafka_t *rk;      /* reading tally.ledger from the start, until the first commit is read */
	struct tly_codec *codec;
	struct tly_event entry;
	int64_t first_ms;    /* the earliest CreateTime read, INT64_MAX before any */
	int64_t *cause;      /* per partition: the cause offset of the last entry bearing first_ms */
	long *at_first;      /* per partition: input records whose entries bear first_ms */
};

static void stamps_start(struct stamps *st, struct stack *s)
{
	char err[512];
	memset(st, 0, sizeof(*st));
	rd_kafka_conf_t *conf = tly_kafka_conf_new(s->cfg, err, sizeof(err));
	if (!conf || tly_kafka_conf_set(conf, "fetch.wait.max.ms", "5", err, sizeof(err)) != 0)
		die("consumer conf", err);
	st->rk = tly_kafka_consumer_new(conf, "bench-stamps", err, sizeof(err));
	st->codec = tly_codec_new(err, sizeof(err));
	st->cause = calloc((size_t)partitions, sizeof(*st->cause));
	st->at_first = calloc((size_t)partitions, sizeof(*st->at_first));
	if (!st->rk || !st->codec || !st->cause || !st->at_first)
		die("commit stamps", err);
	st->first_ms = INT64_MAX;
	rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(partitions);
	for (int i = 0; i < partitions; i++)
		rd_kafka_topic_partition_list_add(parts, "tally.ledger", i)->offset = RD_KAFKA_OFFSET_BEGINNING;
	if (rd_kafka_assign(st->rk, parts) != RD_KAFKA_RESP_ERR_NO_ERROR)
		die("assign", "failed");
	rd_kafka_topic_partition_list_destroy(parts);
}

/* Read what tally.ledger has for up to timeout_ms, keeping the earliest commit's entries. */
static void stamps_read(struct stamps *st, int timeout_ms)
{
	char err[512];
	for (rd_kafka_message_t *m; (m = rd_kafka_consumer_poll(st->rk, timeout_ms)) != NULL;
	     rd_kafka_message_destroy(m)) {
		timeout_ms = 0;
		int p = m->partition;
		int64_t ms = rd_kafka_message_timestamp(m, NULL);
		if (m->err || p < 0 || p >= partitions || ms > st->first_ms)
			continue;
		if (ms < 0 || tly_codec_decode(st->codec, m->payload, m->len, &st->entry, err, sizeof(err)) != 0)
			die("commit stamps", ms < 0 ? "an entry has no timestamp" : err);
		if (ms < st->first_ms) { /* an earlier commit than those read so far */
			st->first_ms = ms;
			memset(st->at_first, 0, (size_t)partitions * sizeof(*st->at_first));
			for (int i = 0; i < partitions; i++)
				st->cause[i] = -1;
		}
		/* a partition's entries come in decision order, those of one cause together */
		if (st->entry.u.ledger_entry.cause_offset != st->cause[p]) {
			st->cause[p] = st->entry.u.ledger_entry.cause_offset;
			st->at_first[p]++;
		}
	}
}

/* Stop reading; the input records the first commit stored (0 if none was read). */
static long stamps_stop(struct stamps *st)
{
	long n = 0;
	for (int i = 0; st->first_ms < INT64_MAX && i < partitions; i++)
		n += st->at_first[i];
	tly_event_free(&st->entry);
	tly_codec_free(st->codec);
	tly_kafka_consumer_destroy(st->rk);
	free(st->cause);
	free(st->at_first);
	st->rk = NULL;
	return n;
}

/* The newest CreateTime on tally.ledger (its last commit's, once the ledger stopped), or -1. */
static int64_t last_stamp(struct stack *s)
{
	char err[512];
	rd_kafka_conf_t *conf = tly_kafka_conf_new(s->cfg, err, sizeof(err));
	if (!conf)
		die("consumer conf", err);
	rd_kafka_t *rk = tly_kafka_consumer_new(conf, "bench-stamps-last", err, sizeof(err));
	if (!rk)
		die("consumer", err);
	rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(partitions);
	int left = 0;
	for (int i = 0; i < partitions; i++) {
		int64_t low, high;
		if (rd_kafka_query_watermark_offsets(rk, "tally.ledger", i, &low, &high, 10000) !=
		    RD_KAFKA_RESP_ERR_NO_ERROR)
			die("commit stamps", "could not read the end offsets of tally.ledger");
		if (high > low) { /* its newest entry only: stamps never go back within a partition */
			rd_kafka_topic_partition_list_add(parts, "tally.ledger", i)->offset = high - 1;
			left++;
		}
	}
	if (rd_kafka_assign(rk, parts) != RD_KAFKA_RESP_ERR_NO_ERROR)
		die("assign", "failed");
	rd_kafka_topic_partition_list_destroy(parts);
	int64_t last = -1;
	for (double give_up = tly_clock_s() + 30; left > 0 && tly_clock_s() < give_up;) {
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
		if (!m)
			continue;
		if (!m->err) {
			int64_t ms = rd_kafka_message_timestamp(m, NULL);
			last = ms > last ? ms : last;
			left--;
		}
		rd_kafka_message_destroy(m);
	}
	tly_kafka_consumer_destroy(rk);
	return left > 0 ? -1 : last;
}

/* A throughput run's figures. */
struct ledger_run {
	double rate;       /* records/s from the first commit to the last, by the commit stamps */
	double window_s;   /* that window */
	double poll_rate;  /* the same from the 20 ms poll of the stored offsets (the figure before) */
	double poll_window_s;
	double half_s[2];  /* by the poll: the first and the second half of the window's records */
	double bare_rate;  /* a bare librdkafka consumer on the same topic */
	bool truncated;    /* the dev broker dropped the backlog's first records: nothing measured */
	struct ledger_cpu cpu;
};

/*
 * Decisions per second of tally-ledger, published -> committed, on a pre-published backlog, and
 * the CPU each process spent per record from the first commit seen to the last.
 */
static void bench_ledger(struct tly_devpg *pg, const char *dbname, int tenants, long n,
			 struct ledger_run *run)
{
	memset(run, 0, sizeof(*run));
	char *db = fresh_db(pg, dbname);
	struct stack s;
	stack_start(&s, db);
	publish_workload(&s, tenants, n, wall_us());
	long total = 2 * n + tenants;
	run->bare_rate = bench_bare_consumer(&s, total);
	if (run->bare_rate < 0) {
		run->truncated = true;
		stack_stop(&s);
		free(db);
		return;
	}
	char err[512], log[128];
	snprintf(log, sizeof(log), "%s/ledger.log", s.dir);
	PGconn *conn = tly_pg_connect(db, "tally-bench", err, sizeof(err));
	if (!conn)
		die("connect", err);
	struct stamps st;
	stamps_start(&st, &s);
	pid_t ledger = start_ledger(&s, db, log);
	double first_t = 0, half_t = 0, end_t = 0, give_up = tly_clock_s() + 600;
	long at_first = -1;
	double wal0 = 0, wal1 = 0;
	long first_v = 0, v = 0;
	struct writer_pids writers = {.n = 0};
	int64_t cpu0[3] = {0}, cpu1[3] = {0};
	while (tly_clock_s() < give_up) {
		v = committed_offsets(conn);
		if (v > 0 && first_t == 0) {
			first_t = tly_clock_s();
			first_v = v;
			wal0 = wal_lsn(conn);
			if ((writers = writer_backends(conn)).n > 0)
				ledger_cpu_now(ledger, &writers, pg, cpu0);
		}
		if (first_t > 0 && half_t == 0 && v - first_v >= (total - first_v) / 2)
			half_t = tly_clock_s();
		if (v >= total) {
			end_t = tly_clock_s();
			wal1 = wal_lsn(conn);
			if (writers.n > 0)
				ledger_cpu_now(ledger, &writers, pg, cpu1);
			break;
		}
		/*
		 * Until the first commit's entries are all in (50 ms after the first read, more than the
		 * ledger's producer waits), this wait is the tally.ledger reader's; then only the poll's.
		 */
		if (st.rk && st.first_ms < INT64_MAX && wall_us() / 1000 > st.first_ms + 50)
			at_first = stamps_stop(&st);
		if (st.rk)
			stamps_read(&st, 20);
		else
			usleep(20000);
	}
	if (st.rk)
		at_first = stamps_stop(&st);
	int64_t first_ms = st.first_ms;
	struct ledger_cpu *cpu = &run->cpu;
	if (writers.n > 0 && v > first_v) {
		cpu->ledger_us = (double)(cpu1[0] - cpu0[0]) / (double)(v - first_v);
		cpu->writer_us = (double)(cpu1[1] - cpu0[1]) / (double)(v - first_v);
		cpu->pg_us = (double)(cpu1[2] - cpu0[2]) / (double)(v - first_v);
		cpu->wal_bytes = (wal1 - wal0) / (double)(v - first_v);
	}
	stop_ledger(ledger);
	PQfinish(conn);
	if (end_t == 0 || end_t <= first_t) {
		fprintf(stderr, "tally-bench: the ledger committed %ld of %ld records (see its log)\n", v, total);
	} else {
		run->poll_window_s = end_t - first_t;
		run->poll_rate = (double)(total - first_v) / run->poll_window_s;
		run->half_s[0] = half_t - first_t;
		run->half_s[1] = end_t - half_t;
		int64_t last_ms = last_stamp(&s);
		if (at_first <= 0 || last_ms <= first_ms) {
			fprintf(stderr, "tally-bench: could not read the commits' times from tally.ledger: "
				"the poll's figure stands\n");
			run->window_s = run->poll_window_s;
			run->rate = run->poll_rate;
		} else {
			run->window_s = (double)(last_ms - first_ms) / 1000.0;
			run->rate = (double)(total - at_first) / run->window_s;
		}
	}
	stack_stop(&s);
	free(db);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/*
 * Latency from publish to the committed decision, at `rate` reservations/s over 1,000 tenants:
 * the ledger runs first (group joined, caught up), then reservations carry their publish time as
 * occurred_at; the entry's ledger_time is that time, and the bench reads each hold_placed entry
 * from tally.ledger, which the ledger publishes only after the commit.
 */
/* Percentiles of publish -> read back, split at the moment tally-ledger produced the entry. */
struct latency {
	double p50, p99;         /* publish -> the bench read the entry from tally.ledger */
	double in_p50, in_p99;   /* publish -> tally-ledger produced it (fetch, batch, decide, COMMIT) */
	double out_p50, out_p99; /* produced -> read (its producer, the broker, the bench's fetch) */
	long samples;
	struct tly_proc_cpu cpu[4]; /* over the measured 5 s, of each of cpu_names */
	double wall_s, busy_s;      /* that window's length, and the machine's busy CPU time in it */
};

static const char *const cpu_names[] = {"tally-ledger", "PostgreSQL", "dev broker", "tally-bench"};

/* Scheduler time so far of the processes in the latency run (cpu_names' order). */
static void cpu_snapshot(pid_t ledger, struct tly_devpg *pg, pid_t broker, struct tly_proc_cpu *cpu)
{
	memset(cpu, 0, 4 * sizeof(*cpu));
	if (tly_proc_cpu_add(ledger, false, &cpu[0]) != 0 ||
	    tly_proc_cpu_add(tly_devpg_pid(pg), true, &cpu[1]) != 0 ||
	    tly_proc_cpu_add(broker, false, &cpu[2]) != 0 || tly_proc_cpu_add(getpid(), false, &cpu[3]) != 0)
		die("latency", "could not read /proc");
}

/*
 * CPU seconds the whole machine has spent busy since boot (/proc/stat's first line: user, nice,
 * system, irq, softirq and steal; guest time is inside user). Beside the run's own processes it
 * tells how much other work shared the cores: the tail follows it more than anything in the loop.
 */
static double machine_busy_s(void)
{
	unsigned long long v[8] = {0};
	FILE *f = fopen("/proc/stat", "r");
	if (!f)
		die("latency", "could not open /proc/stat");
	int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
		       &v[4], &v[5], &v[6], &v[7]);
	if (fclose(f) != 0 || n != 8)
		die("latency", "could not read /proc/stat");
	long hz = sysconf(_SC_CLK_TCK);
	if (hz <= 0)
		die("latency", "no clock tick rate");
	/* user nice system [idle iowait] irq softirq steal */
	return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / (double)hz;
}

static void percentiles(double *v, long n, double *p50, double *p99)
{
	qsort(v, (size_t)n, sizeof(double), cmp_double);
	*p50 = n ? v[n / 2] : 0;
	*p99 = n ? v[(long)(n * 0.99)] : 0;
}

/*
 * Before the clock starts: one reservation for each of the first WARM_TENANTS tenants (every
 * partition gets some), flushed, and their decisions read back. The producer then has its
 * idempotent producer id and its connections, and every consumer has fetched from every
 * partition, as in a gateway and a ledger that have been running: otherwise what the producer
 * queued while it started arrives at once, and the backlog it makes lasts past the warm-up.
 */
#define WARM_TENANTS 60

/*
 * Publish reservation n of id space `space` (its event id in space, its reservation id in
 * space + 1) for tenant, stamped with the time of publishing: the latency run's ledger_time.
 */
static void publish_reservation(struct tly_producer *p, struct tly_event *ev, uint64_t space,
				uint64_t n, uint64_t tenant)
{
	char err[512];
	tly_event_init(ev, TLY_EV_TOKENS_RESERVED);
	uuid_n(&ev->event_id, space, n);
	uuid_n(&ev->tenant_id, 2, tenant);
	ev->occurred_at = wall_us();
	uuid_n(&ev->u.tokens_reserved.reservation_id, space + 1, n);
	ev->u.tokens_reserved.tokens = 100;
	ev->u.tokens_reserved.expires_at = ev->occurred_at + 3600LL * 1000000;
	ev->u.tokens_reserved.model = "gpt-4o";
	if (tly_producer_publish(p, ev, NULL, err, sizeof(err)) != 0)
		die("publish", err);
}

/* A hold_placed entry read from tally.ledger, decoded into entry. */
static bool is_hold_placed(struct tly_codec *codec, const rd_kafka_message_t *m, struct tly_event *entry)
{
	char err[512];
	return !m->err && tly_codec_decode(codec, m->payload, m->len, entry, err, sizeof(err)) == 0 &&
	       strcmp(entry->u.ledger_entry.kind, "hold_placed") == 0;
}

static void warm_up(struct tly_producer *p, rd_kafka_t *rk, struct tly_codec *codec)
{
	struct tly_event ev = {0}, entry = {0};
	for (int i = 0; i < WARM_TENANTS; i++)
		publish_reservation(p, &ev, 9, (uint64_t)i, (uint64_t)i);
	if (tly_producer_flush(p, 30000) != 0)
		die("warm-up", "flush timed out");
	int seen = 0;
	for (double give_up = tly_clock_s() + 30; seen < WARM_TENANTS && tly_clock_s() < give_up;) {
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
		if (!m)
			continue;
		if (is_hold_placed(codec, m, &entry))
			seen++;
		rd_kafka_message_destroy(m);
	}
	if (seen < WARM_TENANTS)
		die("warm-up", "the ledger did not decide the warm-up reservations in 30 s");
	tly_event_free(&ev);
	tly_event_free(&entry);
}

static void bench_latency(struct tly_devpg *pg, double rate, int linger_ms, struct latency *res)
{
	char err[512], log[128];
	char *db = fresh_db(pg, "bench_latency");
	struct stack s;
	stack_start(&s, db);
	publish_workload(&s, 1000, 0, wall_us());
	snprintf(log, sizeof(log), "%s/ledger.log", s.dir);
	pid_t ledger = start_ledger(&s, db, log);
	PGconn *conn = tly_pg_connect(db, "tally-bench", err, sizeof(err));
	if (!conn)
		die("connect", err);
	for (double give_up = tly_clock_s() + 60; committed_offsets(conn) < 1000 && tly_clock_s() < give_up;)
		usleep(20000);

	rd_kafka_conf_t *conf = tly_kafka_conf_new(s.cfg, err, sizeof(err));
	if (!conf)
		die("consumer conf", err);
	if (tly_kafka_conf_set(conf, "fetch.wait.max.ms", read_wait, err, sizeof(err)) != 0)
		die("consumer conf", err);
	rd_kafka_t *rk = tly_kafka_consumer_new(conf, "bench-latency", err, sizeof(err));
	if (!rk)
		die("consumer", err);
	/*
	 * From each partition's end as of now, not RD_KAFKA_OFFSET_END: that is looked up when the
	 * fetcher starts, and under load the warm-up's entries were sometimes there already.
	 */
	rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(partitions);
	for (int i = 0; i < partitions; i++) {
		int64_t low, high;
		if (rd_kafka_query_watermark_offsets(rk, "tally.ledger", i, &low, &high, 10000) !=
		    RD_KAFKA_RESP_ERR_NO_ERROR)
			die("latency", "could not read the end offsets of tally.ledger");
		rd_kafka_topic_partition_list_add(parts, "tally.ledger", i)->offset = high;
	}
	if (rd_kafka_assign(rk, parts) != RD_KAFKA_RESP_ERR_NO_ERROR)
		die("assign", "failed");
	rd_kafka_topic_partition_list_destroy(parts);
	rd_kafka_queue_t *rq = rd_kafka_queue_get_consumer(rk);
	if (!rq)
		die("consumer", "no consumer queue");

	char linger[16];
	snprintf(linger, sizeof(linger), "%d", linger_ms);
	if (tly_config_set(s.cfg, "kafka.linger.ms", linger, err, sizeof(err)) != 0)
		die("config", err);
	struct tly_producer *p = tly_producer_new(s.cfg, NULL, NULL, err, sizeof(err));
	struct tly_codec *codec = tly_codec_new(err, sizeof(err));
	if (!p || !codec)
		die("producer", err);
	warm_up(p, rk, codec);
	/* 1 s at the rate before measuring (the pipeline reaches its pace), then 5 s measured */
	long n = (long)(rate * 5), total = (long)(rate * 6);
	int64_t measure_from = wall_us() + 1000000;
	double *lat = calloc((size_t)n + 1, sizeof(double));
	double *lat_in = calloc((size_t)n + 1, sizeof(double));
	double *lat_out = calloc((size_t)n + 1, sizeof(double));
	if (!lat || !lat_in || !lat_out)
		die("latency", "out of memory");
	/* decided: entries read of this loop's reservations (all accepted), so it ends with the last */
	long got = 0, sent = 0, decided = 0;
	int64_t first_sent = wall_us();
	struct tly_event ev = {0}, entry = {0};
	uint64_t rng = 7;
	double start = tly_clock_s(), drain_until = 0;
	bool measuring = false;
	struct tly_proc_cpu cpu0[4];
	double wall0 = 0, busy0 = 0;
	while (decided < total) {
		double t = tly_clock_s();
		if (!measuring && wall_us() >= measure_from) {
			measuring = true;
			cpu_snapshot(ledger, pg, s.broker, cpu0);
			wall0 = tly_clock_s();
			busy0 = machine_busy_s();
		}
		while (sent < total && sent < (long)((t - start) * rate)) {
			publish_reservation(p, &ev, 6, (uint64_t)sent, splitmix(&rng) % 1000);
			sent++;
		}
		tly_producer_poll(p, 0);
		if (sent == total && drain_until == 0)
			drain_until = tly_clock_s() + 30;
		if (drain_until && tly_clock_s() > drain_until)
			break;
		/* one wait for the first entry, then every entry already read in one call */
		rd_kafka_message_t *msgs[READ_MAX];
		msgs[0] = rd_kafka_consumer_poll(rk, 1);
		if (!msgs[0])
			continue;
		ssize_t k = rd_kafka_consume_batch_queue(rq, 0, msgs + 1, READ_MAX - 1);
		int64_t now = wall_us();
		for (ssize_t i = 0; i < 1 + (k > 0 ? k : 0); i++) {
			rd_kafka_message_t *m = msgs[i];
			bool hold = is_hold_placed(codec, m, &entry);
			decided += hold && entry.u.ledger_entry.ledger_time >= first_sent;
			if (hold && entry.u.ledger_entry.ledger_time >= measure_from && got < n) {
				int64_t published = entry.u.ledger_entry.ledger_time;
				/* the entry's CreateTime: when tally-ledger handed it to its producer, after COMMIT */
				int64_t out_ms = rd_kafka_message_timestamp(m, NULL);
				lat[got] = (double)(now - published) / 1000.0;
				lat_in[got] = (double)(out_ms * 1000 - published) / 1000.0;
				lat_out[got] = (double)(now - out_ms * 1000) / 1000.0;
				got++;
			}
			rd_kafka_message_destroy(m);
		}
	}
	rd_kafka_queue_destroy(rq);
	cpu_snapshot(ledger, pg, s.broker, res->cpu);
	res->wall_s = tly_clock_s() - wall0;
	res->busy_s = machine_busy_s() - busy0;
	for (int i = 0; i < 4; i++) {
		res->cpu[i].on_cpu_us -= cpu0[i].on_cpu_us;
		res->cpu[i].waiting_us -= cpu0[i].waiting_us;
	}
	res->samples = got;
	percentiles(lat, got, &res->p50, &res->p99);
	percentiles(lat_in, got, &res->in_p50, &res->in_p99);
	percentiles(lat_out, got, &res->out_p50, &res->out_p99);
	free(lat);
	free(lat_in);
	free(lat_out);
	tly_event_free(&ev);
	tly_event_free(&entry);
	tly_codec_free(codec);
	tly_producer_free(p, 5000);
	tly_kafka_consumer_destroy(rk);
	stop_ledger(ledger);
	PQfinish(conn);
	stack_stop(&s);
	free(db);
}

static const char help[] =
	"Usage: tally-bench [--keep] [--only seeds,many,hot,latency] [--calls-many N] [--calls-hot N]\n"
	"                   [--rate N] [--linger-ms N] [--brokers N] [--partitions N]\n"
	"                   [--ledger-fetch-wait-ms N] [--read-wait-ms N]\n"
	"\n"
	"make bench: tally-ledger's decisions per second end to end (1,000 tenants and one hot tenant),\n"
	"side by side with the seeds' design (SELECT ... FOR UPDATE per deduction, 8 clients) and a bare\n"
	"librdkafka consumer on the same topic, then the publish -> committed decision latency (p50,\n"
	"p99) at half the ledger's rate. Starts its own durable PostgreSQL and dev broker; prints the\n"
	"figures, asserts nothing.\n"
	"\n"
	"  --keep  leave each run's directory (broker and ledger logs) in /tmp\n"
	"  --only  run only the parts named (the ratios need seeds)\n"
	"  --calls-many  model calls (two decisions each) of the 1,000-tenant run (default " STR(CALLS_MANY) ")\n"
	"  --calls-hot  model calls of the hot-tenant run (default " STR(CALLS_HOT) ")\n"
	"  --rate  reservations/s of the latency run (default: half the 1,000-tenant rate)\n"
	"  --linger-ms  linger.ms of the latency run's producer, the gateway (default 10; librdkafka's 5)\n"
	"  --brokers  brokers of each run's dev broker (default 3)\n"
	"  --partitions  partitions of every topic of each run's dev broker (default 12)\n"
	"  --ledger-fetch-wait-ms  tally-ledger's kafka.fetch.wait.max.ms (default " FETCH_WAIT_MS "; the mock\n"
	"           holds a fetch that found nothing this long, even when records come meanwhile)\n"
	"  --read-wait-ms  fetch.wait.max.ms of the latency run's reader of tally.ledger (default " READ_WAIT_MS ")\n";

/* Is part (seeds, many, hot, latency) to run: every part unless --only names others. */
static bool wanted(const char *only, const char *part)
{
	return !only || strstr(only, part) != NULL;
}

int main(int argc, char **argv)
{
	char err[512];
	const char *only = NULL;
	double latency_rate = 0; /* --rate: of the latency run when the 1,000-tenant run is left out */
	int linger_ms = LINGER_MS; /* --linger-ms: of the latency run's producer */
	long calls_many = CALLS_MANY, calls_hot = CALLS_HOT; /* --calls-many, --calls-hot */
	tly_log_init("tally-bench", TLY_LOG_WARN);
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--keep") == 0)
			keep_logs = true;
		else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc)
			only = argv[++i];
		else if (strcmp(argv[i], "--rate") == 0 && i + 1 < argc)
			latency_rate = atof(argv[++i]);
		else if (strcmp(argv[i], "--calls-many") == 0 && i + 1 < argc)
			calls_many = atol(argv[++i]);
		else if (strcmp(argv[i], "--calls-hot") == 0 && i + 1 < argc)
			calls_hot = atol(argv[++i]);
		else if (strcmp(argv[i], "--linger-ms") == 0 && i + 1 < argc)
			linger_ms = atoi(argv[++i]);
		else if (strcmp(argv[i], "--ledger-fetch-wait-ms") == 0 && i + 1 < argc)
			ledger_fetch_wait = argv[++i];
		else if (strcmp(argv[i], "--read-wait-ms") == 0 && i + 1 < argc)
			read_wait = argv[++i];
		else if (strcmp(argv[i], "--brokers") == 0 && i + 1 < argc)
			brokers = atoi(argv[++i]);
		else if (strcmp(argv[i], "--partitions") == 0 && i + 1 < argc)
			partitions = atoi(argv[++i]);
		else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
			fputs(help, stdout);
			return 0;
		} else {
			fprintf(stderr, "tally-bench: unexpected argument \"%s\"\n%s", argv[i], help);
			return 2;
		}
	}
	if (partitions < 1 || partitions > 1000) { /* tally-devbroker's bounds */
		fprintf(stderr, "tally-bench: --partitions must be 1..1000, not %d\n%s", partitions, help);
		return 2;
	}
	if (calls_many < 1 || calls_many > 10000000 || calls_hot < 1 || calls_hot > 10000000) {
		fprintf(stderr, "tally-bench: --calls-many and --calls-hot must be 1..10000000\n%s", help);
		return 2;
	}
	if (brokers < 1 || brokers > 32) {
		fprintf(stderr, "tally-bench: --brokers must be 1..32, not %d\n%s", brokers, help);
		return 2;
	}
	printf("Tally benchmark (2 cores; PostgreSQL 15 with fsync=on, full_page_writes=on, "
	       "synchronous_commit=on; dev broker with %d brokers, %d partitions;\n"
	       "tally-ledger with default settings but kafka.fetch.wait.max.ms=%s; the latency run's reader's %s;\n"
	       "the latency run's gateway producer linger.ms=%d)\n\n",
	       brokers, partitions, ledger_fetch_wait, read_wait, linger_ms);
	struct tly_devpg *pg = tly_devpg_start_durable(NULL, true, err, sizeof(err));
	if (!pg)
		die("PostgreSQL", err);
	running.pg = pg;
	/* ready WAL segments, as a server in steady state has, for the seeds and the ledger alike: a
	 * fresh cluster zero-fills each new one (2-10% of the ledger writer's backend in a profile) */
	if (tly_devpg_prealloc_wal(pg, err, sizeof(err)) != 0)
		die("PostgreSQL", err);

	double seeds_many = 0, seeds_hot = 0;
	if (wanted(only, "seeds")) {
		seeds_many = bench_seeds(tly_devpg_conninfo(pg), 1000);
		seeds_hot = bench_seeds(tly_devpg_conninfo(pg), 1);
		printf("seeds' design (BEGIN; SELECT ... FOR UPDATE; UPDATE; INSERT usage; COMMIT), %d clients, %d s:\n",
		       CLIENTS, SEEDS_SECONDS);
		printf("  1,000 tenants     %10.0f deductions/s\n", seeds_many);
		printf("  1 hot tenant      %10.0f deductions/s\n\n", seeds_hot);
		fflush(stdout);
	}

	char ledger_exe[PATH_MAX];
	tly_proc_sibling("tally-ledger", ledger_exe, sizeof(ledger_exe));
	if (access(ledger_exe, X_OK) != 0) {
		printf("tally-ledger is not built: no end-to-end figures\n");
		tly_devpg_stop(pg);
		return 1;
	}
	struct ledger_run many = {0}, hot = {0};
	if (wanted(only, "many"))
		bench_ledger(pg, "bench_many", 1000, calls_many, &many);
	if (wanted(only, "hot") && !many.truncated)
		bench_ledger(pg, "bench_hot", 1, calls_hot, &hot);
	if (many.truncated || hot.truncated) {
		tly_devpg_stop(pg);
		return 1;
	}
	double ledger_many = many.rate, ledger_hot = hot.rate;
	printf("tally-ledger, published -> committed in PostgreSQL (a pre-published backlog of model calls:\n"
	       "TokensReserved, then its ReservationSettled 20 calls later; each event is a decision),\n"
	       "from the first commit to the last (their entries' CreateTime on tally.ledger):\n");
	printf("  1,000 tenants     %10.0f decisions/s   %6.1fx the seeds' design   (%ld events, %.2f s)\n",
	       ledger_many, seeds_many > 0 ? ledger_many / seeds_many : 0, 2 * calls_many, many.window_s);
	printf("  1 hot tenant      %10.0f decisions/s   %6.1fx the seeds' design   (%ld events, %.2f s)\n",
	       ledger_hot, seeds_hot > 0 ? ledger_hot / seeds_hot : 0, 2 * calls_hot, hot.window_s);
	printf("  (by the 20 ms poll of the stored offsets: %.0f/s in %.2f s, %.0f/s in %.2f s;\n"
	       "   the first and the second half of the records in %.2f + %.2f s, %.2f + %.2f s)\n\n",
	       many.poll_rate, many.poll_window_s, hot.poll_rate, hot.poll_window_s, many.half_s[0],
	       many.half_s[1], hot.half_s[0], hot.half_s[1]);
	printf("CPU per record committed (from /proc/PID/task/*/schedstat, on a CPU):\n");
	if (wanted(only, "many"))
		printf("  1,000 tenants     tally-ledger %6.1f us   its writers' backends %6.1f us   all of PostgreSQL %6.1f us   (WAL %.0f bytes)\n",
		       many.cpu.ledger_us, many.cpu.writer_us, many.cpu.pg_us, many.cpu.wal_bytes);
	if (wanted(only, "hot"))
		printf("  1 hot tenant      tally-ledger %6.1f us   its writers' backends %6.1f us   all of PostgreSQL %6.1f us   (WAL %.0f bytes)\n",
		       hot.cpu.ledger_us, hot.cpu.writer_us, hot.cpu.pg_us, hot.cpu.wal_bytes);
	printf("\n");
	printf("bare librdkafka consumer on the same topic (the ceiling):\n");
	printf("  1,000 tenants     %10.0f records/s     ledger at %5.1f%% of it\n", many.bare_rate,
	       many.bare_rate > 0 ? 100 * ledger_many / many.bare_rate : 0);
	printf("  1 hot tenant      %10.0f records/s     ledger at %5.1f%% of it\n", hot.bare_rate,
	       hot.bare_rate > 0 ? 100 * ledger_hot / hot.bare_rate : 0);
	double rate = ledger_many > 0 ? ledger_many / 2 : latency_rate;
	if (wanted(only, "latency") && rate > 0) {
		struct latency l;
		/* the runs before filled the WAL: ready segments again, as a server in steady state has */
		if (tly_devpg_prealloc_wal(pg, err, sizeof(err)) != 0)
			die("PostgreSQL", err);
		bench_latency(pg, rate, linger_ms, &l);
		printf("\npublish -> committed decision (read back from tally.ledger), %.0f reservations/s "
		       "(%s; the gateway's linger.ms %d), 5 s after a warm-up and 1 s at the rate:\n"
		       "  p50 %.1f ms   p99 %.1f ms   (%ld samples)\n"
		       "  of which publish -> tally-ledger produced the entry (after COMMIT): p50 %.1f ms   p99 %.1f ms\n"
		       "  and produced -> read from tally.ledger:                            p50 %.1f ms   p99 %.1f ms\n",
		       rate, ledger_many > 0 ? "half the 1,000-tenant rate" : "--rate", linger_ms, l.p50, l.p99,
		       l.samples, l.in_p50, l.in_p99, l.out_p50, l.out_p99);
		printf("  CPU per decision measured (from /proc/PID/task/*/schedstat; waiting: runnable, no CPU free):\n");
		for (int i = 0; i < 4; i++)
			printf("    %-13s %6.1f us on a CPU   %6.1f us waiting for one\n", cpu_names[i],
			       l.samples ? (double)l.cpu[i].on_cpu_us / (double)l.samples : 0,
			       l.samples ? (double)l.cpu[i].waiting_us / (double)l.samples : 0);
		double run_s = 0;
		for (int i = 0; i < 4; i++)
			run_s += (double)l.cpu[i].on_cpu_us / 1e6;
		long cores = sysconf(_SC_NPROCESSORS_ONLN);
		printf("  the machine meanwhile (/proc/stat, %.1f s): %.2f of %ld cores busy, these four "
		       "processes %.2f, other work %.2f\n", l.wall_s, l.wall_s > 0 ? l.busy_s / l.wall_s : 0,
		       cores, l.wall_s > 0 ? run_s / l.wall_s : 0,
		       l.wall_s > 0 ? (l.busy_s - run_s) / l.wall_s : 0);
	}
	tly_devpg_stop(pg);
	return 0;
}
