/*
 * One tenant's wallet: the state the decision core reads and writes (subscription and period,
 * allowance, credit grants, open holds, metered usage, ledger time, seq and last hash), and its
 * snapshot as JSON so a consumer can reload it from PostgreSQL instead of replaying history.
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

/* Snapshot: a JSON document (malloc'd) that tly_wallet_from_json turns back into an equal wallet. */
char *tly_wallet_to_json(const struct tly_wallet *w);
struct tly_wallet *tly_wallet_from_json(const char *json, char *errstr, size_t errlen);

#endif
