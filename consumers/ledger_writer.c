/* The writer thread of tally-ledger: one group's transaction at a time on its own connection. */
#include "ledger_writer.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "log.h"

/* One submitted transaction, in submission order. */
struct job {
	struct tly_ledger_txn *txn;
	bool finished;                     /* ran, or passed over */
	struct tly_ledger_writer_result res;
};

struct tly_ledger_writer {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;          /* signalled on submit, finish and stop */
	PGconn *conn;                 /* owned by the thread while it runs */
	char *conninfo;
	void (*wake)(void *ud);
	void *ud;
	struct job jobs[TLY_LEDGER_WRITER_DEPTH]; /* under lock: the oldest first, n_jobs of them */
	size_t n_jobs;
	bool stop;
	size_t submitted;             /* consumer thread only: submitted, not taken back */
};

/* A working connection for the next transaction: kept, or made again once. */
static int ensure_conn(struct tly_ledger_writer *w, struct tly_pg_error *err)
{
	char errstr[512];
	if (w->conn && PQstatus(w->conn) == CONNECTION_OK)
		return 0;
	if (w->conn)
		PQfinish(w->conn);
	if ((w->conn = tly_pg_connect(w->conninfo, TLY_LEDGER_WRITER_APP, errstr, sizeof(errstr))))
		return 0;
	err->errclass = TLY_ERRCLASS_RETRIABLE;
	err->sqlstate[0] = '\0';
	snprintf(err->message, sizeof(err->message), "%s", errstr);
	return TLY_E_PG;
}

/* Under lock: the first job not finished, or NULL; *after_failure when one before it failed. */
static struct job *next_job(struct tly_ledger_writer *w, bool *after_failure)
{
	*after_failure = false;
	for (size_t i = 0; i < w->n_jobs; i++) {
		if (!w->jobs[i].finished)
			return &w->jobs[i];
		if (w->jobs[i].res.rc != 0)
			*after_failure = true;
	}
	return NULL;
}

static void *writer_main(void *arg)
{
	struct tly_ledger_writer *w = arg;
	pthread_mutex_lock(&w->lock);
	for (;;) {
		struct job *job;
		bool after_failure;
		while (!w->stop && !(job = next_job(w, &after_failure)))
			pthread_cond_wait(&w->cond, &w->lock);
		if (w->stop)
			break;
		struct tly_ledger_writer_result res = {.ran = !after_failure};
		if (after_failure) {
			res.rc = TLY_E_PG;
			res.err.errclass = TLY_ERRCLASS_RETRIABLE;
			snprintf(res.err.message, sizeof(res.err.message),
				 "not run: the transaction before it failed");
		} else {
			struct tly_ledger_txn *txn = job->txn;
			pthread_mutex_unlock(&w->lock);
			res.started_us = tly_clock_us();
			res.rc = ensure_conn(w, &res.err);
			if (res.rc == 0)
				res.rc = tly_ledger_store_run(w->conn, txn, &res.err);
			res.ended_us = tly_clock_us();
			pthread_mutex_lock(&w->lock);
			/* the one before may have been taken meanwhile, moving this one up */
			for (size_t i = 0; i < w->n_jobs; i++)
				if (w->jobs[i].txn == txn)
					job = &w->jobs[i];
		}
		job->res = res;
		job->finished = true;
		pthread_cond_broadcast(&w->cond);
		if (w->wake)
			w->wake(w->ud);
	}
	pthread_mutex_unlock(&w->lock);
	return NULL;
}

struct tly_ledger_writer *tly_ledger_writer_new(const char *conninfo, void (*wake)(void *ud),
						void *ud, char *errstr, size_t errlen)
{
	struct tly_ledger_writer *w = calloc(1, sizeof(*w));
	if (!w || !(w->conninfo = strdup(conninfo))) {
		snprintf(errstr, errlen, "out of memory");
		free(w);
		return NULL;
	}
	w->wake = wake;
	w->ud = ud;
	if (!(w->conn = tly_pg_connect(conninfo, TLY_LEDGER_WRITER_APP, errstr, errlen))) {
		free(w->conninfo);
		free(w);
		return NULL;
	}
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	int e = pthread_create(&w->thread, NULL, writer_main, w);
	if (e != 0) {
		snprintf(errstr, errlen, "could not start the writer thread: %s", strerror(e));
		pthread_cond_destroy(&w->cond);
		pthread_mutex_destroy(&w->lock);
		PQfinish(w->conn);
		free(w->conninfo);
		free(w);
		return NULL;
	}
	return w;
}

void tly_ledger_writer_free(struct tly_ledger_writer *w)
{
	if (!w)
		return;
	pthread_mutex_lock(&w->lock);
	w->stop = true;
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
	pthread_join(w->thread, NULL);
	for (size_t i = 0; i < w->n_jobs; i++)
		tly_ledger_store_txn_free(w->jobs[i].txn);
	pthread_cond_destroy(&w->cond);
	pthread_mutex_destroy(&w->lock);
	if (w->conn)
		PQfinish(w->conn);
	free(w->conninfo);
	free(w);
}

void tly_ledger_writer_submit(struct tly_ledger_writer *w, struct tly_ledger_txn *txn)
{
	pthread_mutex_lock(&w->lock);
	w->jobs[w->n_jobs++] = (struct job){.txn = txn};
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

struct tly_ledger_txn *tly_ledger_writer_take(struct tly_ledger_writer *w, int timeout_ms,
					     struct tly_ledger_writer_result *res)
{
	struct tly_ledger_txn *txn = NULL;
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
	while (w->n_jobs && !w->jobs[0].finished && timeout_ms != 0) {
		int e = timeout_ms < 0 ? pthread_cond_wait(&w->cond, &w->lock)
				       : pthread_cond_timedwait(&w->cond, &w->lock, &until);
		if (e == ETIMEDOUT)
			break;
	}
	if (w->n_jobs && w->jobs[0].finished) {
		txn = w->jobs[0].txn;
		*res = w->jobs[0].res;
		memmove(&w->jobs[0], &w->jobs[1], (w->n_jobs - 1) * sizeof(w->jobs[0]));
		w->n_jobs--;
		w->submitted--;
	}
	pthread_mutex_unlock(&w->lock);
	return txn;
}
