/* A daemon's liveness and readiness state, shared by its loop and its HTTP thread. */
#include "health.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "clock.h"

struct tly_health {
	_Atomic int64_t beat_ms;   /* last heartbeat; 0: never */
	atomic_bool pg_ok;
	atomic_bool schema_ok;
	atomic_int assigned;
	_Atomic int64_t lag;       /* total; -1 unknown */
	int64_t max_lag;           /* set once at creation */
};

struct tly_health *tly_health_new(int64_t max_lag)
{
	struct tly_health *h = calloc(1, sizeof(*h));
	if (!h)
		return NULL;
	atomic_init(&h->beat_ms, 0);
	atomic_init(&h->pg_ok, false);
	atomic_init(&h->schema_ok, false);
	atomic_init(&h->assigned, 0);
	atomic_init(&h->lag, -1);
	h->max_lag = max_lag;
	return h;
}

void tly_health_free(struct tly_health *h)
{
	free(h);
}

void tly_health_beat(struct tly_health *h)
{
	atomic_store(&h->beat_ms, tly_clock_ms());
}

void tly_health_set_pg(struct tly_health *h, bool reachable)
{
	atomic_store(&h->pg_ok, reachable);
}

void tly_health_set_schema(struct tly_health *h, bool at_head)
{
	atomic_store(&h->schema_ok, at_head);
}

void tly_health_set_assigned(struct tly_health *h, int partitions)
{
	atomic_store(&h->assigned, partitions);
}

void tly_health_set_lag(struct tly_health *h, int64_t total)
{
	atomic_store(&h->lag, total);
}

bool tly_health_alive(const struct tly_health *h, int64_t alive_ms, char *reason, size_t len)
{
	int64_t beat = atomic_load(&h->beat_ms);
	int64_t age = tly_clock_ms() - beat;
	if (beat == 0) {
		snprintf(reason, len, "the consumer loop has not started");
		return false;
	}
	if (age > alive_ms) {
		snprintf(reason, len, "the consumer loop has not run for %" PRId64 " ms", age);
		return false;
	}
	snprintf(reason, len, "ok");
	return true;
}

bool tly_health_ready(const struct tly_health *h, char *reason, size_t len)
{
	int64_t lag = atomic_load(&h->lag);
	if (!atomic_load(&h->schema_ok))
		snprintf(reason, len, "the database schema is not at head");
	else if (!atomic_load(&h->pg_ok))
		snprintf(reason, len, "PostgreSQL was unreachable at the last check");
	else if (atomic_load(&h->assigned) == 0)
		snprintf(reason, len, "no partition is assigned");
	else if (lag < 0)
		snprintf(reason, len, "the lag is not known yet");
	else if (lag > h->max_lag)
		snprintf(reason, len, "the lag is %" PRId64 " records, above readyz.max.lag %" PRId64,
			 lag, h->max_lag);
	else {
		snprintf(reason, len, "ok");
		return true;
	}
	return false;
}
