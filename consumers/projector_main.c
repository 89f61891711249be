/* tally-projector: reads tally.events, tally.ledger and tally.catalog and folds them into the projections. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#include "clock.h"
#include "cli.h"
#include "codec.h"
#include "config.h"
#include "fold.h"
#include "health.h"
#include "http.h"
#include "kafka.h"
#include "lag.h"
#include "log.h"
#include "metrics.h"
#include "migrate.h"
#include "pg.h"
#include "proc.h"
#include "schema.h"

extern char **environ;

#define PROG "tally-projector"
#define CONSUMER_NAME "tally-projector" /* consumer_offsets.consumer */
#define POLL_MS 10
#define BATCH_MAX_RECORDS 20000
#define BATCH_MAX_MS 200
/*
 * Records taken per turn of the loop while they are there: after a poll returned one, the rest
 * in one call (take_ready). The turn's housekeeping (a read of each lane's pending results, the
 * clock, health) runs once per this many records rather than once per record (a recv() per
 * record and lane, about a tenth of the process's CPU on a backlog).
 */
#define DRAIN_MAX 256
#define RETRY_MS 200
#define MAX_BACKOFF_MS 5000
#define METADATA_TIMEOUT_MS 10000
#define N_TOPICS 3
#define LAG_EVERY_MS 250       /* lag gauges from librdkafka's cached high watermarks */
#define PG_CHECK_EVERY_MS 5000 /* while idle: is PostgreSQL still there (for /readyz) */
#define CATALOG 2              /* topics[] index of tally.catalog */
/*
 * Lanes: connections that fold disjoint partitions in parallel, each with its own batches and
 * transactions (rows and the offsets of its partitions, as one process per lane would). Partition
 * p of tally.events and tally.ledger, one tenant's whole input, goes to lane p % N_LANES;
 * tally.catalog (the plans every tenant shares) to lane 0.
 */
#define N_LANES 2

/* One partition of an input topic. */
struct part {
	bool assigned;
	bool seeking;   /* moved back to stored: drop records until the one at next arrives */
	int64_t stored; /* next offset stored in consumer_offsets; -1: none stored */
	int64_t next;   /* next offset after the records in the open batch; -1: any */
	int64_t sending; /* next offset the batch in flight stores once committed; -1: none */
	int lane;        /* the lane that folds it */
	struct tly_series *lag; /* its gauge, hidden while not assigned */
};

struct topic {
	const char *name;
	int32_t count;
	struct part *parts; /* count of them; owned */
	struct tly_series *consumed;
};

/* One connection and its batches: the open one, and the one sent (committing, or idle). */
struct lane {
	PGconn *conn;              /* owned; from start-up, reconnected when lost */
	struct tly_fold *fold;     /* the open batch; owned */
	struct tly_fold *flight;   /* the batch sent, committing (or idle); owned */
	size_t flight_n;           /* its records */
	double flight_s;           /* when it was sent */
	int64_t opened_ms;         /* when the open batch got its first record; 0: empty */
};

#define TICK_MEMO 256 /* is_tick's table: a power of two, well above the registry's schemas */

struct app {
	const char *config_file;          /* -c, NULL: none; reread on SIGHUP with sets */
	char **sets;                      /* the --set arguments (n_sets), borrowed from argv */
	size_t n_sets;
	struct tly_config *cfg;    /* owned */
	const char *database_url;
	struct tly_codec *codec;   /* owned */
	rd_kafka_t *consumer;      /* owned */
	rd_kafka_queue_t *queue;   /* owned: the consumer's queue, read in batches */
	struct lane lanes[N_LANES]; /* lanes[0].conn also reads the stored offsets, checks health */
	struct tly_event ev;       /* decode target, reused; owns its arena */
	struct tick_memo {
		uint64_t fp;
		bool known, tick;
	} tick_memo[TICK_MEMO]; /* is_tick's answers by fingerprint, linear probing, never evicted */
	size_t n_tick_memo;
	struct topic topics[N_TOPICS];
	int64_t rewind_at_ms;      /* > 0: the batch was dropped; move consumption back then */
	int backoff_ms;
	uint64_t committed, skipped;
	bool failed;               /* a fatal error: leave the loop, exit 1 */
	struct tly_metrics *metrics; /* owned; read by the HTTP thread */
	struct tly_health *health;   /* owned; read by the HTTP thread */
	struct tly_http *http;       /* owned; NULL when http.listen is empty */
	struct tly_series *applied, *undecodable, *batch, *commit, *assigned;
	int64_t lag_at_ms, pg_checked_ms;
};

static volatile sig_atomic_t stop_requested, reload_requested;

static void on_stop(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static void on_reload(int sig)
{
	(void)sig;
	reload_requested = 1;
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: " PROG " [OPTIONS]\n"
		"\n"
		"The projection consumer: folds tally.events, tally.ledger and tally.catalog into the\n"
		"PostgreSQL projections (tenants, users, conversations, messages, plans, subscriptions,\n"
		"invoices, usage, token balances, API usage), each batch of rows and the consumed\n"
		"offsets in one transaction. SIGTERM or SIGINT: finish the batch, commit, leave.\n"
		"SIGHUP: read log.level again from the config file and TALLY_* (a bad value is refused).\n"
		"Start-up fails with one line when PostgreSQL is unreachable, the schema is behind or a\n"
		"topic is missing.\n"
		"\n"
		"Options:\n"
		"  -c, --config FILE            read settings from FILE (\"key = value\" lines)\n"
		"  -s, --set KEY=VALUE          set one setting (after the file and TALLY_* variables)\n"
		"  -h, --help                   this help\n"
		"\n");
	tly_config_print_help(out);
}

static struct part *find_part(struct app *app, const char *topic, int32_t partition, int *ti)
{
	for (int i = 0; i < N_TOPICS; i++) {
		struct topic *t = &app->topics[i];
		if (strcmp(t->name, topic) == 0 && partition >= 0 && partition < t->count) {
			if (ti)
				*ti = i;
			return &t->parts[partition];
		}
	}
	return NULL;
}

/* ---- PostgreSQL --------------------------------------------------------------------------- */

/* Connected (again, after a lost connection), retrying with backoff until stop: 0 or -1. */
/* Alive, waiting for the database. */
static void pg_waiting(void *ud)
{
	struct app *app = ud;
	tly_health_set_pg(app->health, false);
	tly_health_beat(app->health);
}

static int ensure_conn(struct app *app, int lane)
{
	if (tly_pg_reconnect(&app->lanes[lane].conn, app->database_url, PROG, &stop_requested,
			     pg_waiting, app) != 0)
		return -1;
	tly_health_set_pg(app->health, true);
	return 0;
}

static int load_offset(struct app *app, const char *topic, int32_t partition, int64_t *out,
		       struct tly_pg_error *err)
{
	char p[16];
	snprintf(p, sizeof(p), "%d", (int)partition);
	const char *const v[] = {CONSUMER_NAME, topic, p};
	PGresult *res = tly_pg_query(app->lanes[0].conn,
				     "SELECT next_offset FROM consumer_offsets "
				     "WHERE consumer = $1 AND topic = $2 AND partition = $3",
				     3, v, err);
	if (!res)
		return TLY_E_PG;
	*out = PQntuples(res) == 1 ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : -1;
	PQclear(res);
	return 0;
}

/*
 * Compare-and-set of every stored offset the lane's open batch moves, in two statements (the
 * partitions with a stored offset, then the ones storing their first): 0, or TLY_E_PG, with
 * *fenced when one of them moved (another process committed it).
 */
static int advance_offsets(struct app *app, int lane, bool *fenced, struct tly_pg_error *err)
{
	char *lists[2][4] = {{NULL}}; /* [update, insert] x {topics, partitions, new, old} array literals */
	size_t lens[2][4] = {{0}}, counts[2] = {0};
	FILE *f[2][4] = {{NULL}};
	int rc = TLY_E_NOMEM;
	for (int k = 0; k < 2; k++)
		for (int c = 0; c < 4; c++)
			if (!(f[k][c] = open_memstream(&lists[k][c], &lens[k][c])))
				goto out;
	for (int i = 0; i < N_TOPICS; i++) {
		struct topic *t = &app->topics[i];
		for (int32_t p = 0; p < t->count; p++) {
			struct part *pt = &t->parts[p];
			if (pt->lane != lane || !pt->assigned || pt->next < 0 || pt->next == pt->stored)
				continue;
			int k = pt->stored < 0 ? 1 : 0;
			const char *sep = counts[k]++ ? "," : "{";
			/* topic names are [a-zA-Z0-9._-] (Kafka's rule): quoted, nothing to escape */
			fprintf(f[k][0], "%s\"%s\"", sep, t->name);
			fprintf(f[k][1], "%s%d", sep, (int)p);
			fprintf(f[k][2], "%s%" PRId64, sep, pt->next);
			fprintf(f[k][3], "%s%" PRId64, sep, pt->stored);
		}
	}
	for (int k = 0; k < 2; k++)
		for (int c = 0; c < 4; c++) {
			fputs(counts[k] ? "}" : "{}", f[k][c]);
			int closed = fclose(f[k][c]);
			f[k][c] = NULL;
			if (closed != 0)
				goto out;
		}
	static const char *const SQL[2] = {
		"UPDATE consumer_offsets o SET next_offset = u.new, updated_at = now() "
		"FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS u(topic, part, new, old) "
		"WHERE o.consumer = $1 AND o.topic = u.topic AND o.partition = u.part "
		"AND o.next_offset = u.old",
		"INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) "
		"SELECT $1, u.topic, u.part, u.new "
		"FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(topic, part, new) "
		"ON CONFLICT DO NOTHING",
	};
	rc = 0;
	for (int k = 0; rc == 0 && k < 2; k++) {
		if (!counts[k])
			continue;
		const char *const v[] = {CONSUMER_NAME, lists[k][0], lists[k][1], lists[k][2], lists[k][3]};
		PGresult *res = tly_pg_query(app->lanes[lane].conn, SQL[k], k == 0 ? 5 : 4, v, err);
		if (!res) {
			rc = TLY_E_PG;
			break;
		}
		size_t n = strtoul(PQcmdTuples(res), NULL, 10);
		PQclear(res);
		if (n != counts[k]) {
			*fenced = true;
			err->errclass = TLY_ERRCLASS_PERMANENT;
			err->sqlstate[0] = '\0';
			snprintf(err->message, sizeof(err->message),
				 "%zu of %zu stored offsets moved: another process committed them",
				 counts[k] - n, counts[k]);
			rc = TLY_E_PG;
		}
	}
out:
	if (rc == TLY_E_NOMEM) {
		err->errclass = TLY_ERRCLASS_FATAL;
		err->sqlstate[0] = '\0';
		snprintf(err->message, sizeof(err->message), "out of memory");
	}
	for (int k = 0; k < 2; k++)
		for (int c = 0; c < 4; c++) {
			if (f[k][c])
				fclose(f[k][c]);
			free(lists[k][c]);
		}
	return rc;
}

/* ---- batches ------------------------------------------------------------------------------ */

/*
 * Drop every lane's open batch (they read on from offsets the dropped one did not store);
 * consumption moves back to the stored offsets (now, or after backoff) once no batch is in flight.
 */
static void drop_batch(struct app *app, int backoff_ms)
{
	for (int l = 0; l < N_LANES; l++) {
		tly_fold_clear(app->lanes[l].fold);
		app->lanes[l].opened_ms = 0;
	}
	app->rewind_at_ms = tly_clock_ms() + backoff_ms;
}

static void finish_flight(struct app *app, int lane, bool wait);

/* Every lane's batch in flight, done (wait) or read as far as it arrived. */
static void finish_flights(struct app *app, bool wait)
{
	for (int l = 0; l < N_LANES; l++)
		finish_flight(app, l, wait);
}

/* Is any lane's batch in flight? */
static bool in_flight(const struct app *app)
{
	bool any = false;
	for (int l = 0; l < N_LANES; l++)
		any |= tly_fold_in_flight(app->lanes[l].flight);
	return any;
}

/* Reload the stored offsets of every assigned partition and seek there: 0 or -1 (retry later). */
static int rewind_all(struct app *app)
{
	struct tly_pg_error err = {0};
	rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(16);
	int rc = -1;
	finish_flights(app, true); /* what they store is where to move back to */
	if (!l || ensure_conn(app, 0) != 0)
		goto out;
	for (int i = 0; i < N_TOPICS; i++) {
		struct topic *t = &app->topics[i];
		for (int32_t p = 0; p < t->count; p++) {
			struct part *pt = &t->parts[p];
			if (!pt->assigned)
				continue;
			if (load_offset(app, t->name, p, &pt->stored, &err) != 0) {
				tly_warn("could not read stored offsets, retrying", "reason=\"%s\"",
					 err.message);
				goto out;
			}
			pt->next = pt->stored;
			pt->seeking = true;
			rd_kafka_topic_partition_list_add(l, t->name, p)->offset =
				pt->stored >= 0 ? pt->stored : RD_KAFKA_OFFSET_BEGINNING;
		}
	}
	if (l->cnt) {
		rd_kafka_error_t *error = rd_kafka_seek_partitions(app->consumer, l, 5000);
		if (error) {
			tly_warn("could not seek partitions, retrying", "reason=\"%s\"",
				 rd_kafka_error_string(error));
			rd_kafka_error_destroy(error);
			goto out;
		}
		for (int i = 0; i < l->cnt; i++) {
			if (l->elems[i].err) {
				tly_warn("could not seek partition, retrying", "topic=%s partition=%d reason=\"%s\"",
					 l->elems[i].topic, (int)l->elems[i].partition,
					 rd_kafka_err2str(l->elems[i].err));
				goto out;
			}
		}
	}
	rc = 0;
out:
	if (l)
		rd_kafka_topic_partition_list_destroy(l);
	return rc;
}

/* A batch that could not be committed: dropped, with the open one, by the error's class. */
static void batch_failed(struct app *app, size_t n, bool fenced, const struct tly_pg_error *err)
{
	if (fenced) {
		tly_warn("could not commit batch: another process moved a stored offset; moving back",
			 "records=%zu reason=\"%s\"", n, err->message);
		drop_batch(app, RETRY_MS);
	} else if (err->errclass == TLY_ERRCLASS_RETRIABLE) {
		tly_warn("could not commit batch, retrying from the stored offsets",
			 "records=%zu reason=\"%s\" backoff_ms=%d", n, err->message, app->backoff_ms);
		drop_batch(app, app->backoff_ms);
		app->backoff_ms = app->backoff_ms * 2 > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : app->backoff_ms * 2;
	} else {
		tly_error("could not commit batch", "records=%zu reason=\"%s\"", n, err->message);
		drop_batch(app, RETRY_MS);
		app->failed = true;
	}
}

/* Roll back what the lane's failed batch left open, if its connection still has it. */
static void roll_back(struct app *app, int lane)
{
	struct tly_pg_error rberr;
	PGconn *conn = app->lanes[lane].conn;
	if (PQstatus(conn) == CONNECTION_OK && PQtransactionStatus(conn) != PQTRANS_IDLE &&
	    tly_pg_rollback(conn, &rberr) != 0)
		tly_warn("could not roll back the batch", "reason=\"%s\"", rberr.message);
}

/*
 * The lane's batch in flight (sent by send_batch), if any: its results read as far as they have
 * arrived (wait: until its COMMIT's). Committed: its offsets become the stored ones. Failed:
 * rolled back, and the open batches are dropped with it (they continue offsets it did not store).
 */
static void finish_flight(struct app *app, int lane, bool wait)
{
	struct tly_pg_error err = {0};
	struct lane *ln = &app->lanes[lane];
	if (!tly_fold_in_flight(ln->flight))
		return;
	int rc = tly_fold_flush_poll(ln->flight, ln->conn, wait, &err);
	if (rc == 1)
		return;
	size_t n = ln->flight_n;
	for (int i = 0; i < N_TOPICS; i++)
		for (int32_t p = 0; p < app->topics[i].count; p++) {
			struct part *pt = &app->topics[i].parts[p];
			if (pt->lane != lane)
				continue;
			if (rc == 0 && pt->sending >= 0)
				pt->stored = pt->sending;
			pt->sending = -1;
		}
	if (rc != 0) {
		roll_back(app, lane);
		tly_fold_clear(ln->flight);
		batch_failed(app, n, false, &err);
		return;
	}
	app->committed += n;
	tly_metrics_add(app->applied, n);
	tly_metrics_observe(app->batch, (double)n);
	tly_metrics_observe(app->commit, tly_clock_s() - ln->flight_s);
	app->pg_checked_ms = tly_clock_ms();
	app->backoff_ms = RETRY_MS;
	tly_debug("batch committed", "lane=%d records=%zu", lane, n);
}

/*
 * Send the lane's open batch, after its batch in flight is done: BEGIN, the offsets'
 * compare-and-set and the staging COPY (round trips), then the fold's statements and COMMIT in one
 * pipeline that the server executes while this thread reads on (finish_flight reads its
 * results). The rows and the offsets of the lane's partitions commit in one transaction. On
 * failure the open batches are dropped and consumption moves back to the stored offsets.
 */
static void send_batch(struct app *app, int lane)
{
	struct tly_pg_error err = {0};
	struct lane *ln = &app->lanes[lane];
	bool fenced = false;
	finish_flight(app, lane, true);
	if (app->rewind_at_ms)
		return; /* a batch failed: the open ones went with it */
	size_t n = tly_fold_pending(ln->fold);
	bool any = n > 0;
	for (int i = 0; !any && i < N_TOPICS; i++)
		for (int32_t p = 0; p < app->topics[i].count; p++) {
			const struct part *pt = &app->topics[i].parts[p];
			any |= pt->lane == lane && pt->assigned && pt->next != pt->stored && pt->next >= 0;
		}
	if (!any)
		return;
	if (ensure_conn(app, lane) != 0) {
		drop_batch(app, RETRY_MS);
		return;
	}
	ln->flight_s = tly_clock_s();
	int rc = tly_pg_begin(ln->conn, &err);
	if (rc == 0)
		rc = advance_offsets(app, lane, &fenced, &err);
	if (rc == 0)
		rc = tly_fold_flush_send(ln->fold, ln->conn, "COMMIT", &err);
	if (rc != 0) {
		roll_back(app, lane);
		batch_failed(app, n, fenced, &err);
		return;
	}
	struct tly_fold *sent = ln->fold;
	ln->fold = ln->flight;
	ln->flight = sent;
	ln->flight_n = n;
	for (int i = 0; i < N_TOPICS; i++)
		for (int32_t p = 0; p < app->topics[i].count; p++)
			if (app->topics[i].parts[p].lane == lane)
				app->topics[i].parts[p].sending = app->topics[i].parts[p].next;
	ln->opened_ms = 0;
}

/* Commit every lane's open batch and wait for them (a revocation, the stop). */
static void commit_batches(struct app *app)
{
	finish_flights(app, true);
	for (int l = 0; l < N_LANES; l++)
		send_batch(app, l);
	finish_flights(app, true);
}

/* ---- rebalance ---------------------------------------------------------------------------- */

static void on_assign(void *opaque, rd_kafka_topic_partition_list_t *parts)
{
	struct app *app = opaque;
	struct tly_pg_error err = {0};
	finish_flights(app, true); /* lane 0's connection reads the stored offsets */
	for (int i = 0; i < parts->cnt; i++) {
		rd_kafka_topic_partition_t *tp = &parts->elems[i];
		struct part *pt = find_part(app, tp->topic, tp->partition, NULL);
		if (!pt)
			continue;
		pt->assigned = true;
		pt->seeking = true;
		pt->stored = -1;
		if (ensure_conn(app, 0) != 0 ||
		    load_offset(app, tp->topic, tp->partition, &pt->stored, &err) != 0) {
			tly_warn("could not read the stored offset; moving back once it can be read",
				 "topic=%s partition=%d reason=\"%s\"", tp->topic, (int)tp->partition,
				 err.message);
			app->rewind_at_ms = tly_clock_ms() + RETRY_MS;
		}
		pt->next = pt->stored;
		tp->offset = pt->stored >= 0 ? pt->stored : RD_KAFKA_OFFSET_BEGINNING;
		tly_info("partition assigned", "topic=%s partition=%d offset=%" PRId64, tp->topic,
			 (int)tp->partition, pt->stored);
	}
	rd_kafka_error_t *error = rd_kafka_incremental_assign(app->consumer, parts);
	if (error) {
		tly_error("could not assign partitions", "reason=\"%s\"", rd_kafka_error_string(error));
		rd_kafka_error_destroy(error);
		app->failed = true;
	}
}

static void on_revoke(void *opaque, rd_kafka_topic_partition_list_t *parts, bool lost)
{
	struct app *app = opaque;
	size_t pending = 0;
	finish_flights(app, true); /* what they store is this process's to know */
	for (int l = 0; l < N_LANES; l++)
		pending += tly_fold_pending(app->lanes[l].fold);
	if (!lost)
		commit_batches(app); /* fenced by the compare-and-set if another owner moved on */
	else if (pending) {
		tly_warn("partitions lost: abandoning the open batches", "records=%zu", pending);
		drop_batch(app, 0);
	}
	for (int i = 0; i < parts->cnt; i++) {
		struct part *pt = find_part(app, parts->elems[i].topic, parts->elems[i].partition, NULL);
		if (pt) {
			tly_metrics_unset(pt->lag);
			*pt = (struct part){.stored = -1, .next = -1, .sending = -1, .lane = pt->lane,
					    .lag = pt->lag};
		}
		tly_info("partition revoked", "topic=%s partition=%d lost=%s", parts->elems[i].topic,
			 (int)parts->elems[i].partition, lost ? "true" : "false");
	}
}

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
			 rd_kafka_topic_partition_list_t *parts, void *opaque)
{
	struct app *app = opaque;
	tly_kafka_rebalance(rk, err, parts, app->failed, on_assign, on_revoke, app);
}

/* ---- start-up ----------------------------------------------------------------------------- */

/* The registry's families and the series that need no partition: 0, or -1 (out of memory). */
static int metrics_init(struct app *app)
{
	static const double batch_bounds[] = {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000};
	static const double commit_bounds[] = {0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10};
	static const char *const topic[] = {"topic", NULL};
	struct tly_metrics *r = app->metrics;
	struct tly_metric *consumed = tly_metrics_counter(r, "tally_records_consumed_total",
		"Input records taken into a batch, by topic", topic);
	for (int i = 0; i < N_TOPICS; i++) {
		const char *const v[] = {app->topics[i].name};
		if (!(app->topics[i].consumed = tly_metrics_series(consumed, v)))
			return -1;
	}
	app->applied = tly_metrics_series(tly_metrics_counter(r, "tally_projector_records_applied_total",
		"Input records folded into the projections and committed", NULL), NULL);
	app->undecodable = tly_metrics_series(tly_metrics_counter(r, "tally_projector_undecodable_total",
		"Input records that could not be decoded and were skipped", NULL), NULL);
	app->batch = tly_metrics_series(tly_metrics_histogram(r, "tally_batch_records",
		"Input records per committed batch", NULL, batch_bounds,
		sizeof(batch_bounds) / sizeof(batch_bounds[0])), NULL);
	app->commit = tly_metrics_series(tly_metrics_histogram(r, "tally_commit_duration_seconds",
		"Time to write a batch and its offsets in one PostgreSQL transaction", NULL,
		commit_bounds, sizeof(commit_bounds) / sizeof(commit_bounds[0])), NULL);
	app->assigned = tly_metrics_series(tly_metrics_gauge(r, "tally_partitions_assigned",
		"Partitions of the input topics assigned to this process", NULL), NULL);
	return app->applied && app->undecodable && app->batch && app->commit && app->assigned ? 0 : -1;
}

/* Connect, check the schema and the topics, subscribe: 0, or -1 with one line logged. */
static int start(struct app *app)
{
	char errstr[2048];
	struct tly_migrate_set *set = NULL;
	int rc = -1;
	const char *listen_on = tly_config_str(app->cfg, "http.listen");
	static const char *const labels[] = {"topic", "partition", NULL};
	struct tly_metric *lag = NULL;
	app->topics[0].name = tly_config_str(app->cfg, "topics.events");
	app->topics[1].name = tly_config_str(app->cfg, "topics.ledger");
	app->topics[2].name = tly_config_str(app->cfg, "topics.catalog");
	if (!(app->metrics = tly_metrics_new()) ||
	    !(app->health = tly_health_new(tly_config_int(app->cfg, "readyz.max.lag"))) ||
	    metrics_init(app) != 0 ||
	    !(lag = tly_metrics_gauge(app->metrics, "tally_consumer_lag",
				      "Records behind the partition's high watermark", labels))) {
		tly_error("could not start: out of memory", NULL);
		goto out;
	}
	tly_health_beat(app->health);
	if (listen_on && *listen_on &&
	    !(app->http = tly_http_start(listen_on, app->metrics, app->health, NULL, errstr,
					 sizeof(errstr)))) {
		tly_error("could not start the HTTP endpoint", "reason=\"%s\"", errstr);
		goto out;
	}
	app->database_url = tly_config_str(app->cfg, "database.url");
	if (!app->database_url) {
		tly_error("database.url is not set", "hint=\"use -s database.url=... or TALLY_DATABASE_URL\"");
		goto out;
	}
	if (!(app->lanes[0].conn = tly_pg_connect(app->database_url, PROG, errstr, sizeof(errstr)))) {
		tly_error("could not start: PostgreSQL is unreachable", "reason=\"%s\"", errstr);
		goto out;
	}
	if (!(set = tly_migrate_load_embedded(errstr, sizeof(errstr))) ||
	    tly_migrate_check_head(app->lanes[0].conn, set, errstr, sizeof(errstr)) != 0) {
		tly_error("could not start: the database schema is not at head",
			  "reason=\"%s\" hint=\"run tallyctl migrate up\"", errstr);
		goto out;
	}
	for (int l = 1; l < N_LANES; l++)
		if (!(app->lanes[l].conn = tly_pg_connect(app->database_url, PROG, errstr, sizeof(errstr)))) {
			tly_error("could not start: PostgreSQL is unreachable", "reason=\"%s\"", errstr);
			goto out;
		}
	tly_health_set_pg(app->health, true);
	tly_health_set_schema(app->health, true);
	bool folds = true;
	for (int l = 0; l < N_LANES; l++)
		folds &= (app->lanes[l].fold = tly_fold_new()) && (app->lanes[l].flight = tly_fold_new());
	if (!(app->codec = tly_codec_new(errstr, sizeof(errstr))) || !folds) {
		tly_error("could not create the codec and the fold", "reason=\"%s\"",
			  app->codec ? "out of memory" : errstr);
		goto out;
	}
	rd_kafka_conf_t *conf = tly_kafka_conf_new(app->cfg, errstr, sizeof(errstr));
	if (!conf) {
		tly_error("could not configure Kafka", "reason=\"%s\"", errstr);
		goto out;
	}
	/*
	 * Consumption starts at the stored offset. When the partition no longer holds it (retention
	 * dropped the head while the consumer was away), resume at the earliest record still kept:
	 * librdkafka's default (latest) would skip every record the topic still holds.
	 */
	if (tly_kafka_conf_default(conf, "auto.offset.reset", "earliest", errstr, sizeof(errstr)) != 0) {
		tly_error("could not configure Kafka", "reason=\"%s\"", errstr);
		rd_kafka_conf_destroy(conf);
		goto out;
	}
	rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
	rd_kafka_conf_set_opaque(conf, app);
	const char *group = tly_config_str(app->cfg, "projector.group.id");
	if (!(app->consumer = tly_kafka_consumer_new(conf, group, errstr, sizeof(errstr)))) {
		tly_error("could not create the Kafka consumer", "reason=\"%s\"", errstr);
		goto out;
	}
	const char *names[N_TOPICS];
	for (int i = 0; i < N_TOPICS; i++) {
		struct topic *t = &app->topics[i];
		names[i] = t->name;
		if (tly_kafka_topic_partitions(app->consumer, t->name, METADATA_TIMEOUT_MS, &t->count,
					       errstr, sizeof(errstr)) != 0) {
			tly_error("could not start: a topic is missing", "reason=\"%s\"", errstr);
			goto out;
		}
		if (!(t->parts = calloc((size_t)t->count, sizeof(*t->parts)))) {
			tly_error("could not start: out of memory", NULL);
			goto out;
		}
		for (int32_t p = 0; p < t->count; p++) {
			char ps[16];
			snprintf(ps, sizeof(ps), "%d", (int)p);
			const char *const v[] = {t->name, ps};
			t->parts[p] = (struct part){.stored = -1, .next = -1, .sending = -1,
						    .lane = i == CATALOG ? 0 : p % N_LANES,
						    .lag = tly_metrics_series(lag, v)};
			if (!t->parts[p].lag) {
				tly_error("could not start: out of memory", NULL);
				goto out;
			}
			tly_metrics_unset(t->parts[p].lag);
		}
	}
	if (!(app->queue = rd_kafka_queue_get_consumer(app->consumer))) {
		tly_error("could not start: the Kafka consumer has no queue", NULL);
		goto out;
	}
	if (tly_kafka_subscribe(app->consumer, names, N_TOPICS) != 0)
		goto out;
	tly_info(PROG " started", "group=%s events=%s ledger=%s catalog=%s", group, names[0],
		 names[1], names[2]);
	rc = 0;
out:
	tly_migrate_free(set);
	return rc;
}

/* ---- the loop ----------------------------------------------------------------------------- */

/*
 * Is m a ClockTick, by its schema fingerprint (single-object header), without a decode? The fold
 * ignores ClockTicks (time moves the ledger, not the projections), and they are most of
 * tally.events. A record whose header names no known schema is not one: the decode says why.
 */
static bool is_tick(struct app *app, const rd_kafka_message_t *m)
{
	uint64_t fp;
	if (tly_codec_peek_fingerprint(m->payload, m->len, &fp) != 0)
		return false;
	size_t i = (size_t)((fp * UINT64_C(0x9E3779B97F4A7C15)) >> 32) & (TICK_MEMO - 1);
	for (; app->tick_memo[i].known; i = (i + 1) & (TICK_MEMO - 1)) {
		if (app->tick_memo[i].fp == fp)
			return app->tick_memo[i].tick;
	}
	const struct tly_schema *sc = tly_schema_find(tly_codec_registry(app->codec), fp);
	const struct tly_event_desc *d = sc ? tly_event_desc_by_name(tly_schema_fullname(sc)) : NULL;
	bool tick = d && d->type == TLY_EV_CLOCK_TICK;
	/* known schemas only, filled to three quarters at most, so probes end */
	if (sc && app->n_tick_memo < TICK_MEMO / 4 * 3) {
		app->tick_memo[i] = (struct tick_memo){fp, true, tick};
		app->n_tick_memo++;
	}
	return tick;
}

static void handle_message(struct app *app, rd_kafka_message_t *m)
{
	char errstr[512];
	const char *topic = m->rkt ? rd_kafka_topic_name(m->rkt) : "?";
	if (m->err) {
		if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
			return;
		bool fatal = m->err == RD_KAFKA_RESP_ERR__FATAL;
		tly_log(fatal ? TLY_LOG_ERROR : TLY_LOG_WARN, "Kafka consumer error",
			"topic=%s partition=%d reason=\"%s\"", topic, (int)m->partition,
			rd_kafka_message_errstr(m));
		if (tly_kafka_errclass(m->err, fatal) == TLY_ERRCLASS_FATAL)
			app->failed = true;
		return;
	}
	int ti = 0;
	struct part *pt = find_part(app, topic, m->partition, &ti);
	if (!pt || !pt->assigned || app->rewind_at_ms)
		return; /* not ours, or moving back: read again from the stored offset */
	if (pt->seeking) {
		if (pt->next >= 0 && m->offset != pt->next)
			return; /* fetched before the seek */
		pt->seeking = false;
	} else if (pt->next >= 0 && m->offset < pt->next) {
		return;
	} else if (pt->next >= 0 && m->offset > pt->next) {
		tly_warn("input offsets skip ahead", "topic=%s partition=%d expected=%" PRId64
			 " offset=%" PRId64, topic, (int)m->partition, pt->next, m->offset);
	}
	pt->next = m->offset + 1;
	tly_metrics_add(app->topics[ti].consumed, 1);
	struct lane *ln = &app->lanes[pt->lane];
	if (!ln->opened_ms)
		ln->opened_ms = tly_clock_ms();
	if (is_tick(app, m))
		return; /* its offset moves with the batch */
	int rc = tly_codec_decode(app->codec, m->payload, m->len, &app->ev, errstr, sizeof(errstr));
	if (rc != 0) {
		app->skipped++;
		tly_metrics_add(app->undecodable, 1);
		tly_warn("could not decode record, skipping it", "topic=%s partition=%d offset=%" PRId64
			 " error=%s reason=\"%s\"", topic, (int)m->partition, m->offset, tly_err_name(rc),
			 errstr);
		return;
	}
	if (tly_fold_add(ln->fold, &app->ev) != 0) {
		tly_error("could not buffer record: out of memory", "topic=%s partition=%d offset=%" PRId64,
			  topic, (int)m->partition, m->offset);
		app->failed = true;
		return;
	}
	if (tly_fold_pending(ln->fold) >= BATCH_MAX_RECORDS)
		send_batch(app, pt->lane);
}

/*
 * Lag per assigned partition: librdkafka's cached high watermark (updated by every fetch
 * response, no broker round trip) minus where this process resumes (tly_lag_of). Unknown until
 * the first fetch of a partition answers.
 */
static void refresh_lag(struct app *app)
{
	int64_t total = 0;
	int assigned = 0;
	bool known = true;
	for (int i = 0; i < N_TOPICS; i++) {
		struct topic *t = &app->topics[i];
		for (int32_t p = 0; p < t->count; p++) {
			struct part *pt = &t->parts[p];
			int64_t low = -1, high = -1;
			if (!pt->assigned)
				continue;
			assigned++;
			if (rd_kafka_get_watermark_offsets(app->consumer, t->name, p, &low, &high) !=
			    RD_KAFKA_RESP_ERR_NO_ERROR)
				low = high = -1;
			int64_t lag = tly_lag_of(pt->next >= 0 ? pt->next : pt->stored, low, high);
			if (lag < 0) {
				known = false;
				tly_metrics_unset(pt->lag);
				continue;
			}
			tly_metrics_set(pt->lag, lag);
			total += lag;
		}
	}
	tly_metrics_set(app->assigned, assigned);
	tly_health_set_assigned(app->health, assigned);
	tly_health_set_lag(app->health, known ? total : -1);
}

/*
 * While no commit proved it lately: one round trip to tell /readyz whether PostgreSQL answers,
 * after one reconnection attempt (never a retry loop: the consumer loop goes on) if it was lost.
 */
static void check_pg(struct app *app)
{
	app->pg_checked_ms = tly_clock_ms();
	tly_health_set_pg(app->health, tly_pg_check(&app->lanes[0].conn, app->database_url, PROG));
}

/* Housekeeping for /healthz, /readyz and the lag gauges, on every turn of the loop. */
static void observe(struct app *app)
{
	int64_t now = tly_clock_ms();
	tly_health_beat(app->health);
	if (now - app->lag_at_ms >= LAG_EVERY_MS) {
		app->lag_at_ms = now;
		refresh_lag(app);
	}
	bool open = false;
	for (int l = 0; l < N_LANES; l++)
		open |= app->lanes[l].opened_ms != 0;
	if (!open && !in_flight(app) && now - app->pg_checked_ms >= PG_CHECK_EVERY_MS)
		check_pg(app);
}

/*
 * After a poll returned a record: what else librdkafka has ready, up to DRAIN_MAX - 1 in one
 * call (one call instead of a poll a record, and its offset bookkeeping once a partition).
 * Rebalance callbacks it serves run before the records it returns are handled; handle_message
 * drops those of partitions no longer assigned and, after a seek, those before the stored offset.
 */
static void take_ready(struct app *app)
{
	rd_kafka_message_t *msgs[DRAIN_MAX - 1];
	ssize_t n = rd_kafka_consume_batch_queue(app->queue, 0, msgs, DRAIN_MAX - 1);
	for (ssize_t i = 0; i < n; i++) {
		if (!app->failed)
			handle_message(app, msgs[i]);
		rd_kafka_message_destroy(msgs[i]);
	}
}

static void run(struct app *app)
{
	while (!stop_requested && !app->failed) {
		if (reload_requested) {
			reload_requested = 0;
			tly_cli_reload(app->config_file, app->sets, app->n_sets, environ);
		}
		rd_kafka_message_t *m = rd_kafka_consumer_poll(app->consumer, POLL_MS);
		if (m) {
			handle_message(app, m);
			rd_kafka_message_destroy(m);
			if (!app->failed && !app->rewind_at_ms && !stop_requested)
				take_ready(app);
		}
		finish_flights(app, false);
		if (app->rewind_at_ms) {
			if (tly_clock_ms() >= app->rewind_at_ms)
				app->rewind_at_ms = rewind_all(app) == 0 ? 0 : tly_clock_ms() + RETRY_MS;
		} else {
			for (int l = 0; l < N_LANES; l++) {
				const struct lane *ln = &app->lanes[l];
				if (ln->opened_ms && tly_clock_ms() - ln->opened_ms >= BATCH_MAX_MS &&
				    !tly_fold_in_flight(ln->flight))
					send_batch(app, l);
			}
		}
		observe(app);
	}
	finish_flights(app, true);
	if (app->failed)
		return;
	tly_info("stopping: committing the open batch", NULL);
	if (!app->rewind_at_ms)
		commit_batches(app);
}

int main(int argc, char **argv)
{
	char errstr[1024];
	struct app app = {0};
	const char *config_file = NULL;
	char **sets = calloc((size_t)argc + 1, sizeof(*sets));
	size_t n_sets = 0;
	int rc = 2, opt;
	enum tly_log_level level;
	tly_log_init(PROG, TLY_LOG_INFO);
	static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
					     {"set", required_argument, NULL, 's'},
					     {"help", no_argument, NULL, 'h'},
					     {NULL, 0, NULL, 0}};
	if (!sets) {
		fprintf(stderr, PROG ": out of memory\n");
		return 1;
	}
	while ((opt = getopt_long(argc, argv, "c:s:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'c': config_file = optarg; break;
		case 's': sets[n_sets++] = optarg; break;
		case 'h': usage(stdout); rc = 0; goto out;
		default: usage(stderr); goto out;
		}
	}
	if (optind < argc) {
		fprintf(stderr, PROG ": unexpected argument \"%s\" (see --help)\n", argv[optind]);
		goto out;
	}
	if (!(app.cfg = tly_cli_config(config_file, sets, n_sets, environ, errstr, sizeof(errstr)))) {
		fprintf(stderr, PROG ": %s\n", errstr);
		goto out;
	}
	if (tly_log_level_parse(tly_config_str(app.cfg, "log.level"), &level) == 0)
		tly_log_set_level(level);
	if (tly_proc_on_signals(on_stop, on_reload) != 0) {
		fprintf(stderr, PROG ": could not install the signal handlers: %s\n", strerror(errno));
		rc = 1;
		goto out;
	}
	app.config_file = config_file;
	app.sets = sets;
	app.n_sets = n_sets;
	app.backoff_ms = RETRY_MS;
	rc = 1;
	if (start(&app) != 0)
		goto out;
	run(&app);
	rc = app.failed ? 1 : 0;
out:
	/* Leaving the group revokes what is left (the open batch was committed above). */
	if (app.queue)
		rd_kafka_queue_destroy(app.queue);
	tly_kafka_consumer_destroy(app.consumer);
	tly_http_stop(app.http);
	tly_metrics_free(app.metrics);
	tly_health_free(app.health);
	for (int l = 0; l < N_LANES; l++) {
		tly_fold_free(app.lanes[l].fold);
		tly_fold_free(app.lanes[l].flight);
		if (app.lanes[l].conn)
			PQfinish(app.lanes[l].conn);
	}
	tly_event_free(&app.ev);
	for (int i = 0; i < N_TOPICS; i++)
		free(app.topics[i].parts);
	tly_codec_free(app.codec);
	tly_config_free(app.cfg);
	free(sets);
	if (rc == 0 && app.topics[0].count)
		tly_info(PROG " stopped", "records=%" PRIu64 " undecodable=%" PRIu64, app.committed,
			 app.skipped);
	return rc;
}
