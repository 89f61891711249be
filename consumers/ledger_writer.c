/* The writer thread of tally-ledger: one group's transaction at a time on its own connection. */
#include "ledger_writer.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

struct tly_ledger_writer {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;          /* signalled on submit, done and stop */
	PGconn *conn;                 /* owned by the thread while it runs */
	char *conninfo;
	void (*wake)(void *ud);
	void *ud;
	struct tly_ledger_txn *txn;   /* submitted, under lock */
	bool done;
	bool stop;
	int rc;
	struct tly_pg_error err;
	bool submitted;               /* consumer thread only: txn not taken back */
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

static void *writer_main(void *arg)
{
	struct tly_ledger_writer *w = arg;
	pthread_mutex_lock(&w->lock);
	for (;;) {
		while (!w->stop && (!w->txn || w->done))
			pthread_cond_wait(&w->cond, &w->lock);
		if (w->stop)
			break;
		struct tly_ledger_txn *txn = w->txn;
		pthread_mutex_unlock(&w->lock);
		struct tly_pg_error err = {0};
		int rc = ensure_conn(w, &err);
		if (rc == 0)
			rc = tly_ledger_store_run(w->conn, txn, &err);
		pthread_mutex_lock(&w->lock);
		w->rc = rc;
		w->err = err;
		w->done = true;
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
	tly_ledger_store_txn_free(w->txn);
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
	w->txn = txn;
	w->done = false;
	w->submitted = true;
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

bool tly_ledger_writer_busy(const struct tly_ledger_writer *w)
{
	return w->submitted;
}

struct tly_ledger_txn *tly_ledger_writer_take(struct tly_ledger_writer *w, int timeout_ms, int *rc,
					     struct tly_pg_error *err)
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
	while (w->submitted && !w->done && timeout_ms != 0) {
		int e = timeout_ms < 0 ? pthread_cond_wait(&w->cond, &w->lock)
				       : pthread_cond_timedwait(&w->cond, &w->lock, &until);
		if (e == ETIMEDOUT)
			break;
	}
	if (w->submitted && w->done) {
		txn = w->txn;
		*rc = w->rc;
		*err = w->err;
		w->txn = NULL;
		w->done = false;
		w->submitted = false;
	}
	pthread_mutex_unlock(&w->lock);
	return txn;
}
