/* tally-ledger: arguments, configuration, handles, and the consumer loop around the partitions. */
#include <errno.h>
#include <getopt.h>
#include <malloc.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>

#include "clock.h"
#include "cli.h"
#include "codec.h"
#include "config.h"
#include "health.h"
#include "http.h"
#include "kafka.h"
#include "ledger_pace.h"
#include "ledger_partition.h"
#include "ledger_publisher.h"
#include "ledger_store.h"
#include "ledger_writer.h"
#include "log.h"
#include "metrics.h"
#include "migrate.h"
#include "pg.h"
#include "proc.h"

extern char **environ;

#define POLL_MS 10
#define DRAIN_MAX 256          /* records taken from librdkafka's queue in one call after a poll */
#define RELOAD_BACKOFF_MS 200
#define FENCED_BACKOFF_MS 2000
#define MAX_BACKOFF_MS 5000
#define METADATA_TIMEOUT_MS 10000
#define LAG_EVERY_MS 250       /* lag gauges from librdkafka's cached high watermarks */
#define PG_CHECK_EVERY_MS 5000 /* while idle: is PostgreSQL still there (for /readyz) */

/* One partition of tally.events as the group gave it to this process. */
struct slot {
	bool assigned;
	struct tly_ledger_partition *part; /* owned; NULL while (re)loading */
	int64_t reload_at_ms;              /* when part is NULL: next load attempt */
	int backoff_ms;
	int64_t open_holds;                /* of its wallets, as of the last commit */
	struct tly_series *lag, *holds;    /* its gauges, hidden while not assigned */
};

/* Handles into the metrics registry, looked up once at start-up. */
struct ledger_metrics {
	struct tly_metric *entries;        /* {kind} */
	struct tly_metric *rejected;       /* {reason} */
	struct tly_series *consumed, *quarantined, *duplicates, *batch, *commit, *assigned;
};

/*
 * A decided group: its partitions' items (partition_count of them, lane by lane) and one
 * transaction per writer lane.
 */
struct group {
	struct tly_ledger_group_item *items;
	int32_t *ids;                     /* each item's partition (read when its state may be freed) */
	size_t n;                         /* 0: no group */
	size_t lane_end[TLY_LEDGER_WRITER_LANES_MAX]; /* lane k's items end here (start: k-1's end) */
	bool dropped[TLY_LEDGER_WRITER_LANES_MAX];    /* lane k's partitions were reset: items stale */
	size_t records;
	struct tly_ledger_txn *txn[TLY_LEDGER_WRITER_LANES_MAX]; /* owned; the writer has them while in flight or queued */
	bool queued;                      /* ready group only: with the writer, behind the flight group */
	int64_t waited_us, decided_us;    /* first record to decide; decide to submit */
	int64_t submitted_at_us;          /* flight group: when the writer started it (about) */
};

struct app {
	const char *config_file;          /* -c, NULL: none; reread on SIGHUP with sets */
	char **sets;                      /* the --set arguments (n_sets), borrowed from argv */
	size_t n_sets;
	struct tly_config *cfg;           /* owned */
	const char *database_url;
	PGconn *conn;                     /* owned */
	struct tly_codec *codec;          /* owned */
	rd_kafka_t *consumer;             /* owned */
	struct tly_ledger_publisher *pub; /* owned */
	struct tly_ledger_ctx ctx;        /* borrows conn and codec */
	struct slot *slots;               /* partition_count of them */
	int32_t partition_count;
	struct tly_ledger_writer *writer; /* owned: runs the flight group's transaction */
	rd_kafka_queue_t *wake_queue;     /* owned: the consumer queue, yielded by the writer */
	struct group flight, ready;       /* committing on the writer; decided, waiting for it */
	size_t pending;                   /* records added and not decided yet */
	int64_t opened_ms;                /* when the first of them was added */
	size_t max_events;
	int64_t max_ms;
	struct tly_ledger_pace pace;      /* when the pending records are decided */
	size_t lanes, backlog_lanes;      /* ledger.writers, ledger.writers.backlog */
	size_t active_lanes;              /* lanes the last group was decided for */
	int *held;                        /* scratch per partition: lane of its batch with the writer, -1 none */
	int shutdown_ms;
	bool failed;                      /* a fatal error: leave the loop, exit 1 */
	struct tly_metrics *metrics;      /* owned; read by the HTTP thread */
	struct tly_health *health;        /* owned; read by the HTTP thread */
	struct tly_http *http;            /* owned; NULL when http.listen is empty */
	struct ledger_metrics m;
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

/* On the writer's thread: a transaction ran, wake the consumer loop out of its poll. */
static void wake_loop(void *ud)
{
	struct app *app = ud;
	rd_kafka_queue_yield(app->wake_queue);
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: tally-ledger [OPTIONS]\n"
		"\n"
		"The ledger consumer: applies tally.events per partition, serially, into PostgreSQL\n"
		"(entries and consumed offsets in one transaction per batch), then publishes the\n"
		"entries to tally.ledger. SIGTERM or SIGINT: finish the batch, commit, publish, leave.\n"
		"SIGHUP: read log.level again from the config file and TALLY_* (a bad value is refused).\n"
		"Start-up fails with one line when PostgreSQL is unreachable, the schema is behind, a\n"
		"topic is missing or the partition count of tally.events changed.\n"
		"\n"
		"Options:\n"
		"  -c, --config FILE            read settings from FILE (\"key = value\" lines)\n"
		"  -s, --set KEY=VALUE          set one setting (after the file and TALLY_* variables)\n"
		"  -h, --help                   this help\n"
		"\n");
	tly_config_print_help(out);
}

/* ---- PostgreSQL connection ---------------------------------------------------------------- */

/* Connected (again, after a lost connection), retrying with backoff until stop: 0 or -1. */
/* Alive, waiting for the database. */
static void pg_waiting(void *ud)
{
	struct app *app = ud;
	tly_health_set_pg(app->health, false);
	tly_health_beat(app->health);
}

static int ensure_conn(struct app *app)
{
	if (tly_pg_reconnect(&app->conn, app->database_url, "tally-ledger", &stop_requested, pg_waiting,
			     app) != 0)
		return -1;
	app->ctx.conn = app->conn;
	tly_health_set_pg(app->health, true);
	return 0;
}

/* ---- partitions --------------------------------------------------------------------------- */

static void pause_partition(struct app *app, int32_t partition, bool pause)
{
	rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
	if (!l)
		return;
	rd_kafka_topic_partition_list_add(l, app->ctx.events_topic, partition);
	rd_kafka_resp_err_t err = pause ? rd_kafka_pause_partitions(app->consumer, l)
					: rd_kafka_resume_partitions(app->consumer, l);
	if (err)
		tly_warn(pause ? "could not pause partition" : "could not resume partition",
			 "partition=%d reason=\"%s\"", (int)partition, rd_kafka_err2str(err));
	rd_kafka_topic_partition_list_destroy(l);
}

/* Drop a partition's state; it is loaded again (and consumption moved back) after backoff_ms. */
static void reset_partition(struct app *app, int32_t partition, int backoff_ms)
{
	struct slot *s = &app->slots[partition];
	tly_ledger_partition_free(s->part);
	s->part = NULL;
	s->backoff_ms = backoff_ms;
	s->reload_at_ms = tly_clock_ms() + backoff_ms;
	pause_partition(app, partition, true);
}

/* Load state, republish what tally.ledger may miss; *offset is where consuming resumes. */
static int load_partition(struct app *app, int32_t partition, int64_t *offset)
{
	struct tly_pg_error err = {0};
	struct slot *s = &app->slots[partition];
	if (ensure_conn(app) != 0)
		return -1;
	s->part = tly_ledger_partition_open(&app->ctx, partition, &err);
	if (!s->part)
		goto fail;
	*offset = tly_ledger_partition_next_offset(s->part);
	if (tly_ledger_publisher_republish(app->pub, app->conn, partition, *offset, &err) != 0) {
		tly_ledger_partition_free(s->part);
		s->part = NULL;
		goto fail;
	}
	s->open_holds = tly_ledger_partition_open_holds(s->part);
	tly_metrics_set(s->holds, s->open_holds);
	tly_info("partition loaded", "partition=%d next_offset=%" PRId64 " tenants=%zu",
		 (int)partition, *offset, tly_ledger_partition_tenants(s->part));
	return 0;
fail:
	tly_error("could not load partition state", "partition=%d reason=\"%s\"", (int)partition,
		  err.message);
	if (err.errclass == TLY_ERRCLASS_FATAL && err.sqlstate[0])
		app->failed = true;
	return -1;
}

/* Partitions whose state was dropped: load again, move consumption back, resume. */
static void reload_due(struct app *app)
{
	int64_t now = tly_clock_ms();
	for (int32_t i = 0; i < app->partition_count; i++) {
		struct slot *s = &app->slots[i];
		int64_t offset;
		if (!s->assigned || s->part || now < s->reload_at_ms)
			continue;
		if (load_partition(app, i, &offset) != 0) {
			s->backoff_ms = s->backoff_ms * 2 > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : s->backoff_ms * 2;
			s->reload_at_ms = now + s->backoff_ms;
			continue;
		}
		rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
		rd_kafka_topic_partition_list_add(l, app->ctx.events_topic, i)->offset = offset;
		rd_kafka_error_t *error = rd_kafka_seek_partitions(app->consumer, l, 5000);
		if (error || l->elems[0].err) {
			tly_warn("could not seek partition, retrying",
				 "partition=%d offset=%" PRId64 " reason=\"%s\"", (int)i, offset,
				 error ? rd_kafka_error_string(error) : rd_kafka_err2str(l->elems[0].err));
			if (error)
				rd_kafka_error_destroy(error);
			tly_ledger_partition_free(s->part);
			s->part = NULL;
			s->reload_at_ms = now + RELOAD_BACKOFF_MS;
		} else {
			pause_partition(app, i, false);
		}
		rd_kafka_topic_partition_list_destroy(l);
	}
}

/* A few distinct strings and how often each came (kinds or reasons of one batch). */
#define TALLY_MAX 32
struct tally {
	const char *key[TALLY_MAX];
	uint64_t n[TALLY_MAX];
	size_t count;
};

static void tally_add(struct tally *t, const char *key)
{
	for (size_t i = 0; i < t->count; i++) {
		if (strcmp(t->key[i], key) == 0) {
			t->n[i]++;
			return;
		}
	}
	if (t->count < TALLY_MAX) {
		t->key[t->count] = key;
		t->n[t->count++] = 1;
	}
}

static void tally_flush(const struct tally *t, struct tly_metric *family)
{
	for (size_t i = 0; i < t->count; i++) {
		const char *const v[] = {t->key[i]};
		tly_metrics_add(tly_metrics_series(family, v), t->n[i]);
	}
}

/* A committed batch in the metrics: entries by kind, rejections by reason, holds still open. */
static void count_batch(struct app *app, struct slot *s, const struct tly_ledger_batch_out *out)
{
	struct tally kinds = {0}, reasons = {0};
	uint64_t duplicates = 0;
	for (size_t i = 0; i < out->n_entries; i++) {
		const struct tly_ledger_entry *e = &out->entries[i].u.ledger_entry;
		const char *kind = e->kind ? e->kind : "";
		tally_add(&kinds, kind);
		if (strcmp(kind, TLY_KIND_REJECTED) == 0)
			tally_add(&reasons, e->reason ? e->reason : "");
		else if (strcmp(kind, TLY_KIND_DUPLICATE) == 0)
			duplicates++;
		else if (strcmp(kind, TLY_KIND_HOLD_PLACED) == 0)
			s->open_holds++;
		else if (strcmp(kind, TLY_KIND_HOLD_RELEASED) == 0 || strcmp(kind, TLY_KIND_HOLD_EXPIRED) == 0)
			s->open_holds--;
	}
	tally_flush(&kinds, app->m.entries);
	tally_flush(&reasons, app->m.rejected);
	tly_metrics_add(app->m.duplicates, duplicates);
	tly_metrics_add(app->m.quarantined, out->n_quarantined);
	tly_metrics_set(s->holds, s->open_holds);
}

/* Lane k's items of g: [*from, return value). */
static size_t lane_items(const struct group *g, size_t k, size_t *from)
{
	if (g->n == 0) {
		*from = 0;
		return 0;
	}
	*from = k ? g->lane_end[k - 1] : 0;
	return g->lane_end[k];
}

/*
 * Lane k of the flight group failed: the ready group's batches of that lane were decided on top
 * of it (their wallets moved past the database), so its partitions drop their state and reload;
 * its transaction there is freed (or, queued, comes back unrun and is freed then).
 */
static void drop_ready_lane(struct app *app, size_t k)
{
	struct group *g = &app->ready;
	size_t from, to = lane_items(g, k, &from);
	if (g->n == 0 || g->dropped[k])
		return;
	for (size_t i = from; i < to; i++)
		if (app->slots[g->ids[i]].part)
			reset_partition(app, g->ids[i], RELOAD_BACKOFF_MS);
	g->dropped[k] = true;
	if (!g->queued) {
		tly_ledger_store_txn_free(g->txn[k]);
		g->txn[k] = NULL;
	}
}

/*
 * The flight group's transactions ran, res[k] lane k's result: publish each committed batch, in
 * order. A lane that failed drops the state of its partitions in this group and in the ready
 * group (decided on top of it) and they reload; a fenced one waits longer, another owner has
 * it. The other lanes' batches are not touched.
 */
static void finish_flight(struct app *app, const struct tly_ledger_writer_result *res)
{
	struct group *g = &app->flight;
	size_t lanes = tly_ledger_writer_lanes(app->writer);
	int64_t started_us = INT64_MAX, ended_us = 0;
	bool ok = true;
	for (size_t k = 0; k < lanes; k++) {
		size_t from, to = lane_items(g, k, &from);
		int rc = res[k].rc;
		const struct tly_pg_error *err = &res[k].err;
		if (g->txn[k] && res[k].ran) {
			started_us = res[k].started_us < started_us ? res[k].started_us : started_us;
			ended_us = res[k].ended_us > ended_us ? res[k].ended_us : ended_us;
		}
		if (g->dropped[k] || from == to)
			continue; /* its partitions were reset when the lane failed before */
		ok = ok && rc == 0;
		tly_ledger_partition_finish(g->items + from, to - from, g->txn[k], rc);
		for (size_t i = from; i < to; i++) {
			struct tly_ledger_group_item *it = &g->items[i];
			int32_t partition = tly_ledger_partition_id(it->part);
			if (rc == 0) {
				tly_debug("batch committed", "partition=%d lane=%zu first_offset=%" PRId64
					  " end_offset=%" PRId64 " entries=%zu quarantined=%zu group=%zu",
					  (int)partition, k, it->out.first_offset, it->out.end_offset,
					  it->out.n_entries, it->out.n_quarantined, g->n);
				count_batch(app, &app->slots[partition], &it->out);
				if (tly_ledger_publisher_send(app->pub, partition, &it->out) != 0)
					tly_warn("could not enqueue the batch for tally.ledger; it is republished from the marker",
						 "partition=%d end_offset=%" PRId64, (int)partition,
						 it->out.end_offset);
			} else if (it->fenced) {
				tly_error("could not commit batch: this process lost the partition",
					  "partition=%d reason=\"%s\"", (int)partition, err->message);
				reset_partition(app, partition, FENCED_BACKOFF_MS);
			} else {
				/* The markers handed out were not stored: they are handed out again later. */
				reset_partition(app, partition, RELOAD_BACKOFF_MS);
			}
		}
		if (rc == 0)
			continue;
		drop_ready_lane(app, k); /* after this lane's own partitions: they share some */
		if (err->errclass == TLY_ERRCLASS_RETRIABLE)
			tly_warn("could not commit batch, retrying from the stored offsets",
				 "lane=%zu partitions=%zu reason=\"%s\"", k, to - from, err->message);
		else if (err->errclass != TLY_ERRCLASS_PERMANENT) {
			tly_error("could not commit batch", "lane=%zu partitions=%zu reason=\"%s\"", k,
				  to - from, err->message);
			app->failed = true;
		}
	}
	int64_t commit_us = ended_us > started_us ? ended_us - started_us : 0;
	if (ok) {
		tly_ledger_pace_group_committed(&app->pace, commit_us, g->records);
		tly_metrics_observe(app->m.batch, (double)g->records);
		tly_metrics_observe(app->m.commit, (double)(commit_us + g->decided_us) / 1e6);
		tly_health_set_pg(app->health, true);
		app->pg_checked_ms = tly_clock_ms();
	}
	tly_debug("group committed", "partitions=%zu records=%zu waited_us=%" PRId64 " decide_us=%" PRId64
		  " commit_us=%" PRId64 " ok=%s",
		  g->n, g->records, g->waited_us, g->decided_us, commit_us, ok ? "true" : "false");
	for (size_t k = 0; k < lanes; k++) {
		tly_ledger_store_txn_free(g->txn[k]);
		g->txn[k] = NULL;
		g->dropped[k] = false;
	}
	g->n = 0;
	/* a ready group not queued yet whose every lane was dropped: nothing left of it */
	bool left = false;
	for (size_t k = 0; app->ready.n && k < lanes; k++)
		left = left || app->ready.txn[k] != NULL;
	if (app->ready.n && !app->ready.queued && !left) {
		memset(app->ready.dropped, 0, sizeof(app->ready.dropped));
		app->ready.n = 0;
	}
}

/* Swap the ready group into flight (the flight group's slot is empty). */
static void promote_ready(struct app *app, int64_t started_us)
{
	struct group g = app->flight;
	app->flight = app->ready;
	app->flight.queued = false;
	app->flight.submitted_at_us = started_us;
	app->ready = g;
	app->ready.n = 0;
}

/*
 * Take the flight group back from the writer (waiting up to timeout_ms, -1: until it ran). A
 * ready group queued behind it is running already and becomes the flight group.
 */
static void complete_flight(struct app *app, int timeout_ms)
{
	struct tly_ledger_writer_result res[TLY_LEDGER_WRITER_LANES_MAX];
	if (!app->writer || !tly_ledger_writer_busy(app->writer) ||
	    !tly_ledger_writer_take(app->writer, timeout_ms, app->flight.txn, res))
		return;
	/* a queued group started when the first lane's transaction before it ended */
	int64_t started_us = INT64_MAX;
	for (size_t k = 0; k < tly_ledger_writer_lanes(app->writer); k++)
		if (app->flight.txn[k] && res[k].ran && res[k].ended_us < started_us)
			started_us = res[k].ended_us;
	finish_flight(app, res);
	if (app->ready.queued)
		promote_ready(app, started_us == INT64_MAX ? tly_clock_us() : started_us);
}

/*
 * The ready group goes to the writer at once: run now when it is free, else queued behind the
 * flight group, which each lane follows with it the moment its COMMIT returned (no round trip
 * through this thread, which may be deciding or waiting for a CPU then).
 */
static void submit_ready(struct app *app)
{
	if (app->ready.n == 0 || app->ready.queued || !app->writer || tly_ledger_writer_full(app->writer))
		return;
	struct group *g = &app->ready;
	if (!tly_ledger_writer_busy(app->writer)) {
		promote_ready(app, tly_clock_us());
		g = &app->flight;
	} else {
		g->queued = true;
	}
	tly_ledger_writer_submit(app->writer, g->txn);
	memset(g->txn, 0, sizeof(g->txn)); /* the writer has them until complete_flight */
}

/* app->held: each partition's lane in the flight group (with the writer until taken back), else -1. */
static void hold_flight_lanes(struct app *app)
{
	for (int32_t i = 0; i < app->partition_count; i++)
		app->held[i] = -1;
	size_t lanes = tly_ledger_writer_lanes(app->writer);
	for (size_t k = 0, from = 0; app->flight.n && k < lanes; from = app->flight.lane_end[k++])
		for (size_t j = from; j < app->flight.lane_end[k]; j++)
			app->held[app->flight.ids[j]] = (int)k;
}

/*
 * Group commit, step one: decide the open batches of every partition and build their
 * transactions, one per writer lane: the ready group (sent at once when the writer is free).
 * Only while no group is ready, so a partition has at most one decided batch before (the
 * flight's).
 */
static void decide_group(struct app *app)
{
	struct tly_pg_error err = {0};
	struct group *g = &app->ready;
	size_t n = 0, lanes = app->writer ? tly_ledger_writer_lanes(app->writer) : 0;
	int rc = 0;
	if (app->pending == 0 || g->n || !app->writer)
		return;
	memset(g->dropped, 0, sizeof(g->dropped));
	size_t active = tly_ledger_pace_lanes(&app->pace, app->lanes, app->backlog_lanes);
	if (active != app->active_lanes)
		tly_debug("writer lanes changed", "lanes=%zu previous=%zu backlog=%s", active,
			  app->active_lanes, app->pace.backlog > 0 ? "true" : "false");
	app->active_lanes = active;
	hold_flight_lanes(app);
	for (size_t k = 0; k < lanes; k++) {
		for (int32_t i = 0; i < app->partition_count; i++) {
			struct tly_ledger_partition *part = app->slots[i].part;
			if (part && tly_ledger_partition_pending(part) &&
			    tly_ledger_writer_lane_for(i, active, app->held[i]) == k)
			{
				g->ids[n] = i;
				g->items[n++] = (struct tly_ledger_group_item){
					.part = part,
					.published_offset = tly_ledger_publisher_take_marker(app->pub, i)};
			}
		}
		g->lane_end[k] = n;
	}
	g->records = app->pending;
	g->waited_us = tly_clock_us() - 1000 * app->opened_ms;
	app->pending = 0;
	if (n == 0)
		return;
	int64_t t0 = tly_clock_us();
	if (ensure_conn(app) != 0)
		rc = TLY_E_PG;
	for (size_t k = 0, from = 0; rc == 0 && k < lanes; from = g->lane_end[k++])
		if (g->lane_end[k] > from)
			rc = tly_ledger_partition_decide(g->items + from, g->lane_end[k] - from, &app->ctx,
							 &g->txn[k], &err);
	g->decided_us = tly_clock_us() - t0;
	if (rc == 0) {
		tly_ledger_pace_decided(&app->pace, g->decided_us, g->records);
		g->n = n;
		return;
	}
	/*
	 * Their wallets may have moved: drop them, after the flight group (it may hold some, and
	 * free them if it failed).
	 */
	for (size_t k = 0; k < lanes; k++) {
		tly_ledger_store_txn_free(g->txn[k]);
		g->txn[k] = NULL;
	}
	complete_flight(app, -1);
	for (size_t k = 0; k < n; k++)
		if (app->slots[g->ids[k]].part)
			reset_partition(app, g->ids[k], RELOAD_BACKOFF_MS);
	if (err.errclass == TLY_ERRCLASS_RETRIABLE)
		tly_warn("could not decide batch, retrying from the stored offsets",
			 "partitions=%zu reason=\"%s\"", n, err.message);
	else {
		tly_error("could not decide batch", "partitions=%zu reason=\"%s\"", n, err.message);
		app->failed = true;
	}
}

/* Every decided group committed (or failed) and handled. */
static void drain(struct app *app)
{
	while (app->writer && (tly_ledger_writer_busy(app->writer) || app->ready.n)) {
		complete_flight(app, -1);
		submit_ready(app);
	}
}

/* Decide what is open and commit everything (revocation, shutdown). */
static void commit_all(struct app *app)
{
	drain(app);
	decide_group(app);
	submit_ready(app);
	drain(app);
}

/* Store the delivered marker of a partition outside a batch (revocation, shutdown). */
static void save_marker(struct app *app, int32_t partition)
{
	struct tly_pg_error err;
	int64_t marker = tly_ledger_publisher_take_marker(app->pub, partition);
	if (marker < 0 || ensure_conn(app) != 0)
		return;
	if (tly_ledger_store_save_published(app->conn, app->ctx.ledger_topic, partition, marker,
					    &err) != 0)
		tly_warn("could not store the delivered marker", "partition=%d reason=\"%s\"",
			 (int)partition, err.message);
}

/* ---- rebalance ---------------------------------------------------------------------------- */

static void on_assign(void *opaque, rd_kafka_topic_partition_list_t *parts)
{
	struct app *app = opaque;
	for (int i = 0; i < parts->cnt; i++) {
		rd_kafka_topic_partition_t *tp = &parts->elems[i];
		if (tp->partition < 0 || tp->partition >= app->partition_count)
			continue;
		struct slot *s = &app->slots[tp->partition];
		int64_t offset = 0;
		s->assigned = true;
		s->backoff_ms = RELOAD_BACKOFF_MS;
		if (load_partition(app, tp->partition, &offset) == 0) {
			tp->offset = offset;
		} else {
			s->reload_at_ms = tly_clock_ms() + RELOAD_BACKOFF_MS;
			tp->offset = RD_KAFKA_OFFSET_BEGINNING; /* paused below until loaded */
		}
	}
	rd_kafka_error_t *error = rd_kafka_incremental_assign(app->consumer, parts);
	if (error) {
		tly_error("could not assign partitions", "reason=\"%s\"", rd_kafka_error_string(error));
		rd_kafka_error_destroy(error);
		app->failed = true;
	}
	for (int i = 0; i < parts->cnt; i++) {
		int32_t p = parts->elems[i].partition;
		if (p >= 0 && p < app->partition_count && !app->slots[p].part)
			pause_partition(app, p, true);
		tly_info("partition assigned", "partition=%d offset=%" PRId64, (int)p,
			 parts->elems[i].offset);
	}
}

static void on_revoke(void *opaque, rd_kafka_topic_partition_list_t *parts, bool lost)
{
	struct app *app = opaque;
	drain(app); /* decided groups first: the compare-and-set refuses them if another owner moved on */
	for (int i = 0; i < parts->cnt; i++) {
		int32_t p = parts->elems[i].partition;
		if (p < 0 || p >= app->partition_count)
			continue;
		struct slot *s = &app->slots[p];
		if (lost && s->part && tly_ledger_partition_pending(s->part)) {
			tly_warn("partition lost: abandoning its open batch",
				 "partition=%d records=%zu", (int)p, tly_ledger_partition_pending(s->part));
			reset_partition(app, p, RELOAD_BACKOFF_MS);
		}
	}
	commit_all(app); /* a revoked partition is fenced by the compare-and-set if another owner moved on */
	if (app->pub && tly_ledger_publisher_flush(app->pub, app->shutdown_ms) != 0)
		tly_warn("revoked partitions: not every entry was delivered; the next owner republishes",
			 "partitions=%d", parts->cnt);
	for (int i = 0; i < parts->cnt; i++) {
		int32_t p = parts->elems[i].partition;
		if (p < 0 || p >= app->partition_count)
			continue;
		if (app->pub)
			save_marker(app, p);
		tly_ledger_partition_free(app->slots[p].part);
		tly_metrics_unset(app->slots[p].lag);
		tly_metrics_unset(app->slots[p].holds);
		app->slots[p] = (struct slot){.lag = app->slots[p].lag, .holds = app->slots[p].holds};
		tly_info("partition revoked", "partition=%d lost=%s", (int)p, lost ? "true" : "false");
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
	static const char *const kind[] = {"kind", NULL};
	static const char *const reason[] = {"reason", NULL};
	struct tly_metrics *r = app->metrics;
	struct ledger_metrics *m = &app->m;
	m->consumed = tly_metrics_series(tly_metrics_counter(r, "tally_records_consumed_total",
		"Input records of tally.events taken into a batch", NULL), NULL);
	m->entries = tly_metrics_counter(r, "tally_ledger_entries_total",
		"Ledger entries committed, by kind (rejected, duplicate and conflict included)", kind);
	m->rejected = tly_metrics_counter(r, "tally_ledger_rejected_total",
		"Rejected decisions committed, by reason", reason);
	m->duplicates = tly_metrics_series(tly_metrics_counter(r, "tally_ledger_duplicates_total",
		"Events whose event_id the tenant's ledger had already seen (same content)", NULL), NULL);
	m->quarantined = tly_metrics_series(tly_metrics_counter(r, "tally_ledger_quarantined_total",
		"Input records kept aside in quarantine (undecodable or invalid)", NULL), NULL);
	m->batch = tly_metrics_series(tly_metrics_histogram(r, "tally_batch_records",
		"Input records per group commit", NULL, batch_bounds,
		sizeof(batch_bounds) / sizeof(batch_bounds[0])), NULL);
	m->commit = tly_metrics_series(tly_metrics_histogram(r, "tally_commit_duration_seconds",
		"Time to decide and commit a group of batches in PostgreSQL", NULL, commit_bounds,
		sizeof(commit_bounds) / sizeof(commit_bounds[0])), NULL);
	m->assigned = tly_metrics_series(tly_metrics_gauge(r, "tally_partitions_assigned",
		"Partitions of tally.events assigned to this process", NULL), NULL);
	return m->consumed && m->entries && m->rejected && m->duplicates && m->quarantined &&
			       m->batch && m->commit && m->assigned
		       ? 0
		       : -1;
}

/* Per-partition gauges, hidden until the partition is assigned: 0, or -1 (out of memory). */
static int metrics_partitions(struct app *app)
{
	static const char *const partition[] = {"partition", NULL};
	struct tly_metric *lag = tly_metrics_gauge(app->metrics, "tally_consumer_lag",
		"Records of tally.events behind the partition's high watermark", partition);
	struct tly_metric *holds = tly_metrics_gauge(app->metrics, "tally_ledger_open_holds",
		"Reservations holding tokens in the partition's wallets", partition);
	for (int32_t i = 0; i < app->partition_count; i++) {
		char p[16];
		snprintf(p, sizeof(p), "%d", (int)i);
		const char *const v[] = {p};
		struct slot *s = &app->slots[i];
		if (!(s->lag = tly_metrics_series(lag, v)) || !(s->holds = tly_metrics_series(holds, v)))
			return -1;
		tly_metrics_unset(s->lag);
		tly_metrics_unset(s->holds);
	}
	return 0;
}

/* Connect, check the schema, the topics and the partition guard: 0, or -1 with one line logged. */
static int start(struct app *app)
{
	char errstr[2048];
	struct tly_migrate_set *set = NULL;
	int rc = -1;
	const char *listen_on = tly_config_str(app->cfg, "http.listen");
	if (!(app->metrics = tly_metrics_new()) ||
	    !(app->health = tly_health_new(tly_config_int(app->cfg, "readyz.max.lag"))) ||
	    metrics_init(app) != 0) {
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
	if (!(app->conn = tly_pg_connect(app->database_url, "tally-ledger", errstr, sizeof(errstr)))) {
		tly_error("could not start: PostgreSQL is unreachable", "reason=\"%s\"", errstr);
		goto out;
	}
	if (!(set = tly_migrate_load_embedded(errstr, sizeof(errstr))) ||
	    tly_migrate_check_head(app->conn, set, errstr, sizeof(errstr)) != 0) {
		tly_error("could not start: the database schema is not at head", "reason=\"%s\" hint=\"run tallyctl migrate up\"",
			  errstr);
		goto out;
	}
	tly_health_set_pg(app->health, true);
	tly_health_set_schema(app->health, true);
	if (!(app->codec = tly_codec_new(errstr, sizeof(errstr)))) {
		tly_error("could not create the codec", "reason=\"%s\"", errstr);
		goto out;
	}
	app->ctx.events_topic = tly_config_str(app->cfg, "topics.events");
	app->ctx.ledger_topic = tly_config_str(app->cfg, "topics.ledger");
	app->ctx.codec = app->codec;
	app->ctx.conn = app->conn;
	app->ctx.decide.overdraft_limit = tly_config_int(app->cfg, "ledger.overdraft.limit");
	app->ctx.lock_timeout_ms = tly_config_int(app->cfg, "ledger.lock.timeout.ms");
	app->ctx.decide.codec = app->codec;
	app->max_events = (size_t)tly_config_int(app->cfg, "ledger.batch.max.events");
	app->max_ms = tly_config_int(app->cfg, "ledger.batch.max.ms");
	app->shutdown_ms = (int)tly_config_int(app->cfg, "shutdown.timeout.ms");

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
	if (!(app->consumer = tly_kafka_consumer_new(conf, tly_config_str(app->cfg, "ledger.group.id"),
						     errstr, sizeof(errstr)))) {
		tly_error("could not create the Kafka consumer", "reason=\"%s\"", errstr);
		goto out;
	}
	int32_t ledger_count = 0;
	if (tly_kafka_topic_partitions(app->consumer, app->ctx.events_topic, METADATA_TIMEOUT_MS,
				       &app->partition_count, errstr, sizeof(errstr)) != 0 ||
	    tly_kafka_topic_partitions(app->consumer, app->ctx.ledger_topic, METADATA_TIMEOUT_MS,
				       &ledger_count, errstr, sizeof(errstr)) != 0) {
		tly_error("could not start: a topic is missing", "reason=\"%s\"", errstr);
		goto out;
	}
	if (ledger_count < app->partition_count) {
		tly_error("could not start: the ledger topic has fewer partitions than the events topic",
			  "events_topic=%s partitions=%d ledger_topic=%s ledger_partitions=%d",
			  app->ctx.events_topic, (int)app->partition_count, app->ctx.ledger_topic,
			  (int)ledger_count);
		goto out;
	}
	if (tly_config_int(app->cfg, "topics.partitions") != app->partition_count)
		tly_warn("topics.partitions differs from the topic's partition count; using the topic's",
			 "topic=%s configured=%" PRId64 " actual=%d", app->ctx.events_topic,
			 tly_config_int(app->cfg, "topics.partitions"), (int)app->partition_count);
	app->ctx.partition_count = app->partition_count;
	if (tly_ledger_store_check_partitions(app->conn, app->ctx.events_topic, app->partition_count,
					      errstr, sizeof(errstr)) != 0) {
		fprintf(stderr, "tally-ledger: refusing to start: %s\n", errstr);
		tly_error("could not start: the partition count changed", "topic=%s partitions=%d",
			  app->ctx.events_topic, (int)app->partition_count);
		goto out;
	}
	if (!(app->slots = calloc((size_t)app->partition_count, sizeof(*app->slots))) ||
	    !(app->flight.items = calloc((size_t)app->partition_count, sizeof(*app->flight.items))) ||
	    !(app->ready.items = calloc((size_t)app->partition_count, sizeof(*app->ready.items))) ||
	    !(app->flight.ids = calloc((size_t)app->partition_count, sizeof(*app->flight.ids))) ||
	    !(app->ready.ids = calloc((size_t)app->partition_count, sizeof(*app->ready.ids))) ||
	    !(app->held = calloc((size_t)app->partition_count, sizeof(*app->held))) ||
	    !(app->pub = tly_ledger_publisher_new(app->cfg, app->codec, app->partition_count, errstr,
						  sizeof(errstr)))) {
		tly_error("could not create the ledger producer", "reason=\"%s\"",
			  app->slots ? errstr : "out of memory");
		goto out;
	}
	if (metrics_partitions(app) != 0) {
		tly_error("could not start: out of memory", NULL);
		goto out;
	}
	app->lanes = (size_t)tly_config_int(app->cfg, "ledger.writers");
	app->backlog_lanes = (size_t)tly_config_int(app->cfg, "ledger.writers.backlog");
	app->active_lanes = app->lanes;
	if (!(app->wake_queue = rd_kafka_queue_get_consumer(app->consumer)) ||
	    !(app->writer = tly_ledger_writer_new(app->database_url,
						  app->lanes > app->backlog_lanes ? app->lanes
										  : app->backlog_lanes,
						  wake_loop, app, errstr,
						  sizeof(errstr)))) {
		tly_error("could not start the writer", "reason=\"%s\"",
			  app->wake_queue ? errstr : "no consumer queue");
		goto out;
	}
	const char *const topics[] = {app->ctx.events_topic};
	if (tly_kafka_subscribe(app->consumer, topics, 1) != 0)
		goto out;
	tly_info("tally-ledger started", "topic=%s partitions=%d group=%s batch_max_events=%zu batch_max_ms=%" PRId64
		 " writers=%zu writers_backlog=%zu",
		 app->ctx.events_topic, (int)app->partition_count,
		 tly_config_str(app->cfg, "ledger.group.id"), app->max_events, app->max_ms,
		 app->lanes, app->backlog_lanes);
	rc = 0;
out:
	tly_migrate_free(set);
	return rc;
}

/* ---- the loop ----------------------------------------------------------------------------- */

static void handle_message(struct app *app, rd_kafka_message_t *m)
{
	if (m->err) {
		if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
			return;
		bool fatal = m->err == RD_KAFKA_RESP_ERR__FATAL;
		tly_log(fatal ? TLY_LOG_ERROR : TLY_LOG_WARN, "Kafka consumer error",
			"partition=%d reason=\"%s\"", (int)m->partition, rd_kafka_message_errstr(m));
		if (tly_kafka_errclass(m->err, fatal) == TLY_ERRCLASS_FATAL)
			app->failed = true;
		return;
	}
	int32_t p = m->partition;
	if (p < 0 || p >= app->partition_count || !app->slots[p].part)
		return; /* not ours, or being reloaded: consumption moves back to the stored offset */
	struct tly_ledger_partition *part = app->slots[p].part;
	bool added = false;
	int64_t expected = tly_ledger_partition_next_offset(part);
	if (tly_ledger_partition_add(part, m->offset, m->key, m->key_len, m->payload, m->len,
				     tly_clock_ms(), &added) != 0) {
		tly_error("could not buffer input record: out of memory", "partition=%d offset=%" PRId64,
			  (int)p, m->offset);
		app->failed = true;
		return;
	}
	if (!added)
		return;
	if (m->offset != expected)
		tly_warn("input offsets skip ahead", "partition=%d expected=%" PRId64 " offset=%" PRId64,
			 (int)p, expected, m->offset);
	tly_metrics_add(app->m.consumed, 1);
	if (app->pending++ == 0)
		app->opened_ms = tly_clock_ms();
}

/*
 * After a poll returned a record: take what else librdkafka has ready in one call (one lock of
 * its queue, and the loop's housekeeping once for all of them instead of once a record), up to
 * DRAIN_MAX and never past limit pending (a group's most records). True: more may be ready.
 */
static bool take_ready(struct app *app, size_t limit)
{
	rd_kafka_message_t *msgs[DRAIN_MAX];
	size_t room = app->pending >= limit ? 0 : limit - app->pending;
	if (room > DRAIN_MAX)
		room = DRAIN_MAX;
	if (room == 0)
		return true;
	ssize_t n = rd_kafka_consume_batch_queue(app->wake_queue, 0, msgs, room);
	for (ssize_t i = 0; i < n; i++) {
		handle_message(app, msgs[i]);
		rd_kafka_message_destroy(msgs[i]);
	}
	return n == (ssize_t)room;
}

/* Delivery to tally.ledger failed for good: republish from the marker. */
static void check_deliveries(struct app *app)
{
	for (int32_t i = 0; i < app->partition_count; i++) {
		if (app->slots[i].part && tly_ledger_publisher_take_failure(app->pub, i)) {
			tly_warn("delivery to tally.ledger failed; republishing from the marker",
				 "partition=%d", (int)i);
			drain(app); /* its decided batches, if any, are committed before it is dropped */
			if (!app->slots[i].part)
				continue;
			reset_partition(app, i, RELOAD_BACKOFF_MS);
		}
	}
}

/*
 * A partition's lag: librdkafka's cached high watermark (updated by every fetch response, no
 * broker round trip) minus where this process resumes. -1: unknown (not assigned, before the
 * first fetch of it answers, while it is being reloaded).
 */
static int64_t partition_lag(const struct app *app, int32_t i)
{
	const struct slot *s = &app->slots[i];
	int64_t low = -1, high = -1;
	if (!s->assigned || !s->part ||
	    rd_kafka_get_watermark_offsets(app->consumer, app->ctx.events_topic, i, &low, &high) !=
		    RD_KAFKA_RESP_ERR_NO_ERROR ||
	    high < 0)
		return -1;
	int64_t next = tly_ledger_partition_next_offset(s->part);
	return high > next ? high - next : 0;
}

/* The backlog's depth for ledger_pace: records not taken on the partitions whose lag is known. */
static int64_t backlog_depth(const struct app *app)
{
	int64_t depth = -1;
	for (int32_t i = 0; i < app->partition_count; i++) {
		int64_t lag = partition_lag(app, i);
		if (lag >= 0)
			depth = (depth < 0 ? 0 : depth) + lag;
	}
	return depth;
}

/* Lag per assigned partition (partition_lag) for the gauges and /readyz. */
static void refresh_lag(struct app *app)
{
	int64_t total = 0;
	int assigned = 0;
	bool known = true;
	for (int32_t i = 0; i < app->partition_count; i++) {
		struct slot *s = &app->slots[i];
		if (!s->assigned)
			continue;
		assigned++;
		int64_t lag = partition_lag(app, i);
		if (lag < 0) {
			known = false;
			tly_metrics_unset(s->lag);
			continue;
		}
		tly_metrics_set(s->lag, lag);
		total += lag;
	}
	tly_metrics_set(app->m.assigned, assigned);
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
	tly_health_set_pg(app->health, tly_pg_check(&app->conn, app->database_url, "tally-ledger"));
	app->ctx.conn = app->conn;
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
	if (!app->pending && app->writer && !tly_ledger_writer_busy(app->writer) &&
	    now - app->pg_checked_ms >= PG_CHECK_EVERY_MS)
		check_pg(app);
}

/* Microseconds until the pending records are to be decided: 0 now, -1 not yet (ledger_pace.h). */
static int64_t decide_in_us(const struct app *app, bool none_ready)
{
	struct tly_ledger_pace_state st = {
		.pending = app->pending,
		.max_events = tly_ledger_pace_max_events(&app->pace, app->max_events),
		.bound_us = 1000 * (app->opened_ms + app->max_ms),
		.group_waiting = app->ready.n > 0,
		.none_ready = none_ready,
		.writer_busy = app->writer && tly_ledger_writer_busy(app->writer),
		.submitted_us = app->flight.submitted_at_us,
		.flight_records = app->flight.records,
		.now_us = tly_clock_us(),
	};
	return tly_ledger_pace_decide_in_us(&app->pace, &st);
}

/*
 * The loop. Records are taken as long as librdkafka has them ready; with the writer free the open
 * batches are decided as soon as none is ready (so a lone event is decided at once), or at
 * ledger.batch.max.events, or ledger.batch.max.ms after the first record, and their transaction
 * goes to the writer. While it commits, the loop goes on taking records and decides the next group
 * when that commit is about to end (ledger_pace.h); the group then waits for the writer (and
 * taking records pauses at ledger.batch.max.events, up to 4x that through a backlog). The writer
 * wakes the loop when a transaction ran; only then is its group published.
 */
static void run(struct app *app)
{
	while (!stop_requested && !app->failed) {
		if (reload_requested) {
			reload_requested = 0;
			tly_cli_reload(app->config_file, app->sets, app->n_sets, environ);
		}
		bool more_ready = false;
		size_t limit = tly_ledger_pace_max_events(&app->pace, app->max_events);
		if (app->ready.n && app->pending >= limit) {
			complete_flight(app, POLL_MS); /* back pressure: the next group is full */
		} else {
			/* a record or the writer's wake-up ends the wait early */
			int64_t due_us = decide_in_us(app, true);
			rd_kafka_message_t *m = rd_kafka_consumer_poll(
				app->consumer, due_us < 0 || due_us >= 1000 * POLL_MS
						       ? POLL_MS
						       : (int)((due_us + 999) / 1000));
			if (m) {
				handle_message(app, m);
				rd_kafka_message_destroy(m);
				more_ready = take_ready(app, limit);
			}
		}
		complete_flight(app, 0);
		submit_ready(app);
		if (decide_in_us(app, !more_ready) == 0) {
			tly_ledger_pace_sized(&app->pace, app->pending, app->max_events, more_ready,
					      backlog_depth(app));
			decide_group(app);
			submit_ready(app);
		}
		check_deliveries(app);
		reload_due(app);
		tly_ledger_publisher_poll(app->pub, 0);
		observe(app);
	}
	if (app->failed) {
		drain(app);
		return;
	}
	tly_info("stopping: committing open batches", NULL);
	commit_all(app);
	if (tly_ledger_publisher_flush(app->pub, app->shutdown_ms) != 0)
		tly_warn("stopping with undelivered entries; the next owner republishes them", NULL);
	for (int32_t i = 0; i < app->partition_count; i++)
		if (app->slots[i].assigned)
			save_marker(app, i);
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
	tly_log_init("tally-ledger", TLY_LOG_INFO);
	static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
					     {"set", required_argument, NULL, 's'},
					     {"help", no_argument, NULL, 'h'},
					     {NULL, 0, NULL, 0}};
	if (!sets) {
		fprintf(stderr, "tally-ledger: out of memory\n");
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
		fprintf(stderr, "tally-ledger: unexpected argument \"%s\" (see --help)\n", argv[optind]);
		goto out;
	}
	if (!(app.cfg = tly_cli_config(config_file, sets, n_sets, environ, errstr, sizeof(errstr)))) {
		fprintf(stderr, "tally-ledger: %s\n", errstr);
		goto out;
	}
	if (tly_log_level_parse(tly_config_str(app.cfg, "log.level"), &level) == 0)
		tly_log_set_level(level);
	/*
	 * A group's buffers (its COPY payload, statements, decoded events) come and go every few
	 * milliseconds: keep freed memory in the heap instead of mapping and faulting it in again.
	 */
	if (mallopt(M_MMAP_THRESHOLD, 64 << 20) != 1 || mallopt(M_TRIM_THRESHOLD, 256 << 20) != 1)
		tly_warn("could not tune the allocator; going on with its defaults", NULL);
	if (tly_proc_on_signals(on_stop, on_reload) != 0) {
		fprintf(stderr, "tally-ledger: could not install the signal handlers: %s\n", strerror(errno));
		rc = 1;
		goto out;
	}
	app.config_file = config_file;
	app.sets = sets;
	app.n_sets = n_sets;
	rc = 1;
	if (start(&app) != 0)
		goto out;
	run(&app);
	rc = app.failed ? 1 : 0;
out:
	/*
	 * Leaving the group revokes what is left (their open batches were committed above; the
	 * writer is gone first, so nothing is decided any more and nothing wakes the queue).
	 */
	tly_ledger_writer_free(app.writer);
	app.writer = NULL;
	if (app.wake_queue)
		rd_kafka_queue_destroy(app.wake_queue);
	tly_kafka_consumer_destroy(app.consumer);
	for (size_t k = 0; k < TLY_LEDGER_WRITER_LANES_MAX; k++) {
		tly_ledger_store_txn_free(app.flight.txn[k]);
		tly_ledger_store_txn_free(app.ready.txn[k]);
	}
	tly_http_stop(app.http);
	tly_metrics_free(app.metrics);
	tly_health_free(app.health);
	tly_ledger_publisher_free(app.pub, app.shutdown_ms);
	for (int32_t i = 0; app.slots && i < app.partition_count; i++)
		tly_ledger_partition_free(app.slots[i].part);
	free(app.slots);
	free(app.held);
	free(app.flight.items);
	free(app.ready.items);
	free(app.flight.ids);
	free(app.ready.ids);
	tly_codec_free(app.codec);
	if (app.conn)
		PQfinish(app.conn);
	tly_config_free(app.cfg);
	free(sets);
	if (rc == 0 && app.partition_count)
		tly_info("tally-ledger stopped", NULL);
	return rc;
}
