/* tallyctl rebuild: its inputs read on threads (Kafka records decoded in blocks; COPY rows read ahead). */
#include "tallyctl_rebuild_read.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "copyout.h"
#include "err.h"
#include "kafka.h"

#define BLOCK_EVENTS 256 /* decoded records per hand-over */
#define N_BLOCKS 4       /* blocks in flight per reader: it runs at most this far ahead */
#define N_READERS 2      /* reading threads, each with the partitions of its own queue */
#define POLL_MS 100

struct block {
	struct tly_event ev[BLOCK_EVENTS]; /* decode targets, reused (their arenas too) */
	size_t n;
	int64_t records;      /* records read for this block, skipped ones included */
	uint64_t undecodable;
};

struct rb_read;

/* One reading thread: its partitions' records come through its own queue. */
struct reader {
	struct rb_read *r;
	pthread_t thread;
	bool started;
	rd_kafka_queue_t *q;       /* owned */
	struct tly_codec *codec;   /* owned, or the caller's (reader 0) */
	bool own_codec;
	struct block blocks[N_BLOCKS];
	uint64_t head, tail;       /* under r->mu: blocks [tail, head) are filled */
	bool done;                 /* under r->mu */
	int rc;                    /* its end: 0 or an error (written before done) */
	char err[512];
	size_t remaining;          /* its partitions not at their target yet */
};

struct rb_read {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	atomic_bool stop;          /* the caller's request; readers look between records */
	struct reader readers[N_READERS];
	size_t n_readers;
	rd_kafka_t *rk;
	struct rpart *parts;       /* each reader writes only its own partitions' elements */
	size_t nparts;
	const uint64_t *tick_fp;
	size_t n_tick;
	int stall_ms;
	/* the caller's */
	struct reader *cur_reader;
	struct block *cur;
	size_t next, turn;
	uint64_t undecodable;
};

/* A mutex and condition variable for a reading thread's hand-over: 0 or an errno. */
static int sync_init(pthread_mutex_t *mu, pthread_cond_t *cv)
{
	int e = pthread_mutex_init(mu, NULL);
	if (e == 0 && (e = pthread_cond_init(cv, NULL)) != 0)
		pthread_mutex_destroy(mu);
	return e;
}

static bool is_tick(const struct rb_read *r, const rd_kafka_message_t *m)
{
	uint64_t fp;
	if (tly_codec_peek_fingerprint(m->payload, m->len, &fp) != 0)
		return false;
	for (size_t i = 0; i < r->n_tick; i++)
		if (r->tick_fp[i] == fp)
			return true;
	return false;
}

static struct rpart *find_part(struct rb_read *r, const char *topic, int32_t partition)
{
	for (size_t i = 0; i < r->nparts; i++)
		if (r->parts[i].partition == partition && strcmp(r->parts[i].topic, topic) == 0)
			return &r->parts[i];
	return NULL;
}

/*
 * One message into b: partition bookkeeping, then a ClockTick skipped, another record decoded.
 * 0, or TLY_E_KAFKA with rd->err filled.
 */
static int take(struct reader *rd, struct block *b, rd_kafka_message_t *m)
{
	char errstr[256];
	const char *topic = m->rkt ? rd_kafka_topic_name(m->rkt) : "";
	struct rpart *pt = find_part(rd->r, topic, m->partition);
	if (m->err) {
		if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
			if (pt && pt->active && m->offset >= pt->target) {
				pt->done = pt->target; /* a gap up to the end (compaction) */
				pt->active = false;
				rd->remaining--;
			}
		} else if (tly_kafka_errclass(m->err, m->err == RD_KAFKA_RESP_ERR__FATAL) ==
			   TLY_ERRCLASS_FATAL) {
			snprintf(rd->err, sizeof(rd->err), "Kafka: %s", rd_kafka_message_errstr(m));
			return TLY_E_KAFKA;
		} else {
			fprintf(stderr, "\ntallyctl: Kafka (retrying): %s\n", rd_kafka_message_errstr(m));
		}
		return 0;
	}
	if (!pt || !pt->active || m->offset < pt->done)
		return 0;
	if (m->offset < pt->target) {
		b->records++;
		if (!is_tick(rd->r, m)) {
			if (tly_codec_decode(rd->codec, m->payload, m->len, &b->ev[b->n], errstr,
					     sizeof(errstr)) == 0)
				b->n++;
			else
				b->undecodable++;
		}
	}
	pt->done = m->offset + 1 < pt->target ? m->offset + 1 : pt->target;
	if (pt->done >= pt->target) {
		pt->active = false;
		rd->remaining--;
	}
	return 0;
}

static void *reader(void *arg)
{
	struct reader *rd = arg;
	struct rb_read *r = rd->r;
	int rc = 0;
	double last = tly_clock_s();
	while (rd->remaining > 0 && rc == 0) {
		pthread_mutex_lock(&r->mu);
		while (rd->head - rd->tail == N_BLOCKS && !atomic_load(&r->stop))
			pthread_cond_wait(&r->cv, &r->mu);
		struct block *b = &rd->blocks[rd->head % N_BLOCKS];
		pthread_mutex_unlock(&r->mu);
		if (atomic_load(&r->stop))
			break;
		b->n = 0;
		b->records = 0;
		b->undecodable = 0;
		/* fill the block; a partial one goes when the topic has nothing more at once */
		while (rd->remaining > 0 && rc == 0 && b->n < BLOCK_EVENTS && !atomic_load(&r->stop)) {
			rd_kafka_message_t *m = rd_kafka_consume_queue(rd->q, b->records ? 0 : POLL_MS);
			if (!m) {
				if (b->records)
					break;
				if (tly_clock_s() - last > r->stall_ms / 1000.0) {
					snprintf(rd->err, sizeof(rd->err),
						 "no record for %d s while %zu partition(s) are behind the projector",
						 r->stall_ms / 1000, rd->remaining);
					rc = TLY_E_TIMEOUT;
				}
				continue;
			}
			if (!m->err)
				last = tly_clock_s();
			rc = take(rd, b, m);
			rd_kafka_message_destroy(m);
		}
		pthread_mutex_lock(&r->mu);
		rd->head++;
		pthread_cond_broadcast(&r->cv);
		pthread_mutex_unlock(&r->mu);
	}
	pthread_mutex_lock(&r->mu);
	rd->rc = rc;
	rd->done = true;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
	return NULL;
}

/*
 * Each active partition's queue forwarded to a reader's (to_readers false: every partition's back
 * to the consumer's): the largest first, each to the reader with the fewest records to read so far,
 * so that the readers finish at about the same time.
 */
static void route(struct rb_read *r, bool to_readers)
{
	rd_kafka_queue_t *consumer = to_readers ? NULL : rd_kafka_queue_get_consumer(r->rk);
	int64_t load[N_READERS] = {0};
	/* partitions in the order (records behind descending, index): prev is the last one routed */
	int64_t prev_behind = INT64_MAX;
	size_t prev = SIZE_MAX;
	for (;;) {
		size_t i = r->nparts;
		for (size_t j = 0; j < r->nparts; j++) {
			int64_t behind = r->parts[j].target - r->parts[j].done;
			bool after = behind < prev_behind || (behind == prev_behind && prev != SIZE_MAX && j > prev);
			if (!after || (!r->parts[j].active && to_readers))
				continue;
			if (i == r->nparts || behind > r->parts[i].target - r->parts[i].done)
				i = j;
		}
		if (i == r->nparts)
			break;
		prev = i;
		prev_behind = r->parts[i].target - r->parts[i].done;
		rd_kafka_queue_t *pq = rd_kafka_queue_get_partition(r->rk, r->parts[i].topic,
								    r->parts[i].partition);
		if (!pq)
			continue;
		size_t k = 0;
		for (size_t j = 1; j < r->n_readers; j++)
			if (load[j] < load[k])
				k = j;
		if (to_readers) {
			r->readers[k].remaining++;
			load[k] += r->parts[i].target - r->parts[i].done;
		}
		rd_kafka_queue_forward(pq, to_readers ? r->readers[k].q : consumer);
		rd_kafka_queue_destroy(pq);
	}
	if (consumer)
		rd_kafka_queue_destroy(consumer);
}

struct rb_read *rb_read_start(rd_kafka_t *rk, struct tly_codec *codec, struct rpart *parts,
			      size_t nparts, const uint64_t *tick_fp, size_t n_tick, int stall_ms,
			      char *errstr, size_t errlen)
{
	struct rb_read *r = calloc(1, sizeof(*r));
	if (!r) {
		snprintf(errstr, errlen, "out of memory");
		return NULL;
	}
	r->rk = rk;
	r->parts = parts;
	r->nparts = nparts;
	r->tick_fp = tick_fp;
	r->n_tick = n_tick;
	r->stall_ms = stall_ms;
	r->n_readers = N_READERS;
	atomic_init(&r->stop, false);
	int e = sync_init(&r->mu, &r->cv);
	if (e != 0) {
		snprintf(errstr, errlen, "could not start the reading threads: %s", strerror(e));
		free(r);
		return NULL;
	}
	bool ok = true;
	for (size_t k = 0; k < r->n_readers && ok; k++) {
		struct reader *rd = &r->readers[k];
		rd->r = r;
		rd->own_codec = k > 0;
		rd->codec = k > 0 ? tly_codec_new(errstr, errlen) : codec;
		ok = rd->codec && (rd->q = rd_kafka_queue_new(rk)) != NULL;
	}
	if (ok)
		route(r, true);
	for (size_t k = 0; k < r->n_readers && ok; k++) {
		struct reader *rd = &r->readers[k];
		if ((e = pthread_create(&rd->thread, NULL, reader, rd)) != 0)
			snprintf(errstr, errlen, "could not start a reading thread: %s", strerror(e));
		rd->started = ok = e == 0;
	}
	if (!ok) {
		if (errstr[0] == '\0')
			snprintf(errstr, errlen, "out of memory");
		uint64_t ignored = 0;
		rb_read_end(r, &ignored);
		return NULL;
	}
	return r;
}

int rb_read_next(struct rb_read *r, const struct tly_event **ev, int64_t *records, char *errstr,
		 size_t errlen)
{
	for (;;) {
		if (r->cur && r->next < r->cur->n) {
			*ev = &r->cur->ev[r->next++];
			return 1;
		}
		pthread_mutex_lock(&r->mu);
		if (r->cur) {
			r->cur_reader->tail++; /* the block is the reader's again */
			r->cur = NULL;
			pthread_cond_broadcast(&r->cv);
		}
		for (;;) {
			bool all_done = true;
			for (size_t i = 0; i < r->n_readers && !r->cur; i++) {
				struct reader *rd = &r->readers[(r->turn + i) % r->n_readers];
				if (rd->head != rd->tail) {
					r->cur_reader = rd;
					r->cur = &rd->blocks[rd->tail % N_BLOCKS];
					r->turn = (r->turn + i + 1) % r->n_readers;
				} else if (rd->done && rd->rc != 0) {
					snprintf(errstr, errlen, "%s", rd->err);
					pthread_mutex_unlock(&r->mu);
					return rd->rc;
				}
				all_done &= rd->done;
			}
			if (r->cur || all_done)
				break;
			pthread_cond_wait(&r->cv, &r->mu);
		}
		pthread_mutex_unlock(&r->mu);
		if (!r->cur)
			return 0;
		r->next = 0;
		*records += r->cur->records;
		r->undecodable += r->cur->undecodable;
	}
}

void rb_read_end(struct rb_read *r, uint64_t *undecodable)
{
	if (!r)
		return;
	pthread_mutex_lock(&r->mu);
	atomic_store(&r->stop, true);
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
	for (size_t k = 0; k < r->n_readers; k++)
		if (r->readers[k].started)
			pthread_join(r->readers[k].thread, NULL);
	route(r, false);
	*undecodable += r->undecodable;
	for (size_t k = 0; k < r->n_readers; k++) {
		struct reader *rd = &r->readers[k];
		for (size_t i = 0; i < N_BLOCKS; i++)
			for (size_t j = 0; j < BLOCK_EVENTS; j++)
				tly_event_free(&rd->blocks[i].ev[j]);
		if (rd->q)
			rd_kafka_queue_destroy(rd->q);
		if (rd->own_codec)
			tly_codec_free(rd->codec);
	}
	pthread_cond_destroy(&r->cv);
	pthread_mutex_destroy(&r->mu);
	free(r);
}

/* ---- rows of a COPY, read ahead ------------------------------------------------------------ */

#define CHUNK_BYTES (1024 * 1024) /* rows are kept in chunks of about this size */
#define MAX_FIELDS 64

/* Rows, each as int32 nfields, nfields int32 lengths (-1: NULL), then the values' bytes. */
struct chunk {
	struct chunk *next;
	size_t len, cap;
	char data[];
};

struct rb_rows {
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct chunk *first, *last; /* under mu: the full chunks not yet read */
	size_t held;                /* under mu: bytes in them */
	bool done;                  /* under mu */
	atomic_bool stop;
	int rc;                     /* the thread's end (written before done) */
	char err[512];
	/* the thread's */
	PGconn *conn;
	char *sql;
	size_t max_bytes;
	/* the caller's */
	struct chunk *cur;
	size_t off;
	const char *values[MAX_FIELDS];
	int lengths[MAX_FIELDS];
};

static void publish(struct rb_rows *r, struct chunk *c)
{
	pthread_mutex_lock(&r->mu);
	if (r->last)
		r->last->next = c;
	else
		r->first = c;
	r->last = c;
	r->held += c->len;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
}

static void *rows_reader(void *arg)
{
	struct rb_rows *r = arg;
	struct tly_pg_error pe = {0};
	struct chunk *c = NULL;
	int rc = 0;
	struct tly_copyout *co = tly_copyout_start(r->conn, r->sql, &pe);
	if (!co) {
		rc = TLY_E_PG;
		snprintf(r->err, sizeof(r->err), "%s", pe.message);
	}
	const char *const *values;
	const int *lengths;
	int n = 0;
	while (rc == 0 && !atomic_load(&r->stop) &&
	       (rc = tly_copyout_next(co, &values, &lengths, &n, &pe)) == 1) {
		rc = 0;
		size_t need = sizeof(int32_t) * (1 + (size_t)n);
		for (int i = 0; i < n; i++)
			need += lengths[i] > 0 ? (size_t)lengths[i] : 0;
		if (n > MAX_FIELDS) {
			rc = TLY_E_CORRUPT;
			break;
		}
		if (c && c->len + need > c->cap) {
			publish(r, c);
			c = NULL;
			pthread_mutex_lock(&r->mu);
			while (r->held >= r->max_bytes && !atomic_load(&r->stop))
				pthread_cond_wait(&r->cv, &r->mu);
			pthread_mutex_unlock(&r->mu);
		}
		if (!c) {
			size_t cap = need > CHUNK_BYTES ? need : CHUNK_BYTES;
			if (!(c = malloc(sizeof(*c) + cap))) {
				rc = TLY_E_NOMEM;
				break;
			}
			c->next = NULL;
			c->len = 0;
			c->cap = cap;
		}
		int32_t v = n;
		memcpy(c->data + c->len, &v, sizeof(v));
		c->len += sizeof(v);
		for (int i = 0; i < n; i++) {
			v = lengths[i];
			memcpy(c->data + c->len, &v, sizeof(v));
			c->len += sizeof(v);
		}
		for (int i = 0; i < n; i++) {
			if (lengths[i] > 0) {
				memcpy(c->data + c->len, values[i], (size_t)lengths[i]);
				c->len += (size_t)lengths[i];
			}
		}
	}
	if (rc == TLY_E_PG && !r->err[0])
		snprintf(r->err, sizeof(r->err), "%s", pe.message);
	else if (rc == TLY_E_CORRUPT || rc == TLY_E_NOMEM)
		snprintf(r->err, sizeof(r->err), "%s", rc == TLY_E_NOMEM ? "out of memory" :
			 "a row of the COPY does not read back");
	tly_copyout_free(co);
	if (c)
		publish(r, c);
	pthread_mutex_lock(&r->mu);
	r->rc = rc;
	r->done = true;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
	return NULL;
}

struct rb_rows *rb_rows_start(PGconn *conn, const char *sql, size_t max_bytes, char *errstr,
			      size_t errlen)
{
	struct rb_rows *r = calloc(1, sizeof(*r));
	if (!r || !(r->sql = strdup(sql))) {
		free(r);
		snprintf(errstr, errlen, "out of memory");
		return NULL;
	}
	r->conn = conn;
	r->max_bytes = max_bytes;
	atomic_init(&r->stop, false);
	int e = sync_init(&r->mu, &r->cv);
	if (e == 0 && (e = pthread_create(&r->thread, NULL, rows_reader, r)) != 0) {
		pthread_cond_destroy(&r->cv);
		pthread_mutex_destroy(&r->mu);
	}
	if (e != 0) {
		snprintf(errstr, errlen, "could not start the reading thread: %s", strerror(e));
		free(r->sql);
		free(r);
		return NULL;
	}
	return r;
}

int rb_rows_next(struct rb_rows *r, const char *const **values, const int **lengths, int *nfields,
		 char *errstr, size_t errlen)
{
	while (!r->cur || r->off >= r->cur->len) {
		pthread_mutex_lock(&r->mu);
		if (r->cur) {
			r->held -= r->cur->len;
			free(r->cur);
			r->cur = NULL;
			pthread_cond_broadcast(&r->cv);
		}
		while (!r->first && !r->done)
			pthread_cond_wait(&r->cv, &r->mu);
		if (!r->first) {
			pthread_mutex_unlock(&r->mu);
			if (r->rc != 0)
				snprintf(errstr, errlen, "%s", r->err);
			return r->rc;
		}
		r->cur = r->first;
		r->first = r->cur->next;
		if (!r->first)
			r->last = NULL;
		pthread_mutex_unlock(&r->mu);
		r->off = 0;
	}
	const char *p = r->cur->data + r->off;
	int32_t n, len;
	memcpy(&n, p, sizeof(n));
	p += sizeof(n);
	const char *bytes = p + sizeof(int32_t) * (size_t)n;
	for (int i = 0; i < n; i++) {
		memcpy(&len, p + sizeof(int32_t) * (size_t)i, sizeof(len));
		r->lengths[i] = len;
		r->values[i] = len >= 0 ? bytes : NULL;
		bytes += len > 0 ? len : 0;
	}
	r->off = (size_t)(bytes - r->cur->data);
	*values = r->values;
	*lengths = r->lengths;
	*nfields = n;
	return 1;
}

void rb_rows_end(struct rb_rows *r)
{
	if (!r)
		return;
	pthread_mutex_lock(&r->mu);
	atomic_store(&r->stop, true);
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
	pthread_join(r->thread, NULL);
	free(r->cur);
	for (struct chunk *c = r->first, *next; c; c = next) {
		next = c->next;
		free(c);
	}
	pthread_cond_destroy(&r->cv);
	pthread_mutex_destroy(&r->mu);
	free(r->sql);
	free(r);
}
