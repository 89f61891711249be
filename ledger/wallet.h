/*
 * One tenant's wallet: the state the decision core reads and writes (subscription and period,
 * allowance, credit grants, holds, metered usage, ledger time, seq and last hash), and its
 * snapshot (JSON, holds apart) so a consumer can reload it from PostgreSQL instead of replaying
 * history.
 */
#ifndef TLY_LEDGER_WALLET_H
#define TLY_LEDGER_WALLET_H

#include <stdbool.h>
#include <stdint.h>

#include "err.h"
#include "event.h"

struct tly_wallet;

/* The balances a person or a test reads; see ledger/decide.h for their meaning. */
struct tly_balance {
	int64_t seq;                 /* last entry's seq (0: none yet) */
	int64_t ledger_time;         /* µs since the epoch */
	int64_t allowance_remaining;
	int64_t credits_remaining;
	int64_t held;
	int64_t overage_tokens;      /* this period */
	int64_t available;           /* allowance + credits - held */
	bool has_subscription;       /* active (possibly paused) */
	bool paused;
	bool overage_allowed;
	int64_t period_start, period_end; /* 0 without a subscription */
	int64_t open_holds;
};

/* A wallet with nothing in it for tenant. NULL on OOM. */
struct tly_wallet *tly_wallet_new(const tly_uuid *tenant);
void tly_wallet_free(struct tly_wallet *w); /* accepts NULL */

/* A deep copy (for trying a batch and rolling back). NULL on OOM. */
struct tly_wallet *tly_wallet_clone(const struct tly_wallet *w);

const tly_uuid *tly_wallet_tenant(const struct tly_wallet *w);
void tly_wallet_balance(const struct tly_wallet *w, struct tly_balance *out);
const unsigned char *tly_wallet_last_hash(const struct tly_wallet *w); /* 32 bytes */

/*
 * Snapshot: a JSON document (malloc'd) that tly_wallet_from_json turns back into an equal wallet.
 * Without holds (with_holds false) it stays small whatever the traffic; the holds are then saved
 * apart, one row each, as they change (tly_wallet_changed_holds) and loaded back with
 * tly_wallet_load_hold. A snapshot with holds loads them as changed, to be saved apart.
 */
char *tly_wallet_to_json(const struct tly_wallet *w, bool with_holds);
struct tly_wallet *tly_wallet_from_json(const char *json, char *errstr, size_t errlen);

/* A hold as saved apart from the snapshot: one row per (tenant, order). */
struct tly_hold_row {
	int64_t order;      /* placement order, unique in the wallet */
	tly_uuid id;        /* the reservation */
	int64_t tokens;
	int64_t expires_at;
	int64_t ended_at;   /* -1 while open */
};

/*
 * The holds placed or ended since the last tly_wallet_mark_saved, in order: fn gets each (the
 * row is borrowed for the call); a non-zero return stops the walk and is returned.
 */
int tly_wallet_changed_holds(const struct tly_wallet *w,
			     int (*fn)(const struct tly_hold_row *row, void *ud), void *ud);

/* Orders of the holds forgotten since the last tly_wallet_mark_saved (their rows go). Borrowed. */
const int64_t *tly_wallet_forgotten(const struct tly_wallet *w, size_t *n);

/* The changes above are committed: forget them. */
void tly_wallet_mark_saved(struct tly_wallet *w);

/*
 * Where the consumer's stored snapshot of the wallet stands (not decision state: never in a
 * snapshot, never read by the decision core). A new or loaded wallet has as_of -1, batches 0,
 * batch 0.
 */
struct tly_wallet_saving {
	int64_t as_of;    /* input offset the stored snapshot is as of; -1: none (or not known yet) */
	uint32_t batches; /* batches that changed the wallet since it was stored */
	uint32_t records; /* input records applied to it since it was stored (ClockTicks that moved it too) */
	uint64_t batch;   /* the consumer's serial of the last batch that listed it as changed; 0: none */
};
struct tly_wallet_saving *tly_wallet_saving(struct tly_wallet *w);

/*
 * Add a saved hold to a wallet being loaded, in order (after tly_wallet_from_json of a snapshot
 * without holds); then call tly_wallet_loaded. 0, TLY_E_INVALID (out of order), TLY_E_NOMEM.
 */
int tly_wallet_load_hold(struct tly_wallet *w, const struct tly_hold_row *row) TLY_MUST_CHECK;
int tly_wallet_loaded(struct tly_wallet *w) TLY_MUST_CHECK;

#endif
