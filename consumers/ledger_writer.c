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
	struct tly_ledger_writer_result res[TLY_LEDGER_WRITER_LANES_MAX];
};

/* One connection and the thread that runs its lane's transactions. */
struct lane {
	struct tly_ledger_writer *w;
	size_t index;
	pthread_t thread;
	bool started;                 /* thread running (joined in free) */
	PGconn *conn;                 /* owned by the thread while it runs */
};

struct tly_ledger_writer {
	pthread_mutex_t lock;
	pthread_cond_t cond;          /* signalled on submit, finish and stop */
	char *conninfo;
	void (*wake)(void *ud);
	void *ud;
	struct lane lanes[TLY_LEDGER_WRITER_LANES_MAX];
	size_t n_lanes;
	struct job jobs[TLY_LEDGER_WRITER_DEPTH]; /* under lock: the oldest first, n_jobs of them */
	size_t n_jobs;
	uint64_t next_id;             /* under lock */
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

/*
 * Under lock: the first job whose lane k is not finished, or NULL; *after_failure when lane k of
 * one before it ran and failed (one passed over does not count: it was already handed back).
 */
static struct job *next_job(struct tly_ledger_writer *w, size_t k, bool *after_failure)
{
	*after_failure = false;
	for (size_t i = 0; i < w->n_jobs; i++) {
		if (!w->jobs[i].finished[k])
			return &w->jobs[i];
		if (w->jobs[i].res[k].ran && w->jobs[i].res[k].rc != 0)
			*after_failure = true;
	}
	return NULL;
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
		if (after_failure) {
			res.rc = TLY_E_PG;
			res.err.errclass = TLY_ERRCLASS_RETRIABLE;
			snprintf(res.err.message, sizeof(res.err.message),
				 "not run: the transaction before it failed");
		} else if (txn) {
			uint64_t id = job->id;
			pthread_mutex_unlock(&w->lock);
			res.started_us = tly_clock_us();
			res.rc = ensure_conn(l, &res.err);
			if (res.rc == 0)
				res.rc = tly_ledger_store_run(l->conn, txn, &res.err);
			res.ended_us = tly_clock_us();
			pthread_mutex_lock(&w->lock);
			/* the one before may have been taken meanwhile, moving this one up */
			for (size_t i = 0; i < w->n_jobs; i++)
				if (w->jobs[i].id == id)
					job = &w->jobs[i];
		}
		job->res[k] = res;
		job->finished[k] = true;
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
	for (size_t k = 0; k < lanes; k++) {
		struct lane *l = &w->lanes[k];
		l->w = w;
		l->index = k;
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
	for (size_t k = 0; k < w->n_lanes; k++) {
		if (w->lanes[k].started)
			pthread_join(w->lanes[k].thread, NULL);
		if (w->lanes[k].conn)
			PQfinish(w->lanes[k].conn);
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
	for (size_t k = 0; k < w->n_lanes; k++)
		job->txn[k] = txns[k];
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
