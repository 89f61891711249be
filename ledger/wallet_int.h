/* The wallet's body, shared by ledger/wallet.c (lifecycle, snapshots) and ledger/decide.c (rules). */
#ifndef TLY_LEDGER_WALLET_INT_H
#define TLY_LEDGER_WALLET_INT_H

#include "wallet.h"

#define TLY_NEVER INT64_MAX /* expiry of a grant without expires_at */

struct tly_grant {
	tly_uuid id;
	int64_t remaining;  /* tokens left (> 0 while listed) */
	int64_t expires_at; /* TLY_NEVER: does not expire */
	int64_t order;      /* grant order, breaks expiry ties */
};

struct tly_hold {
	tly_uuid id;
	int64_t tokens;
	int64_t expires_at;
	bool open;
	int64_t ended_at; /* ledger time it was settled, released or expired */
	int64_t order;    /* placement order in its wallet, unique: the key of its saved row */
	bool dirty;       /* placed or ended since the wallet was last saved */
};

struct tly_price {
	char key[129];
	int64_t value; /* metered: micro-units per unit; usage: quantity */
};

struct tly_terms {
	char plan_code[257];
	int64_t tokens_per_period;
	char interval[8];
	int32_t interval_count;
	int64_t price_cents;
	char currency[4];
	bool overage_allowed;
	int64_t overage_price; /* micro-units of currency per 1000 tokens */
	int64_t rollover_cap;
	struct tly_price *metered;
	size_t n_metered;
};

struct tly_subscription {
	bool active;
	tly_uuid id;
	struct tly_terms terms;
	int64_t period_start, period_end;
	int32_t seats;
	bool auto_renew;
	bool paused;
	bool cancel_at_period_end;
	bool has_pending;          /* a SubscriptionChanged waiting for its effective_at */
	struct tly_terms pending;
	int32_t pending_seats;
	int64_t pending_at;
};

/* A hold's place in the expiry heap. */
struct tly_due {
	int64_t at;
	uint32_t index;
};

struct tly_wallet {
	tly_uuid tenant;
	int64_t seq;
	unsigned char hash[32];
	int64_t time;           /* ledger time */
	int64_t due_floor;      /* nothing is due before it (ledger/decide.c); 0: not known */
	int64_t allowance;      /* A */
	int64_t overage;        /* this period */
	int64_t next_grant;     /* order of the next grant */
	struct tly_grant *grants; /* by (expires_at, order): next to expire, and to spend, first */
	int64_t credits_total;  /* sum of the grants' remaining, kept as they change */
	size_t n_grants, cap_grants;
	struct tly_hold *holds; /* open ones, and ended ones of this and the last period */
	size_t n_holds, cap_holds;
	int64_t next_hold;      /* order of the next hold */
	int64_t *forgotten;     /* orders of holds forgotten since the wallet was last saved */
	size_t n_forgotten, cap_forgotten;
	struct tly_price *usage; /* metered quantities of this period */
	size_t n_usage, cap_usage;
	struct tly_subscription sub;
	/* derived from holds, rebuilt on load, clone and forgetting; not in the snapshot */
	int64_t held_total;     /* sum of open holds */
	uint32_t *slots;        /* open addressing by reservation id: hold index + 1, 0 = empty */
	size_t n_slots;         /* power of two, at least twice n_holds */
	struct tly_due *heap;   /* open holds by expires_at (min-heap; ended ones dropped lazily) */
	size_t n_heap, cap_heap;
	size_t forget_scan_at;  /* n_holds at which ledger/decide.c next looks for forgotten holds */
	struct tly_wallet_saving saving; /* the consumer's, not decision state */
};

int64_t tly_wallet_credits(const struct tly_wallet *w);

/* Put grant i, whose expiry changed or which was just appended, back in (expires_at, order). */
void tly_wallet_place_grant(struct tly_wallet *w, size_t i);
int64_t tly_wallet_held(const struct tly_wallet *w);

/* Rebuild the derived hold structures (index, heap, held total). 0 or TLY_E_NOMEM. */
int tly_wallet_reindex(struct tly_wallet *w) TLY_MUST_CHECK;

/* The hold with this reservation id (open or ended), or NULL. */
struct tly_hold *tly_wallet_find_hold(struct tly_wallet *w, const tly_uuid *id);

/* Append an open hold (its id must be new). 0 or TLY_E_NOMEM. */
int tly_wallet_add_hold(struct tly_wallet *w, const struct tly_hold *h) TLY_MUST_CHECK;

/* Drop hold i from memory (ledger/decide.c's forgetting); its saved row is deleted on save. */
int tly_wallet_note_forgotten(struct tly_wallet *w, const struct tly_hold *h) TLY_MUST_CHECK;

/* End an open hold at ledger time `at`. */
void tly_wallet_end_hold(struct tly_wallet *w, struct tly_hold *h, int64_t at);

/* The open hold expiring first (NULL if none). */
struct tly_hold *tly_wallet_first_expiry(struct tly_wallet *w);


/*
 * Make room for one more item in the array whose pointer is at items_ptr (n used, *cap allocated,
 * size bytes each), doubling it. 0 or TLY_E_NOMEM (the array is unchanged).
 */
int tly_ledger_grow(void *items_ptr, size_t *cap, size_t n, size_t size) TLY_MUST_CHECK;

/* Free a terms' owned memory and zero it. */
void tly_terms_clear(struct tly_terms *t);

/* Deep copy src into dst (dst cleared first). 0 or TLY_E_NOMEM. */
int tly_terms_copy(struct tly_terms *dst, const struct tly_terms *src) TLY_MUST_CHECK;

#endif
