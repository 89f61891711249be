/*
 * The ledger's decision core: (tenant wallet, event) -> ledger entries. Pure: no I/O, no wall
 * clock, no other tenant; the same wallet and the same events always give byte-identical entries.
 * Time advances only through events (occurred_at) and ClockTicks.
 *
 * Balances (tokens): A = allowance_remaining, C = credits_remaining (sum of live grants),
 * H = held (open reservations), overage = tokens used past zero in the current period.
 * available = A + C - H >= -overdraft_limit after every entry, unless the subscription allows
 * overage (it has an overage price), in which case reservations past zero are accepted.
 */
#ifndef TLY_LEDGER_DECIDE_H
#define TLY_LEDGER_DECIDE_H

#include <stdbool.h>
#include <stdint.h>

#include "codec.h"
#include "err.h"
#include "event.h"

struct tly_arena;
struct tly_codec;
struct tly_wallet;

struct tly_ledger_config {
	int64_t overdraft_limit;  /* tokens available may go below zero by reservations (>= 0) */
	struct tly_codec *codec;  /* borrowed: encodes entries for hashing; codecs are per thread */
};

/* The input record an event came from; copied into every entry it causes. */
struct tly_cause {
	tly_uuid event_id;
	const char *type;          /* "TokensReserved"; static or outliving the apply call */
	int32_t partition;
	int64_t offset;
	unsigned char digest[32];  /* SHA-256 of the event's encoding with its current schema */
};

/* What the consumer knows of an event_id before applying it (must be exact: see tly_ledger_apply). */
struct tly_seen {
	bool seen;                 /* an entry of this tenant already has this cause_event_id */
	unsigned char digest[32];  /* that entry's cause digest */
};

/*
 * Output of one apply: entries as struct tly_event of type TLY_EV_LEDGER_ENTRY, hash-chained.
 * Strings and invoice lines point into arena or into static storage. Zero-initialise; reuse.
 */
struct tly_entries {
	struct tly_event *items;
	size_t n, cap;
	struct tly_arena *arena;
	struct tly_buf encoded; /* every item's single-object encoding (hash set), one after another */
	size_t *ends;           /* item i's bytes: encoded.data[i ? ends[i - 1] : 0 .. ends[i]) */
	size_t cap_ends;
};
void tly_entries_clear(struct tly_entries *out);  /* n = 0, arena reset */
void tly_entries_free(struct tly_entries *out);
/* Item i's encoding (the bytes published to tally.ledger), borrowed until the next clear. */
const unsigned char *tly_entries_encoded(const struct tly_entries *out, size_t i, size_t *len);

/* Entry kinds (LedgerEntry.kind). */
#define TLY_KIND_SUBSCRIPTION_STARTED "subscription_started"
#define TLY_KIND_SUBSCRIPTION_CHANGED "subscription_changed"
#define TLY_KIND_SUBSCRIPTION_CHANGE_SCHEDULED "subscription_change_scheduled"
#define TLY_KIND_SUBSCRIPTION_PAUSED "subscription_paused"
#define TLY_KIND_SUBSCRIPTION_RESUMED "subscription_resumed"
#define TLY_KIND_SUBSCRIPTION_CANCELLED "subscription_cancelled" /* at period end: flag only */
#define TLY_KIND_SUBSCRIPTION_ENDED "subscription_ended"
#define TLY_KIND_PERIOD_CLOSED "period_closed"
#define TLY_KIND_INVOICE "invoice"
#define TLY_KIND_PERIOD_OPENED "period_opened"
#define TLY_KIND_CREDITS_GRANTED "credits_granted"
#define TLY_KIND_CREDITS_EXPIRED "credits_expired"
#define TLY_KIND_HOLD_PLACED "hold_placed"
#define TLY_KIND_HOLD_RELEASED "hold_released"   /* by ReservationReleased or by a settle */
#define TLY_KIND_HOLD_EXPIRED "hold_expired"
#define TLY_KIND_DEBIT "debit"                   /* settle, direct debit, message usage */
#define TLY_KIND_USAGE_RECORDED "usage_recorded" /* metered usage for the invoice */
#define TLY_KIND_REJECTED "rejected"
#define TLY_KIND_DUPLICATE "duplicate"
#define TLY_KIND_CONFLICT "conflict"

/* Rejection reasons (LedgerEntry.reason of kind "rejected"). */
#define TLY_REASON_INSUFFICIENT_TOKENS "insufficient_tokens"
#define TLY_REASON_NO_ACTIVE_SUBSCRIPTION "no_active_subscription"
#define TLY_REASON_SUBSCRIPTION_PAUSED "subscription_paused"
#define TLY_REASON_SUBSCRIPTION_ALREADY_ACTIVE "subscription_already_active"
#define TLY_REASON_UNKNOWN_SUBSCRIPTION "unknown_subscription"
#define TLY_REASON_NOT_PAUSED "subscription_not_paused"
#define TLY_REASON_ALREADY_PAUSED "subscription_already_paused"
#define TLY_REASON_UNKNOWN_RESERVATION "unknown_reservation"
#define TLY_REASON_RESERVATION_ENDED "reservation_already_ended"
#define TLY_REASON_DUPLICATE_RESERVATION "reservation_id_in_use"
#define TLY_REASON_HOLD_EXPIRED_ON_ARRIVAL "expires_before_ledger_time"
#define TLY_REASON_UNKNOWN_METERED_FEATURE "unknown_metered_feature"
#define TLY_REASON_DUPLICATE_GRANT "grant_id_in_use"
#define TLY_REASON_CURRENCY_CHANGE "currency_change_not_allowed"

/*
 * Apply one event of w's tenant (ev->tenant_id must be w's). First advances ledger time to
 * ev->occurred_at (never backwards), which expires holds and grants and closes periods that are
 * due; then decides the event. Appends the entries to out (seq and hash chained from w).
 *
 * seen must be exact: whether this tenant's ledger already has an entry caused by ev->event_id,
 * and its digest. Seen with the same digest gives a "duplicate" entry, with another digest a
 * "conflict" entry; neither changes balances or time.
 *
 * Events that do not touch the wallet (TenantCreated, UserRegistered, conversation events,
 * InvoiceStatusChanged, a MessageAppended without usage) yield no entry unless time advanced.
 * Returns 0, or TLY_E_INVALID (wrong tenant or type; w unchanged) or TLY_E_NOMEM (w may be
 * partly updated: discard it and reload its snapshot).
 */
int tly_ledger_apply(const struct tly_ledger_config *cfg, struct tly_wallet *w,
		     const struct tly_event *ev, const struct tly_cause *cause,
		     const struct tly_seen *seen, struct tly_entries *out, char *errstr,
		     size_t errlen) TLY_MUST_CHECK;

/* A ClockTick for one tenant of its partition: advance ledger time to now (entries if anything was due). */
int tly_ledger_tick(const struct tly_ledger_config *cfg, struct tly_wallet *w, int64_t now,
		    const struct tly_cause *cause, struct tly_entries *out, char *errstr,
		    size_t errlen) TLY_MUST_CHECK;

/*
 * The canonical bytes of an entry (the Avro binary body of LedgerEntry with hash set to 32 zero
 * bytes) and its hash: SHA-256(prev_hash || canonical bytes). Used by the core and by auditors.
 */
int tly_ledger_entry_hash(struct tly_codec *codec, const struct tly_event *entry,
			  unsigned char hash[32]) TLY_MUST_CHECK;

#endif
