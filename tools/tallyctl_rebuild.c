/*
 * tallyctl rebuild: projections folded from scratch into shadow tables while the live ones keep
 * serving, caught up to exactly the inputs the live projector has committed, then swapped in with
 * their grants, row-level security, indexes, sequences and foreign keys in one transaction.
 *
 * Inputs: tally.events and tally.catalog from each partition's first record up to the projector's
 * stored offset (consumer_offsets, consumer 'tally-projector'); ledger entries from ledger_entries
 * up to the projector's last applied seq per tenant (projector_ledger_applied), never from
 * tally.ledger, whose retention may be shorter than history. See projections/README.md.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#include "clock.h"
#include "codec.h"
#include "copyout.h"
#include "embedded.h"
#include "entries.h"
#include "fold.h"
#include "memfold.h"
#include "kafka.h"
#include "migrate.h"
#include "pgcopy.h"
#include "pg.h"
#include "schema.h"
#include "tallyctl.h"
#include "tallyctl_rebuild_read.h"

#define PROJECTOR_CONSUMER "tally-projector" /* consumer_offsets.consumer of tally-projector */
#define SHADOW_SUFFIX "_rebuild"
#define FLUSH_EVERY 100000      /* records per fold flush */
#define LEDGER_PAGE "50000"     /* entries per keyset page */
#define ENTRIES_AHEAD ((size_t)256 << 20) /* bytes of entries the first pass reads ahead, at most */
#define ENTRIES_WORK_MEM "256MB" /* the first pass's sort of the entries, in memory */
#define SWAP_ATTEMPTS 20
#define CATCHUP_PASSES 5        /* passes before the swap, while the projector runs */
#define CATCHUP_SMALL 2000      /* records: few enough to fold inside the swap transaction */
#define KAFKA_TIMEOUT_MS 10000
#define STALL_MS 60000          /* no record for this long while some are expected: give up */
#define ADVISORY_KEY "7310412918264617"
#define N_MAX_TABLES 32
#define NIL_UUID "00000000-0000-0000-0000-000000000000"
/*
 * The tables whose rows the first pass COPYs while it folds (each row is final once folded: see
 * tly_memfold_stream), each on a connection of its own: the server loads them while the events are
 * read. Not agent_messages, which could be: its rows (JSON content) come faster than the server
 * takes them while the events are read on both cores, and libpq moves its unsent output on every
 * partial send (on the large backlog the rebuild took 1.53 s against 1.29 s without it).
 */
static const char *const STREAMED_TABLES[] = {"projector_seen_events"};
#define N_STREAMS (sizeof(STREAMED_TABLES) / sizeof(STREAMED_TABLES[0]))
#define STREAM_ROWS 2048        /* rows per send of a streamed COPY */

/* One streamed table's COPY, on its own connection, in a transaction that created its shadow. */
struct stream {
	PGconn *conn;               /* owned; NULL: not streamed */
	struct tly_pgcopy *c;       /* owned; rows not sent yet */
	int rc;                     /* the first error of the stream, sticky */
	struct tly_pg_error err;
};

/*
 * The order in which the fold's statements first touch its tables: the swap locks them in this
 * order, so that it queues behind a projector batch instead of deadlocking with it.
 */
static const char *const LOCK_ORDER[] = {
	"projector_seen_events", "projector_ledger_applied", "tenant_accounts", "users",
	"billing_plans", "plan_features", "tenant_subscriptions", "agent_conversations",
	"agent_messages", "projector_usage_periods", "subscription_usage", "projector_api_calls",
	"api_usage", "token_balances", "subscription_invoices", "projector_invoice_status",
};
#define N_LOCK_ORDER (sizeof(LOCK_ORDER) / sizeof(LOCK_ORDER[0]))

struct rebuild {
	struct app *app;
	PGconn *conn;               /* owned */
	bool locked;                /* conn holds the rebuild's advisory lock */
	rd_kafka_t *rk;             /* owned; assigned partitions only, never joins its group */
	struct tly_codec *codec;    /* owned */
	struct tly_fold *fold;      /* owned; writes the shadow tables */
	struct tly_memfold *mem;    /* owned; the first pass, into the empty shadows; then NULL */
	struct tly_event ev;        /* decode target, reused */
	uint64_t tick_fp[8];        /* fingerprints of the ClockTick schemas: skipped undecoded */
	size_t n_tick_fp;
	const char *topics[2];      /* events, catalog (borrowed from the config) */
	struct rpart *parts;        /* owned */
	size_t nparts;
	const char *tables[N_MAX_TABLES]; /* every table the fold writes, in LOCK_ORDER */
	size_t ntables;
	bool selected[N_MAX_TABLES];      /* swapped in */
	char shadow[N_MAX_TABLES][64];
	char *qshadow_applied;      /* quoted name of the shadow projector_ledger_applied; owned */
	bool in_swap;               /* inside the swap transaction: flushes do not commit */
	/* the first pass's other connections, opened by a thread while the first is set up */
	pthread_t connector;
	bool connecting;            /* the connector thread runs or has not been joined */
	PGconn *spare[1 + N_STREAMS]; /* owned until taken (take_spare): entries, then streams */
	struct stream streams[N_STREAMS]; /* STREAMED_TABLES[k] */
	bool streamed[N_MAX_TABLES];
	/* progress */
	bool tty;
	int64_t total, events, entries;
	uint64_t undecodable;
	double started, drawn;
	double phase[16];            /* seconds per phase, for the summary line (PHASES) */
};

/* The phases the summary line times. */
enum { PH_START, PH_SHADOWS, PH_EVENTS, PH_ENTRIES, PH_COPY, PH_INDEXES, PH_CATCHUP, PH_SWAP, PH_AFTER, PH__N };
static const char *const PHASES[PH__N] = {"start", "shadows", "events", "entries", "copy", "indexes",
					  "catch-up", "swap", "validate"};

static void rebuild_usage(void)
{
	fprintf(stderr, "tallyctl: usage: tallyctl rebuild all|PROJECTION... (tables: see "
			"projections/README.md)\n");
}

/* ---- progress ----------------------------------------------------------------------------- */

static void progress(struct rebuild *rb, bool force)
{
	if (!rb->tty)
		return;
	double t = tly_clock_s();
	if (!force && t - rb->drawn < 0.1)
		return;
	rb->drawn = t;
	int64_t done = rb->events + rb->entries;
	int64_t total = rb->total > done ? rb->total : done;
	int width = 30, fill = total > 0 ? (int)(width * done / total) : width;
	char bar[64];
	for (int i = 0; i < width; i++)
		bar[i] = i < fill ? '#' : '-';
	bar[width] = '\0';
	fprintf(stderr, "\rrebuild [%s] %3d%%  %" PRId64 "/%" PRId64 " (events %" PRId64
		", ledger entries %" PRId64 ")  %.1f s ",
		bar, total > 0 ? (int)(100 * done / total) : 100, done, total, rb->events, rb->entries,
		t - rb->started);
	fflush(stderr);
}

/* ---- SQL helpers -------------------------------------------------------------------------- */

static void report(const struct rebuild *rb, const char *what, const struct tly_pg_error *err)
{
	fprintf(stderr, "%stallyctl: could not %s: %s\n", rb->tty ? "\n" : "", what, err->message);
}

/* An identifier quoted for SQL text (malloc'd by libpq: PQfreemem), or NULL. */
static char *qident(PGconn *conn, const char *name)
{
	return PQescapeIdentifier(conn, name, strlen(name));
}

/*
 * The tables' live (or shadow) names, those which[i] is true for (NULL: every table), as a text[]
 * literal (names are the fold's: [a-z0-9_]).
 */
static void names_array(const struct rebuild *rb, bool shadow, const bool *which, char *out, size_t len)
{
	size_t off = (size_t)snprintf(out, len, "{");
	for (size_t i = 0; i < rb->ntables; i++)
		if ((!which || which[i]) && off < len)
			off += (size_t)snprintf(out + off, len - off, "%s\"%s\"", off > 1 ? "," : "",
						shadow ? rb->shadow[i] : rb->tables[i]);
	if (off < len)
		snprintf(out + off, len - off, "}");
}

/* Statements for one pipeline: each malloc'd, owned by the list. */
struct stmts {
	char **v;
	size_t n, cap;
};

/* Append a copy of sql (NULL: nothing); 0 or TLY_E_NOMEM. */
static int stmts_add(struct stmts *l, const char *sql)
{
	if (!sql)
		return 0;
	if (l->n == l->cap) {
		size_t cap = l->cap ? 2 * l->cap : 64;
		char **v = realloc(l->v, cap * sizeof(*v));
		if (!v)
			return TLY_E_NOMEM;
		l->v = v;
		l->cap = cap;
	}
	if (!(l->v[l->n] = strdup(sql)))
		return TLY_E_NOMEM;
	l->n++;
	return 0;
}

static void stmts_free(struct stmts *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->v[i]);
	free(l->v);
	*l = (struct stmts){0};
}

/* Run every statement (column 0) that query, parameterised by v[0..1], generates: one pipeline. */
static int run_generated(PGconn *conn, const char *query, const char *const *v, struct tly_pg_error *err)
{
	struct stmts l = {0};
	PGresult *res = tly_pg_query(conn, query, 2, v, err);
	if (!res)
		return TLY_E_PG;
	int rc = 0;
	for (int r = 0; r < PQntuples(res) && rc == 0; r++)
		rc = stmts_add(&l, PQgetvalue(res, r, 0));
	PQclear(res);
	if (rc != 0)
		snprintf(err->message, sizeof(err->message), "out of memory");
	else
		rc = tly_pg_exec_pipeline(conn, (const char *const *)l.v, l.n, err);
	stmts_free(&l);
	return rc;
}

/* ---- the shadow tables -------------------------------------------------------------------- */

static int drop_shadows(struct rebuild *rb, bool only_unselected, struct tly_pg_error *err)
{
	int rc = 0;
	for (size_t i = 0; i < rb->ntables && rc == 0; i++) {
		if (only_unselected && rb->selected[i])
			continue;
		char *q = qident(rb->conn, rb->shadow[i]);
		char sql[256];
		if (!q)
			return TLY_E_NOMEM;
		snprintf(sql, sizeof(sql), "DROP TABLE IF EXISTS %s", q);
		PQfreemem(q);
		rc = tly_pg_exec(rb->conn, sql, 0, NULL, err);
	}
	return rc;
}

/*
 * The rows the migrations themselves put into projection tables (the plan catalog seed of
 * 0001_baseline.sql) are the first input of every projection, before any event: their INSERT
 * statements run again, verbatim, into temporary tables that shadow the live names (pg_temp comes
 * first in the search path), inside the open transaction; seeded[i] says which tables got some.
 */
static int seed_temps(struct rebuild *rb, bool *seeded, struct tly_pg_error *err)
{
	int rc = 0;
	for (const struct tly_embedded *m = tly_embedded_migrations; rc == 0 && m->name; m++) {
		for (const char *p = m->data; rc == 0 && (p = strstr(p, "INSERT INTO ")) != NULL; p++) {
			if (p != m->data && p[-1] != '\n')
				continue;
			const char *name = p + strlen("INSERT INTO ");
			size_t len = strcspn(name, " (\n");
			size_t i = 0;
			while (i < rb->ntables && (strlen(rb->tables[i]) != len ||
						   strncmp(rb->tables[i], name, len) != 0))
				i++;
			if (i == rb->ntables)
				continue;
			const char *end = p;
			for (bool quoted = false; *end && (quoted || *end != ';'); end++)
				if (*end == '\'')
					quoted = !quoted; /* '' inside a literal toggles twice */
			char *stmt = strndup(p, (size_t)(end - p));
			char *ql = qident(rb->conn, rb->tables[i]);
			char sql[512];
			if (!stmt || !ql) {
				rc = TLY_E_NOMEM;
			} else if (!seeded[i]) {
				snprintf(sql, sizeof(sql), "CREATE TEMP TABLE %s (LIKE public.%s INCLUDING DEFAULTS) "
					 "ON COMMIT DROP", ql, ql);
				rc = tly_pg_exec(rb->conn, sql, 0, NULL, err);
				seeded[i] = true;
			}
			/* SQL text of our own migrations, compiled in: no value comes from outside */
			if (rc == 0)
				rc = tly_pg_exec_script(rb->conn, stmt, err);
			free(stmt);
			PQfreemem(ql);
		}
	}
	return rc;
}

/*
 * The live tables' storage parameters (a fill factor: migrations/0011), for their shadows ($1 live
 * names, $2 their shadows, text[] in the same order): one ALTER TABLE per table that has any, all
 * in one text (NULL: none). LIKE does not copy them, and a shadow is loaded at its own fill
 * factor before it becomes the live table. The live names are schema-qualified: the seeds'
 * temporary tables, in this transaction, have the same names.
 */
static const char SHADOW_STORAGE_SQL[] =
	"SELECT string_agg(format('ALTER TABLE %I SET (%s);', t.shadow, "
	"  array_to_string(c.reloptions, ', ')), E'\\n' ORDER BY t.n) "
	"FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(live, shadow, n) "
	"JOIN pg_class c ON c.oid = ('public.' || quote_ident(t.live))::regclass "
	"WHERE c.reloptions IS NOT NULL";

/*
 * The shadows' DDL as one script for the open transaction: leftovers of an earlier rebuild
 * dropped, an empty copy of every table the fold writes but the streamed ones (columns, defaults,
 * checks; no index, no data) with the live table's storage parameters (storage: SHADOW_STORAGE_SQL's
 * statements, NULL: none), the seeded rows, COMMIT. malloc'd; NULL on OOM.
 */
static char *shadows_script(struct rebuild *rb, const bool *seeded, const char *storage)
{
	char *sql = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&sql, &len);
	if (!f)
		return NULL;
	bool ok = true;
	for (int step = 0; step < 3 && ok; step++) {
		if (step == 0)
			fputs("DROP TABLE IF EXISTS ", f);
		for (size_t i = 0, n = 0; i < rb->ntables && ok; i++) {
			if (rb->streamed[i])
				continue; /* the stream's connection creates it (stream_begin) */
			char *ql = qident(rb->conn, rb->tables[i]), *qs = qident(rb->conn, rb->shadow[i]);
			ok = ql && qs;
			if (ok && step == 0)
				fprintf(f, "%s%s", n++ ? ", " : "", qs);
			else if (ok && step == 1)
				fprintf(f, "CREATE TABLE %s (LIKE public.%s INCLUDING ALL EXCLUDING INDEXES);\n",
					qs, ql); /* public.: the seeds' temporary tables shadow the live names */
			else if (ok && seeded[i])
				fprintf(f, "INSERT INTO public.%s SELECT * FROM pg_temp.%s;\n", qs, ql);
			PQfreemem(ql);
			PQfreemem(qs);
		}
		if (step == 0)
			fputs(";\n", f);
		else if (step == 1 && storage)
			fprintf(f, "%s\n", storage);
	}
	fputs("COMMIT", f);
	if (fclose(f) != 0 || !ok) {
		free(sql);
		return NULL;
	}
	return sql;
}

/* The results of a script sent with PQsendQuery: 0, or TLY_E_PG with the first error in err. */
static int script_results(PGconn *conn, struct tly_pg_error *err)
{
	int rc = 0;
	PGresult *res;
	while ((res = PQgetResult(conn)) != NULL) {
		ExecStatusType st = PQresultStatus(res);
		if (rc == 0 && st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
			tly_pg_error_set(err, conn, res);
			rc = TLY_E_PG;
		}
		PQclear(res);
	}
	return rc;
}

/* ---- folding ------------------------------------------------------------------------------ */

static int flush(struct rebuild *rb, struct tly_pg_error *err)
{
	if (rb->mem || tly_fold_pending(rb->fold) == 0)
		return 0; /* the first pass: plans wait for the shadows' indexes (first_pass_copy) */
	if (rb->in_swap)
		return tly_fold_flush(rb->fold, rb->conn, err);
	int rc = tly_pg_begin(rb->conn, err);
	if (rc == 0)
		rc = tly_fold_flush(rb->fold, rb->conn, err);
	if (rc == 0)
		return tly_pg_commit(rb->conn, err);
	struct tly_pg_error rberr;
	if (PQtransactionStatus(rb->conn) != PQTRANS_IDLE && tly_pg_rollback(rb->conn, &rberr) != 0)
		fprintf(stderr, "tallyctl: could not roll back: %s\n", rberr.message);
	return rc;
}

static int add(struct rebuild *rb, const struct tly_event *ev, struct tly_pg_error *err)
{
	if (rb->mem) {
		int rc = tly_memfold_add(rb->mem, ev);
		if (rc == 0 && ev->type == TLY_EV_PLAN_PUBLISHED && tly_fold_add(rb->fold, ev) != 0)
			rc = TLY_E_NOMEM;
		if (rc != 0)
			snprintf(err->message, sizeof(err->message), "%s", rc == TLY_E_NOMEM ? "out of memory" :
				 "the in-memory fold got an event after the ledger entries");
		return rc;
	}
	if (tly_fold_add(rb->fold, ev) != 0) {
		snprintf(err->message, sizeof(err->message), "out of memory");
		return TLY_E_NOMEM;
	}
	return tly_fold_pending(rb->fold) >= FLUSH_EVERY ? flush(rb, err) : 0;
}

/*
 * Targets of this pass: the projector's stored offsets, never below what the shadows already
 * hold (the stored offsets only move back when an operator resets them; the live tables still
 * hold what was folded before, and so do the shadows).
 */
static int read_targets(struct rebuild *rb, int64_t *behind, struct tly_pg_error *err)
{
	const char *const v[] = {PROJECTOR_CONSUMER};
	PGresult *res = tly_pg_query(rb->conn, "SELECT topic, partition, next_offset FROM consumer_offsets "
				     "WHERE consumer = $1", 1, v, err);
	if (!res)
		return TLY_E_PG;
	*behind = 0;
	for (size_t i = 0; i < rb->nparts; i++)
		rb->parts[i].target = rb->parts[i].done;
	for (int r = 0; r < PQntuples(res); r++) {
		int32_t p = (int32_t)strtol(PQgetvalue(res, r, 1), NULL, 10);
		int64_t stored = strtoll(PQgetvalue(res, r, 2), NULL, 10);
		for (size_t i = 0; i < rb->nparts; i++) {
			struct rpart *pt = &rb->parts[i];
			if (pt->partition == p && strcmp(pt->topic, PQgetvalue(res, r, 0)) == 0 &&
			    stored > pt->target)
				pt->target = stored;
		}
	}
	PQclear(res);
	for (size_t i = 0; i < rb->nparts; i++)
		*behind += rb->parts[i].target - rb->parts[i].done;
	return 0;
}

/*
 * The fingerprints of every ClockTick schema version: the fold ignores ClockTicks (time moves the
 * ledger, not the projections), and they are most of tally.events, so they are skipped by their
 * single-object header without a decode.
 */
static void find_ticks(struct rebuild *rb)
{
	const struct tly_schema_registry *reg = tly_codec_registry(rb->codec);
	const char *name = tly_event_desc(TLY_EV_CLOCK_TICK)->name;
	rb->n_tick_fp = 0;
	for (size_t i = 0; i < tly_schema_count(reg); i++) {
		const struct tly_schema *sc = tly_schema_at(reg, i);
		const char *full = tly_schema_fullname(sc), *dot = strrchr(full, '.');
		if (strcmp(dot ? dot + 1 : full, name) == 0 &&
		    rb->n_tick_fp < sizeof(rb->tick_fp) / sizeof(rb->tick_fp[0]))
			rb->tick_fp[rb->n_tick_fp++] = tly_schema_fingerprint(sc);
	}
}

/*
 * Fold every partition's records from done up to target, in partition order: read and decoded on
 * the reading threads (tallyctl_rebuild_read.c) while this one folds.
 */
static int fold_topics(struct rebuild *rb, struct tly_pg_error *err)
{
	size_t remaining = 0;
	rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new((int)rb->nparts);
	if (!l)
		return TLY_E_NOMEM;
	for (size_t i = 0; i < rb->nparts; i++) {
		struct rpart *pt = &rb->parts[i];
		pt->active = pt->done < pt->target;
		if (pt->active) {
			rd_kafka_topic_partition_list_add(l, pt->topic, pt->partition)->offset = pt->done;
			remaining++;
		}
	}
	int rc = 0;
	if (remaining == 0)
		goto out;
	/* the readers' queues first: what the assignment fetches goes to them */
	struct rb_read *r = rb_read_start(rb->rk, rb->codec, rb->parts, rb->nparts, rb->tick_fp,
					  rb->n_tick_fp, STALL_MS, err->message, sizeof(err->message));
	if (!r) {
		rc = TLY_E_NOMEM;
		goto out;
	}
	rd_kafka_resp_err_t kerr = rd_kafka_assign(rb->rk, l);
	if (kerr) {
		snprintf(err->message, sizeof(err->message), "could not assign partitions: %s",
			 rd_kafka_err2str(kerr));
		rc = TLY_E_KAFKA;
	}
	const struct tly_event *ev;
	while (rc == 0 && (rc = rb_read_next(r, &ev, &rb->events, err->message,
					      sizeof(err->message))) == 1) {
		rc = add(rb, ev, err);
		progress(rb, false);
	}
	rb_read_end(r, &rb->undecodable);
	if (rc == 0)
		rc = flush(rb, err);
	kerr = rd_kafka_assign(rb->rk, NULL);

	if (kerr && rc == 0) {
		snprintf(err->message, sizeof(err->message), "could not unassign partitions: %s",
			 rd_kafka_err2str(kerr));
		rc = TLY_E_KAFKA;
	}
out:
	rd_kafka_topic_partition_list_destroy(l);
	return rc;
}

struct add_ctx {
	struct rebuild *rb;
	struct tly_pg_error *err;
};

static int add_entry(const struct tly_event *entry, void *ud)
{
	struct add_ctx *c = ud;
	c->rb->entries++;
	return add(c->rb, entry, c->err);
}

/*
 * The tenants whose live applied seq is above the shadow's, with the range (lo, hi] still to fold:
 * a few rows of projector_ledger_applied, not a scan of ledger_entries, when little is behind.
 */
#define LEDGER_BEHIND_SQL(shadow)                                                                   \
	"SELECT a.tenant_id, COALESCE(s.seq, 0) AS lo, a.seq AS hi FROM projector_ledger_applied a " \
	"LEFT JOIN " shadow " s ON s.tenant_id = a.tenant_id WHERE a.seq > COALESCE(s.seq, 0)"

/*
 * Fold the ledger entries the live projector has applied (seq <= its projector_ledger_applied
 * row) and the shadows have not (seq > the shadow's row), by keyset pages in (tenant, seq) order,
 * each tenant's range read by its primary key.
 */
static int fold_ledger(struct rebuild *rb, struct tly_pg_error *err)
{
	char sql[1536], tenant[37] = NIL_UUID, seq[24] = "-1";
	snprintf(sql, sizeof(sql),
		 "SELECT " TLY_ENTRIES_SELECT " FROM (" LEDGER_BEHIND_SQL("%s") ") g "
		 "CROSS JOIN LATERAL (SELECT * FROM ledger_entries x WHERE x.tenant_id = g.tenant_id "
		 "  AND x.seq > g.lo AND x.seq <= g.hi) e "
		 "WHERE (e.tenant_id, e.seq) > ($1::uuid, $2::bigint) "
		 "ORDER BY e.tenant_id, e.seq LIMIT " LEDGER_PAGE,
		 rb->qshadow_applied);
	struct add_ctx c = {rb, err};
	for (;;) {
		const char *const v[] = {tenant, seq};
		PGresult *res = tly_pg_query(rb->conn, sql, 2, v, err);
		if (!res)
			return TLY_E_PG;
		int n = PQntuples(res);
		if (n > 0) {
			snprintf(tenant, sizeof(tenant), "%s", PQgetvalue(res, n - 1, 0));
			snprintf(seq, sizeof(seq), "%s", PQgetvalue(res, n - 1, 1));
		}
		int rc = tly_entries_each(res, add_entry, &c);
		PQclear(res);
		if (rc == TLY_E_CORRUPT || rc == TLY_E_NOMEM)
			snprintf(err->message, sizeof(err->message), "%s",
				 rc == TLY_E_NOMEM ? "out of memory" : "a stored ledger entry does not read back");
		if (rc != 0)
			return rc;
		progress(rb, false);
		if (n == 0)
			break;
	}
	return flush(rb, err);
}

/*
 * The first pass's ledger entries (the shadows hold none): one binary COPY of every entry up to
 * the live applied seqs, run on a second connection by a thread that reads them ahead (rb_rows)
 * while this one folds the events (the events come first in the in-memory fold), at most
 * ENTRIES_AHEAD bytes ahead; the server sorts them in memory with no parallel workers. NULL with
 * err filled.
 */
/* The connector thread: the first pass's other two connections (NULL where one failed, said why). */
static void *connect_spares(void *arg)
{
	struct rebuild *rb = arg;
	for (size_t k = 0; k < 1 + N_STREAMS; k++)
		rb->spare[k] = tallyctl_connect_db(rb->app);
	return NULL;
}

/* Spare connection k, the caller's from now on (the connector joined first); NULL if it failed. */
static PGconn *take_spare(struct rebuild *rb, size_t k)
{
	if (rb->connecting)
		pthread_join(rb->connector, NULL);
	rb->connecting = false;
	PGconn *conn = rb->spare[k];
	rb->spare[k] = NULL;
	return conn;
}

static struct rb_rows *entries_ahead(struct rebuild *rb, PGconn **conn2, struct tly_pg_error *err)
{
	char sql[1536];
	snprintf(sql, sizeof(sql),
		 "COPY (SELECT " TLY_ENTRIES_SELECT_BINARY " FROM ledger_entries e "
		 "JOIN projector_ledger_applied a ON a.tenant_id = e.tenant_id AND e.seq <= a.seq "
		 "ORDER BY e.tenant_id, e.seq) TO STDOUT (FORMAT binary)");
	if (!(*conn2 = take_spare(rb, 0))) {
		snprintf(err->message, sizeof(err->message), "could not open a second connection");
		return NULL;
	}
	if (tly_pg_exec(*conn2, "SELECT set_config('work_mem', '" ENTRIES_WORK_MEM "', false), "
			"set_config('max_parallel_workers_per_gather', '0', false), "
			"set_config('synchronous_commit', 'off', false)", 0, NULL, err) != 0)
		return NULL;
	return rb_rows_start(*conn2, sql, ENTRIES_AHEAD, err->message, sizeof(err->message));
}

/* Fold the entries entries_ahead reads. */
static int fold_ledger_ahead(struct rebuild *rb, struct rb_rows *rows, struct tly_pg_error *err)
{
	const char *const *values;
	const int *lengths;
	int n, rc;
	while ((rc = rb_rows_next(rows, &values, &lengths, &n, err->message, sizeof(err->message))) == 1) {
		if ((rc = tly_entries_from_copy(values, lengths, n, &rb->ev)) != 0)
			break;
		rb->entries++;
		if ((rc = add(rb, &rb->ev, err)) != 0)
			break;
		progress(rb, false);
	}
	if (rc == TLY_E_CORRUPT || rc == TLY_E_NOMEM)
		snprintf(err->message, sizeof(err->message), "%s",
			 rc == TLY_E_NOMEM ? "out of memory" : "a stored ledger entry does not read back");
	return rc;
}

/* Entries still to fold: seqs are gap-free per tenant (DESIGN.md), so each range holds hi - lo. */
static int64_t ledger_behind(struct rebuild *rb, struct tly_pg_error *err)
{
	char sql[512];
	snprintf(sql, sizeof(sql), "SELECT COALESCE(sum(hi - lo), 0) FROM (" LEDGER_BEHIND_SQL("%s") ") g",
		 rb->qshadow_applied);
	PGresult *res = tly_pg_query(rb->conn, sql, 0, NULL, err);
	if (!res)
		return -1;
	int64_t n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	PQclear(res);
	return n;
}

/* One pass: fold everything the projector has committed and the shadows do not hold yet. */
static int pass(struct rebuild *rb, int64_t *behind, struct tly_pg_error *err)
{
	int64_t topics_behind = 0, entries_behind;
	if (read_targets(rb, &topics_behind, err) != 0)
		return TLY_E_PG;
	if ((entries_behind = ledger_behind(rb, err)) < 0)
		return TLY_E_PG;
	*behind = topics_behind + entries_behind;
	rb->total += *behind;
	progress(rb, true);
	int rc = fold_topics(rb, err);
	if (rc == 0 && entries_behind > 0)
		rc = fold_ledger(rb, err);
	progress(rb, true);
	return rc;
}

/* ---- the first pass, folded in memory --------------------------------------------------- */

/* A row added to a stream's COPY (tly_memfold_added_fn): sent every STREAM_ROWS rows. */
static void stream_added(void *ud, struct tly_pgcopy *c)
{
	struct stream *st = ud;
	if (st->rc != 0)
		tly_pgcopy_reset(c); /* failed: the error is reported when the stream ends */
	else if (tly_pgcopy_rows(c) >= STREAM_ROWS)
		st->rc = tly_pgcopy_send_rows(st->conn, c, &st->err);
}

/*
 * The streamed tables' shadows, each on a connection of its own, in a transaction that stays
 * open until first_pass_copy: created (so that its COPY may FREEZE the rows) and its COPY begun,
 * nonblocking; the in-memory fold adds the rows as it folds them. Not a table the migrations seed.
 */
static int stream_begin(struct rebuild *rb, const bool *seeded, struct tly_pg_error *err)
{
	int rc = 0;
	for (size_t k = 0; k < N_STREAMS && rc == 0; k++) {
		struct stream *st = &rb->streams[k];
		size_t i = 0, f = 0;
		while (i < rb->ntables && strcmp(rb->tables[i], STREAMED_TABLES[k]) != 0)
			i++;
		while (f < tly_fold_n_tables && strcmp(tly_fold_tables[f], STREAMED_TABLES[k]) != 0)
			f++;
		if (i == rb->ntables || f == tly_fold_n_tables || seeded[i])
			continue;
		char *ql = qident(rb->conn, rb->tables[i]), *qs = qident(rb->conn, rb->shadow[i]);
		char *ddl = NULL, *copy = NULL;
		if (!ql || !qs || !tly_memfold_columns(f) ||
		    asprintf(&ddl, "SET synchronous_commit = off; BEGIN; DROP TABLE IF EXISTS %s; "
			     "CREATE TABLE %s (LIKE %s INCLUDING ALL EXCLUDING INDEXES)", qs, qs, ql) < 0 ||
		    asprintf(&copy, "COPY %s (%s) FROM STDIN (FORMAT binary, FREEZE)", qs,
			     tly_memfold_columns(f)) < 0 ||
		    !(st->c = tly_pgcopy_new())) {
			snprintf(err->message, sizeof(err->message), "out of memory");
			rc = TLY_E_NOMEM;
		} else if (!(st->conn = take_spare(rb, 1 + k))) {
			snprintf(err->message, sizeof(err->message), "could not open a connection for %s",
				 STREAMED_TABLES[k]);
			rc = TLY_E_PG;
		} else if ((rc = tly_pg_exec_script(st->conn, ddl, err)) == 0 &&
			   (rc = tly_pgcopy_begin(st->conn, copy, err)) == 0) {
			/* rows are queued, never waited for: the fold goes on while the server is busy */
			if (PQsetnonblocking(st->conn, 1) != 0) {
				tly_pg_error_set(err, st->conn, NULL);
				rc = TLY_E_PG;
			}
		}
		if (rc == 0 && (rc = tly_memfold_stream(rb->mem, f, st->c, stream_added, st)) != 0)
			snprintf(err->message, sizeof(err->message), "%s cannot be streamed", STREAMED_TABLES[k]);
		rb->streamed[i] = rc == 0;
		PQfreemem(ql);
		PQfreemem(qs);
		free(ddl);
		free(copy);
	}
	return rc;
}

/*
 * shadows_script with the live tables' storage parameters (SHADOW_STORAGE_SQL); NULL on error.
 * The streamed table's shadow (stream_begin) gets none: no migration sets any on it, and
 * check_rebuild.c's signature of the tables would show one lost.
 */
static char *shadows_of(struct rebuild *rb, const bool *seeded, struct tly_pg_error *err)
{
	bool created[N_MAX_TABLES] = {false}; /* the script's tables: not the streamed ones */
	for (size_t i = 0; i < rb->ntables; i++)
		created[i] = !rb->streamed[i];
	char lives[2048], shadows[2048];
	names_array(rb, false, created, lives, sizeof(lives));
	names_array(rb, true, created, shadows, sizeof(shadows));
	const char *const v[] = {lives, shadows};
	PGresult *res = tly_pg_query(rb->conn, SHADOW_STORAGE_SQL, 2, v, err);
	if (!res)
		return NULL;
	char *script = shadows_script(rb, seeded, PQgetisnull(res, 0, 0) ? NULL : PQgetvalue(res, 0, 0));
	PQclear(res);
	if (!script)
		snprintf(err->message, sizeof(err->message), "out of memory");
	return script;
}

/*
 * The first pass, up to its Kafka records: in one transaction, the seeds into temporary tables,
 * the in-memory fold told the seeded plans, the targets, the ledger entries read ahead on a second
 * connection, and the shadows' DDL sent (shadows_script) without waiting: the server creates
 * the shadows while the events are read and folded (first_pass).
 */
static int first_pass_begin(struct rebuild *rb, PGconn **conn2, struct rb_rows **rows,
			    int64_t *behind, struct tly_pg_error *err)
{
	bool seeded[N_MAX_TABLES] = {false};
	int64_t topics_behind = 0;
	int rc = tly_pg_begin(rb->conn, err);
	if (rc == 0)
		rc = seed_temps(rb, seeded, err);
	if (rc == 0 && !(rb->mem = tly_memfold_new()))
		rc = TLY_E_NOMEM;
	for (size_t i = 0; rc == 0 && i < rb->ntables; i++) {
		if (!seeded[i] || strcmp(rb->tables[i], "billing_plans") != 0)
			continue;
		PGresult *res = tly_pg_query(rb->conn, "SELECT code, id FROM pg_temp.billing_plans", 0, NULL,
					     err);
		if (!res)
			return TLY_E_PG;
		for (int r = 0; r < PQntuples(res) && rc == 0; r++) {
			tly_uuid id;
			rc = tly_uuid_parse(PQgetvalue(res, r, 1), &id);
			if (rc == 0)
				rc = tly_memfold_plan(rb->mem, PQgetvalue(res, r, 0), &id);
		}
		PQclear(res);
		if (rc != 0)
			snprintf(err->message, sizeof(err->message), "could not read the seeded plans");
	}
	if (rc == 0)
		rc = stream_begin(rb, seeded, err);
	if (rc == 0)
		rc = read_targets(rb, &topics_behind, err);
	PGresult *res = rc == 0 ? tly_pg_query(rb->conn, "SELECT COALESCE(sum(seq), 0) FROM "
					      "projector_ledger_applied", 0, NULL, err) : NULL;
	if (rc == 0 && !res)
		rc = TLY_E_PG;
	int64_t entries_behind = res ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : 0;
	PQclear(res);
	*behind = topics_behind + entries_behind;
	rb->total += *behind;
	if (rc == 0 && entries_behind > 0 && !(*rows = entries_ahead(rb, conn2, err)))
		rc = TLY_E_PG;
	char *script = rc == 0 ? shadows_of(rb, seeded, err) : NULL;
	if (rc == 0 && !script)
		rc = TLY_E_PG; /* err says why */
	if (rc == 0 && PQsendQuery(rb->conn, script) != 1) {
		tly_pg_error_set(err, rb->conn, NULL);
		rc = TLY_E_PG;
	}
	free(script);
	if (rc == TLY_E_NOMEM)
		snprintf(err->message, sizeof(err->message), "out of memory");
	return rc;
}

/* The rest of the first pass: the Kafka records folded, the shadows' DDL done, the entries folded. */
static int first_pass(struct rebuild *rb, struct rb_rows *rows, struct tly_pg_error *err)
{
	double t0 = tly_clock_s();
	struct tly_pg_error ddl_err = {0};
	int rc = fold_topics(rb, err);
	double t1 = tly_clock_s();
	int ddl = script_results(rb->conn, &ddl_err); /* the shadows: created and committed */
	if (rc == 0 && ddl != 0) {
		*err = ddl_err;
		rc = ddl;
	}
	double t2 = tly_clock_s();
	if (rc == 0 && rows)
		rc = fold_ledger_ahead(rb, rows, err);
	rb->phase[PH_EVENTS] += t1 - t0;
	rb->phase[PH_SHADOWS] += t2 - t1;
	rb->phase[PH_ENTRIES] += tly_clock_s() - t2;
	progress(rb, true);
	return rc;
}

/*
 * The live tables' indexes and the constraints they back, generated for their shadows ($1 live
 * names, $2 their shadows, text[] in the same order), built after the load (one sort per index
 * instead of an insertion per row). The names end in _rb; the swap renames them to the live names
 * (paired by definition, SWAP_SQL).
 */
static const char SHADOW_INDEX_SQL[] =
	"SELECT CASE WHEN con.oid IS NOT NULL "
	"  THEN format('ALTER TABLE %I ADD CONSTRAINT %I %s', t.shadow, left(ic.relname, 60) || '_rb', "
	"    pg_get_constraintdef(con.oid)) "
	"  ELSE format('CREATE %sINDEX %I ON %I USING %s', CASE WHEN i.indisunique THEN 'UNIQUE ' "
	"    ELSE '' END, left(ic.relname, 60) || '_rb', t.shadow, "
	"    regexp_replace(pg_get_indexdef(i.indexrelid), '^.*? USING ', '')) END "
	"FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(live, shadow, n) "
	"JOIN pg_index i ON i.indrelid = quote_ident(t.live)::regclass "
	"JOIN pg_class ic ON ic.oid = i.indexrelid "
	"LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid "
	"  AND con.contype IN ('p', 'u', 'x') "
	"ORDER BY t.n, ic.relname";

/* The tables the first pass writes on its second connection, at the same time as the others. */
static const char *const SECOND_CONN_TABLES[] = {"agent_messages"};
#define N_SECOND_CONN_TABLES (sizeof(SECOND_CONN_TABLES) / sizeof(SECOND_CONN_TABLES[0]))

/*
 * One connection's share of the end of the first pass, in one transaction: the in-memory fold's
 * rows of its tables COPYed into their shadows (or its streamed COPY ended), their indexes built,
 * committed unless the caller goes on in it (the first connection: the plans, first_pass_copy).
 */
struct copy_share {
	struct rebuild *rb;         /* borrowed; rb->mem only read (tly_memfold_finish ran) */
	PGconn *conn;               /* borrowed */
	bool which[N_MAX_TABLES];   /* rb->tables[i] is this share's */
	struct stream *stream;      /* its rows went by this streamed COPY: end it (NULL: none) */
	bool commit;                /* commit at the end (else the caller does) */
	double copied;              /* seconds the COPY took */
	int rc;
	struct tly_pg_error err;
};

/* Send what a nonblocking connection has queued, waiting as needed, and make it blocking again. */
static int drain(PGconn *conn, struct tly_pg_error *err)
{
	int f;
	while ((f = PQflush(conn)) == 1) {
		struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLOUT};
		if (poll(&pfd, 1, 1000) < 0 && errno != EINTR)
			break;
	}
	if (f != 0 || PQsetnonblocking(conn, 0) != 0) {
		tly_pg_error_set(err, conn, NULL);
		return TLY_E_PG;
	}
	return 0;
}

static int copy_share_run(struct copy_share *cs)
{
	struct rebuild *rb = cs->rb;
	const char *names[N_MAX_TABLES] = {0};
	char lives[2048], shadows[2048];
	for (size_t k = 0; k < tly_fold_n_tables && k < N_MAX_TABLES; k++)
		for (size_t i = 0; i < rb->ntables; i++)
			if (cs->which[i] && strcmp(rb->tables[i], tly_fold_tables[k]) == 0)
				names[k] = rb->shadow[i];
	names_array(rb, false, cs->which, lives, sizeof(lives));
	names_array(rb, true, cs->which, shadows, sizeof(shadows));
	const char *const v[] = {lives, shadows};
	double t0 = tly_clock_s();
	int rc = 0;
	if (cs->stream) {
		if ((rc = cs->stream->rc) != 0)
			cs->err = cs->stream->err;
		else
			rc = tly_pgcopy_send_rows(cs->conn, cs->stream->c, &cs->err);
		struct tly_pg_error end_err;
		int drc = drain(cs->conn, &end_err); /* before the end, also after an error */
		if (rc == 0 && (rc = drc) != 0)
			cs->err = end_err;
		int erc = tly_pgcopy_end(cs->conn, &end_err); /* ends the COPY, also after an error */
		if (rc == 0 && (rc = erc) != 0)
			cs->err = end_err;
	} else if ((rc = tly_pg_begin(cs->conn, &cs->err)) == 0) {
		rc = tly_memfold_copy(rb->mem, cs->conn, names, &cs->err);
	}
	cs->copied = tly_clock_s() - t0;
	if (rc == 0)
		rc = run_generated(cs->conn, SHADOW_INDEX_SQL, v, &cs->err);
	if (rc == 0 && cs->commit)
		rc = tly_pg_commit(cs->conn, &cs->err);
	if (rc == TLY_E_NOMEM)
		snprintf(cs->err.message, sizeof(cs->err.message), "out of memory");
	struct tly_pg_error rberr;
	if (rc != 0 && PQtransactionStatus(cs->conn) != PQTRANS_IDLE && tly_pg_rollback(cs->conn, &rberr) != 0)
		fprintf(stderr, "tallyctl: could not roll back: %s\n", rberr.message);
	return rc;
}

static void *copy_share_thread(void *arg)
{
	struct copy_share *cs = arg;
	cs->rc = copy_share_run(cs);
	return NULL;
}

/*
 * End of the first pass: the in-memory fold's final rows into the shadows and their indexes, at
 * once on several connections, each share but the first's by a thread of its own:
 * SECOND_CONN_TABLES on conn2 (idle since the ledger entries were read; NULL: on the first
 * connection), each streamed table's COPY ended on its connection, the rest on the first
 * connection, which then folds the plans (fold.c: over the indexed shadows, the streamed ones
 * included) and commits.
 */
static int first_pass_copy(struct rebuild *rb, PGconn *conn2, struct tly_pg_error *err)
{
	enum { N_SHARES = 2 + N_STREAMS };
	struct copy_share shares[N_SHARES] = {{.rb = rb, .conn = rb->conn},
					      {.rb = rb, .conn = conn2, .commit = true}};
	pthread_t threads[N_SHARES];
	bool started[N_SHARES] = {false};
	for (size_t k = 0; k < N_STREAMS; k++)
		shares[2 + k] = (struct copy_share){.rb = rb, .conn = rb->streams[k].conn, .commit = true,
						    .stream = &rb->streams[k]};
	for (size_t i = 0; i < rb->ntables; i++) {
		bool second = false;
		for (size_t k = 0; k < N_SECOND_CONN_TABLES && conn2; k++)
			second |= strcmp(rb->tables[i], SECOND_CONN_TABLES[k]) == 0;
		shares[0].which[i] = !second && !rb->streamed[i];
		shares[1].which[i] = second && !rb->streamed[i];
		for (size_t k = 0; k < N_STREAMS; k++)
			shares[2 + k].which[i] = rb->streamed[i] && strcmp(rb->tables[i], STREAMED_TABLES[k]) == 0;
	}
	double t0 = tly_clock_s();
	int rc = tly_memfold_finish(rb->mem);
	for (int k = 1; k < N_SHARES && rc == 0; k++) {
		if (!shares[k].conn)
			continue;
		int e = pthread_create(&threads[k], NULL, copy_share_thread, &shares[k]);
		if (e != 0) {
			snprintf(err->message, sizeof(err->message), "could not start a thread: %s", strerror(e));
			rc = TLY_E_NOMEM;
		}
		started[k] = e == 0;
	}
	if (rc == 0 && (rc = copy_share_run(&shares[0])) != 0)
		*err = shares[0].err;
	for (int k = 1; k < N_SHARES; k++) {
		if (!started[k])
			continue;
		pthread_join(threads[k], NULL);
		if (rc == 0 && (rc = shares[k].rc) != 0)
			*err = shares[k].err;
	}
	if (rc == 0)
		rc = tly_fold_flush(rb->fold, rb->conn, err);
	if (rc == 0)
		rc = tly_pg_commit(rb->conn, err);
	if (rc == TLY_E_NOMEM)
		snprintf(err->message, sizeof(err->message), "out of memory");
	struct tly_pg_error rberr;
	if (rc != 0 && PQtransactionStatus(rb->conn) != PQTRANS_IDLE && tly_pg_rollback(rb->conn, &rberr) != 0)
		fprintf(stderr, "tallyctl: could not roll back: %s\n", rberr.message);
	tly_memfold_free(rb->mem);
	rb->mem = NULL;
	rb->phase[PH_COPY] += shares[0].copied;
	rb->phase[PH_INDEXES] += tly_clock_s() - t0 - shares[0].copied;
	return rc;
}

/* ---- the swap ----------------------------------------------------------------------------- */

/*
 * What the swap does per table, generated for every swapped table at once ($1 live names, $2
 * their shadows, text[] in the same order), in one query and from the catalog as it is before any
 * of it runs: k 0 to 7, ownership, grants (table and column; whatever default privileges gave the
 * shadow revoked first), row-level security and policies of the live table onto its shadow, and
 * its sequences kept alive (a serial column of the shadow already draws from the live sequence);
 * k 8, after the live table is dropped, the shadow's indexes (and the constraints they back)
 * renamed to the live names, paired by definition (column 3 names an index without a partner,
 * column 2 then NULL). Rows ordered by table (column 0, its live name), k, statement.
 */
static const char SWAP_SQL[] =
	"SELECT t.live, g.k, g.stmt, g.name FROM unnest($1::text[], $2::text[]) WITH ORDINALITY "
	"  AS t(live, shadow, n) "
	"CROSS JOIN LATERAL ("
	"SELECT 0 AS k, format('ALTER TABLE %I OWNER TO %I', t.shadow, pg_get_userbyid(c.relowner)) "
	"  AS stmt, NULL::name AS name FROM pg_class c WHERE c.oid = quote_ident(t.live)::regclass "
	/* the shadow's owner after the statement above is the live owner: neither is revoked */
	"UNION ALL SELECT 1, format('REVOKE ALL ON TABLE %I FROM %s', t.shadow, CASE WHEN a.grantee = 0 "
	"  THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END), NULL "
	"FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = quote_ident(t.shadow)::regclass "
	"  AND a.grantee <> c.relowner AND a.grantee <> (SELECT l.relowner FROM pg_class l "
	"  WHERE l.oid = quote_ident(t.live)::regclass) GROUP BY a.grantee "
	/* one GRANT per grantee (and grant option) with all its privileges */
	"UNION ALL SELECT 2, format('GRANT %s ON TABLE %I TO %s%s', string_agg(a.privilege_type, ', ' "
	"  ORDER BY a.privilege_type), t.shadow, CASE WHEN a.grantee = 0 THEN 'PUBLIC' "
	"  ELSE quote_ident(pg_get_userbyid(a.grantee)) END, "
	"  CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END), NULL "
	"FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = quote_ident(t.live)::regclass "
	"  AND a.grantee <> c.relowner GROUP BY a.grantee, a.is_grantable "
	"UNION ALL SELECT 3, format('GRANT %s (%s) ON TABLE %I TO %s%s', a.privilege_type, "
	"  string_agg(quote_ident(att.attname), ', ' ORDER BY att.attnum), t.shadow, "
	"  CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END, "
	"  CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END), NULL "
	"FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid, aclexplode(att.attacl) a "
	"WHERE c.oid = quote_ident(t.live)::regclass AND att.attnum > 0 AND NOT att.attisdropped "
	"  AND a.grantee <> c.relowner GROUP BY a.grantee, a.is_grantable, a.privilege_type "
	"UNION ALL SELECT 4, format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t.shadow), NULL "
	"FROM pg_class c WHERE c.oid = quote_ident(t.live)::regclass AND c.relrowsecurity "
	"UNION ALL SELECT 5, format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t.shadow), NULL "
	"FROM pg_class c WHERE c.oid = quote_ident(t.live)::regclass AND c.relforcerowsecurity "
	"UNION ALL SELECT 6, format('CREATE POLICY %I ON %I AS %s FOR %s TO %s%s%s', p.policyname, "
	"  t.shadow, p.permissive, p.cmd, (SELECT string_agg(CASE WHEN r = 'public' THEN 'PUBLIC' "
	"  ELSE quote_ident(r) END, ', ') FROM unnest(p.roles) r), "
	"  CASE WHEN p.qual IS NULL THEN '' ELSE ' USING (' || p.qual || ')' END, "
	"  CASE WHEN p.with_check IS NULL THEN '' ELSE ' WITH CHECK (' || p.with_check || ')' END), NULL "
	"FROM pg_policies p WHERE p.schemaname = current_schema() AND p.tablename = t.live "
	"UNION ALL SELECT 7, format('ALTER SEQUENCE %s OWNED BY %I.%I', d.objid::regclass, t.shadow, "
	"  att.attname), NULL "
	"FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
	"JOIN pg_attribute att ON att.attrelid = d.refobjid AND att.attnum = d.refobjsubid "
	"WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass "
	"  AND d.refobjid = quote_ident(t.live)::regclass AND d.deptype = 'a' "
	"UNION ALL SELECT 8, CASE WHEN ln.relname IS NOT NULL AND sn.relname IS NOT NULL "
	"  THEN format('ALTER INDEX %I RENAME TO %I', sn.relname, ln.relname) END, "
	"  coalesce(ln.relname, sn.relname) "
	"FROM (SELECT *, row_number() OVER (PARTITION BY def, u, p ORDER BY relname) AS n "
	"  FROM (SELECT ic.relname, regexp_replace(pg_get_indexdef(i.indexrelid), '^.*? USING ', '') "
	"    AS def, i.indisunique AS u, i.indisprimary AS p FROM pg_index i "
	"    JOIN pg_class ic ON ic.oid = i.indexrelid "
	"    WHERE i.indrelid = quote_ident(t.live)::regclass) l0) ln "
	"FULL JOIN (SELECT *, row_number() OVER (PARTITION BY def, u, p ORDER BY relname) AS n "
	"  FROM (SELECT ic.relname, regexp_replace(pg_get_indexdef(i.indexrelid), '^.*? USING ', '') "
	"    AS def, i.indisunique AS u, i.indisprimary AS p FROM pg_index i "
	"    JOIN pg_class ic ON ic.oid = i.indexrelid "
	"    WHERE i.indrelid = quote_ident(t.shadow)::regclass) s0) sn USING (def, u, p, n)"
	") g ORDER BY t.n, g.k, g.stmt";
#define SWAP_K_RENAME_INDEX 8

/*
 * Foreign keys from or to the swapped tables ($1: their names): the drop of those held by tables
 * that stay, their re-creation NOT VALID (quick, under the swap's locks) and their validation
 * after the commit (which blocks no reader or writer).
 */
static const char FK_SQL[] =
	"WITH sel AS (SELECT quote_ident(x)::regclass::oid AS oid FROM unnest($1::text[]) x) "
	"SELECT c.conrelid NOT IN (SELECT oid FROM sel), "
	"  format('ALTER TABLE %I DROP CONSTRAINT %I', r.relname, c.conname), "
	"  format('ALTER TABLE %I ADD CONSTRAINT %I %s%s', r.relname, c.conname, "
	"    pg_get_constraintdef(c.oid), CASE WHEN c.convalidated THEN ' NOT VALID' ELSE '' END), "
	"  CASE WHEN c.convalidated THEN format('ALTER TABLE %I VALIDATE CONSTRAINT %I', r.relname, "
	"    c.conname) END "
	"FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid "
	"WHERE c.contype = 'f' AND (c.conrelid IN (SELECT oid FROM sel) OR c.confrelid IN "
	"  (SELECT oid FROM sel)) ORDER BY r.relname, c.conname";

/*
 * Inside the swap transaction, with every lock held: copy security, move sequences, drop the
 * live tables, rename the shadows, their indexes, re-create the foreign keys. Generated by two
 * queries (FK_SQL, SWAP_SQL) and run as one pipeline. *fks receives the FK rows (column 3:
 * validation to run after the commit; caller PQclears).
 */
static int swap_tables(struct rebuild *rb, PGresult **fks, struct tly_pg_error *err)
{
	char names[2048], shadows[2048], sql[4096];
	struct stmts l = {0};
	PGresult *gen = NULL;
	int rc = 0;
	names_array(rb, false, rb->selected, names, sizeof(names));
	names_array(rb, true, rb->selected, shadows, sizeof(shadows));
	const char *const v[] = {names, shadows};
	if (!(*fks = tly_pg_query(rb->conn, FK_SQL, 1, v, err)) ||
	    !(gen = tly_pg_query(rb->conn, SWAP_SQL, 2, v, err)))
		return TLY_E_PG;
	int ngen = PQntuples(gen);
	for (int r = 0; rc == 0 && r < ngen; r++) {
		if (atoi(PQgetvalue(gen, r, 1)) != SWAP_K_RENAME_INDEX)
			rc = stmts_add(&l, PQgetvalue(gen, r, 2));
		else if (PQgetisnull(gen, r, 2)) {
			snprintf(err->message, sizeof(err->message),
				 "index \"%s\" of \"%s\" has no counterpart in its shadow table",
				 PQgetvalue(gen, r, 3), PQgetvalue(gen, r, 0));
			err->errclass = TLY_ERRCLASS_FATAL;
			rc = TLY_E_PG;
		}
	}
	for (int r = 0; rc == 0 && r < PQntuples(*fks); r++)
		if (strcmp(PQgetvalue(*fks, r, 0), "t") == 0)
			rc = stmts_add(&l, PQgetvalue(*fks, r, 1));
	size_t off = (size_t)snprintf(sql, sizeof(sql), "DROP TABLE ");
	for (size_t i = 0, first = 1; rc == 0 && i < rb->ntables; i++) {
		if (!rb->selected[i])
			continue;
		char *q = qident(rb->conn, rb->tables[i]);
		if (!q || off >= sizeof(sql))
			rc = TLY_E_NOMEM;
		else
			off += (size_t)snprintf(sql + off, sizeof(sql) - off, "%s%s", first ? "" : ", ", q);
		first = 0;
		PQfreemem(q);
	}
	if (rc == 0)
		rc = stmts_add(&l, sql);
	for (size_t i = 0; i < rb->ntables && rc == 0; i++) {
		if (!rb->selected[i])
			continue;
		char *ql = qident(rb->conn, rb->tables[i]), *qs = qident(rb->conn, rb->shadow[i]);
		if (ql && qs) {
			snprintf(sql, sizeof(sql), "ALTER TABLE %s RENAME TO %s", qs, ql);
			rc = stmts_add(&l, sql);
		} else {
			rc = TLY_E_NOMEM;
		}
		PQfreemem(ql);
		PQfreemem(qs);
		for (int r = 0; rc == 0 && r < ngen; r++)
			if (atoi(PQgetvalue(gen, r, 1)) == SWAP_K_RENAME_INDEX &&
			    strcmp(PQgetvalue(gen, r, 0), rb->tables[i]) == 0)
				rc = stmts_add(&l, PQgetvalue(gen, r, 2));
	}
	for (int r = 0; rc == 0 && r < PQntuples(*fks); r++)
		rc = stmts_add(&l, PQgetvalue(*fks, r, 2));
	if (rc == TLY_E_NOMEM)
		snprintf(err->message, sizeof(err->message), "out of memory");
	if (rc == 0)
		rc = tly_pg_exec_pipeline(rb->conn, (const char *const *)l.v, l.n, err);
	PQclear(gen);
	stmts_free(&l);
	return rc;
}

/*
 * The swap transaction: lock the projector's offsets (a batch in flight commits first, the next
 * one waits), lock the live tables, fold what the projector committed since the last pass (so the
 * shadows hold exactly its inputs), swap. 0, or an error whose class says whether to retry.
 */
static int swap_once(struct rebuild *rb, PGresult **fks, struct tly_pg_error *err)
{
	char sql[2048];
	size_t off = (size_t)snprintf(sql, sizeof(sql), "LOCK TABLE ");
	bool first = true;
	for (size_t i = 0; i < rb->ntables; i++) {
		if (!rb->selected[i])
			continue;
		char *q = qident(rb->conn, rb->tables[i]);
		if (!q)
			return TLY_E_NOMEM;
		off += (size_t)snprintf(sql + off, off < sizeof(sql) ? sizeof(sql) - off : 0, "%s%s",
					first ? "" : ", ", q);
		first = false;
		PQfreemem(q);
	}
	if (off < sizeof(sql))
		snprintf(sql + off, sizeof(sql) - off, " IN ACCESS EXCLUSIVE MODE");
	const char *const v[] = {PROJECTOR_CONSUMER};
	int64_t behind = 0;
	static const char *const begin[] = {"BEGIN", "SET LOCAL lock_timeout = '5s'",
					    "SET LOCAL synchronous_commit = on"};
	int rc = tly_pg_exec_pipeline(rb->conn, begin, sizeof(begin) / sizeof(begin[0]), err);
	if (rc == 0)
		rc = tly_pg_exec(rb->conn, "SELECT 1 FROM consumer_offsets WHERE consumer = $1 FOR UPDATE",
				 1, v, err);
	if (rc == 0)
		rc = tly_pg_exec(rb->conn, sql, 0, NULL, err);
	rb->in_swap = true;
	if (rc == 0)
		rc = pass(rb, &behind, err);
	rb->in_swap = false;
	if (rc == 0)
		rc = swap_tables(rb, fks, err);
	if (rc == 0)
		rc = tly_pg_commit(rb->conn, err);

	return rc;
}

/* ---- the command -------------------------------------------------------------------------- */

static int select_tables(struct rebuild *rb, int argc, char **argv)
{
	for (size_t i = 0; i < N_LOCK_ORDER; i++)
		rb->tables[rb->ntables++] = LOCK_ORDER[i];
	for (size_t i = 0; i < tly_fold_n_tables; i++) {
		bool known = false;
		for (size_t k = 0; k < rb->ntables; k++)
			known |= strcmp(rb->tables[k], tly_fold_tables[i]) == 0;
		if (!known && rb->ntables < N_MAX_TABLES)
			rb->tables[rb->ntables++] = tly_fold_tables[i]; /* a table added to the fold later */
	}
	for (size_t i = 0; i < rb->ntables; i++) {
		bool in_fold = false;
		for (size_t k = 0; k < tly_fold_n_tables; k++)
			in_fold |= strcmp(rb->tables[i], tly_fold_tables[k]) == 0;
		if (!in_fold) {
			fprintf(stderr, "tallyctl: rebuild knows table \"%s\" that the fold does not write\n",
				rb->tables[i]);
			return 1;
		}
		snprintf(rb->shadow[i], sizeof(rb->shadow[i]), "%s" SHADOW_SUFFIX, rb->tables[i]);
	}
	for (int a = 1; a < argc; a++) {
		bool found = false;
		for (size_t i = 0; i < rb->ntables; i++) {
			if (strcmp(argv[a], "all") == 0 || strcmp(argv[a], rb->tables[i]) == 0) {
				rb->selected[i] = true;
				found = true;
			}
		}
		if (!found) {
			fprintf(stderr, "tallyctl: unknown projection \"%s\"; one of: all", argv[a]);
			for (size_t i = 0; i < rb->ntables; i++)
				fprintf(stderr, ", %s", rb->tables[i]);
			fprintf(stderr, "\n");
			return 2;
		}
	}
	return 0;
}

/* Partitions and low watermarks of the event topics; refuses a topic that lost history. */
static int load_partitions(struct rebuild *rb)
{
	for (int t = 0; t < 2; t++) {
		const struct rd_kafka_metadata *md = NULL;
		rd_kafka_topic_t *rkt = rd_kafka_topic_new(rb->rk, rb->topics[t], NULL);
		rd_kafka_resp_err_t kerr = rkt ? rd_kafka_metadata(rb->rk, 0, rkt, &md, KAFKA_TIMEOUT_MS)
					       : rd_kafka_last_error();
		if (kerr || md->topic_cnt != 1 || md->topics[0].err || md->topics[0].partition_cnt < 1) {
			fprintf(stderr, "tallyctl: could not read the partitions of \"%s\": %s\n",
				rb->topics[t], kerr ? rd_kafka_err2str(kerr) : "no such topic");
			if (md)
				rd_kafka_metadata_destroy(md);
			if (rkt)
				rd_kafka_topic_destroy(rkt);
			return 1;
		}
		int n = md->topics[0].partition_cnt;
		struct rpart *parts = realloc(rb->parts, (rb->nparts + (size_t)n) * sizeof(*parts));
		if (!parts) {
			rd_kafka_metadata_destroy(md);
			rd_kafka_topic_destroy(rkt);
			fprintf(stderr, "tallyctl: out of memory\n");
			return 1;
		}
		rb->parts = parts;
		int rc = 0;
		for (int p = 0; p < n && rc == 0; p++) {
			int64_t low = -1, high = -1;
			int32_t id = md->topics[0].partitions[p].id;
			kerr = rd_kafka_query_watermark_offsets(rb->rk, rb->topics[t], id, &low, &high,
								KAFKA_TIMEOUT_MS);
			if (kerr) {
				fprintf(stderr, "tallyctl: could not read the offsets of \"%s\" [%d]: %s\n",
					rb->topics[t], (int)id, rd_kafka_err2str(kerr));
				rc = 1;
			} else if (low > 0) {
				fprintf(stderr, "tallyctl: could not rebuild: \"%s\" [%d] starts at offset %" PRId64
					", the records before it are gone (retention); the projections hold "
					"them and a rebuild would not\n", rb->topics[t], (int)id, low);
				rc = 1;
			}
			rb->parts[rb->nparts++] = (struct rpart){rb->topics[t], id, low, low, low, false};
		}
		rd_kafka_metadata_destroy(md);
		rd_kafka_topic_destroy(rkt);
		if (rc)
			return rc;
	}
	return 0;
}

/*
 * A fresh fold writing the shadows (also after a rolled back swap: the fold's staging table may
 * have been created, and so dropped, in it). 0 or TLY_E_NOMEM.
 */
static int new_fold(struct rebuild *rb)
{
	tly_fold_free(rb->fold);
	if (!(rb->fold = tly_fold_new()))
		return TLY_E_NOMEM;
	for (size_t i = 0; i < rb->ntables; i++)
		if (tly_fold_set_table(rb->fold, rb->tables[i], rb->shadow[i]) != 0)
			return TLY_E_NOMEM; /* the shadow names are ours and valid */
	return 0;
}

/*
 * The Kafka consumer, first of all: it connects and reads the cluster's metadata on its own
 * threads while the database is set up. 0, or 1 with the reason printed.
 */
static int kafka_start(struct rebuild *rb)
{
	char errstr[1024];
	rb->topics[0] = tly_config_str(rb->app->cfg, "topics.events");
	rb->topics[1] = tly_config_str(rb->app->cfg, "topics.catalog");
	rd_kafka_conf_t *conf = tly_kafka_conf_new(rb->app->cfg, errstr, sizeof(errstr));
	/* EOF marks the end of a partition whose last offsets are gaps; short fetch waits keep the
	 * catch-up inside the swap transaction short. */
	if (!conf || tly_kafka_conf_set(conf, "enable.partition.eof", "true", errstr, sizeof(errstr)) != 0 ||
	    tly_kafka_conf_set(conf, "fetch.wait.max.ms", "10", errstr, sizeof(errstr)) != 0) {
		if (conf)
			rd_kafka_conf_destroy(conf);
		fprintf(stderr, "tallyctl: %s\n", errstr);
		return 1;
	}
	/* Partitions are assigned, not subscribed: the group id is never joined or committed to. */
	char group[64];
	snprintf(group, sizeof(group), "tallyctl-rebuild-%ld", (long)getpid());
	if (!(rb->rk = tly_kafka_consumer_new(conf, group, errstr, sizeof(errstr)))) {
		fprintf(stderr, "tallyctl: %s\n", errstr);
		return 1;
	}
	return 0;
}

static int start(struct rebuild *rb)
{
	char errstr[1024];
	struct tly_pg_error err;
	struct tly_migrate_set *set = NULL;
	int rc = 1;
	if (!tly_config_str(rb->app->cfg, "kafka.bootstrap.servers")) {
		fprintf(stderr, "tallyctl: kafka.bootstrap.servers is not set (use -s "
				"kafka.bootstrap.servers=… or TALLY_KAFKA_BOOTSTRAP_SERVERS)\n");
		return 1;
	}
	if (kafka_start(rb) != 0)
		return 1;
	int e = pthread_create(&rb->connector, NULL, connect_spares, rb);
	if (e != 0) {
		fprintf(stderr, "tallyctl: could not start a thread: %s\n", strerror(e));
		return 1;
	}
	rb->connecting = true;
	if (!(rb->conn = tallyctl_connect_db(rb->app)))
		return 1;
	if (!(set = tly_migrate_load_embedded(errstr, sizeof(errstr))) ||
	    tly_migrate_check_head(rb->conn, set, errstr, sizeof(errstr)) != 0) {
		fprintf(stderr, "tallyctl: could not rebuild: the database schema is not at head: %s\n",
			errstr);
		goto out;
	}
	/* the shadows' commits need not wait for the disk: only the swap's commit must be durable */
	if (tly_pg_exec(rb->conn, "SET synchronous_commit = off", 0, NULL, &err) != 0) {
		report(rb, "set synchronous_commit", &err);
		goto out;
	}
	/* before seed_shadows' temporary tables */
	if (tly_fold_prepare_session(rb->conn, &err) != 0) {
		report(rb, "set the session up for the fold", &err);
		goto out;
	}
	PGresult *res = tly_pg_query(rb->conn, "SELECT pg_try_advisory_lock(" ADVISORY_KEY ")", 0, NULL,
				     &err);
	if (!res) {
		report(rb, "take the rebuild lock", &err);
		goto out;
	}
	rb->locked = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
	PQclear(res);
	if (!rb->locked) {
		fprintf(stderr, "tallyctl: could not rebuild: another rebuild is running on this database\n");
		goto out;
	}
	if ((rb->codec = tly_codec_new(errstr, sizeof(errstr))) != NULL)
		find_ticks(rb);
	if (!rb->codec || new_fold(rb) != 0) {
		fprintf(stderr, "tallyctl: %s\n", rb->codec ? "out of memory" : errstr);
		goto out;
	}
	for (size_t i = 0; i < rb->ntables; i++) {
		if (strcmp(rb->tables[i], "projector_ledger_applied") == 0) {
			char *q = qident(rb->conn, rb->shadow[i]);
			rb->qshadow_applied = q ? strdup(q) : NULL;
			PQfreemem(q);
		}
	}
	if (!rb->qshadow_applied) {
		fprintf(stderr, "tallyctl: out of memory\n");
		goto out;
	}
	rc = load_partitions(rb);
out:
	tly_migrate_free(set);
	return rc;
}

int cmd_rebuild(struct app *app, int argc, char **argv)
{
	struct rebuild rb = {.app = app};
	struct tly_pg_error err = {0};
	PGresult *fks = NULL;
	int rc = 1, prc = 0;
	bool shadows = false;
	if (argc < 2 || strcmp(argv[1], "--help") == 0) {
		rebuild_usage();
		return 2;
	}
	if ((rc = select_tables(&rb, argc, argv)) != 0)
		return rc;
	rc = 1;
	rb.tty = isatty(STDERR_FILENO) == 1;
	rb.started = tly_clock_s();
	if (start(&rb) != 0)
		goto out;
	rb.phase[PH_START] = tly_clock_s() - rb.started;
	/* The first pass folds in memory into the empty shadows; then they get their indexes. */
	int64_t behind = 0;
	PGconn *conn2 = NULL;
	struct rb_rows *rows = NULL;
	struct tly_pg_error ddl_err = {0};
	prc = first_pass_begin(&rb, &conn2, &rows, &behind, &err);
	shadows = true;
	rb.phase[PH_SHADOWS] = tly_clock_s() - rb.started - rb.phase[PH_START];
	progress(&rb, true);
	if (prc == 0)
		prc = first_pass(&rb, rows, &err);
	else if (PQtransactionStatus(rb.conn) == PQTRANS_ACTIVE && script_results(rb.conn, &ddl_err) != 0)
		fprintf(stderr, "tallyctl: could not create the shadow tables: %s\n", ddl_err.message);
	rb_rows_end(rows);
	if (prc != 0 && conn2)
		PQfinish(conn2);
	if (prc != 0) {
		struct tly_pg_error rberr;
		if (PQtransactionStatus(rb.conn) != PQTRANS_IDLE && tly_pg_rollback(rb.conn, &rberr) != 0)
			fprintf(stderr, "tallyctl: could not roll back: %s\n", rberr.message);
		report(&rb, "fold into the shadow tables", &err);
		goto out;
	}
	prc = first_pass_copy(&rb, conn2, &err);
	if (conn2)
		PQfinish(conn2);
	for (size_t k = 0; k < N_STREAMS; k++) {
		if (rb.streams[k].conn)
			PQfinish(rb.streams[k].conn);
		rb.streams[k].conn = NULL;
	}
	if (prc != 0) {
		report(&rb, "write the shadow tables", &err);
		goto out;
	}

	/* Catch-up passes (fold.c) while the projector runs, until what is left is small. */
	double t = tly_clock_s();
	for (int i = 1; i < CATCHUP_PASSES && behind > CATCHUP_SMALL; i++) {
		if ((prc = pass(&rb, &behind, &err)) != 0) {
			report(&rb, "fold into the shadow tables", &err);
			goto out;
		}
	}
	rb.phase[PH_CATCHUP] = tly_clock_s() - t;
	t = tly_clock_s();

	/* The swap; a lock timeout or a deadlock with a projector batch rolls back and retries. */
	for (int attempt = 1;; attempt++) {
		struct rpart *saved = malloc(rb.nparts * sizeof(*saved) + 1);
		int64_t ev0 = rb.events, en0 = rb.entries, total0 = rb.total;
		if (!saved) {
			fprintf(stderr, "tallyctl: out of memory\n");
			goto out;
		}
		memcpy(saved, rb.parts, rb.nparts * sizeof(*saved));
		PQclear(fks);
		fks = NULL;
		prc = swap_once(&rb, &fks, &err);
		if (prc == 0) {
			free(saved);
			break;
		}
		struct tly_pg_error rberr;
		if (PQtransactionStatus(rb.conn) != PQTRANS_IDLE && tly_pg_rollback(rb.conn, &rberr) != 0)
			fprintf(stderr, "\ntallyctl: could not roll back: %s\n", rberr.message);
		/* the rolled back catch-up is not in the shadows: fold it again next time */
		memcpy(rb.parts, saved, rb.nparts * sizeof(*saved));
		free(saved);
		if (new_fold(&rb) != 0) {
			fprintf(stderr, "tallyctl: out of memory\n");
			goto out;
		}
		rb.events = ev0;
		rb.entries = en0;
		rb.total = total0;
		if (prc != TLY_E_PG || err.errclass != TLY_ERRCLASS_RETRIABLE || attempt >= SWAP_ATTEMPTS ||
		    PQstatus(rb.conn) != CONNECTION_OK) {
			report(&rb, "swap the rebuilt tables in", &err);
			goto out;
		}
		fprintf(stderr, "%stallyctl: swap attempt %d: %s; retrying\n", rb.tty ? "\n" : "", attempt,
			err.message);
		if ((prc = pass(&rb, &behind, &err)) != 0) {
			report(&rb, "fold into the shadow tables", &err);
			goto out;
		}
	}
	progress(&rb, true);
	if (rb.tty)
		fprintf(stderr, "\n");
	rb.phase[PH_SWAP] = tly_clock_s() - t;
	t = tly_clock_s();

	/* After the commit: foreign keys validated (no lock that blocks readers or writers; one
	 * pipeline), the unswapped shadows dropped. */
	struct stmts validations = {0};
	for (int r = 0; r < PQntuples(fks) && prc == 0; r++)
		if (!PQgetisnull(fks, r, 3))
			prc = stmts_add(&validations, PQgetvalue(fks, r, 3));
	if (prc != 0)
		snprintf(err.message, sizeof(err.message), "out of memory");
	else
		prc = tly_pg_exec_pipeline(rb.conn, (const char *const *)validations.v, validations.n, &err);
	stmts_free(&validations);
	if (prc != 0) {
		report(&rb, "validate a foreign key of the swapped tables", &err);
		goto out;
	}
	if (drop_shadows(&rb, true, &err) != 0) {
		report(&rb, "drop the shadow tables", &err);
		goto out;
	}
	shadows = false;
	/*
	 * No ANALYZE here: the index builds recorded each table's row and page counts (what the
	 * projector's keyed statements plan by), and the load counts as changes, so autovacuum
	 * analyzes every swapped table of more than a few rows within autovacuum_naptime. An
	 * ANALYZE of agent_messages alone cost the rebuild about a tenth of its time.
	 */
	rb.phase[PH_AFTER] = tly_clock_s() - t;
	double secs = tly_clock_s() - rb.started;
	int nsel = 0;
	for (size_t i = 0; i < rb.ntables; i++)
		nsel += rb.selected[i];
	printf("rebuilt %d table(s) from %" PRId64 " event records and %" PRId64
	       " ledger entries in %.2f s (%.0f records/s)", nsel, rb.events, rb.entries, secs,
	       secs > 0 ? (double)(rb.events + rb.entries) / secs : 0);
	if (rb.undecodable)
		printf("; %" PRIu64 " undecodable record(s) skipped, as the projector skips them",
		       rb.undecodable);
	printf("\n  seconds:");
	for (int ph = 0; ph < PH__N; ph++)
		printf(" %s %.2f", PHASES[ph], rb.phase[ph]);
	printf("\n");
	rc = 0;
out:
	/* first: a stream's transaction may hold a lock that the drop below would wait for */
	for (size_t k = 0; k < N_STREAMS; k++)
		if (rb.streams[k].conn)
			PQfinish(rb.streams[k].conn);
	for (size_t k = 0; k < 1 + N_STREAMS; k++) {
		PGconn *spare = take_spare(&rb, k);
		if (spare)
			PQfinish(spare);
	}
	if (rc != 0 && shadows && rb.conn && PQstatus(rb.conn) == CONNECTION_OK &&
	    PQtransactionStatus(rb.conn) == PQTRANS_IDLE) {
		for (size_t i = 0; i < rb.ntables; i++)
			rb.selected[i] = false;
		if (drop_shadows(&rb, false, &err) != 0)
			fprintf(stderr, "tallyctl: could not drop the shadow tables: %s\n", err.message);
	}
	/*
	 * Released here, not by the session's end: a backend ends after its client has gone (and
	 * drops its temporary tables first), so the next rebuild could find the lock still held.
	 */
	if (rb.locked && PQstatus(rb.conn) == CONNECTION_OK &&
	    PQtransactionStatus(rb.conn) == PQTRANS_IDLE &&
	    tly_pg_exec(rb.conn, "SELECT pg_advisory_unlock(" ADVISORY_KEY ")", 0, NULL, &err) != 0)
		fprintf(stderr, "tallyctl: could not release the rebuild lock: %s\n", err.message);
	PQclear(fks);
	for (size_t k = 0; k < N_STREAMS; k++)
		tly_pgcopy_free(rb.streams[k].c);
	tly_kafka_consumer_destroy(rb.rk);
	tly_fold_free(rb.fold);
	tly_memfold_free(rb.mem);
	tly_event_free(&rb.ev);
	tly_codec_free(rb.codec);
	free(rb.parts);
	free(rb.qshadow_applied);
	if (rb.conn)
		PQfinish(rb.conn);
	return rc;
}
