/* The writer threads of tally-ledger: a group's transactions, one per lane, each on its own connection. */
#include "ledger_writer.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "log.h"

/* One submitted group, in submission order. */
struct job {
	uint64_t id;                                           /* submission number */
	struct tly_ledger_txn *txn[TLY_LEDGER_WRITER_LANES_MAX]; /* NULL: nothing in that lane */
	bool finished[TLY_LEDGER_WRITER_LANES_MAX];            /* ran, or passed over */
	bool claimed[TLY_LEDGER_WRITER_LANES_MAX];             /* a connection took it */
	bool cas_done[TLY_LEDGER_WRITER_LANES_MAX];            /* its compare-and-sets ran */
	bool doomed[TLY_LEDGER_WRITER_LANES_MAX];              /* submitted before a failure was taken */
	struct tly_ledger_writer_result res[TLY_LEDGER_WRITER_LANES_MAX];
};

/*
 * One connection and its thread. A lane has two: consecutive transactions of the lane take
 * turns, so the next one sends its inputs and entries while the one before still commits.
 */
struct lane {
	struct tly_ledger_writer *w;
	size_t index;                 /* the lane */
	pthread_t thread;
	bool started;                 /* thread running (joined in free) */
	PGconn *conn;                 /* owned by the thread while it runs */
};

#define CONNS_PER_LANE 2

struct tly_ledger_writer {
	pthread_mutex_t lock;
	pthread_cond_t cond;          /* signalled on submit, finish and stop */
	char *conninfo;
	void (*wake)(void *ud);
	void *ud;
	struct lane lanes[TLY_LEDGER_WRITER_LANES_MAX * CONNS_PER_LANE]; /* lane k: k * 2, k * 2 + 1 */
	size_t n_lanes;
	struct job jobs[TLY_LEDGER_WRITER_DEPTH]; /* under lock: the oldest first, n_jobs of them */
	size_t n_jobs;
	uint64_t next_id;             /* under lock */
	int64_t ended_us[TLY_LEDGER_WRITER_LANES_MAX]; /* under lock: the lane's last run ended */
	bool stop;
	size_t submitted;             /* consumer thread only: submitted, not taken back */
};

/* A working connection for the lane's next transaction: kept, or made again once. */
static int ensure_conn(struct lane *l, struct tly_pg_error *err)
{
	char errstr[512];
	if (l->conn && PQstatus(l->conn) == CONNECTION_OK)
		return 0;
	if (l->conn)
		PQfinish(l->conn);
	if ((l->conn = tly_pg_connect(l->w->conninfo, TLY_LEDGER_WRITER_APP, errstr, sizeof(errstr))))
		return 0;
	err->errclass = TLY_ERRCLASS_RETRIABLE;
	err->sqlstate[0] = '\0';
	snprintf(err->message, sizeof(err->message), "%s", errstr);
	return TLY_E_PG;
}

/* Under lock: lane k of job ran and failed (one passed over does not count: it was handed back). */
static bool ran_and_failed(const struct job *job, size_t k)
{
	return job->finished[k] && job->res[k].ran && job->res[k].rc != 0;
}

/*
 * Under lock: the first job whose lane k no connection took, or NULL; *after_failure when it was
 * submitted before the consumer took back a failure of lane k (marked doomed at the failure or
 * at its submission, so the mark outlives the failed job's take).
 */
static struct job *next_job(struct tly_ledger_writer *w, size_t k, bool *after_failure)
{
	for (size_t i = 0; i < w->n_jobs; i++) {
		if (!w->jobs[i].claimed[k]) {
			*after_failure = w->jobs[i].doomed[k];
			return &w->jobs[i];
		}
	}
	*after_failure = false;
	return NULL;
}

/* Under lock: the job submitted as id, or NULL once taken back. */
static struct job *job_of(struct tly_ledger_writer *w, uint64_t id)
{
	for (size_t i = 0; i < w->n_jobs; i++)
		if (w->jobs[i].id == id)
			return &w->jobs[i];
	return NULL;
}

/* A transaction's place, for its gate. */
struct gate_ud {
	struct tly_ledger_writer *w;
	size_t k;
	uint64_t id;
	bool shares; /* with the one before: a partition in common */
};

/*
 * Under lock: wait until lane k of the job before id ran its compare-and-sets (cas: true) or
 * ended (either way when it is gone); then whether it failed (marked on id's job).
 */
static bool wait_before(struct tly_ledger_writer *w, size_t k, uint64_t id, bool cas)
{
	for (;;) {
		struct job *job = job_of(w, id), *prev = id ? job_of(w, id - 1) : NULL;
		if (job->doomed[k] || !prev || prev->finished[k] || (cas && prev->cas_done[k]))
			return job->doomed[k];
		pthread_cond_wait(&w->cond, &w->lock);
	}
}

/* wait_before under the lock: 1 when the one before failed, else 0. */
static int gate_wait(const struct gate_ud *g, bool cas)
{
	pthread_mutex_lock(&g->w->lock);
	bool failed = wait_before(g->w, g->k, g->id, cas);
	pthread_mutex_unlock(&g->w->lock);
	return failed ? 1 : 0;
}

/*
 * Before the compare-and-set, the rest and the COMMIT: the one before ran its compare-and-set
 * when they share a partition (PostgreSQL then orders this one after its end), else it ended.
 */
static int gate_before_cas(void *arg)
{
	const struct gate_ud *g = arg;
	return gate_wait(g, g->shares);
}

static void gate_after_cas(void *arg)
{
	struct gate_ud *g = arg;
	pthread_mutex_lock(&g->w->lock);
	job_of(g->w, g->id)->cas_done[g->k] = true;
	pthread_cond_broadcast(&g->w->cond);
	pthread_mutex_unlock(&g->w->lock);
}

/* Under lock: every lane of job finished. */
static bool job_done(const struct tly_ledger_writer *w, const struct job *job)
{
	for (size_t k = 0; k < w->n_lanes; k++)
		if (!job->finished[k])
			return false;
	return true;
}

static void *lane_main(void *arg)
{
	struct lane *l = arg;
	struct tly_ledger_writer *w = l->w;
	size_t k = l->index;
	char not_run[] = "not run: the transaction before it failed";
	pthread_mutex_lock(&w->lock);
	for (;;) {
		struct job *job;
		bool after_failure;
		while (!w->stop && !(job = next_job(w, k, &after_failure)))
			pthread_cond_wait(&w->cond, &w->lock);
		if (w->stop)
			break;
		struct tly_ledger_writer_result res = {.ran = !after_failure};
		struct tly_ledger_txn *txn = job->txn[k];
		uint64_t id = job->id;
		job->claimed[k] = true;
		if (after_failure) {
			res.rc = TLY_E_PG;
			res.err.errclass = TLY_ERRCLASS_RETRIABLE;
			snprintf(res.err.message, sizeof(res.err.message), "%s", not_run);
		} else if (txn) {
			struct job *prev = id ? job_of(w, id - 1) : NULL;
			bool overlapped = prev && !prev->finished[k];
			struct gate_ud g = {w, k, id,
					    prev && tly_ledger_store_txn_shares(prev->txn[k], txn)};
			struct tly_ledger_store_gate gate = {gate_before_cas, gate_after_cas, &g};
			pthread_mutex_unlock(&w->lock);
			res.started_us = tly_clock_us();
			res.rc = ensure_conn(l, &res.err);
			if (res.rc == 0)
				res.rc = tly_ledger_store_run_gated(l->conn, txn, &gate, &res.err);
			res.ended_us = tly_clock_us();
			pthread_mutex_lock(&w->lock);
			/*
			 * It failed behind one that failed too (its compare-and-sets found the old
			 * offsets, or it never sent them): handed back unrun, not fenced by another owner.
			 */
			if (res.rc != 0 && overlapped && wait_before(w, k, id, false)) {
				res = (struct tly_ledger_writer_result){.rc = TLY_E_PG};
				res.err.errclass = TLY_ERRCLASS_RETRIABLE;
				snprintf(res.err.message, sizeof(res.err.message), "%s", not_run);
				tly_ledger_store_txn_unfence(txn);
			}
			/* its own time: from its start or the end of the one before, whichever is later */
			if (res.ran && w->ended_us[k] > res.started_us)
				res.started_us = w->ended_us[k];
			/* the one before may have been taken meanwhile, moving this one up */
			job = job_of(w, id);
		}
		job->res[k] = res;
		job->finished[k] = true;
		if (res.ran && txn)
			w->ended_us[k] = res.ended_us;
		if (ran_and_failed(job, k))
			for (struct job *next = job + 1; next < w->jobs + w->n_jobs; next++)
				next->doomed[k] = true;
		pthread_cond_broadcast(&w->cond);
		if (w->wake && job_done(w, job))
			w->wake(w->ud);
	}
	pthread_mutex_unlock(&w->lock);
	return NULL;
}

struct tly_ledger_writer *tly_ledger_writer_new(const char *conninfo, size_t lanes,
						void (*wake)(void *ud), void *ud, char *errstr,
						size_t errlen)
{
	if (lanes < 1 || lanes > TLY_LEDGER_WRITER_LANES_MAX) {
		snprintf(errstr, errlen, "could not start the writer: %zu lanes (1 to %d)", lanes,
			 TLY_LEDGER_WRITER_LANES_MAX);
		return NULL;
	}
	struct tly_ledger_writer *w = calloc(1, sizeof(*w));
	if (!w || !(w->conninfo = strdup(conninfo))) {
		snprintf(errstr, errlen, "out of memory");
		free(w);
		return NULL;
	}
	w->wake = wake;
	w->ud = ud;
	w->n_lanes = lanes;
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	for (size_t c = 0; c < lanes * CONNS_PER_LANE; c++) {
		struct lane *l = &w->lanes[c];
		l->w = w;
		l->index = c / CONNS_PER_LANE;
		if (!(l->conn = tly_pg_connect(conninfo, TLY_LEDGER_WRITER_APP, errstr, errlen)))
			goto fail;
		int e = pthread_create(&l->thread, NULL, lane_main, l);
		if (e != 0) {
			snprintf(errstr, errlen, "could not start a writer thread: %s", strerror(e));
			goto fail;
		}
		l->started = true;
	}
	return w;
fail:
	tly_ledger_writer_free(w);
	return NULL;
}

void tly_ledger_writer_free(struct tly_ledger_writer *w)
{
	if (!w)
		return;
	pthread_mutex_lock(&w->lock);
	w->stop = true;
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
	for (size_t c = 0; c < w->n_lanes * CONNS_PER_LANE; c++) {
		if (w->lanes[c].started)
			pthread_join(w->lanes[c].thread, NULL);
		if (w->lanes[c].conn)
			PQfinish(w->lanes[c].conn);
	}
	for (size_t i = 0; i < w->n_jobs; i++)
		for (size_t k = 0; k < w->n_lanes; k++)
			tly_ledger_store_txn_free(w->jobs[i].txn[k]);
	pthread_cond_destroy(&w->cond);
	pthread_mutex_destroy(&w->lock);
	free(w->conninfo);
	free(w);
}

size_t tly_ledger_writer_lanes(const struct tly_ledger_writer *w)
{
	return w->n_lanes;
}

size_t tly_ledger_writer_lane(const struct tly_ledger_writer *w, int32_t partition)
{
	return (size_t)partition % w->n_lanes;
}

size_t tly_ledger_writer_lane_for(int32_t partition, size_t active, int held)
{
	return held >= 0 ? (size_t)held : (size_t)partition % active;
}

void tly_ledger_writer_submit(struct tly_ledger_writer *w, struct tly_ledger_txn *const *txns)
{
	pthread_mutex_lock(&w->lock);
	struct job *job = &w->jobs[w->n_jobs++];
	memset(job, 0, sizeof(*job));
	job->id = w->next_id++;
	for (size_t k = 0; k < w->n_lanes; k++) {
		job->txn[k] = txns[k];
		/* a failure the consumer has not taken back yet: it decided this one before knowing */
		for (struct job *before = w->jobs; before < job && !job->doomed[k]; before++)
			job->doomed[k] = ran_and_failed(before, k);
	}
	w->submitted++;
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

bool tly_ledger_writer_busy(const struct tly_ledger_writer *w)
{
	return w->submitted > 0;
}

bool tly_ledger_writer_full(const struct tly_ledger_writer *w)
{
	return w->submitted >= TLY_LEDGER_WRITER_DEPTH;
}

bool tly_ledger_writer_take(struct tly_ledger_writer *w, int timeout_ms,
			    struct tly_ledger_txn **txns, struct tly_ledger_writer_result *res)
{
	bool taken = false;
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	if (timeout_ms > 0) {
		until.tv_sec += timeout_ms / 1000;
		until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
		if (until.tv_nsec >= 1000000000L) {
			until.tv_sec++;
			until.tv_nsec -= 1000000000L;
		}
	}
	pthread_mutex_lock(&w->lock);
	while (w->n_jobs && !job_done(w, &w->jobs[0]) && timeout_ms != 0) {
		int e = timeout_ms < 0 ? pthread_cond_wait(&w->cond, &w->lock)
				       : pthread_cond_timedwait(&w->cond, &w->lock, &until);
		if (e == ETIMEDOUT)
			break;
	}
	if (w->n_jobs && job_done(w, &w->jobs[0])) {
		for (size_t k = 0; k < w->n_lanes; k++) {
			txns[k] = w->jobs[0].txn[k];
			res[k] = w->jobs[0].res[k];
		}
		memmove(&w->jobs[0], &w->jobs[1], (w->n_jobs - 1) * sizeof(w->jobs[0]));
		w->n_jobs--;
		w->submitted--;
		taken = true;
	}
	pthread_mutex_unlock(&w->lock);
	return taken;
}
