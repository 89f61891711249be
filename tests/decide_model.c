/* The reference wallet model and the runner comparing it with the decision core (see decide_model.h). */
#include "decide_model.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "decide.h"
#include "event.h"
#include "fixtures.h"
#include "wallet.h"

#define T0 INT64_C(1767225600000000) /* 2026-01-01 */
#define MINUTE INT64_C(60000000)
#define HOUR (60 * MINUTE)
#define DAY (24 * HOUR)
#define REMEMBER_ENDED HOUR   /* an ended hold is refused as "ended", then as unknown (decide.c) */
#define N_RES 8               /* reservation ids in play */
#define N_GRANT_IDS 4         /* grant ids in play */
#define NEVER INT64_MAX

/* ---- the model ------------------------------------------------------------------------------ */

struct m_grant {
	int id;
	int64_t remaining, expires_at, order;
};

struct m_hold {
	bool placed; /* remembered: open, or ended less than REMEMBER_ENDED ago */
	bool open;
	int64_t tokens, expires_at, ended_at;
};

struct model {
	int64_t time, overdraft;
	bool active, paused, overage_ok, auto_renew, cancel_at_end;
	int sub_no;                  /* id of the subscription (0: none yet) */
	int64_t per_period, rollover_cap, period_end;
	int64_t allowance, overage;
	struct m_grant grants[N_GRANT_IDS];
	size_t n_grants;             /* in grant order */
	int64_t next_order;
	struct m_hold holds[N_RES];
	bool ever_overage;           /* a subscription allowed overage: available may go below the limit */
};

static int64_t m_credits(const struct model *m)
{
	int64_t c = 0;
	for (size_t i = 0; i < m->n_grants; i++)
		c += m->grants[i].remaining;
	return c;
}

static int64_t m_held(const struct model *m)
{
	int64_t h = 0;
	for (int r = 0; r < N_RES; r++)
		h += m->holds[r].placed && m->holds[r].open ? m->holds[r].tokens : 0;
	return h;
}

static int64_t max64(int64_t a, int64_t b)
{
	return a > b ? a : b;
}

static int64_t min64(int64_t a, int64_t b)
{
	return a < b ? a : b;
}

/* Reservation r as the ledger sees it now: NULL when never placed or forgotten. */
static struct m_hold *m_hold(struct model *m, int r)
{
	struct m_hold *h = &m->holds[r];
	if (!h->placed)
		return NULL;
	if (!h->open && m->time >= max64(h->ended_at, h->expires_at) + REMEMBER_ENDED)
		return NULL;
	return h;
}

static void m_remove_grant(struct model *m, size_t i)
{
	memmove(&m->grants[i], &m->grants[i + 1], (m->n_grants - i - 1) * sizeof(m->grants[0]));
	m->n_grants--;
}

/* Credits are spent soonest-expiring first, then oldest first. */
static void m_spend_credits(struct model *m, int64_t amount)
{
	while (amount > 0 && m->n_grants > 0) {
		size_t best = 0;
		for (size_t i = 1; i < m->n_grants; i++) {
			if (m->grants[i].expires_at < m->grants[best].expires_at ||
			    (m->grants[i].expires_at == m->grants[best].expires_at &&
			     m->grants[i].order < m->grants[best].order))
				best = i;
		}
		int64_t take = min64(m->grants[best].remaining, amount);
		m->grants[best].remaining -= take;
		amount -= take;
		if (m->grants[best].remaining == 0)
			m_remove_grant(m, best);
	}
}

/* Usage that happened: what is free comes from the allowance, then credits; the rest is overage. */
static void m_debit(struct model *m, int64_t tokens)
{
	int64_t free_ = max64(m->allowance + m_credits(m) - m_held(m), 0);
	int64_t covered = min64(tokens, free_);
	int64_t from_allowance = min64(covered, m->allowance);
	m->allowance -= from_allowance;
	m_spend_credits(m, covered - from_allowance);
	m->overage += tokens - covered;
}

/* Period end: unused allowance lapses except what backs open holds, plus the rollover. */
static void m_close_period(struct model *m, bool renew)
{
	int64_t need = m_held(m) - m_credits(m);
	int64_t backing = need <= 0 ? 0 : min64(need, m->allowance);
	int64_t rollover = renew ? max64(0, min64(m->allowance - backing, m->rollover_cap)) : 0;
	m->allowance = backing + rollover;
	m->overage = 0;
	if (renew) {
		m->period_end += DAY;
		m->allowance += m->per_period;
		return;
	}
	m->active = m->paused = m->overage_ok = m->cancel_at_end = m->auto_renew = false;
	m->per_period = m->rollover_cap = m->period_end = 0;
}

/* Ledger time moves to t (never back): holds, then grants, then the period, earliest first. */
static void m_advance(struct model *m, int64_t t)
{
	t = max64(t, m->time);
	for (;;) {
		int hold = -1, grant = -1;
		int64_t when = NEVER;
		for (int r = 0; r < N_RES; r++) {
			const struct m_hold *h = &m->holds[r];
			if (h->placed && h->open && h->expires_at <= t && h->expires_at < when) {
				hold = r;
				when = h->expires_at;
			}
		}
		for (size_t i = 0; i < m->n_grants; i++) {
			if (m->grants[i].expires_at <= t && m->grants[i].expires_at < when) {
				hold = -1;
				grant = (int)i;
				when = m->grants[i].expires_at;
			}
		}
		bool period = m->active && m->period_end <= t && m->period_end < when;
		if (period)
			when = m->period_end;
		if (when == NEVER) {
			m->time = t;
			return;
		}
		m->time = max64(m->time, when);
		if (period) {
			m_close_period(m, m->auto_renew && !m->cancel_at_end);
		} else if (grant >= 0) {
			/* what backs open holds beyond the allowance and the other credits stays */
			struct m_grant *g = &m->grants[grant];
			int64_t need = m_held(m) - m->allowance - (m_credits(m) - g->remaining);
			if (need <= 0) {
				m_remove_grant(m, (size_t)grant);
			} else {
				g->remaining = min64(need, g->remaining);
				g->expires_at = m->time;
				for (int r = 0; r < N_RES; r++)
					if (m->holds[r].placed && m->holds[r].open)
						g->expires_at = max64(g->expires_at, m->holds[r].expires_at);
			}
		} else {
			m->holds[hold].open = false;
			m->holds[hold].ended_at = m->time;
		}
	}
}

/* A settle (actual tokens used) or a release (actual < 0) of reservation r: NULL or the refusal. */
static const char *m_end_hold(struct model *m, int r, int64_t actual)
{
	struct m_hold *h = m_hold(m, r);
	if (!h)
		return TLY_REASON_UNKNOWN_RESERVATION;
	if (!h->open)
		return TLY_REASON_RESERVATION_ENDED;
	h->open = false;
	h->ended_at = m->time;
	if (actual >= 0)
		m_debit(m, actual);
	return NULL;
}

/* ---- events from bytes ---------------------------------------------------------------------- */

enum op_kind { OP_START, OP_GRANT, OP_RESERVE, OP_SETTLE, OP_RELEASE, OP_DEBIT, OP_CANCEL,
	       OP_PAUSE, OP_RESUME, OP_OTHER, OP_MESSAGE, OP__COUNT };

static void make_id(tly_uuid *u, unsigned char kind, uint32_t n)
{
	memset(u, 0, sizeof(*u));
	u->b[0] = kind;
	u->b[1] = (unsigned char)(n >> 24);
	u->b[2] = (unsigned char)(n >> 16);
	u->b[3] = (unsigned char)(n >> 8);
	u->b[4] = (unsigned char)n;
	u->b[6] = 0x40; /* version 4 */
	u->b[8] = 0x80; /* RFC 4122 variant */
	u->b[15] = 1;
}

static const tly_uuid *tenant(void)
{
	static tly_uuid t;
	make_id(&t, 0x7e, 1);
	return &t;
}

/*
 * Event step from its 5 bytes (kind, time step, three arguments), applied to the model; returns
 * the model's outcome: NULL (accepted or not a decision) or the rejection reason.
 */
static const char *step(struct model *m, const uint8_t *b, size_t no, struct tly_event *ev)
{
	enum op_kind kind = (enum op_kind)(b[0] % OP__COUNT);
	int64_t base = max64(m->time, T0);
	int64_t at = b[1] == 255 ? base - HOUR : base + (b[1] % 32) * 15 * MINUTE;
	uint8_t a = b[2], x = b[3], y = b[4];
	static const enum tly_event_type types[OP__COUNT] = {
		TLY_EV_SUBSCRIPTION_STARTED, TLY_EV_CREDITS_GRANTED, TLY_EV_TOKENS_RESERVED,
		TLY_EV_RESERVATION_SETTLED, TLY_EV_RESERVATION_RELEASED, TLY_EV_TOKENS_DEBITED,
		TLY_EV_SUBSCRIPTION_CANCELLED, TLY_EV_SUBSCRIPTION_PAUSED, TLY_EV_SUBSCRIPTION_RESUMED,
		TLY_EV_CONVERSATION_STARTED, TLY_EV_MESSAGE_APPENDED};
	tly_fixture_event(ev, types[kind], (unsigned)no);
	make_id(&ev->event_id, 0xe0, (uint32_t)no);
	ev->tenant_id = *tenant();
	ev->occurred_at = at;
	tly_uuid sub;
	make_id(&sub, 0xc0, (uint32_t)(a & 1 ? m->sub_no : m->sub_no + 1000));

	m_advance(m, at);
	const char *reason = NULL;
	switch (kind) {
	case OP_START: {
		struct tly_ev_subscription_started *s = &ev->u.subscription_started;
		int no_sub = m->sub_no + 1;
		make_id(&s->subscription_id, 0xc0, (uint32_t)no_sub);
		s->terms.tokens_per_period = (a % 8) * 100;
		s->terms.interval = "day";
		s->terms.interval_count = 1;
		s->terms.overage_price_micros_per_1k_tokens = (struct tly_opt_i64){(x & 1) != 0, 2000};
		s->terms.rollover_cap_tokens = (y % 4) * 50;
		s->auto_renew = (x & 6) != 0;
		s->period_start = at;
		s->period_end = at + DAY * (1 + y / 64);
		s->trial_ends_at.set = false;
		if (m->active) {
			reason = TLY_REASON_SUBSCRIPTION_ALREADY_ACTIVE;
			break;
		}
		m->active = true;
		m->paused = m->cancel_at_end = false;
		m->sub_no = no_sub;
		m->per_period = s->terms.tokens_per_period;
		m->overage_ok = s->terms.overage_price_micros_per_1k_tokens.set;
		m->ever_overage |= m->overage_ok;
		m->rollover_cap = s->terms.rollover_cap_tokens;
		m->auto_renew = s->auto_renew;
		m->period_end = s->period_end;
		m->overage = 0;
		m->allowance += m->per_period;
		break;
	}
	case OP_GRANT: {
		struct tly_ev_credits_granted *g = &ev->u.credits_granted;
		int id = a % N_GRANT_IDS;
		make_id(&g->grant_id, 0xb0, (uint32_t)id);
		g->tokens = 1 + x * 4;
		g->expires_at = (struct tly_opt_i64){(y & 1) != 0, at + (y >> 1) % 48 * HOUR};
		bool dup = false;
		for (size_t i = 0; i < m->n_grants; i++)
			dup |= m->grants[i].id == id;
		if (dup) {
			reason = TLY_REASON_DUPLICATE_GRANT;
		} else if (g->expires_at.set && g->expires_at.v <= m->time) {
			reason = TLY_REASON_HOLD_EXPIRED_ON_ARRIVAL;
		} else {
			m->grants[m->n_grants++] = (struct m_grant){
				id, g->tokens, g->expires_at.set ? g->expires_at.v : NEVER, m->next_order++};
		}
		break;
	}
	case OP_RESERVE: {
		struct tly_ev_tokens_reserved *r = &ev->u.tokens_reserved;
		int id = a % N_RES;
		make_id(&r->reservation_id, 0xa0, (uint32_t)id);
		r->tokens = 1 + x * 4;
		r->expires_at = at + (y % 48) * 30 * MINUTE;
		int64_t credits = m_credits(m);
		if (m_hold(m, id))
			reason = TLY_REASON_DUPLICATE_RESERVATION;
		else if (r->expires_at <= m->time)
			reason = TLY_REASON_HOLD_EXPIRED_ON_ARRIVAL;
		else if (m->active && m->paused)
			reason = TLY_REASON_SUBSCRIPTION_PAUSED;
		else if (!m->active && credits == 0)
			reason = TLY_REASON_NO_ACTIVE_SUBSCRIPTION;
		else if (!(m->active && m->overage_ok) &&
			 r->tokens > m->allowance + credits - m_held(m) + m->overdraft)
			reason = TLY_REASON_INSUFFICIENT_TOKENS;
		else
			m->holds[id] = (struct m_hold){true, true, r->tokens, r->expires_at, -1};
		break;
	}
	case OP_MESSAGE:
		/* usage of a message: settles the reservation it names, else a direct debit if any */
		ev->u.message_appended.prompt_tokens = x * 4;
		ev->u.message_appended.completion_tokens = y % 16;
		ev->u.message_appended.reasoning_tokens = 0;
		memset(&ev->u.message_appended.reservation_id, 0, sizeof(tly_uuid));
		if (!(a & 1)) {
			if (x * 4 + y % 16 > 0)
				m_debit(m, x * 4 + y % 16);
			break;
		}
		make_id(&ev->u.message_appended.reservation_id, 0xa0, (uint32_t)((a >> 1) % N_RES));
		reason = m_end_hold(m, (a >> 1) % N_RES, x * 4 + y % 16);
		break;
	case OP_SETTLE:
	case OP_RELEASE: {
		int id = a % N_RES;
		int64_t actual = x * 4 + y % 16;
		if (kind == OP_SETTLE) {
			struct tly_ev_reservation_settled *s = &ev->u.reservation_settled;
			make_id(&s->reservation_id, 0xa0, (uint32_t)id);
			s->prompt_tokens = x * 4;
			s->completion_tokens = y % 16;
			s->reasoning_tokens = 0;
		} else {
			make_id(&ev->u.reservation_released.reservation_id, 0xa0, (uint32_t)id);
		}
		reason = m_end_hold(m, id, kind == OP_SETTLE ? actual : -1);
		break;
	}
	case OP_DEBIT:
		ev->u.tokens_debited.tokens = 1 + x * 4;
		m_debit(m, ev->u.tokens_debited.tokens);
		break;
	case OP_CANCEL:
		ev->u.subscription_cancelled.subscription_id = sub;
		ev->u.subscription_cancelled.at_period_end = (x & 1) != 0;
		if (!(m->active && (a & 1)))
			reason = TLY_REASON_UNKNOWN_SUBSCRIPTION;
		else if (x & 1)
			m->cancel_at_end = true;
		else
			m_close_period(m, false);
		break;
	case OP_PAUSE:
	case OP_RESUME:
		if (kind == OP_PAUSE)
			ev->u.subscription_paused.subscription_id = sub;
		else
			ev->u.subscription_resumed.subscription_id = sub;
		if (!(m->active && (a & 1)))
			reason = TLY_REASON_UNKNOWN_SUBSCRIPTION;
		else if (m->paused == (kind == OP_PAUSE))
			reason = kind == OP_PAUSE ? TLY_REASON_ALREADY_PAUSED : TLY_REASON_NOT_PAUSED;
		else
			m->paused = kind == OP_PAUSE;
		break;
	case OP_OTHER:
	case OP__COUNT:
		break;
	}
	m_advance(m, m->time);
	return reason;
}

/* ---- the runner ----------------------------------------------------------------------------- */

struct chain {
	int64_t seq;
	unsigned char hash[32];
	int64_t allowance, credits, held, overage; /* the last entry's balances after */
	bool hold_open[N_RES];
};

#define FAIL(...) do { snprintf(why, whylen, __VA_ARGS__); goto fail; } while (0)

/* The entries of one step against the chain so far and the model's outcome. */
static int check_entries(struct tly_codec *codec, const struct tly_entries *out, struct chain *ch,
			 const struct model *m, const char *reason, char *why, size_t whylen)
{
	size_t rejected = 0;
	const char *got_reason = NULL;
	for (size_t i = 0; i < out->n; i++) {
		const struct tly_ledger_entry *e = &out->items[i].u.ledger_entry;
		unsigned char h[32];
		if (e->seq != ch->seq + 1)
			FAIL("entry %s has seq %" PRId64 " after %" PRId64, e->kind, e->seq, ch->seq);
		if (memcmp(e->prev_hash, ch->hash, 32) != 0)
			FAIL("entry %" PRId64 " does not chain to the previous hash", e->seq);
		if (tly_ledger_entry_hash(codec, &out->items[i], h) != 0 || memcmp(h, e->hash, 32) != 0)
			FAIL("entry %" PRId64 " hash does not verify", e->seq);
		if (e->allowance_remaining != ch->allowance + e->allowance_delta ||
		    e->credits_remaining != ch->credits + e->credits_delta ||
		    e->held != ch->held + e->held_delta ||
		    e->overage_tokens != ch->overage + e->overage_delta)
			FAIL("entry %" PRId64 " (%s): balances after (A %" PRId64 " C %" PRId64 " H %" PRId64
			     " overage %" PRId64 ") are not the ones before (%" PRId64 " %" PRId64 " %" PRId64
			     " %" PRId64 ") plus its deltas (%" PRId64 " %" PRId64 " %" PRId64 " %" PRId64 ")",
			     e->seq, e->kind, e->allowance_remaining, e->credits_remaining, e->held,
			     e->overage_tokens, ch->allowance, ch->credits, ch->held, ch->overage,
			     e->allowance_delta, e->credits_delta, e->held_delta, e->overage_delta);
		if (!m->ever_overage &&
		    e->allowance_remaining + e->credits_remaining - e->held < -m->overdraft)
			FAIL("entry %" PRId64 " (%s): available %" PRId64 " below the overdraft limit %" PRId64,
			     e->seq, e->kind, e->allowance_remaining + e->credits_remaining - e->held,
			     -m->overdraft);
		bool placed = strcmp(e->kind, TLY_KIND_HOLD_PLACED) == 0;
		bool ended = strcmp(e->kind, TLY_KIND_HOLD_RELEASED) == 0 ||
			     strcmp(e->kind, TLY_KIND_HOLD_EXPIRED) == 0;
		if (placed || ended) {
			int r = e->ref_id.b[4];
			if (e->ref_id.b[0] != 0xa0 || r >= N_RES)
				FAIL("entry %" PRId64 " (%s) names no reservation", e->seq, e->kind);
			if (placed == ch->hold_open[r])
				FAIL("entry %" PRId64 ": reservation %d %s while %s", e->seq, r, e->kind,
				     placed ? "open" : "not open");
			ch->hold_open[r] = placed;
		}
		if (strcmp(e->kind, TLY_KIND_REJECTED) == 0) {
			rejected++;
			got_reason = e->reason;
		}
		ch->seq = e->seq;
		memcpy(ch->hash, e->hash, 32);
		ch->allowance = e->allowance_remaining;
		ch->credits = e->credits_remaining;
		ch->held = e->held;
		ch->overage = e->overage_tokens;
	}
	if (rejected > 1 || (reason && (!got_reason || strcmp(reason, got_reason) != 0)) ||
	    (!reason && got_reason))
		FAIL("outcome: model %s, core %s (%zu rejections)", reason ? reason : "accepted",
		     got_reason ? got_reason : "accepted", rejected);
	return 0;
fail:
	return -1;
}

static int check_balance(const struct tly_wallet *w, const struct model *m, char *why, size_t whylen)
{
	struct tly_balance b;
	tly_wallet_balance(w, &b);
	int64_t open = 0;
	for (int r = 0; r < N_RES; r++)
		open += m->holds[r].placed && m->holds[r].open;
	if (b.allowance_remaining != m->allowance || b.credits_remaining != m_credits(m) ||
	    b.held != m_held(m) || b.overage_tokens != m->overage || b.ledger_time != m->time ||
	    b.has_subscription != m->active || b.paused != (m->active && m->paused) ||
	    b.open_holds != open || (m->active && b.period_end != m->period_end))
		FAIL("core A=%" PRId64 " C=%" PRId64 " H=%" PRId64 " overage=%" PRId64 " holds=%" PRId64
		     " sub=%d paused=%d time=%" PRId64 " end=%" PRId64 "; model A=%" PRId64 " C=%" PRId64
		     " H=%" PRId64 " overage=%" PRId64 " holds=%" PRId64 " sub=%d paused=%d time=%" PRId64
		     " end=%" PRId64,
		     b.allowance_remaining, b.credits_remaining, b.held, b.overage_tokens, b.open_holds,
		     b.has_subscription, b.paused, b.ledger_time, b.period_end, m->allowance,
		     m_credits(m), m_held(m), m->overage, open, m->active, m->paused, m->time,
		     m->period_end);
	return 0;
fail:
	return -1;
}

int tly_model_run(struct tly_codec *codec, const uint8_t *ops, size_t n, char *why, size_t whylen)
{
	char err[512], inner[1024];
	int rc = -1;
	struct model m = {0};
	struct chain ch = {0};
	struct tly_entries out = {0};
	struct tly_event ev;
	struct tly_wallet *w = tly_wallet_new(tenant());
	if (!w || n == 0) {
		snprintf(why, whylen, n ? "out of memory" : "no input");
		tly_wallet_free(w);
		return n ? -1 : 0;
	}
	m.overdraft = (ops[0] % 3) * 50;
	struct tly_ledger_config cfg = {m.overdraft, codec};
	size_t steps = (n - 1) / TLY_MODEL_OP_BYTES;
	for (size_t i = 0; i < steps; i++) {
		const uint8_t *b = ops + 1 + i * TLY_MODEL_OP_BYTES;
		if (b[0] % OP__COUNT == OP_OTHER && (b[2] & 1)) {
			/* a snapshot round trip: the reloaded wallet is the same wallet */
			char *json = tly_wallet_to_json(w, true);
			struct tly_wallet *back = json ? tly_wallet_from_json(json, err, sizeof(err)) : NULL;
			free(json);
			if (!back) {
				snprintf(why, whylen, "step %zu: could not reload the snapshot: %s", i, err);
				goto out;
			}
			tly_wallet_free(w);
			w = back;
		}
		const char *reason = step(&m, b, i, &ev);
		struct tly_cause cause = {.event_id = ev.event_id,
					  .type = tly_event_desc(ev.type)->name,
					  .partition = 0,
					  .offset = (int64_t)i};
		tly_entries_clear(&out);
		if (tly_ledger_apply(&cfg, w, &ev, &cause, NULL, &out, err, sizeof(err)) != 0) {
			snprintf(why, whylen, "step %zu (%s): apply failed: %s", i, cause.type, err);
			goto out;
		}
		if (check_entries(codec, &out, &ch, &m, reason, inner, sizeof(inner)) != 0 ||
		    check_balance(w, &m, inner, sizeof(inner)) != 0) {
			snprintf(why, whylen, "step %zu (%s at +%" PRId64 " min): %s", i, cause.type,
				 (ev.occurred_at - T0) / MINUTE, inner);
			goto out;
		}
	}
	rc = 0;
out:
	tly_entries_free(&out);
	tly_wallet_free(w);
	return rc;
}
