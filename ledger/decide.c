/* The ledger's rules: reserve, settle, release, expire, debit, grant, periods and invoices. */
#include "decide.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uuid/uuid.h>

#include "arena.h"
#include "codec.h"
#include "wallet_int.h"

#define MAX_CATCH_UP 10000 /* due events processed by one time advance (periods, expiries) */
/*
 * An ended hold is remembered (a second settle or release is refused as "already ended") until
 * ledger time passes its end or its expiry, whichever is later, by this much; after that it is
 * refused as unknown. Either way it is never applied twice, and the wallet stays small.
 */
#define ENDED_HOLD_MEMORY (3600LL * 1000000)
#define US_PER_DAY 86400000000LL

/* Namespace of the deterministic (name-based, SHA-1) invoice ids. */
static const uuid_t invoice_ns = {0x5c, 0x1f, 0x7a, 0x1e, 0x4d, 0x2b, 0x4e, 0x8a,
				  0x9f, 0x0c, 0x6b, 0x3e, 0x21, 0x77, 0xd4, 0x10};

struct ctx {
	const struct tly_ledger_config *cfg;
	struct tly_wallet *w;
	const struct tly_cause *cause;
	struct tly_entries *out;
	char *errstr;
	size_t errlen;
};

struct delta {
	int64_t allowance, credits, held, overage;
};

/* ---- entries -------------------------------------------------------------------------------- */

void tly_entries_clear(struct tly_entries *out)
{
	out->n = 0;
	out->encoded.len = 0;
	tly_arena_reset(out->arena);
}

void tly_entries_free(struct tly_entries *out)
{
	if (!out)
		return;
	free(out->items);
	tly_arena_free(out->arena);
	tly_buf_free(&out->encoded);
	free(out->ends);
	memset(out, 0, sizeof(*out));
}

const unsigned char *tly_entries_encoded(const struct tly_entries *out, size_t i, size_t *len)
{
	size_t from = i ? out->ends[i - 1] : 0;
	*len = out->ends[i] - from;
	return out->encoded.data + from;
}

int tly_ledger_entry_hash(struct tly_codec *codec, const struct tly_event *entry,
			  unsigned char hash[32])
{
	char err[256];
	struct tly_event copy = *entry;
	memset(copy.u.ledger_entry.hash, 0, 32);
	return tly_codec_digest(codec, &copy, true, entry->u.ledger_entry.prev_hash, 32, hash, err,
				sizeof(err));
}

/* A new entry slot with the cause filled in; valid until the next begin. NULL on OOM. */
static struct tly_event *entry_begin(struct ctx *c, const char *kind)
{
	struct tly_entries *out = c->out;
	if (!out->arena && !(out->arena = tly_arena_new()))
		return NULL;
	if (tly_ledger_grow(&out->items, &out->cap, out->n, sizeof(*out->items)) != 0)
		return NULL;
	struct tly_event *ev = &out->items[out->n];
	memset(ev, 0, sizeof(*ev));
	ev->type = TLY_EV_LEDGER_ENTRY;
	ev->tenant_id = c->w->tenant;
	struct tly_ledger_entry *e = &ev->u.ledger_entry;
	e->kind = kind;
	e->cause_event_id = c->cause->event_id;
	e->cause_type = c->cause->type;
	e->cause_partition = c->cause->partition;
	e->cause_offset = c->cause->offset;
	memcpy(e->cause_digest, c->cause->digest, 32);
	return ev;
}

/* Seal the entry begun last: seq, balances after, period, time, hash chain. */
static int entry_finish(struct ctx *c, struct tly_event *ev, const struct delta *d)
{
	struct tly_wallet *w = c->w;
	struct tly_ledger_entry *e = &ev->u.ledger_entry;
	if (d) {
		e->allowance_delta = d->allowance;
		e->credits_delta = d->credits;
		e->held_delta = d->held;
		e->overage_delta = d->overage;
	}
	e->seq = w->seq + 1;
	e->allowance_remaining = w->allowance;
	e->credits_remaining = tly_wallet_credits(w);
	e->held = tly_wallet_held(w);
	e->overage_tokens = w->overage;
	if (w->sub.active && !e->period_start.set) {
		e->subscription_id = w->sub.id;
		e->period_start = (struct tly_opt_i64){true, w->sub.period_start};
		e->period_end = (struct tly_opt_i64){true, w->sub.period_end};
	}
	e->ledger_time = w->time;
	memcpy(e->prev_hash, w->hash, 32);
	/* Hashed and encoded once: the bytes hashed are the bytes published. Entries dropped since
	 * (a failed apply rolls n back) leave bytes past the last item's end: cut them. */
	struct tly_entries *out = c->out;
	char why[256];
	out->encoded.len = out->n ? out->ends[out->n - 1] : 0;
	int rc = tly_ledger_grow(&out->ends, &out->cap_ends, out->n, sizeof(*out->ends));
	/* Validated only when it carries an invoice: its currency, metered feature keys and amounts
	 * come from the subscription's terms and usage. Every other entry holds the wallet's and the
	 * validated input's UUIDs, constant kinds and reasons, integers and the subscription's
	 * period (end after start), which cannot fail validation (check_decide's scenarios validate
	 * every entry; test_invoice_still_validated). */
	bool check = e->currency || e->lines.n || e->amount_cents.set;
	if (rc == 0 && check)
		rc = tly_codec_encode_sealed(c->cfg->codec, ev, e->prev_hash, 32, &out->encoded,
					     e->hash, why, sizeof(why));
	else if (rc == 0)
		rc = tly_codec_encode_sealed_trusted(c->cfg->codec, ev, e->prev_hash, 32,
						     &out->encoded, e->hash, why, sizeof(why));
	if (rc != 0) {
		snprintf(c->errstr, c->errlen, "could not hash ledger entry %lld: %s",
			 (long long)e->seq, rc == TLY_E_NOMEM ? "out of memory" : why);
		return rc;
	}
	out->ends[out->n] = out->encoded.len;
	w->seq = e->seq;
	memcpy(w->hash, e->hash, 32);
	c->out->n++;
	return 0;
}

/* An entry with only deltas, a reference and a reason. */
static int emit(struct ctx *c, const char *kind, const struct delta *d, const tly_uuid *ref,
		const char *reason)
{
	struct tly_event *ev = entry_begin(c, kind);
	if (!ev)
		return TLY_E_NOMEM;
	if (ref)
		ev->u.ledger_entry.ref_id = *ref;
	ev->u.ledger_entry.reason = reason;
	return entry_finish(c, ev, d);
}

static int reject(struct ctx *c, const char *reason, const tly_uuid *ref)
{
	return emit(c, TLY_KIND_REJECTED, NULL, ref, reason);
}

/* ---- calendar ------------------------------------------------------------------------------- */

/* Days since 1970-01-01 of a civil date, and back (H. Hinnant's algorithms). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
	y -= m <= 2;
	const int64_t era = (y >= 0 ? y : y - 399) / 400;
	const unsigned yoe = (unsigned)(y - era * 400);
	const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
	const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + (int64_t)doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
	z += 719468;
	const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
	const unsigned doe = (unsigned)(z - era * 146097);
	const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
	const unsigned mp = (5 * doy + 2) / 153;
	*d = doy - (153 * mp + 2) / 5 + 1;
	*m = mp < 10 ? mp + 3 : mp - 9;
	*y = (int64_t)yoe + era * 400 + (*m <= 2);
}

static unsigned days_in_month(int64_t y, unsigned m)
{
	static const unsigned dim[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
	bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
	return m == 2 && leap ? 29 : dim[m - 1];
}

/* t plus count intervals; months and years are calendar months in UTC, clamped to month end. */
static int64_t add_interval(int64_t t, const char *interval, int32_t count)
{
	if (strcmp(interval, "day") == 0)
		return t + count * US_PER_DAY;
	if (strcmp(interval, "week") == 0)
		return t + count * 7 * US_PER_DAY;
	int64_t months = strcmp(interval, "year") == 0 ? 12LL * count : count;
	int64_t days = t / US_PER_DAY, tod = t % US_PER_DAY;
	if (tod < 0) {
		tod += US_PER_DAY;
		days--;
	}
	int64_t y;
	unsigned m, d;
	civil_from_days(days, &y, &m, &d);
	int64_t total = y * 12 + (m - 1) + months;
	y = total / 12;
	m = (unsigned)(total % 12) + 1;
	if (d > days_in_month(y, m))
		d = days_in_month(y, m);
	return days_from_civil(y, m, d) * US_PER_DAY + tod;
}

/* ---- wallet helpers ------------------------------------------------------------------------- */

static int64_t forget_at(const struct tly_hold *h)
{
	return (h->ended_at > h->expires_at ? h->ended_at : h->expires_at) + ENDED_HOLD_MEMORY;
}

/* The hold with this id, unless it ended long enough ago to be forgotten. */
static struct tly_hold *find_hold(struct tly_wallet *w, const tly_uuid *id)
{
	struct tly_hold *h = tly_wallet_find_hold(w, id);
	return h && !h->open && w->time >= forget_at(h) ? NULL : h;
}

/*
 * Drop forgotten holds from memory. Scans only when the list has doubled since the last scan,
 * so it costs O(1) per hold; what it drops was already invisible to find_hold.
 */
static int forget_holds(struct tly_wallet *w)
{
	if (w->n_holds < w->forget_scan_at)
		return 0;
	size_t keep = 0;
	for (size_t i = 0; i < w->n_holds; i++) {
		const struct tly_hold *h = &w->holds[i];
		if (h->open || w->time < forget_at(h))
			w->holds[keep++] = *h;
		else if (tly_wallet_note_forgotten(w, h) != 0)
			return TLY_E_NOMEM;
	}
	w->forget_scan_at = 2 * keep + 64;
	if (keep == w->n_holds)
		return 0;
	w->n_holds = keep;
	return tly_wallet_reindex(w);
}

static struct tly_grant *find_grant(struct tly_wallet *w, const tly_uuid *id)
{
	for (size_t i = 0; i < w->n_grants; i++) {
		if (memcmp(w->grants[i].id.b, id->b, 16) == 0)
			return &w->grants[i];
	}
	return NULL;
}

static void remove_grant(struct tly_wallet *w, size_t i)
{
	memmove(&w->grants[i], &w->grants[i + 1], (w->n_grants - i - 1) * sizeof(*w->grants));
	w->n_grants--;
}

/* Spend amount (<= credits) from grants, soonest-expiring first, then in grant order: the
 * wallet keeps them in that order. */
static void spend_credits(struct tly_wallet *w, int64_t amount)
{
	while (amount > 0 && w->n_grants > 0) {
		struct tly_grant *g = &w->grants[0];
		int64_t take = g->remaining < amount ? g->remaining : amount;
		g->remaining -= take;
		w->credits_total -= take;
		amount -= take;
		if (g->remaining == 0)
			remove_grant(w, 0);
	}
}

/*
 * Debit tokens of usage that already happened. It takes what is free (A + C - H) from the
 * allowance, then credits; the rest is overage, so open holds keep their backing.
 */
static int debit(struct ctx *c, int64_t tokens, const tly_uuid *ref)
{
	struct tly_wallet *w = c->w;
	int64_t free_ = w->allowance + tly_wallet_credits(w) - tly_wallet_held(w);
	int64_t covered = tokens < free_ ? tokens : (free_ > 0 ? free_ : 0);
	int64_t from_a = covered < w->allowance ? covered : w->allowance;
	int64_t from_c = covered - from_a;
	w->allowance -= from_a;
	spend_credits(w, from_c);
	w->overage += tokens - covered;
	struct delta d = {-from_a, -from_c, 0, tokens - covered};
	return emit(c, TLY_KIND_DEBIT, &d, ref, NULL);
}

static int end_hold(struct ctx *c, struct tly_hold *h, const char *kind)
{
	tly_wallet_end_hold(c->w, h, c->w->time);
	struct delta d = {0, 0, -h->tokens, 0};
	tly_uuid ref = h->id;
	return emit(c, kind, &d, &ref, NULL);
}

static int terms_from_event(struct tly_terms *t, const struct tly_plan_terms *p)
{
	tly_terms_clear(t);
	snprintf(t->plan_code, sizeof(t->plan_code), "%s", p->plan_code);
	t->tokens_per_period = p->tokens_per_period;
	snprintf(t->interval, sizeof(t->interval), "%s", p->interval);
	t->interval_count = p->interval_count;
	t->price_cents = p->price_cents;
	snprintf(t->currency, sizeof(t->currency), "%s", p->currency);
	t->overage_allowed = p->overage_price_micros_per_1k_tokens.set;
	t->overage_price = p->overage_price_micros_per_1k_tokens.v;
	t->rollover_cap = p->rollover_cap_tokens;
	if (p->metered_prices.n) {
		t->metered = calloc(p->metered_prices.n, sizeof(*t->metered));
		if (!t->metered)
			return TLY_E_NOMEM;
		for (size_t i = 0; i < p->metered_prices.n; i++) {
			/* insertion in key order, for a deterministic invoice */
			size_t j = t->n_metered;
			while (j > 0 && strcmp(t->metered[j - 1].key, p->metered_prices.items[i].key) > 0) {
				t->metered[j] = t->metered[j - 1];
				j--;
			}
			snprintf(t->metered[j].key, sizeof(t->metered[j].key), "%s",
				 p->metered_prices.items[i].key);
			t->metered[j].value = p->metered_prices.items[i].i;
			t->n_metered++;
		}
	}
	return 0;
}

/* Allowance that backs open holds beyond the credits: kept through closes and downgrades. */
static int64_t held_backing(const struct tly_wallet *w)
{
	int64_t need = tly_wallet_held(w) - tly_wallet_credits(w);
	if (need <= 0)
		return 0;
	return need < w->allowance ? need : w->allowance;
}

/*
 * The part of an expiring grant that backs open holds beyond the allowance and the other credits:
 * it stays (until the last open hold's expiry), so an expiry never takes available below where
 * it was or below zero, as a period close keeps the allowance that backs holds.
 */
static int64_t grant_backing(const struct tly_wallet *w, const struct tly_grant *g)
{
	int64_t others = tly_wallet_credits(w) - g->remaining;
	int64_t need = tly_wallet_held(w) - w->allowance - others;
	if (need <= 0)
		return 0;
	return need < g->remaining ? need : g->remaining;
}

/* The latest expiry of an open hold (open holds expire after the current ledger time). */
static int64_t last_hold_expiry(const struct tly_wallet *w)
{
	int64_t last = w->time;
	for (size_t i = 0; i < w->n_holds; i++) {
		if (w->holds[i].open && w->holds[i].expires_at > last)
			last = w->holds[i].expires_at;
	}
	return last;
}

/* ---- periods -------------------------------------------------------------------------------- */

static int64_t micros_to_cents(__int128 micros)
{
	__int128 cents = (micros + 5000) / 10000;
	return cents > INT64_MAX ? INT64_MAX : (int64_t)cents;
}

/* Close the current period at ledger time: period_closed, invoice, then renew or end. */
static int close_period(struct ctx *c, bool renew)
{
	struct tly_wallet *w = c->w;
	struct tly_subscription *s = &w->sub;
	int rc;

	/* 1. the unused allowance lapses, except what backs open holds and the rollover */
	int64_t backing = held_backing(w);
	int64_t unused = w->allowance - backing;
	int64_t rollover = renew ? (unused < s->terms.rollover_cap ? unused : s->terms.rollover_cap) : 0;
	if (rollover < 0)
		rollover = 0;
	int64_t before = w->allowance;
	w->allowance = backing + rollover;
	struct delta d = {w->allowance - before, 0, 0, 0};
	if ((rc = emit(c, TLY_KIND_PERIOD_CLOSED, &d, &s->id, NULL)) != 0)
		return rc;

	/* 2. the invoice: plan price + overage x price + metered usage x price */
	size_t n_lines = 2 + w->n_usage;
	struct tly_invoice_line *lines = tly_arena_alloc(c->out->arena, n_lines * sizeof(*lines));
	if (!lines)
		return TLY_E_NOMEM;
	size_t n = 0;
	__int128 total = 0;
	lines[n++] = (struct tly_invoice_line){"plan", NULL, 1, s->terms.price_cents * 10000,
					       s->terms.price_cents};
	total += s->terms.price_cents;
	if (w->overage > 0) {
		int64_t price = s->terms.overage_allowed ? s->terms.overage_price : 0;
		int64_t cents = micros_to_cents((__int128)w->overage * price / 1000);
		lines[n++] = (struct tly_invoice_line){"overage", NULL, w->overage, price, cents};
		total += cents;
	}
	for (size_t i = 0; i < w->n_usage; i++) {
		int64_t price = 0;
		for (size_t k = 0; k < s->terms.n_metered; k++) {
			if (strcmp(s->terms.metered[k].key, w->usage[i].key) == 0)
				price = s->terms.metered[k].value;
		}
		char *key = tly_arena_strndup(c->out->arena, w->usage[i].key, strlen(w->usage[i].key));
		if (!key)
			return TLY_E_NOMEM;
		int64_t cents = micros_to_cents((__int128)w->usage[i].value * price);
		lines[n++] = (struct tly_invoice_line){"metered", key, w->usage[i].value, price, cents};
		total += cents;
	}
	struct tly_event *ev = entry_begin(c, TLY_KIND_INVOICE);
	char *currency = ev ? tly_arena_strndup(c->out->arena, s->terms.currency, 3) : NULL;
	if (!ev || !currency)
		return TLY_E_NOMEM;
	struct tly_ledger_entry *e = &ev->u.ledger_entry;
	unsigned char name[40];
	memcpy(name, w->tenant.b, 16);
	memcpy(name + 16, s->id.b, 16);
	for (int i = 0; i < 8; i++)
		name[32 + i] = (unsigned char)((uint64_t)s->period_start >> (56 - 8 * i));
	uuid_generate_sha1(e->ref_id.b, invoice_ns, (const char *)name, sizeof(name));
	e->amount_cents = (struct tly_opt_i64){true, total > INT64_MAX ? INT64_MAX : (int64_t)total};
	e->currency = currency;
	e->lines = (struct tly_list){lines, n};
	int64_t overage = w->overage;
	w->overage = 0;
	w->n_usage = 0;
	struct delta inv = {0, 0, 0, -overage};
	if ((rc = entry_finish(c, ev, &inv)) != 0)
		return rc;


	/* 3. the next period, or the end */
	if (renew) {
		s->period_start = s->period_end;
		s->period_end = add_interval(s->period_start, s->terms.interval, s->terms.interval_count);
		if (s->period_end <= s->period_start)
			s->period_end = s->period_start + US_PER_DAY;
		w->allowance += s->terms.tokens_per_period;
		struct delta open = {s->terms.tokens_per_period, 0, 0, 0};
		return emit(c, TLY_KIND_PERIOD_OPENED, &open, &s->id, NULL);
	}
	tly_uuid id = s->id;
	tly_terms_clear(&s->terms);
	tly_terms_clear(&s->pending);
	memset(s, 0, sizeof(*s));
	return emit(c, TLY_KIND_SUBSCRIPTION_ENDED, NULL, &id, NULL);
}

/* Move to new terms now; the allowance changes by the difference, keeping what backs holds. */
static int apply_terms(struct ctx *c, const struct tly_terms *t, int32_t seats)
{
	struct tly_wallet *w = c->w;
	struct tly_subscription *s = &w->sub;
	int64_t before = w->allowance;
	int64_t after = w->allowance + (t->tokens_per_period - s->terms.tokens_per_period);
	int64_t floor_ = held_backing(w);
	w->allowance = after < floor_ ? floor_ : after;
	if (tly_terms_copy(&s->terms, t) != 0)
		return TLY_E_NOMEM;
	s->seats = seats;
	struct delta d = {w->allowance - before, 0, 0, 0};
	return emit(c, TLY_KIND_SUBSCRIPTION_CHANGED, &d, &s->id, NULL);
}

enum due_kind { DUE_NONE, DUE_HOLD, DUE_GRANT, DUE_CHANGE, DUE_PERIOD };

/* The earliest time anything of the wallet falls due (INT64_MAX: nothing will). */
static int64_t next_due(struct tly_wallet *w)
{
	int64_t when = INT64_MAX;
	const struct tly_hold *first = tly_wallet_first_expiry(w);
	if (first)
		when = first->expires_at;
	if (w->n_grants > 0 && w->grants[0].expires_at < when)
		when = w->grants[0].expires_at;
	if (w->sub.active && w->sub.has_pending && w->sub.pending_at < when)
		when = w->sub.pending_at;
	if (w->sub.active && w->sub.period_end < when)
		when = w->sub.period_end;
	return when;
}

/*
 * Process everything due at or before t, earliest first; at equal times holds expire, then
 * grants, then a scheduled change applies, then the period closes (a hold expiring at the
 * period's end belongs to the period it was placed in).
 */
static int advance(struct ctx *c, int64_t t)
{
	struct tly_wallet *w = c->w;
	if (t < w->time)
		t = w->time;
	if (w->due_floor > 0 && t < w->due_floor) {
		w->time = t; /* nothing due: only time moves (most ClockTicks, for most tenants) */
		return 0;
	}
	w->due_floor = 0; /* not known while dues are processed */
	for (int guard = 0; guard < MAX_CATCH_UP; guard++) {
		enum due_kind kind = DUE_NONE;
		int64_t when = INT64_MAX;
		struct tly_hold *first = tly_wallet_first_expiry(w);
		if (first && first->expires_at <= t) {
			kind = DUE_HOLD;
			when = first->expires_at;
		}
		if (w->n_grants > 0 && w->grants[0].expires_at <= t &&
		    w->grants[0].expires_at < when) {
			kind = DUE_GRANT; /* the wallet's first grant expires first */
			when = w->grants[0].expires_at;
		}
		if (w->sub.active && w->sub.has_pending && w->sub.pending_at <= t && w->sub.pending_at < when) {
			kind = DUE_CHANGE;
			when = w->sub.pending_at;
		}
		if (w->sub.active && w->sub.period_end <= t && w->sub.period_end < when) {
			kind = DUE_PERIOD;
			when = w->sub.period_end;
		}
		if (kind == DUE_NONE) {
			w->time = t;
			w->due_floor = next_due(w);
			return 0;
		}
		if (when > w->time)
			w->time = when;
		int rc = 0;
		switch (kind) {
		case DUE_HOLD:
			rc = end_hold(c, first, TLY_KIND_HOLD_EXPIRED);
			break;
		case DUE_GRANT: {
			struct tly_grant g = w->grants[0];
			int64_t keep = grant_backing(w, &g);
			w->credits_total -= g.remaining - keep;
			if (keep > 0) {
				w->grants[0].remaining = keep;
				w->grants[0].expires_at = last_hold_expiry(w);
				tly_wallet_place_grant(w, 0);
			} else {
				remove_grant(w, 0);
			}
			struct delta d = {0, keep - g.remaining, 0, 0};
			if (keep < g.remaining)
				rc = emit(c, TLY_KIND_CREDITS_EXPIRED, &d, &g.id, NULL);
			break;
		}
		case DUE_CHANGE:
			w->sub.has_pending = false;
			rc = apply_terms(c, &w->sub.pending, w->sub.pending_seats);
			tly_terms_clear(&w->sub.pending);
			break;
		case DUE_PERIOD:
			rc = close_period(c, w->sub.auto_renew && !w->sub.cancel_at_period_end);
			break;
		case DUE_NONE:
			break;
		}
		if (rc != 0)
			return rc;
	}
	snprintf(c->errstr, c->errlen, "more than %d due events in one time advance", MAX_CATCH_UP);
	return TLY_E_INVALID;
}

/* ---- the rules ------------------------------------------------------------------------------ */

static bool sub_matches(const struct tly_wallet *w, const tly_uuid *id)
{
	return w->sub.active && memcmp(w->sub.id.b, id->b, 16) == 0;
}

static int on_reserve(struct ctx *c, const struct tly_ev_tokens_reserved *r)
{
	struct tly_wallet *w = c->w;
	if (find_hold(w, &r->reservation_id))
		return reject(c, TLY_REASON_DUPLICATE_RESERVATION, &r->reservation_id);
	if (tly_wallet_find_hold(w, &r->reservation_id)) {
		/* the id's old hold is forgotten but still in memory: drop it, or the id finds it first */
		w->forget_scan_at = 0;
		if (forget_holds(w) != 0)
			return TLY_E_NOMEM;
	}
	if (r->expires_at <= w->time)
		return reject(c, TLY_REASON_HOLD_EXPIRED_ON_ARRIVAL, &r->reservation_id);
	int64_t credits = tly_wallet_credits(w);
	if (w->sub.active && w->sub.paused)
		return reject(c, TLY_REASON_SUBSCRIPTION_PAUSED, &r->reservation_id);
	if (!w->sub.active && credits == 0)
		return reject(c, TLY_REASON_NO_ACTIVE_SUBSCRIPTION, &r->reservation_id);
	bool overage = w->sub.active && w->sub.terms.overage_allowed;
	int64_t available = w->allowance + credits - tly_wallet_held(w);
	if (!overage && r->tokens > available + c->cfg->overdraft_limit)
		return reject(c, TLY_REASON_INSUFFICIENT_TOKENS, &r->reservation_id);
	struct tly_hold hold = {.id = r->reservation_id, .tokens = r->tokens,
				.expires_at = r->expires_at, .open = true};
	if (tly_wallet_add_hold(w, &hold) != 0)
		return TLY_E_NOMEM;
	struct delta d = {0, 0, r->tokens, 0};
	return emit(c, TLY_KIND_HOLD_PLACED, &d, &r->reservation_id, NULL);
}

static int on_settle(struct ctx *c, const tly_uuid *reservation, int64_t actual)
{
	struct tly_hold *h = find_hold(c->w, reservation);
	if (!h)
		return reject(c, TLY_REASON_UNKNOWN_RESERVATION, reservation);
	if (!h->open)
		return reject(c, TLY_REASON_RESERVATION_ENDED, reservation);
	int rc = end_hold(c, h, TLY_KIND_HOLD_RELEASED);
	return rc != 0 ? rc : debit(c, actual, reservation);
}

static int on_release(struct ctx *c, const tly_uuid *reservation)
{
	struct tly_hold *h = find_hold(c->w, reservation);
	if (!h)
		return reject(c, TLY_REASON_UNKNOWN_RESERVATION, reservation);
	if (!h->open)
		return reject(c, TLY_REASON_RESERVATION_ENDED, reservation);
	return end_hold(c, h, TLY_KIND_HOLD_RELEASED);
}

static int on_grant(struct ctx *c, const struct tly_ev_credits_granted *g)
{
	struct tly_wallet *w = c->w;
	if (find_grant(w, &g->grant_id))
		return reject(c, TLY_REASON_DUPLICATE_GRANT, &g->grant_id);
	if (g->expires_at.set && g->expires_at.v <= w->time)
		return reject(c, TLY_REASON_HOLD_EXPIRED_ON_ARRIVAL, &g->grant_id);
	if (tly_ledger_grow(&w->grants, &w->cap_grants, w->n_grants, sizeof(*w->grants)) != 0)
		return TLY_E_NOMEM;
	w->grants[w->n_grants++] = (struct tly_grant){
		g->grant_id, g->tokens, g->expires_at.set ? g->expires_at.v : TLY_NEVER, w->next_grant++};
	w->credits_total += g->tokens;
	tly_wallet_place_grant(w, w->n_grants - 1);
	struct delta d = {0, g->tokens, 0, 0};
	return emit(c, TLY_KIND_CREDITS_GRANTED, &d, &g->grant_id, NULL);
}

static int on_subscription_started(struct ctx *c, const struct tly_ev_subscription_started *e)
{
	struct tly_wallet *w = c->w;
	struct tly_subscription *s = &w->sub;
	if (s->active)
		return reject(c, TLY_REASON_SUBSCRIPTION_ALREADY_ACTIVE, &e->subscription_id);
	memset(s, 0, sizeof(*s));
	if (terms_from_event(&s->terms, &e->terms) != 0)
		return TLY_E_NOMEM;
	s->active = true;
	s->id = e->subscription_id;
	s->period_start = e->period_start;
	s->period_end = e->period_end;
	s->seats = e->seat_count;
	s->auto_renew = e->auto_renew;
	/* usage past zero without a subscription has no price: it is dropped, and the entry says so */
	int64_t overage = w->overage;
	w->overage = 0;
	w->n_usage = 0;
	w->allowance += e->terms.tokens_per_period;
	struct delta d = {e->terms.tokens_per_period, 0, 0, -overage};
	return emit(c, TLY_KIND_SUBSCRIPTION_STARTED, &d, &s->id, NULL);
}

static int on_subscription_changed(struct ctx *c, const struct tly_ev_subscription_changed *e)
{
	struct tly_wallet *w = c->w;
	struct tly_subscription *s = &w->sub;
	if (!sub_matches(w, &e->subscription_id))
		return reject(c, TLY_REASON_UNKNOWN_SUBSCRIPTION, &e->subscription_id);
	if (strcmp(s->terms.currency, e->terms.currency) != 0)
		return reject(c, TLY_REASON_CURRENCY_CHANGE, &e->subscription_id);
	struct tly_terms t = {0};
	if (terms_from_event(&t, &e->terms) != 0) {
		tly_terms_clear(&t);
		return TLY_E_NOMEM;
	}
	int rc;
	if (e->effective_at <= w->time) {
		rc = apply_terms(c, &t, e->seat_count);
	} else {
		tly_terms_clear(&s->pending);
		s->pending = t;
		memset(&t, 0, sizeof(t));
		s->has_pending = true;
		s->pending_seats = e->seat_count;
		s->pending_at = e->effective_at;
		rc = emit(c, TLY_KIND_SUBSCRIPTION_CHANGE_SCHEDULED, NULL, &s->id, NULL);
	}
	tly_terms_clear(&t);
	return rc;
}

static int on_subscription_cancelled(struct ctx *c, const struct tly_ev_subscription_cancelled *e)
{
	struct tly_wallet *w = c->w;
	if (!sub_matches(w, &e->subscription_id))
		return reject(c, TLY_REASON_UNKNOWN_SUBSCRIPTION, &e->subscription_id);
	if (e->at_period_end) {
		w->sub.cancel_at_period_end = true;
		return emit(c, TLY_KIND_SUBSCRIPTION_CANCELLED, NULL, &w->sub.id, NULL);
	}
	return close_period(c, false);
}

static int on_pause(struct ctx *c, const tly_uuid *id, bool pause)
{
	struct tly_wallet *w = c->w;
	if (!sub_matches(w, id))
		return reject(c, TLY_REASON_UNKNOWN_SUBSCRIPTION, id);
	if (w->sub.paused == pause)
		return reject(c, pause ? TLY_REASON_ALREADY_PAUSED : TLY_REASON_NOT_PAUSED, id);
	w->sub.paused = pause;
	return emit(c, pause ? TLY_KIND_SUBSCRIPTION_PAUSED : TLY_KIND_SUBSCRIPTION_RESUMED, NULL, id, NULL);
}

static int on_usage(struct ctx *c, const struct tly_ev_usage_reported *u)
{
	struct tly_wallet *w = c->w;
	if (!sub_matches(w, &u->subscription_id))
		return reject(c, TLY_REASON_UNKNOWN_SUBSCRIPTION, &u->subscription_id);
	bool priced = false;
	for (size_t i = 0; i < w->sub.terms.n_metered; i++)
		priced |= strcmp(w->sub.terms.metered[i].key, u->feature_key) == 0;
	if (!priced)
		return reject(c, TLY_REASON_UNKNOWN_METERED_FEATURE, &u->subscription_id);
	size_t i = 0;
	while (i < w->n_usage && strcmp(w->usage[i].key, u->feature_key) < 0)
		i++;
	if (i == w->n_usage || strcmp(w->usage[i].key, u->feature_key) != 0) {
		if (tly_ledger_grow(&w->usage, &w->cap_usage, w->n_usage, sizeof(*w->usage)) != 0)
			return TLY_E_NOMEM;
		memmove(&w->usage[i + 1], &w->usage[i], (w->n_usage - i) * sizeof(*w->usage));
		memset(&w->usage[i], 0, sizeof(w->usage[i]));
		snprintf(w->usage[i].key, sizeof(w->usage[i].key), "%s", u->feature_key);
		w->n_usage++;
	}
	w->usage[i].value += u->quantity;
	return emit(c, TLY_KIND_USAGE_RECORDED, NULL, &u->subscription_id, NULL);
}

static int decide(struct ctx *c, const struct tly_event *ev)
{
	switch (ev->type) {
	case TLY_EV_SUBSCRIPTION_STARTED:
		return on_subscription_started(c, &ev->u.subscription_started);
	case TLY_EV_SUBSCRIPTION_CHANGED:
		return on_subscription_changed(c, &ev->u.subscription_changed);
	case TLY_EV_SUBSCRIPTION_CANCELLED:
		return on_subscription_cancelled(c, &ev->u.subscription_cancelled);
	case TLY_EV_SUBSCRIPTION_PAUSED:
		return on_pause(c, &ev->u.subscription_paused.subscription_id, true);
	case TLY_EV_SUBSCRIPTION_RESUMED:
		return on_pause(c, &ev->u.subscription_resumed.subscription_id, false);
	case TLY_EV_CREDITS_GRANTED:
		return on_grant(c, &ev->u.credits_granted);
	case TLY_EV_TOKENS_RESERVED:
		return on_reserve(c, &ev->u.tokens_reserved);
	case TLY_EV_RESERVATION_SETTLED: {
		const struct tly_ev_reservation_settled *s = &ev->u.reservation_settled;
		return on_settle(c, &s->reservation_id,
				 s->prompt_tokens + s->completion_tokens + s->reasoning_tokens);
	}
	case TLY_EV_RESERVATION_RELEASED:
		return on_release(c, &ev->u.reservation_released.reservation_id);
	case TLY_EV_TOKENS_DEBITED:
		return debit(c, ev->u.tokens_debited.tokens, &ev->u.tokens_debited.debit_id);
	case TLY_EV_MESSAGE_APPENDED: {
		const struct tly_ev_message_appended *m = &ev->u.message_appended;
		int64_t used = m->prompt_tokens + m->completion_tokens + m->reasoning_tokens;
		if (!tly_uuid_is_nil(&m->reservation_id))
			return on_settle(c, &m->reservation_id, used);
		return used > 0 ? debit(c, used, &m->message_id) : 0;
	}
	case TLY_EV_USAGE_REPORTED:
		return on_usage(c, &ev->u.usage_reported);
	default:
		return 0; /* not a wallet event: only time moves */
	}
}

int tly_ledger_apply(const struct tly_ledger_config *cfg, struct tly_wallet *w,
		     const struct tly_event *ev, const struct tly_cause *cause,
		     const struct tly_seen *seen, struct tly_entries *out, char *errstr, size_t errlen)
{
	struct ctx c = {cfg, w, cause, out, errstr, errlen};
	if (ev->type == TLY_EV_CLOCK_TICK || ev->type == TLY_EV_PLAN_PUBLISHED ||
	    ev->type == TLY_EV_LEDGER_ENTRY || ev->type >= TLY_EV__COUNT) {
		snprintf(errstr, errlen, "%s is not a tenant event", cause->type);
		return TLY_E_INVALID;
	}
	if (memcmp(ev->tenant_id.b, w->tenant.b, 16) != 0) {
		snprintf(errstr, errlen, "event of another tenant applied to this wallet");
		return TLY_E_INVALID;
	}
	if (seen && seen->seen) {
		bool same = memcmp(seen->digest, cause->digest, 32) == 0;
		return emit(&c, same ? TLY_KIND_DUPLICATE : TLY_KIND_CONFLICT, NULL, NULL,
			    same ? NULL : "event_id reused with different content");
	}
	int rc = advance(&c, ev->occurred_at);
	if (rc == 0)
		rc = forget_holds(w);
	w->due_floor = 0; /* the decision may place a hold, a grant, a subscription: known again
			   * after the advance below */
	if (rc == 0)
		rc = decide(&c, ev);
	if (rc == 0)
		rc = advance(&c, w->time); /* anything the decision made due at once */
	if (rc == TLY_E_NOMEM)
		snprintf(errstr, errlen, "out of memory");
	return rc;
}

int tly_ledger_tick(const struct tly_ledger_config *cfg, struct tly_wallet *w, int64_t now,
		    const struct tly_cause *cause, struct tly_entries *out, char *errstr, size_t errlen)
{
	struct ctx c = {cfg, w, cause, out, errstr, errlen};
	int rc = advance(&c, now);
	if (rc == TLY_E_NOMEM)
		snprintf(errstr, errlen, "out of memory");
	return rc;
}
