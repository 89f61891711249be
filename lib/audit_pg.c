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
#define FIRST_ROWS 32 /* a tenant's share of a fetch at first; doubled each time it runs out first */
#define MIN_ROWS 8
#define MAX_ROWS 8192
#define HELD_ROWS (1 << 18) /* about the most entry rows a worker holds over its tenants' shares */

/*
 * The entries come through the primary key, tenant by tenant: in seq order a tenant's entries
 * are in offset order, so the workers merge the tenants of a partition by offset themselves and
 * the ledger needs no index in (partition, offset) order (its writer pays for every index). One
 * fetch reads the next rows of many tenants of the partition ($1 ids, $2 the seq each has read
 * to, $3 how many rows each), each tenant's rows in seq order in one run, the runs in the
 * arrays' order (a nested loop over the arrays; rows out of that order are refused, never
 * trusted). Small shares read about the same stretch of the partition for every tenant, so the
 * heap pages a fetch visits are visited together, while they are in the server's cache.
 */
static const struct tly_pg_stmt stmts[] = {
	{"tly_audit_tenant_entries",
	 "SELECT " TLY_ENTRIES_SELECT_BINARY ", t.k FROM unnest($1::uuid[], $2::bigint[], "
	 "$3::bigint[]) WITH ORDINALITY AS t(id, after, n, k) CROSS JOIN LATERAL (SELECT * FROM "
	 "ledger_entries x WHERE x.tenant_id = t.id AND x.seq > t.after ORDER BY x.seq LIMIT t.n) e"},
};

/* One fetch's answer, shared by the slices of it its tenants hold. */
struct fetch {
	PGresult *res;
	int refs;
};

/* A tenant's rows [row, end) of a fetch. */
struct slice {
	struct fetch *f; /* NULL: none */
	int row, end;
};

/* A tenant and the partition of its first entry (where its whole ledger belongs). */
struct tenant_part {
	int32_t partition;
	tly_uuid id;
};

/*
 * A stream in the merge, with its head's place: (partition, offset, stream). The streams open
 * together are one partition's tenants by id, so the stream index orders heads of one cause by
 * tenant as the verifier takes them (one stream has one head: seq needs no place here).
 */
struct hslot {
	int32_t partition;
	int64_t offset;
	size_t stream;
};

/*
 * One tenant's stream of stored entries in seq order, with its next entry decoded. When a
 * tenant is down to half a share, the next fetch is sent for it and every other tenant as low
 * (if none is in flight), so that the server reads while the verifier works.
 */
struct tstream {
	tly_uuid id;
	struct slice cur, next; /* the rows held: cur's first, then next's */
	int share;              /* rows it asks for in a fetch */
	int64_t last_seq;       /* of the last row held (or decoded): the next fetch reads after it */
	bool end;               /* the ledger has nothing after last_seq */
	bool asked;             /* in the fetch in flight */
	struct tly_event head;  /* the next entry; the slot keeps its arena */
};

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
	struct tenant_part *tenants; /* every tenant with entries, by (partition, id); not with one */
	size_t n_tenants;
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
 * One worker's verifier and its two connections in the snapshot: the inputs stream on one by
 * binary COPY, the entries come on the other by fetches sent ahead, so the server produces
 * while the verifier works.
 */
struct run {
	struct shared *sh;
	int index;
	PGconn *conn;    /* inputs, and the partitions' offsets */
	PGconn *conn2;   /* entries, tenant by tenant */
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
	struct tstream *ts;           /* the task's tenants; slots keep their arenas between tasks */
	size_t n_ts, cap_ts;
	bool inflight;                /* a fetch is in flight on conn2, for the streams members */
	size_t *members, n_members;   /* its tenants (indexes into ts), in the arrays' order */
	struct tly_pgarray *arr[3];   /* its parameters */
	struct hslot *heap;           /* the streams with a head, least first */
	size_t n_heap;
	size_t t_next, t_end;         /* the task's tenants (sh->tenants) not yet opened */
	int max_share;                /* a tenant's largest share: HELD_ROWS over the partition's */
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

/* The task's bounds, as settings of the transaction the inputs' COPY reads (no parameters). */
static int bounds(struct run *r, const char *lo, const char *hi)
{
	const char *v[] = {lo, hi};
	PGresult *res = tly_pg_query(r->conn,
				     "SELECT set_config('tally.audit_lo', $1, true), "
				     "set_config('tally.audit_hi', $2, true)",
				     2, v, &r->err);
	if (!res)
		return TLY_E_PG;
	PQclear(res);
	return 0;
}

/*
 * The task's inputs: partitions [lo, hi) in (partition, offset) order (with one tenant: its
 * partition's batches; input_row picks its records and the ticks).
 */
#define LO "current_setting('tally.audit_lo')::integer"
#define HI "current_setting('tally.audit_hi')::integer"
static int start_inputs(struct run *r)
{
	r->inputs = tly_copyout_start(r->conn,
				      "COPY (SELECT partition, offsets, tenant_ids, record_values FROM "
				      "ledger_input_batches WHERE partition >= " LO " AND partition < " HI
				      " ORDER BY partition, first_offset) TO STDOUT (FORMAT binary)",
				      &r->err);
	return r->inputs ? 0 : TLY_E_PG;
}

static bool heap_less(const struct run *r, size_t i, size_t j)
{
	const struct hslot *x = &r->heap[i], *y = &r->heap[j];
	if (x->partition != y->partition)
		return x->partition < y->partition;
	if (x->offset != y->offset)
		return x->offset < y->offset;
	return x->stream < y->stream;
}

static void heap_swap(struct run *r, size_t i, size_t j)
{
	struct hslot t = r->heap[i];
	r->heap[i] = r->heap[j];
	r->heap[j] = t;
}

/* Slot i's place from its stream's head. */
static void heap_key(struct run *r, size_t i)
{
	const struct tly_ledger_entry *e = &r->ts[r->heap[i].stream].head.u.ledger_entry;
	r->heap[i].partition = e->cause_partition;
	r->heap[i].offset = e->cause_offset;
}

/* The heap's order restored after its slot i changed (a larger key, or one taken from the end). */
static void heap_down(struct run *r, size_t i)
{
	for (;;) {
		size_t least = i, k = 2 * i + 1;
		if (k < r->n_heap && heap_less(r, k, least))
			least = k;
		if (k + 1 < r->n_heap && heap_less(r, k + 1, least))
			least = k + 1;
		if (least == i)
			return;
		heap_swap(r, i, least);
		i = least;
	}
}

static void heap_push(struct run *r, size_t stream)
{
	size_t i = r->n_heap++;
	r->heap[i].stream = stream;
	heap_key(r, i);
	while (i > 0 && heap_less(r, i, (i - 1) / 2)) {
		heap_swap(r, i, (i - 1) / 2);
		i = (i - 1) / 2;
	}
}

static void slice_release(struct slice *sl)
{
	if (sl->f && --sl->f->refs == 0) {
		PQclear(sl->f->res);
		free(sl->f);
	}
	*sl = (struct slice){0};
}

static int held(const struct tstream *s)
{
	return s->cur.end - s->cur.row + s->next.end - s->next.row;
}

/*
 * A fetch for every tenant down to half its share, with nothing in the fetch in flight and more
 * in the ledger, sent on conn2 (where nothing is in flight); none, when no tenant is that low.
 */
static int send_fetch(struct run *r)
{
	static const uint32_t types[3] = {TLY_PGARRAY_UUID, TLY_PGARRAY_INT8, TLY_PGARRAY_INT8};
	const char *values[3];
	int lengths[3], formats[3] = {1, 1, 1};
	r->n_members = 0;
	for (int j = 0; j < 3; j++)
		tly_pgarray_begin(r->arr[j], types[j]);
	for (size_t i = 0; i < r->n_ts; i++) {
		struct tstream *s = &r->ts[i];
		if (s->end || s->next.f || held(s) > s->share / 2)
			continue;
		r->members[r->n_members++] = i;
		tly_pgarray_add(r->arr[0], s->id.b, 16);
		tly_pgarray_int8(r->arr[1], s->last_seq);
		tly_pgarray_int8(r->arr[2], s->share);
	}
	if (r->n_members == 0)
		return 0;
	for (int j = 0; j < 3; j++) {
		size_t len;
		if (!(values[j] = tly_pgarray_value(r->arr[j], &len)))
			return TLY_E_NOMEM;
		lengths[j] = (int)len;
	}
	if (!PQsendQueryPrepared(r->conn2, stmts[0].name, 3, values, lengths, formats, 1)) {
		tly_pg_error_set(&r->err, r->conn2, NULL);
		return TLY_E_PG;
	}
	for (size_t m = 0; m < r->n_members; m++)
		r->ts[r->members[m]].asked = true;
	r->inflight = true;
	return 0;
}

/* The rows of the fetch in flight, handed to its tenants as slices, in the arrays' order. */
static int take_rows(struct run *r, PGresult *res)
{
	struct fetch *f = malloc(sizeof(*f));
	int rows = PQntuples(res), at = 0;
	if (!f) {
		PQclear(res);
		return TLY_E_NOMEM;
	}
	*f = (struct fetch){res, 1}; /* this function's reference, dropped at the end */
	int rc = PQnfields(res) == TLY_ENTRIES_NFIELDS + 1 ? 0 : TLY_E_CORRUPT;
	for (size_t m = 0; m < r->n_members && rc == 0; m++) {
		struct tstream *s = &r->ts[r->members[m]];
		int from = at;
		while (at < rows && PQgetlength(res, at, TLY_ENTRIES_NFIELDS) == 8 &&
		       tly_copyout_int8(PQgetvalue(res, at, TLY_ENTRIES_NFIELDS)) == (int64_t)m + 1)
			at++;
		s->asked = false;
		s->end = at - from < s->share;
		if (at == from)
			continue;
		if (PQgetlength(res, at - 1, 1) != 8)
			rc = TLY_E_CORRUPT;
		else
			s->last_seq = tly_copyout_int8(PQgetvalue(res, at - 1, 1));
		struct slice *sl = s->cur.f && s->cur.row < s->cur.end ? &s->next : &s->cur;
		slice_release(sl);
		*sl = (struct slice){f, from, at};
		f->refs++;
	}
	if (rc == 0 && at != rows)
		rc = TLY_E_CORRUPT; /* rows out of the arrays' order, or of no tenant asked for */
	for (size_t m = 0; m < r->n_members; m++)
		r->ts[r->members[m]].asked = false;
	struct slice mine = {f, 0, 0};
	slice_release(&mine);
	return rc ? stream_fault(r, rc, "ledger entries") : 0;
}

/* The fetch in flight on conn2, received and handed to its tenants. */
static int receive_fetch(struct run *r)
{
	PGresult *res, *got = NULL;
	int rc = 0;
	r->inflight = false;
	while ((res = PQgetResult(r->conn2))) {
		if (!got && rc == 0 && PQresultStatus(res) == PGRES_TUPLES_OK) {
			got = res;
			continue;
		}
		if (rc == 0) {
			tly_pg_error_set(&r->err, r->conn2, res);
			rc = TLY_E_PG;
		}
		PQclear(res);
	}
	if (rc != 0 || !got) {
		PQclear(got);
		for (size_t m = 0; m < r->n_members; m++)
			r->ts[r->members[m]].asked = false;
		if (rc == 0)
			tly_pg_error_set(&r->err, r->conn2, NULL);
		return TLY_E_PG;
	}
	return take_rows(r, got);
}

/* The stream's next entry decoded into its head: 1, 0 at its end, or an error. */
static int stream_next(struct run *r, struct tstream *s)
{
	int rc;
	for (;;) {
		if (s->cur.f && s->cur.row < s->cur.end)
			break;
		slice_release(&s->cur);
		if (s->next.f) {
			s->cur = s->next;
			s->next = (struct slice){0};
			continue;
		}
		if (s->end)
			return 0;
		if (!r->inflight || !s->asked) {
			/* out of rows before the fetch came for it: a larger share from now on */
			s->share = s->share * 2 < r->max_share ? s->share * 2 : r->max_share;
			if (r->inflight && (rc = receive_fetch(r)) != 0)
				return rc;
			if ((rc = send_fetch(r)) != 0)
				return rc;
			if (!r->inflight)
				return stream_fault(r, TLY_E_CORRUPT, "ledger entries"); /* cannot be */
		}
		if ((rc = receive_fetch(r)) != 0)
			return rc;
	}
	rc = tly_entries_from_result(s->cur.f->res, s->cur.row++, &s->head);
	if (rc != 0)
		return stream_fault(r, rc, "ledger entries");
	if (!r->inflight && !s->end && !s->next.f && held(s) <= s->share / 2 &&
	    (rc = send_fetch(r)) != 0)
		return rc; /* read ahead while the verifier works */
	return 1;
}

/* Open a stream for each of n tenants (one partition's) and put those with entries in the heap. */
static int open_streams(struct run *r, const tly_uuid *one, const struct tenant_part *tp, size_t n)
{
	if (n > r->cap_ts) {
		struct tly_event none = {0};
		struct tstream *ts = realloc(r->ts, n * sizeof(*ts));
		struct hslot *heap = ts ? realloc(r->heap, n * sizeof(*heap)) : NULL;
		size_t *members = heap ? realloc(r->members, n * sizeof(*members)) : NULL;
		if (ts)
			r->ts = ts;
		if (heap)
			r->heap = heap;
		if (!members)
			return TLY_E_NOMEM;
		r->members = members;
		for (size_t i = r->cap_ts; i < n; i++)
			r->ts[i].head = none;
		r->cap_ts = n;
	}
	for (int j = 0; j < 3; j++)
		if (!r->arr[j] && !(r->arr[j] = tly_pgarray_new()))
			return TLY_E_NOMEM;
	r->max_share = n ? HELD_ROWS / (int)n : MAX_ROWS;
	r->max_share = r->max_share < MIN_ROWS ? MIN_ROWS
		       : r->max_share > MAX_ROWS ? MAX_ROWS : r->max_share;
	r->n_ts = n;
	r->n_heap = 0;
	for (size_t i = 0; i < n; i++) {
		struct tstream *s = &r->ts[i];
		s->id = one ? *one : tp[i].id;
		s->cur = s->next = (struct slice){0};
		s->share = FIRST_ROWS < r->max_share ? FIRST_ROWS : r->max_share;
		s->last_seq = 0;
		s->end = s->asked = false;
	}
	if (tly_pg_prepare(r->conn2, stmts, sizeof(stmts) / sizeof(stmts[0]), &r->err) != 0)
		return TLY_E_PG;
	for (size_t i = 0; i < n; i++) {
		int rc = stream_next(r, &r->ts[i]);
		if (rc < 0)
			return rc;
		if (rc == 1)
			heap_push(r, i);
	}
	return 0;
}

static void close_streams(struct run *r)
{
	if (r->inflight)
		(void)receive_fetch(r); /* the task ends: what it read, even a failure, is dropped */
	for (size_t i = 0; i < r->n_ts; i++) {
		slice_release(&r->ts[i].cur);
		slice_release(&r->ts[i].next);
	}
	r->n_ts = r->n_heap = 0;
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

/*
 * The next stored entry, the least head of the open partition's tenants (the task's next
 * partition opened when they are done), into r->group[r->n_group] (grown as needed): 1, 0 at the
 * end, or an error.
 */
static int entry_row(struct run *r)
{
	const struct shared *sh = r->sh;
	while (r->n_heap == 0 && r->t_next < r->t_end) {
		const struct tenant_part *tp = &sh->tenants[r->t_next];
		size_t n = 0;
		while (r->t_next + n < r->t_end && tp[n].partition == tp[0].partition)
			n++;
		r->t_next += n;
		close_streams(r);
		int rc = open_streams(r, NULL, tp, n);
		if (rc != 0)
			return rc;
	}
	if (r->n_heap == 0)
		return 0;
	if (r->n_group == r->cap_group) {
		size_t cap = r->cap_group ? 2 * r->cap_group : 16;
		struct tly_event *g = realloc(r->group, cap * sizeof(*g));
		if (!g)
			return TLY_E_NOMEM;
		memset(g + r->cap_group, 0, (cap - r->cap_group) * sizeof(*g));
		r->group = g;
		r->cap_group = cap;
	}
	struct tstream *s = &r->ts[r->heap[0].stream];
	struct tly_event row = r->group[r->n_group]; /* the two slots trade their arenas */
	r->group[r->n_group] = s->head;
	s->head = row;
	int rc = stream_next(r, s);
	if (rc == 0)
		r->heap[0] = r->heap[--r->n_heap];
	else if (rc == 1)
		heap_key(r, 0);
	if (rc >= 0)
		heap_down(r, 0);
	return rc < 0 ? rc : 1;
}

/*
 * One task: partitions [lo, hi) (or the tenant's), inputs and entries merged in offset order. The
 * entries come tenant by tenant in seq order through the primary key and are merged here by
 * (partition, offset, tenant, seq), which spares the server a sort or an index of its own.
 */
static int audit_task(struct run *r, int32_t lo, int32_t hi)
{
	char lot[16], hit[16];
	const struct shared *sh = r->sh;
	bool one = sh->opts->tenant != NULL;
	int rc = 0;
	long rows = 0;
	snprintf(lot, sizeof(lot), "%d", (int)lo);
	snprintf(hit, sizeof(hit), "%d", (int)hi);
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
		rc = bounds(r, lot, hit);
	if (rc == 0)
		rc = start_inputs(r);
	r->t_next = r->t_end = 0; /* the tenants of [lo, hi): opened a partition at a time */
	while (!one && r->t_next < sh->n_tenants && sh->tenants[r->t_next].partition < lo)
		r->t_next++;
	for (r->t_end = r->t_next; !one && r->t_end < sh->n_tenants &&
				   sh->tenants[r->t_end].partition < hi;)
		r->t_end++;
	if (rc == 0 && one)
		rc = open_streams(r, &sh->tenant, NULL, 1);
	while (rc == 0 && (rc = entry_row(r)) == 1) {
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
	close_streams(r);
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
	 * Rows in index order, streamed: for a range of partitions the planner would rather scan the
	 * input batches in parallel and sort them on disk, which costs a worker more than the whole
	 * range read in index order. No JIT for one pass.
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
	close_streams(r);
	for (size_t i = 0; i < r->cap_ts; i++)
		tly_event_free(&r->ts[i].head);
	free(r->ts);
	free(r->heap);
	free(r->members);
	for (int j = 0; j < 3; j++)
		tly_pgarray_free(r->arr[j]);
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
 * Every tenant with entries, with the partition of its first entry, by (partition, tenant): a
 * walk of the primary key that visits each tenant once (the next above the last one), so it
 * costs a few index pages a tenant, not a read of the ledger. The number of partitions they
 * reach into *n_parts.
 */
static int list_tenants(PGconn *conn, struct shared *sh, int32_t *n_parts, struct tly_pg_error *err)
{
	PGresult *res = tly_pg_query(conn,
				     "WITH RECURSIVE t(id) AS ((SELECT tenant_id FROM ledger_entries "
				     "ORDER BY tenant_id LIMIT 1) UNION ALL SELECT (SELECT e.tenant_id "
				     "FROM ledger_entries e WHERE e.tenant_id > t.id ORDER BY e.tenant_id "
				     "LIMIT 1) FROM t WHERE t.id IS NOT NULL) "
				     "SELECT p, id FROM (SELECT t.id, (SELECT f.cause_partition FROM "
				     "ledger_entries f WHERE f.tenant_id = t.id ORDER BY f.seq LIMIT 1) AS p "
				     "FROM t WHERE t.id IS NOT NULL) x ORDER BY p, id",
				     0, NULL, err);
	if (!res)
		return TLY_E_PG;
	int rows = PQntuples(res);
	*n_parts = 0;
	sh->tenants = calloc((size_t)rows + 1, sizeof(*sh->tenants));
	if (!sh->tenants) {
		PQclear(res);
		return TLY_E_NOMEM;
	}
	for (int i = 0; i < rows; i++) {
		struct tenant_part *t = &sh->tenants[i];
		t->partition = (int32_t)strtol(PQgetvalue(res, i, 0), NULL, 10);
		if (tly_uuid_parse(PQgetvalue(res, i, 1), &t->id) != 0) {
			PQclear(res);
			snprintf(err->message, sizeof(err->message),
				 "could not read the ledger's tenants: a tenant id does not parse");
			err->errclass = TLY_ERRCLASS_FATAL;
			return TLY_E_PG;
		}
		if (t->partition + 1 > *n_parts)
			*n_parts = t->partition + 1;
	}
	sh->n_tenants = (size_t)rows;
	PQclear(res);
	return 0;
}

/*
 * The snapshot every worker reads, and the tasks: contiguous ranges of partitions of about equal
 * input (by the stored offsets), TASKS_PER_JOB for each of several workers, taken heaviest first
 * (so that the last ones, small, end about together); one range for one worker; or the one
 * tenant's partition. Without one tenant, the ledger's tenants (list_tenants) too.
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
		int32_t n_parts;
		char parts[16];
		res = tly_pg_query(conn, "SELECT pg_export_snapshot()", 0, NULL, err);
		if (!res)
			return TLY_E_PG;
		snprintf(sh->snapshot, sizeof(sh->snapshot), "%s", PQgetvalue(res, 0, 0));
		PQclear(res);
		int rc = list_tenants(conn, sh, &n_parts, err);
		if (rc != 0)
			return rc;
		snprintf(parts, sizeof(parts), "%d", (int)n_parts);
		const char *v[] = {sh->opts->events_topic, parts};
		res = tly_pg_query(conn,
				   "WITH n AS (SELECT coalesce(greatest("
				   "(SELECT partition_count FROM topic_partitions WHERE topic = $1), "
				   "(SELECT max(partition) + 1 FROM ledger_input_batches), "
				   "$2::integer, "
				   "(SELECT max(partition) + 1 FROM consumer_offsets WHERE consumer = "
				   "'tally-ledger' AND topic = $1)), 0) AS n) "
				   "SELECT $2::integer, p, greatest(coalesce(o.next_offset, 1), 1) "
				   "FROM n, generate_series(0, n.n - 1) AS p LEFT JOIN consumer_offsets o "
				   "ON o.consumer = 'tally-ledger' AND o.topic = $1 AND o.partition = p "
				   "ORDER BY p",
				   2, v, err);
	}
	if (!res)
		return TLY_E_PG;
	int rows = PQntuples(res);
	if (sh->opts->tenant) /* else the first statement of the transaction exported it */
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
	free(sh.tenants);
	PQfinish(conn); /* ends the coordinator's transaction: read only, nothing to keep */
	return rc;
}
