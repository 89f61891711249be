/*
 * Waiting for the ledger's decision on a reservation: publish a TokensReserved and wait, with a
 * timeout, for the entry tally-ledger publishes for it on tally.ledger.
 *
 *   char err[512];
 *   struct tly_decision_waiter *w = tly_decision_waiter_new(cfg, err, sizeof(err));
 *   struct tly_event ev;                        // a TokensReserved, built as for tly_producer_publish
 *   struct tly_decision_ticket t;
 *   if (tly_decision_reserve(w, &ev, &t, err, sizeof(err)) != 0) { ... not published ... }
 *   struct tly_decision d;
 *   switch (tly_decision_wait(w, &t, 5000, &d)) {
 *   case 0:              // decided: d.outcome ACCEPTED (d.available…) or REJECTED (d.reason)
 *   case TLY_E_TIMEOUT:  // not decided yet (ledger down or behind): wait again later with t
 *   default:             // TLY_E_KAFKA: the event was not delivered (d.reason), nothing decided
 *   }
 *   tly_decision_waiter_free(w);
 *
 * How it matches. The ledger publishes each entry on tally.ledger, on the partition number of the
 * event that caused it, after its transaction commits. Before publishing, reserve captures the end
 * offset of that partition (the ticket's from_offset): the outcome can only come at or after it.
 * One waiter serves any number of outstanding reservations with one consumer, which is assigned
 * (not subscribed: no group is joined) to the partitions it needs from the smallest from_offset
 * any waiting ticket has, and matches entries to tickets by (tenant_id, cause_event_id) = the
 * ticket's (tenant_id, event_id). The outcome is the first such entry of kind hold_placed
 * (accepted), rejected, duplicate or conflict. Entries other than these that the same event
 * caused (expiries and period closes when it advanced ledger time) are skipped.
 *
 * Restarts. The ledger publishes at least once: after a restart it may publish entries again,
 * identical (the decision is deterministic and stored before it is published). The first match
 * wins and a ticket is answered once per wait; no other entry can carry its event id, so the
 * answer is never a wrong one. A wait that times out leaves nothing behind; waiting again with
 * the same ticket (in this process or another, from its printed fields) reads the partition again
 * from the ticket's from_offset, so a reservation decided in between is still found, as long as
 * tally.ledger keeps that offset (retention).
 *
 * Threads: thread-safe. Any number of threads may call reserve and wait on one waiter at once;
 * the waiter runs one thread of its own that polls the consumer and the producer's delivery
 * reports. The tly_event given to reserve is borrowed for the call only.
 */
#ifndef TLY_DECISION_H
#define TLY_DECISION_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "err.h"
#include "event.h"

struct tly_decision_waiter;

/* A published reservation; plain data, copied freely (and printable: tallyctl reserve does). */
struct tly_decision_ticket {
	tly_uuid tenant_id;
	tly_uuid event_id;       /* of the TokensReserved: the entries' cause_event_id */
	tly_uuid reservation_id;
	int32_t partition;       /* of tally.events and of tally.ledger */
	int64_t from_offset;     /* tally.ledger offset at or after which the outcome comes */
};

enum tly_decision_outcome {
	TLY_DECISION_ACCEPTED,   /* hold_placed: the tokens are held */
	TLY_DECISION_REJECTED,   /* rejected: reason says why (insufficient_tokens…) */
	TLY_DECISION_DUPLICATE,  /* this event id was decided before; this copy changed nothing */
	TLY_DECISION_CONFLICT,   /* this event id was used before with other content; not applied */
};

/* The ledger's answer for one ticket. */
struct tly_decision {
	enum tly_decision_outcome outcome;
	char kind[32];             /* the entry's kind */
	char reason[64];           /* rejected: the reason; TLY_E_KAFKA: librdkafka's text; else "" */
	int64_t seq;               /* the entry's seq in the tenant's ledger */
	int64_t allowance_remaining, credits_remaining, held; /* balances after the entry */
	int64_t available;         /* allowance_remaining + credits_remaining - held */
	int64_t ledger_time;       /* µs since the epoch */
	int32_t partition;         /* where the entry was read */
	int64_t offset;
};

const char *tly_decision_outcome_name(enum tly_decision_outcome outcome); /* "accepted"… */

/*
 * A waiter with its own producer (tly_producer: kafka.* keys, topics.*) and consumer of
 * topics.ledger, and its thread. Checks that tally.events and tally.ledger have the same number
 * of partitions. NULL + errstr on failure.
 */
struct tly_decision_waiter *tly_decision_waiter_new(const struct tly_config *cfg, char *errstr,
						    size_t errlen);

/*
 * Publish ev (a TokensReserved, borrowed for the call) and fill *ticket. The end offset of the
 * ledger partition is read from the broker before the event is enqueued. Returns 0,
 * TLY_E_INVALID (not a TokensReserved, or invalid: errstr names the field; nothing published),
 * TLY_E_KAFKA / TLY_E_TIMEOUT (broker unreachable; nothing published). Delivery is checked by wait.
 */
int tly_decision_reserve(struct tly_decision_waiter *w, const struct tly_event *ev,
			 struct tly_decision_ticket *ticket, char *errstr,
			 size_t errlen) TLY_MUST_CHECK;

/*
 * Wait up to timeout_ms for the outcome of ticket (from reserve, or any earlier ticket, also
 * from another process). Returns 0 with *out filled, TLY_E_TIMEOUT (not decided in time; wait
 * again with the same ticket later), TLY_E_KAFKA (the event published by this waiter was not
 * delivered: it cannot be decided; out->reason says why), TLY_E_INVALID (the ticket's tenant
 * has no such partition), TLY_E_NOMEM. Only one thread may wait on a given ticket at a time.
 */
int tly_decision_wait(struct tly_decision_waiter *w, const struct tly_decision_ticket *ticket,
		      int timeout_ms, struct tly_decision *out) TLY_MUST_CHECK;

/* Tickets being waited on or reserved and not yet waited on (for tests and metrics). */
size_t tly_decision_waiter_pending(struct tly_decision_waiter *w);

/* Stop the thread, flush the producer for up to 5 s, free. Accepts NULL. No call may be running. */
void tly_decision_waiter_free(struct tly_decision_waiter *w);

#endif
