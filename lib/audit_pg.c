/* Streams the ledger's inputs, entries and offsets out of PostgreSQL into audits, a partition at a time. */
#include "audit_pg.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "audit_proj.h"
#include "copyout.h"
#include "entries.h"
#include "pgarray.h"

#define DEFAULT_PROGRESS 20000
#define MAX_JOBS 64
#define TASKS_PER_JOB 6 /* with several workers: ranges cut per worker, handed out largest first */

/* Partitions lo .. hi - 1, of about weight inputs. */
struct task {
	int32_t lo, hi;
	double weight;
};

/* What the workers share; every field below mu is guarded by it. */
struct shared {
	const struct tly_audit_opts *aopts;
	const struct tly_audit_pg_opts *opts;
	char snapshot[64];   /* exported by the coordinator's transaction */
	tly_uuid tenant;
	struct task tasks[MAX_JOBS * TASKS_PER_JOB];
	int32_t n_tasks;
	pthread_mutex_t mu;
	int32_t next_task;
	struct tly_audit_counts live[MAX_JOBS];
	int jobs;
	int rc;              /* the first worker failure */
	struct tly_pg_error err;
};

/*
 * One worker's verifier and its two connections in the snapshot: the inputs stream on one, the
 * entries on the other, both as binary COPY, so the server produces while the verifier works.
 */
struct run {
	struct shared *sh;
	int index;
	PGconn *conn;    /* inputs, and the partitions' offsets */
	PGconn *conn2;   /* entries */
	struct tly_audit *a;
	struct tly_pg_error err;
	int progress_rows;
	struct tly_copyout *inputs;   /* ledger_input_batches rows: a partition's records packed */
	int32_t in_partition;         /* of the batch row being read, whose arrays these read */
	struct tly_pgarray_reader in_offsets, in_tenants, in_values;
	int64_t in_offset;            /* the next input record, when in_have (borrowed from the row) */
	const char *in_tenant;        /* 16 bytes, NULL for a ClockTick */
	const char *in_value;
	int in_len;
	bool in_have, in_done;
	struct tly_event *group;      /* the stored entries of one cause, read so far */
	size_t n_group, cap_group;    /* slots keep their arenas from one cause to the next */
};

/* A stream that is not what its query returns: a server or network fault, not the ledger's. */
static int stream_fault(struct run *r, int rc, const char *what)
{
	if (rc == TLY_E_CORRUPT) {
		r->err.errclass = TLY_ERRCLASS_FATAL;
		r->err.sqlstate[0] = '\0';
		snprintf(r->err.message, sizeof(r->err.message),
			 "could not read the %s: a row does not read back as one", what);
		rc = TLY_E_PG;
	}
	return rc;
}

/* A batch row's arrays opened: 0, or TLY_E_CORRUPT unless they are three of equal length. */
static int open_batch(struct run *r, const char *const *values, const int *lengths, int n)
{
	if (n != 4 || lengths[0] != 4 || lengths[1] < 0 || lengths[2] < 0 || lengths[3] < 0)
		return TLY_E_CORRUPT;
	r->in_partition = tly_copyout_int4(values[0]);
	int k = tly_pgarray_open(&r->in_offsets, values[1], (size_t)lengths[1], TLY_PGARRAY_INT8);
	if (k < 0 || tly_pgarray_open(&r->in_tenants, values[2], (size_t)lengths[2],
				      TLY_PGARRAY_UUID) != k ||
	    tly_pgarray_open(&r->in_values, values[3], (size_t)lengths[3], TLY_PGARRAY_BYTEA) != k)
		return TLY_E_CORRUPT;
	return 0;
}

/*
 * The next input record, read when needed: 1 with r->in_* on it, 0 at the end, or an error. A
 * batch row's records are taken in array order (offset order); with --tenant, only the tenant's
 * records and the ClockTicks.
 */
static int input_row(struct run *r)
{
	const tly_uuid *only = r->sh->opts->tenant ? &r->sh->tenant : NULL;
	if (r->in_have)
		return 1;
	for (;;) {
		const char *o, *t, *v;
		int ol, tl, vl;
		int a = tly_pgarray_next(&r->in_offsets, &o, &ol);
		int b = tly_pgarray_next(&r->in_tenants, &t, &tl);
		int c = tly_pgarray_next(&r->in_values, &v, &vl);
		if (a == 1 && b == 1 && c == 1 && ol == 8 && (tl == 16 || tl == -1) && vl >= 0) {
			if (only && t && memcmp(t, only->b, 16) != 0)
				continue;
			r->in_offset = tly_copyout_int8(o);
			r->in_tenant = t;
			r->in_value = v;
			r->in_len = vl;
			r->in_have = true;
			return 1;
		}
		if (a != 0 || b != 0 || c != 0)
			return stream_fault(r, TLY_E_CORRUPT, "ledger inputs");
		if (r->in_done)
			return 0;
		const char *const *values;
		const int *lengths;
		int n;
		int rc = tly_copyout_next(r->inputs, &values, &lengths, &n, &r->err);
		if (rc == 1)
			rc = open_batch(r, values, lengths, n);
		else if (rc == 0)
			r->in_done = true;
		if (rc < 0)
			return stream_fault(r, rc, "ledger inputs");
	}
}

/* Feed the task's inputs up to (partition, offset) inclusive; all of them with all. */
static int feed_inputs(struct run *r, int32_t partition, int64_t offset, bool all)
{
	int have;
	while ((have = input_row(r)) == 1) {
		int32_t p = r->in_partition;
		int64_t o = r->in_offset;
		if (!all && (p > partition || (p == partition && o > offset)))
			return 0;
		tly_uuid tenant;
		if (r->in_tenant)
			memcpy(tenant.b, r->in_tenant, 16);
		r->in_have = false; /* the record stays valid until the next batch row is read */
		int rc = tly_audit_input(r->a, p, o, r->in_tenant ? &tenant : NULL, r->in_value,
					 (size_t)r->in_len);
		if (rc != 0)
			return rc;
	}
	return have;
}

/* The ledger's stored offset of partition and its quarantined offsets, to the verifier. */
static int announce(struct run *r, int32_t partition, const char *ptext)
{
	const char *v[] = {r->sh->opts->events_topic, ptext};
	PGresult *off = tly_pg_query(r->conn,
				     "SELECT next_offset FROM consumer_offsets WHERE consumer = "
				     "'tally-ledger' AND topic = $1 AND partition = $2::integer",
				     2, v, &r->err);
	PGresult *quar = off ? tly_pg_query(r->conn,
					    "SELECT \"offset\" FROM quarantine WHERE topic = $1 AND "
					    "partition = $2::integer ORDER BY \"offset\"",
					    2, v, &r->err)
			     : NULL;
	int64_t *q = quar ? calloc((size_t)PQntuples(quar) + 1, sizeof(*q)) : NULL;
	int rc = off && quar ? TLY_E_NOMEM : TLY_E_PG;
	if (q) {
		for (int i = 0; i < PQntuples(quar); i++)
			q[i] = strtoll(PQgetvalue(quar, i, 0), NULL, 10);
		int64_t next = PQntuples(off) ? strtoll(PQgetvalue(off, 0, 0), NULL, 10) : -1;
		rc = tly_audit_partition(r->a, partition, next, q, (size_t)PQntuples(quar));
	}
	free(q);
	PQclear(off);
	PQclear(quar);
	return rc;
}

/* The task's bounds, as settings of both transactions the COPY statements read (no parameters). */
static int bounds(struct run *r, const char *lo, const char *hi, const char *tenant)
{
	const char *v[] = {lo, hi, tenant ? tenant : ""};
	PGconn *conns[] = {r->conn, r->conn2};
	for (int i = 0; i < 2; i++) {
		PGresult *res = tly_pg_query(conns[i],
					     "SELECT set_config('tally.audit_lo', $1, true), "
					     "set_config('tally.audit_hi', $2, true), "
					     "set_config('tally.audit_tenant', $3, true)",
					     3, v, &r->err);
		if (!res)
			return TLY_E_PG;
		PQclear(res);
	}
	return 0;
}

/*
 * The task's streams: inputs and entries of partitions [lo, hi) in (partition, offset) order, or
 * one tenant's (its partition's ticks with it, and all its entries whatever partition they claim).
 */
#define LO "current_setting('tally.audit_lo')::integer"
#define HI "current_setting('tally.audit_hi')::integer"
#define TENANT "current_setting('tally.audit_tenant')::uuid"
static int start_streams(struct run *r, bool one, struct tly_copyout **entries)
{
	/* with one tenant: its partition's batches; input_row picks its records and the ticks */
	r->inputs = tly_copyout_start(r->conn,
				      "COPY (SELECT partition, offsets, tenant_ids, record_values FROM "
				      "ledger_input_batches WHERE partition >= " LO " AND partition < " HI
				      " ORDER BY partition, first_offset) TO STDOUT (FORMAT binary)",
				      &r->err);
	if (!r->inputs)
		return TLY_E_PG;
	*entries = tly_copyout_start(r->conn2,
				     one ? "COPY (SELECT " TLY_ENTRIES_SELECT_BINARY " FROM ledger_entries "
					   "e WHERE e.tenant_id = " TENANT " ORDER BY e.cause_partition, "
					   "e.cause_offset) TO STDOUT (FORMAT binary)"
					 : "COPY (SELECT " TLY_ENTRIES_SELECT_BINARY " FROM ledger_entries "
					   "e WHERE e.cause_partition >= " LO " AND e.cause_partition < " HI
					   " ORDER BY e.cause_partition, e.cause_offset) "
					   "TO STDOUT (FORMAT binary)",
				     &r->err);
	return *entries ? 0 : TLY_E_PG;
}

static void progress(struct run *r)
{
	struct shared *sh = r->sh;
	if (!sh->opts->progress)
		return;
	struct tly_audit_counts sum = {0};
	pthread_mutex_lock(&sh->mu);
	tly_audit_get_counts(r->a, &sh->live[r->index]);
	for (int i = 0; i < sh->jobs; i++) {
		sum.entries += sh->live[i].entries;
		sum.inputs += sh->live[i].inputs;
		sum.failures += sh->live[i].failures;
	}
	sh->opts->progress(&sum, sh->opts->ud);
	pthread_mutex_unlock(&sh->mu);
}

/* Entry order inside one cause, as the verifier takes them: (tenant, seq). */
static int entry_cmp(const void *x, const void *y)
{
	const struct tly_event *ex = x, *ey = y;
	int c = memcmp(ex->tenant_id.b, ey->tenant_id.b, 16);
	if (c)
		return c;
	int64_t sx = ex->u.ledger_entry.seq, sy = ey->u.ledger_entry.seq;
	return sx < sy ? -1 : sx > sy;
}

/* The entries of the cause read so far, in (tenant, seq) order, after the inputs up to it. */
static int flush(struct run *r, size_t n)
{
	if (n == 0)
		return 0;
	if (n > 1)
		qsort(r->group, n, sizeof(*r->group), entry_cmp);
	const struct tly_ledger_entry *e = &r->group[0].u.ledger_entry;
	tly_audit_expect(r->a, r->group, n);
	int rc = feed_inputs(r, e->cause_partition, e->cause_offset, false);
	for (size_t i = 0; i < n && rc == 0; i++)
		rc = tly_audit_entry(r->a, &r->group[i]);
	return rc;
}

/* The next stored entry into r->group[r->n_group] (grown as needed): 1, 0 at the end, or an error. */
static int entry_row(struct run *r, struct tly_copyout *entries)
{
	const char *const *values;
	const int *lengths;
	int n;
	int rc = tly_copyout_next(entries, &values, &lengths, &n, &r->err);
	if (rc != 1)
		return stream_fault(r, rc, "ledger entries");
	if (r->n_group == r->cap_group) {
		size_t cap = r->cap_group ? 2 * r->cap_group : 16;
		struct tly_event *g = realloc(r->group, cap * sizeof(*g));
		if (!g)
			return TLY_E_NOMEM;
		memset(g + r->cap_group, 0, (cap - r->cap_group) * sizeof(*g));
		r->group = g;
		r->cap_group = cap;
	}
	rc = tly_entries_from_copy(values, lengths, n, &r->group[r->n_group]);
	return rc ? stream_fault(r, rc, "ledger entries") : 1;
}

/*
 * One task: partitions [lo, hi) (or the tenant's), inputs and entries merged in offset order. The
 * entries come in (partition, offset) order from the index; those of one cause are put in (tenant,
 * seq) order here, which spares the server a sort step on every row.
 */
static int audit_task(struct run *r, int32_t lo, int32_t hi)
{
	char lot[16], hit[16], tenant[37];
	const struct shared *sh = r->sh;
	bool one = sh->opts->tenant != NULL;
	struct tly_copyout *entries = NULL;
	int rc = 0;
	long rows = 0;
	snprintf(lot, sizeof(lot), "%d", (int)lo);
	snprintf(hit, sizeof(hit), "%d", (int)hi);
	if (one)
		tly_uuid_format(&sh->tenant, tenant);
	for (int32_t p = lo; p < hi && !one && rc == 0; p++) {
		char ptext[16];
		snprintf(ptext, sizeof(ptext), "%d", (int)p);
		rc = announce(r, p, ptext);
	}
	r->in_have = r->in_done = false;
	memset(&r->in_offsets, 0, sizeof(r->in_offsets)); /* no batch row open */
	r->in_tenants = r->in_values = r->in_offsets;
	r->n_group = 0;
	if (rc == 0)
		rc = bounds(r, lot, hit, one ? tenant : NULL);
	if (rc == 0)
		rc = start_streams(r, one, &entries);
	while (rc == 0 && (rc = entry_row(r, entries)) == 1) {
		size_t at = r->n_group;
		const struct tly_ledger_entry *e = &r->group[at].u.ledger_entry;
		const struct tly_ledger_entry *first = &r->group[0].u.ledger_entry;
		rc = 0;
		if (at > 0 && (e->cause_partition != first->cause_partition ||
			       e->cause_offset != first->cause_offset)) {
			rc = flush(r, at); /* a new cause: the one before is complete */
			struct tly_event row = r->group[at];
			r->group[at] = r->group[0];
			r->group[0] = row;
			at = 0;
		}
		r->n_group = at + 1;
		if (rc == 0 && ++rows % r->progress_rows == 0)
			progress(r);
	}
	if (rc == 0)
		rc = flush(r, r->n_group);
	if (rc == 0)
		rc = feed_inputs(r, 0, 0, true);
	if (rc == 0)
		progress(r);
	tly_copyout_free(entries);
	tly_copyout_free(r->inputs);
	r->inputs = NULL;
	return rc;
}

static void serialised_failure(const struct tly_audit_failure *fl, void *ud)
{
	struct shared *sh = ud;
	pthread_mutex_lock(&sh->mu);
	if (sh->aopts->on_failure)
		sh->aopts->on_failure(fl, sh->aopts->ud);
	pthread_mutex_unlock(&sh->mu);
}

/* Connect and join the coordinator's snapshot (a server-generated id, quoted as a literal). */
static int join(struct run *r, PGconn **conn)
{
	char errstr[512];
	if (!(*conn = tly_pg_connect(r->sh->opts->conninfo, "tallyctl audit", errstr,
				     sizeof(errstr)))) {
		r->err.errclass = TLY_ERRCLASS_RETRIABLE;
		snprintf(r->err.message, sizeof(r->err.message), "%s", errstr);
		return TLY_E_PG;
	}
	if (tly_pg_exec_script(*conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
			       &r->err) != 0)
		return TLY_E_PG;
	if (r->sh->snapshot[0]) { /* else an empty ledger: nothing to share */
		char *lit = PQescapeLiteral(*conn, r->sh->snapshot, strlen(r->sh->snapshot));
		if (!lit)
			return TLY_E_NOMEM;
		char sql[128];
		snprintf(sql, sizeof(sql), "SET TRANSACTION SNAPSHOT %s", lit);
		PQfreemem(lit);
		if (tly_pg_exec_script(*conn, sql, &r->err) != 0)
			return TLY_E_PG;
	}
	/*
	 * Rows in (partition, offset) order straight from the indexes, streamed: for a range of
	 * partitions the planner would rather scan the table in parallel and sort it on disk, which
	 * costs a worker more than the whole ledger read in index order. No JIT for one pass.
	 */
	return tly_pg_exec_script(*conn, "SET LOCAL enable_seqscan = off; "
				  "SET LOCAL enable_bitmapscan = off; "
				  "SET LOCAL max_parallel_workers_per_gather = 0; SET LOCAL jit = off",
				  &r->err) == 0 ? 0 : TLY_E_PG;
}

static int worker_begin(struct run *r)
{
	int rc = join(r, &r->conn);
	return rc ? rc : join(r, &r->conn2);
}

static void *worker_main(void *arg)
{
	struct run *r = arg;
	struct shared *sh = r->sh;
	char errstr[256];
	struct tly_audit_opts wo = *sh->aopts;
	wo.on_failure = serialised_failure;
	wo.ud = sh;
	int rc = worker_begin(r);
	if (rc == 0 && !(r->a = tly_audit_new(&wo, errstr, sizeof(errstr)))) {
		snprintf(r->err.message, sizeof(r->err.message), "%s", errstr);
		rc = TLY_E_NOMEM;
	}
	while (rc == 0) {
		pthread_mutex_lock(&sh->mu);
		int32_t k = sh->rc == 0 && sh->next_task < sh->n_tasks ? sh->next_task++ : -1;
		pthread_mutex_unlock(&sh->mu);
		if (k < 0)
			break;
		rc = audit_task(r, sh->tasks[k].lo, sh->tasks[k].hi);
	}
	if (rc == 0)
		rc = tly_audit_finish(r->a);
	pthread_mutex_lock(&sh->mu);
	if (r->a)
		tly_audit_get_counts(r->a, &sh->live[r->index]);
	if (rc != 0 && sh->rc == 0) {
		sh->rc = rc;
		sh->err = r->err;
		if (rc == TLY_E_NOMEM)
			snprintf(sh->err.message, sizeof(sh->err.message), "out of memory");
	}
	pthread_mutex_unlock(&sh->mu);
	tly_audit_free(r->a);
	if (r->conn)
		PQfinish(r->conn);
	if (r->conn2)
		PQfinish(r->conn2);
	for (size_t i = 0; i < r->cap_group; i++)
		tly_event_free(&r->group[i]);
	free(r->group);
	return NULL;
}

static int heavier_first(const void *x, const void *y)
{
	const struct task *a = x, *b = y;
	if (a->weight != b->weight)
		return a->weight < b->weight ? 1 : -1;
	return (a->lo > b->lo) - (a->lo < b->lo);
}

/*
 * The snapshot every worker reads, and the tasks: contiguous ranges of partitions of about equal
 * input (by the stored offsets), TASKS_PER_JOB for each of several workers, taken heaviest first
 * (so that the last ones, small, end about together); one range for one worker; or the one
 * tenant's partition.
 */
static int coordinate(PGconn *conn, struct shared *sh, struct tly_pg_error *err)
{
	char tenant[37];
	PGresult *res = tly_pg_query(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL,
				     err);
	if (!res)
		return TLY_E_PG;
	PQclear(res);
	if (sh->opts->tenant) {
		tly_uuid_format(&sh->tenant, tenant);
		const char *v[] = {tenant};
		res = tly_pg_query(conn,
				   "SELECT pg_export_snapshot(), coalesce((SELECT cause_partition "
				   "FROM ledger_entries WHERE tenant_id = $1 ORDER BY seq LIMIT 1), "
				   "(SELECT partition FROM ledger_input_batches WHERE $1 = ANY (tenant_ids) "
				   "LIMIT 1), 0), 1",
				   1, v, err);
	} else {
		/* partitions 0 .. n-1 with their weight (stored next offset, at least 1) */
		const char *v[] = {sh->opts->events_topic};
		res = tly_pg_query(conn,
				   "WITH n AS (SELECT coalesce(greatest("
				   "(SELECT partition_count FROM topic_partitions WHERE topic = $1), "
				   "(SELECT max(partition) + 1 FROM ledger_input_batches), "
				   "(SELECT max(cause_partition) + 1 FROM ledger_entries), "
				   "(SELECT max(partition) + 1 FROM consumer_offsets WHERE consumer = "
				   "'tally-ledger' AND topic = $1)), 0) AS n) "
				   "SELECT pg_export_snapshot(), p, greatest(coalesce(o.next_offset, 1), 1) "
				   "FROM n, generate_series(0, n.n - 1) AS p LEFT JOIN consumer_offsets o "
				   "ON o.consumer = 'tally-ledger' AND o.topic = $1 AND o.partition = p "
				   "ORDER BY p",
				   1, v, err);
	}
	if (!res)
		return TLY_E_PG;
	int rows = PQntuples(res);
	snprintf(sh->snapshot, sizeof(sh->snapshot), "%s", rows ? PQgetvalue(res, 0, 0) : "");
	double total = 0, acc = 0;
	for (int i = 0; i < rows; i++)
		total += strtod(PQgetvalue(res, i, 2), NULL);
	/* one worker: one range; more: smaller ranges, so that none waits long for the last one */
	int32_t cut = sh->jobs > 1 ? sh->jobs * TASKS_PER_JOB : 1;
	struct task *t = &sh->tasks[0];
	sh->n_tasks = 0;
	*t = (struct task){rows ? (int32_t)strtol(PQgetvalue(res, 0, 1), NULL, 10) : 0, 0, 0};
	for (int i = 0; i < rows; i++) {
		double w = strtod(PQgetvalue(res, i, 2), NULL);
		acc += w;
		t->weight += w;
		bool last = i + 1 == rows;
		if (last || (acc >= total * (sh->n_tasks + 1) / cut && sh->n_tasks + 1 < cut)) {
			t->hi = (int32_t)strtol(PQgetvalue(res, i, 1), NULL, 10) + 1;
			sh->n_tasks++;
			if (!last) {
				t = &sh->tasks[sh->n_tasks];
				*t = (struct task){t[-1].hi, 0, 0};
			}
		}
	}
	qsort(sh->tasks, (size_t)sh->n_tasks, sizeof(*sh->tasks), heavier_first);
	PQclear(res);
	return 0;
}

int tly_audit_pg_run(const struct tly_audit_opts *aopts, const struct tly_audit_pg_opts *opts,
		     struct tly_audit_counts *counts, struct tly_pg_error *err)
{
	char errstr[512];
	struct shared sh = {.aopts = aopts, .opts = opts};
	struct run runs[MAX_JOBS];
	pthread_t threads[MAX_JOBS];
	int started = 0, rc;
	memset(counts, 0, sizeof(*counts));
	if (opts->tenant)
		sh.tenant = *opts->tenant;
	sh.jobs = opts->tenant || opts->jobs < 1 ? 1 : opts->jobs > MAX_JOBS ? MAX_JOBS : opts->jobs;
	PGconn *conn = tly_pg_connect(opts->conninfo, "tallyctl audit", errstr, sizeof(errstr));
	if (!conn) {
		err->errclass = TLY_ERRCLASS_RETRIABLE;
		snprintf(err->message, sizeof(err->message), "%s", errstr);
		return TLY_E_PG;
	}
	struct tly_audit_counts proj = {0};
	if ((rc = coordinate(conn, &sh, err)) != 0 ||
	    (rc = tly_audit_projections(conn, opts->tenant, aopts, &proj, err)) != 0)
		goto out;
	if (pthread_mutex_init(&sh.mu, NULL) != 0) {
		rc = TLY_E_NOMEM;
		goto out;
	}
	for (; started < sh.jobs; started++) {
		runs[started] = (struct run){.sh = &sh, .index = started,
					     .progress_rows = opts->progress_rows > 0
								      ? opts->progress_rows
								      : DEFAULT_PROGRESS};
		if (pthread_create(&threads[started], NULL, worker_main, &runs[started]) != 0)
			break;
	}
	for (int i = 0; i < started; i++)
		pthread_join(threads[i], NULL);
	pthread_mutex_destroy(&sh.mu);
	rc = sh.rc;
	if (rc == 0 && started < sh.jobs) {
		rc = TLY_E_NOMEM;
		snprintf(sh.err.message, sizeof(sh.err.message), "could not start an audit worker");
	}
	if (rc != 0)
		*err = sh.err;
	for (int i = 0; i < started; i++) {
		const struct tly_audit_counts *c = &sh.live[i];
		counts->tenants += c->tenants;
		counts->entries += c->entries;
		counts->inputs += c->inputs;
		counts->reexecuted += c->reexecuted;
		counts->rehashed += c->rehashed;
		counts->checks += c->checks;
		counts->failures += c->failures;
	}
	counts->checks += proj.checks;
	counts->failures += proj.failures;
	counts->projected = proj.projected;
	counts->behind = proj.behind;
out:
	PQfinish(conn); /* ends the coordinator's transaction: read only, nothing to keep */
	return rc;
}
