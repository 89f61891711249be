/*
 * The load generator's model: synthetic tenants, users, subscriptions, conversations and token
 * usage, deterministic from a seed. Time is simulated (it advances by a seeded step per event, and
 * ClockTick events mark every simulated hour), so the same seed always gives the same events,
 * whatever the wall clock or the publish rate. No I/O: loadgen_main.c prints or publishes.
 */
#ifndef TLY_LOADGEN_H
#define TLY_LOADGEN_H

#include <stddef.h>
#include <stdint.h>

#include "event.h"

struct loadgen_opts {
	uint64_t seed;
	int tenants;          /* tenants that may appear (Zipf-distributed activity) */
	int duplicate_pct;    /* 0..100: share of items that repeat an earlier event exactly */
	int bad_pct;          /* 0..100: share of deliberately bad messages */
	int64_t start_us;     /* simulated time of the first event */
	int64_t step_us;      /* mean simulated time between events */
};

enum loadgen_kind {
	LOADGEN_EVENT,     /* a valid event: item.ev */
	LOADGEN_DUPLICATE, /* an earlier event again, same event_id and bytes */
	LOADGEN_BAD,       /* bytes the ledger must quarantine; item.bad says how they are bad */
};

/* One generated message; every pointer is owned by the generator and valid until the next call. */
struct loadgen_item {
	enum loadgen_kind kind;
	const struct tly_event *ev;   /* LOADGEN_EVENT only */
	const char *label;            /* event type name, or "duplicate", or "bad" */
	const char *bad;              /* LOADGEN_BAD: invalid_value, garbage, truncated, unknown_fingerprint */
	const char *json;             /* one NDJSON line (no newline); for bad items, the line a
				       * JSON producer would have sent that is just as bad */
	const unsigned char *bytes;   /* the Avro single-object encoding (bad: the bad bytes) */
	size_t len;
	const char *key;              /* 36-character tenant id; NULL for ClockTick */
};

struct loadgen;

/* NULL + errstr on failure. */
struct loadgen *loadgen_new(const struct loadgen_opts *opts, char *errstr, size_t errlen);

/* The next message. 0, or TLY_E_NOMEM / TLY_E_INVALID (a bug: errstr says which event). */
int loadgen_next(struct loadgen *lg, struct loadgen_item *item, char *errstr, size_t errlen) TLY_MUST_CHECK;

void loadgen_free(struct loadgen *lg); /* accepts NULL */

#endif
