/* The projection fold in memory: inputs folded into structs, final rows sent by binary COPY. */
#include "memfold.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "arena.h"
#include "fold.h"
#include "pgcopy.h"
#include "uuidmap.h"

#define DAY_US INT64_C(86400000000)

struct opt {
	bool set;
	int64_t v;
};

struct tenant {
	tly_uuid id;
	const char *slug, *name;
	int64_t created, updated;
};

struct user {
	tly_uuid id, tenant;
	const char *external_id, *username, *display_name, *email;
	int64_t created, updated;
};

struct sub {
	tly_uuid id, tenant;
	const char *plan_code, *status, *billing_email, *currency, *metered_prices, *metadata;
	bool auto_renew, cancel_at_period_end;
	int64_t starts_at, cps, cpe, price_cents, tokens_per_period, rollover, created, updated;
	struct opt trial_ends_at, cancel_at, overage_price;
	int32_t seat_count;
	bool started; /* from a SubscriptionStarted, not a ledger placeholder */
};

struct conv {
	tly_uuid id, tenant, user;
	const char *entrypoint, *active_agent, *status, *source_channel, *topic_hint;
	int32_t message_count, handoff_count;
	int64_t prompt, completion, reasoning, cost, created, updated;
	struct opt last_message_at;
	bool started;
};

struct message {
	tly_uuid message_id, tenant, conversation, user, reservation;
	int32_t position;
	const char *role, *agent_type, *content, *tool_name, *tool_call_id, *provider, *model;
	int64_t prompt, completion, reasoning, latency_ms, cost, at;
	char checksum[2 * 32 + 1];
};

struct usage {
	tly_uuid id, tenant, sub;
	const char *feature_key, *unit, *external_event_id;
	int64_t quantity, at;
	uint64_t ord; /* feed order: the first report of an external event id wins */
};

struct balance {
	tly_uuid tenant, sub; /* sub nil: credits held without a subscription */
	int64_t used, allowance, credits, held, overage, seq, at;
	struct opt ps, pe;
	int64_t api_cost;
};

struct api_day {
	tly_uuid tenant;
	const char *provider, *model;
	int32_t day; /* UTC days since 1970 */
	int64_t prompt, completion, reasoning, cost, count, updated;
	struct api_day *next_of_tenant;
};

struct invoice {
	tly_uuid id, tenant, sub;
	int64_t seq, ps, pe, amount, overage, at;
	const char *currency, *lines;
};

struct invoice_status {
	tly_uuid id, tenant;
	const char *status, *external_id, *url;
	int64_t at;
};

struct period {
	tly_uuid event_id;
	int64_t ps, pe;
};

struct key2 {
	tly_uuid a, b;
};

struct applied {
	tly_uuid tenant;
	int64_t seq;
};

/* One table of fold.c's list; the index in tly_fold_tables of each. */
enum {
	T_TENANTS, T_USERS, T_CONVS, T_MESSAGES, T_PLANS, T_FEATURES, T_SUBS, T_INVOICES, T_USAGE,
	T_BALANCES, T_API, T_SEEN, T_APPLIED, T_CALLS, T_INV_STATUS, T_PERIODS, N_T
};

struct tly_memfold {
	struct tly_arena *arena; /* owns every row and string */
	struct tly_uuidmap *map[N_T];   /* each table's rows by key */
	struct tly_uuidmap *plans;      /* code hash -> plan id */
	struct tly_uuidmap *usage_ext;  /* (tenant, hash of external_event_id) -> the usage row kept */
	struct tly_uuidmap *tenant_api; /* tenant -> its first api_day */
	EVP_MD_CTX *md;                 /* owned */
	bool entries_started;
	bool finished;                  /* tly_memfold_finish ran: the fold takes no more input */
	struct {
		struct tly_pgcopy *c;       /* borrowed; NULL: the table is not streamed */
		tly_memfold_added_fn *added;
		void *ud;
	} stream[N_T];                  /* tables streamed as they are folded (tly_memfold_stream) */
	bool oom;
};

static const tly_uuid NIL;

/* SHA-256 of up to three parts into md, with ctx; false (and *fail set) on failure. */
static bool digest(EVP_MD_CTX *ctx, bool *fail, const void *a, size_t alen, const void *b, size_t blen,
		   const void *c, size_t clen, unsigned char md[32])
{
	bool ok = EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 && EVP_DigestUpdate(ctx, a, alen) == 1 &&
		  (!b || EVP_DigestUpdate(ctx, b, blen) == 1) && (!c || EVP_DigestUpdate(ctx, c, clen) == 1) &&
		  EVP_DigestFinal_ex(ctx, md, NULL) == 1;
	if (!ok)
		*fail = true;
	return ok;
}

/* Strings as a 16-byte key (SHA-256, truncated: collisions are not a concern at 128 bits). */
static tly_uuid str_key(EVP_MD_CTX *ctx, bool *fail, const char *a, const char *b, int32_t n)
{
	unsigned char md[32] = {0};
	tly_uuid k;
	digest(ctx, fail, a, strlen(a) + 1, b, b ? strlen(b) + 1 : 0, &n, sizeof(n), md);
	memcpy(k.b, md, sizeof(k.b));
	return k;
}

struct tly_memfold *tly_memfold_new(void)
{
	struct tly_memfold *mf = calloc(1, sizeof(*mf));
	if (!mf)
		return NULL;
	bool ok = (mf->arena = tly_arena_new()) && (mf->plans = tly_uuidmap_new()) &&
		  (mf->usage_ext = tly_uuidmap_new()) && (mf->tenant_api = tly_uuidmap_new()) && (mf->md = EVP_MD_CTX_new());
	for (int t = 0; ok && t < N_T; t++)
		ok = (mf->map[t] = tly_uuidmap_new()) != NULL;
	if (!ok) {
		tly_memfold_free(mf);
		return NULL;
	}
	return mf;
}

void tly_memfold_free(struct tly_memfold *mf)
{
	if (!mf)
		return;
	for (int t = 0; t < N_T; t++)
		tly_uuidmap_free(mf->map[t]);
	tly_uuidmap_free(mf->plans);
	tly_uuidmap_free(mf->usage_ext);
	tly_uuidmap_free(mf->tenant_api);
	tly_arena_free(mf->arena);
	EVP_MD_CTX_free(mf->md);
	free(mf);
}

static void *alloc(struct tly_memfold *mf, size_t size)
{
	void *p = tly_arena_alloc(mf->arena, size);
	if (!p)
		mf->oom = true;
	else
		memset(p, 0, size);
	return p;
}

/* A copy of s in the arena (NULL stays NULL). */
static const char *sdup(struct tly_memfold *mf, const char *s)
{
	if (!s)
		return NULL;
	char *d = tly_arena_strndup(mf->arena, s, strlen(s));
	if (!d)
		mf->oom = true;
	return d;
}

static void put(struct tly_memfold *mf, int t, const tly_uuid *a, const tly_uuid *b, void *row)
{
	if (row && tly_uuidmap_put(mf->map[t], a, b, row) != 0)
		mf->oom = true;
}

int tly_memfold_plan(struct tly_memfold *mf, const char *code, const tly_uuid *plan_id)
{
	tly_uuid k = str_key(mf->md, &mf->oom, code, NULL, 0);
	tly_uuid *id = alloc(mf, sizeof(*id));
	if (id)
		*id = *plan_id;
	if (id && tly_uuidmap_put(mf->plans, &k, NULL, id) != 0)
		mf->oom = true;
	return mf->oom ? TLY_E_NOMEM : 0;
}

static struct opt opt_of(struct tly_opt_i64 o)
{
	return (struct opt){o.set, o.v};
}

/* A map or record-list field as JSON text in the arena; empty ones as "{}" / "[]". */
static const char *json_field(struct tly_memfold *mf, const struct tly_event *ev, const char *name,
			      size_t items, const char *empty)
{
	if (items == 0)
		return empty;
	char *text = tly_fold_field_json(ev, name);
	if (!text) {
		mf->oom = true;
		return NULL;
	}
	const char *d = sdup(mf, text);
	free(text);
	return d;
}

static void ensure_tenant(struct tly_memfold *mf, const tly_uuid *id, int64_t at)
{
	if (tly_uuid_is_nil(id))
		return;
	struct tenant *t = tly_uuidmap_get(mf->map[T_TENANTS], id, NULL);
	if (t) {
		/* a placeholder: the earliest reference among the events (entries come later) */
		if (!t->slug[0] && !mf->entries_started && at < t->created)
			t->created = t->updated = at;
		return;
	}
	if (!(t = alloc(mf, sizeof(*t))))
		return;
	*t = (struct tenant){*id, "", "", at, at};
	put(mf, T_TENANTS, id, NULL, t);
}

/* The conversation a message, handoff or close names; a placeholder when it is not started. */
static struct conv *conv_ref(struct tly_memfold *mf, const tly_uuid *id, const tly_uuid *tenant, int64_t at)
{
	struct conv *c = tly_uuidmap_get(mf->map[T_CONVS], id, NULL);
	if (c && !c->started && at < c->created)
		c->created = at; /* a placeholder: the earliest reference */
	if (c || !(c = alloc(mf, sizeof(*c))))
		return c;
	c->id = *id;
	c->tenant = *tenant;
	c->entrypoint = "";
	c->status = "active";
	c->created = c->updated = at;
	put(mf, T_CONVS, id, NULL, c);
	return c;
}

static int64_t max64(int64_t a, int64_t b)
{
	return a > b ? a : b;
}

static void sub_terms(struct tly_memfold *mf, struct sub *s, const struct tly_plan_terms *t,
		      const struct tly_event *ev)
{
	s->plan_code = sdup(mf, t->plan_code);
	s->price_cents = t->price_cents;
	s->currency = sdup(mf, t->currency);
	s->tokens_per_period = t->tokens_per_period;
	s->overage_price = opt_of(t->overage_price_micros_per_1k_tokens);
	s->rollover = t->rollover_cap_tokens;
	s->metered_prices = json_field(mf, ev, "metered_prices", t->metered_prices.n, "{}");
}

static void api_call(struct tly_memfold *mf, const struct tly_event *ev, const tly_uuid *call,
		     const char *provider, const char *model, int64_t p, int64_t co, int64_t r,
		     int64_t cost)
{
	if (!(p + co + r > 0 || cost > 0) || tly_uuidmap_get(mf->map[T_CALLS], &ev->tenant_id, call))
		return;
	struct key2 *k = alloc(mf, sizeof(*k));
	if (!k)
		return;
	*k = (struct key2){ev->tenant_id, *call};
	put(mf, T_CALLS, &k->a, &k->b, k);
	int64_t at = ev->occurred_at;
	int32_t day = (int32_t)((at >= 0 ? at : at - DAY_US + 1) / DAY_US);
	tly_uuid dk = str_key(mf->md, &mf->oom, provider, model, day);
	struct api_day *d = tly_uuidmap_get(mf->map[T_API], &ev->tenant_id, &dk);
	if (!d) {
		if (!(d = alloc(mf, sizeof(*d))))
			return;
		d->tenant = ev->tenant_id;
		d->provider = sdup(mf, provider);
		d->model = sdup(mf, model);
		d->day = day;
		d->updated = at;
		put(mf, T_API, &ev->tenant_id, &dk, d);
		d->next_of_tenant = tly_uuidmap_get(mf->tenant_api, &ev->tenant_id, NULL);
		if (tly_uuidmap_put(mf->tenant_api, &ev->tenant_id, NULL, d) != 0)
			mf->oom = true;
	}
	d->prompt += p;
	d->completion += co;
	d->reasoning += r;
	d->cost += cost;
	d->count++;
	d->updated = max64(d->updated, at);
}

static void row_of(const struct tly_memfold *mf, int t, const void *row, struct tly_pgcopy *c,
		   EVP_MD_CTX *ctx, bool *fail);

/* A new row of table t: into its stream, if it has one (tly_memfold_stream). */
static void streamed(struct tly_memfold *mf, int t, const void *row)
{
	if (!mf->stream[t].c)
		return;
	row_of(mf, t, row, mf->stream[t].c, mf->md, &mf->oom);
	mf->stream[t].added(mf->stream[t].ud, mf->stream[t].c);
}

static void add_event(struct tly_memfold *mf, const struct tly_event *ev)
{
	int64_t at = ev->occurred_at;
	const tly_uuid *tenant = &ev->tenant_id;
	if (ev->type == TLY_EV_PLAN_PUBLISHED) {
		const struct tly_ev_plan_published *p = &ev->u.plan_published;
		if (tly_memfold_plan(mf, p->code, &p->plan_id) != 0)
			mf->oom = true;
		return; /* the plan's rows, and its event id, are fold.c's (see memfold.h) */
	}
	if (!tly_fold_keeps_event_id(ev->type)) {
		ensure_tenant(mf, tenant, at); /* the wallet's events: their entries do the rest */
		return;
	}
	if (tly_uuidmap_get(mf->map[T_SEEN], tenant, &ev->event_id))
		return; /* seen before: folded once */
	struct key2 *seen = alloc(mf, sizeof(*seen));
	if (!seen)
		return;
	*seen = (struct key2){*tenant, ev->event_id};
	put(mf, T_SEEN, &seen->a, &seen->b, seen);
	streamed(mf, T_SEEN, seen);
	ensure_tenant(mf, tenant, at);

	switch (ev->type) {
	case TLY_EV_TENANT_CREATED: {
		struct tenant *t = tly_uuidmap_get(mf->map[T_TENANTS], tenant, NULL);
		if (t) {
			t->slug = sdup(mf, ev->u.tenant_created.slug);
			t->name = sdup(mf, ev->u.tenant_created.name);
			t->created = t->updated = at;
		}
		break;
	}
	case TLY_EV_USER_REGISTERED: {
		const struct tly_ev_user_registered *e = &ev->u.user_registered;
		struct user *u = tly_uuidmap_get(mf->map[T_USERS], &e->user_id, NULL);
		if (!u) {
			if (!(u = alloc(mf, sizeof(*u))))
				break;
			u->id = e->user_id;
			u->tenant = *tenant;
			u->created = u->updated = at;
			put(mf, T_USERS, &u->id, NULL, u);
		}
		u->external_id = sdup(mf, e->external_id);
		u->username = sdup(mf, e->username);
		u->display_name = sdup(mf, e->display_name);
		u->email = sdup(mf, e->email);
		u->created = at < u->created ? at : u->created;
		u->updated = max64(u->updated, at);
		break;
	}
	case TLY_EV_SUBSCRIPTION_STARTED: {
		const struct tly_ev_subscription_started *e = &ev->u.subscription_started;
		if (tly_uuidmap_get(mf->map[T_SUBS], &e->subscription_id, NULL))
			break; /* the first start of a subscription wins */
		struct sub *s = alloc(mf, sizeof(*s));
		if (!s)
			break;
		s->id = e->subscription_id;
		s->tenant = *tenant;
		sub_terms(mf, s, &e->terms, ev);
		s->status = "pending";
		s->auto_renew = e->auto_renew;
		s->billing_email = sdup(mf, e->billing_email);
		s->starts_at = s->cps = e->period_start;
		s->cpe = e->period_end;
		s->trial_ends_at = opt_of(e->trial_ends_at);
		s->seat_count = e->seat_count;
		s->metadata = json_field(mf, ev, "metadata", e->metadata.n, "{}");
		s->created = s->updated = at;
		s->started = true;
		put(mf, T_SUBS, &s->id, NULL, s);
		break;
	}
	case TLY_EV_SUBSCRIPTION_CHANGED: {
		const struct tly_ev_subscription_changed *e = &ev->u.subscription_changed;
		struct sub *s = tly_uuidmap_get(mf->map[T_SUBS], &e->subscription_id, NULL);
		if (!s || memcmp(&s->tenant, tenant, sizeof(*tenant)) != 0)
			break;
		sub_terms(mf, s, &e->terms, ev);
		s->seat_count = e->seat_count;
		s->updated = max64(s->updated, at);
		break;
	}
	case TLY_EV_CONVERSATION_STARTED: {
		const struct tly_ev_conversation_started *e = &ev->u.conversation_started;
		struct conv *c = conv_ref(mf, &e->conversation_id, tenant, at);
		if (!c || c->started)
			break; /* the first start of a conversation wins */
		c->started = true;
		c->user = e->user_id;
		c->entrypoint = sdup(mf, e->agent_entrypoint);
		if (!c->active_agent)
			c->active_agent = c->entrypoint;
		c->source_channel = sdup(mf, e->source_channel);
		c->topic_hint = sdup(mf, e->topic_hint);
		c->created = at;
		c->updated = max64(c->updated, at);
		break;
	}
	case TLY_EV_MESSAGE_APPENDED: {
		const struct tly_ev_message_appended *e = &ev->u.message_appended;
		struct conv *c = conv_ref(mf, &e->conversation_id, tenant, at);
		api_call(mf, ev, tly_uuid_is_nil(&e->reservation_id) ? &e->message_id : &e->reservation_id,
			 e->provider, e->model, e->prompt_tokens, e->completion_tokens,
			 e->reasoning_tokens, e->cost_micros);
		if (!c || tly_uuidmap_get(mf->map[T_MESSAGES], &e->message_id, NULL))
			break; /* one row per message id */
		struct message *m = alloc(mf, sizeof(*m));
		if (!m)
			break;
		m->message_id = e->message_id;
		m->tenant = *tenant;
		m->conversation = e->conversation_id;
		m->user = e->user_id;
		m->reservation = e->reservation_id;
		m->position = c->message_count;
		m->role = sdup(mf, e->role);
		m->agent_type = sdup(mf, e->agent_type);
		m->content = sdup(mf, e->content);
		m->tool_name = sdup(mf, e->tool_name);
		m->tool_call_id = sdup(mf, e->tool_call_id);
		m->provider = sdup(mf, e->provider);
		m->model = sdup(mf, e->model);
		m->prompt = e->prompt_tokens;
		m->completion = e->completion_tokens;
		m->reasoning = e->reasoning_tokens;
		m->latency_ms = e->latency_ms;
		m->cost = e->cost_micros;
		m->at = at;
		unsigned char md[32] = {0};
		digest(mf->md, &mf->oom, e->content, strlen(e->content), NULL, 0, NULL, 0, md);
		static const char hex[] = "0123456789abcdef"; /* lower case, as fold.c's encode(…, 'hex') */
		for (int i = 0; i < 32; i++) {
			m->checksum[2 * i] = hex[md[i] >> 4];
			m->checksum[2 * i + 1] = hex[md[i] & 15];
		}
		m->checksum[64] = '\0';
		put(mf, T_MESSAGES, &m->message_id, NULL, m);
		streamed(mf, T_MESSAGES, m);
		c->message_count++;
		c->prompt += m->prompt;
		c->completion += m->completion;
		c->reasoning += m->reasoning;
		c->cost += m->cost;
		c->last_message_at.v = c->last_message_at.set ? max64(c->last_message_at.v, at) : at;
		c->last_message_at.set = true;
		c->updated = max64(c->updated, at);
		break;
	}
	case TLY_EV_RESERVATION_SETTLED: {
		const struct tly_ev_reservation_settled *e = &ev->u.reservation_settled;
		api_call(mf, ev, &e->reservation_id, e->provider, e->model, e->prompt_tokens,
			 e->completion_tokens, e->reasoning_tokens, e->cost_micros);
		break;
	}
	case TLY_EV_AGENT_HANDOFF: {
		struct conv *c = conv_ref(mf, &ev->u.agent_handoff.conversation_id, tenant, at);
		if (c) {
			c->handoff_count++;
			c->active_agent = sdup(mf, ev->u.agent_handoff.to_agent);
			c->updated = max64(c->updated, at);
		}
		break;
	}
	case TLY_EV_CONVERSATION_CLOSED: {
		struct conv *c = conv_ref(mf, &ev->u.conversation_closed.conversation_id, tenant, at);
		if (c) {
			c->status = sdup(mf, ev->u.conversation_closed.status);
			c->updated = max64(c->updated, at);
		}
		break;
	}
	case TLY_EV_USAGE_REPORTED: {
		/* a candidate: its subscription may be named later (usage_winners) */
		const struct tly_ev_usage_reported *e = &ev->u.usage_reported;
		struct usage *u = alloc(mf, sizeof(*u));
		if (!u)
			break;
		*u = (struct usage){ev->event_id, *tenant, e->subscription_id, sdup(mf, e->feature_key),
				    sdup(mf, e->unit), sdup(mf, e->external_event_id), e->quantity, at,
				    tly_uuidmap_count(mf->map[T_SEEN])};
		put(mf, T_USAGE, &u->id, NULL, u);
		break;
	}
	case TLY_EV_INVOICE_STATUS_CHANGED: {
		const struct tly_ev_invoice_status_changed *e = &ev->u.invoice_status_changed;
		struct invoice_status *st = tly_uuidmap_get(mf->map[T_INV_STATUS], &e->invoice_id, NULL);
		if (!st) {
			if (!(st = alloc(mf, sizeof(*st))))
				break;
			st->id = e->invoice_id;
			st->tenant = *tenant;
			put(mf, T_INV_STATUS, &st->id, NULL, st);
		} else if (memcmp(&st->tenant, tenant, sizeof(*tenant)) != 0) {
			break;
		}
		st->status = sdup(mf, e->status);
		if (e->external_invoice_id)
			st->external_id = sdup(mf, e->external_invoice_id);
		if (e->hosted_invoice_url)
			st->url = sdup(mf, e->hosted_invoice_url);
		st->at = at;
		break;
	}
	default:
		break; /* the wallet's events reach the projections through the ledger's entries */
	}
}

static bool kind_is(const struct tly_ledger_entry *e, const char *kind)
{
	return strcmp(e->kind, kind) == 0;
}

static void add_entry(struct tly_memfold *mf, const struct tly_event *ev)
{
	const struct tly_ledger_entry *e = &ev->u.ledger_entry;
	const tly_uuid *tenant = &ev->tenant_id;
	int64_t at = e->ledger_time;
	struct applied *a = tly_uuidmap_get(mf->map[T_APPLIED], tenant, NULL);
	if (a && e->seq <= a->seq)
		return; /* folded before (the ledger republishes) */
	if (!a) {
		if (!(a = alloc(mf, sizeof(*a))))
			return;
		a->tenant = *tenant;
		put(mf, T_APPLIED, tenant, NULL, a);
	}
	a->seq = e->seq;
	ensure_tenant(mf, tenant, at);

	bool period = e->period_start.set && e->period_end.set;
	struct sub *s = NULL;
	if (!tly_uuid_is_nil(&e->subscription_id) && period &&
	    !tly_uuidmap_get(mf->map[T_SUBS], &e->subscription_id, NULL) && (s = alloc(mf, sizeof(*s)))) {
		/* a placeholder the subscription's event completes */
		s->id = e->subscription_id;
		s->tenant = *tenant;
		s->plan_code = "";
		s->status = "pending";
		s->currency = "XXX";
		s->metered_prices = s->metadata = "{}";
		s->auto_renew = true;
		s->seat_count = 1;
		s->starts_at = s->cps = e->period_start.v;
		s->cpe = e->period_end.v;
		s->created = s->updated = at;
		put(mf, T_SUBS, &s->id, NULL, s);
	}
	s = tly_uuidmap_get(mf->map[T_SUBS], &e->ref_id, NULL);
	if (s && memcmp(&s->tenant, tenant, sizeof(*tenant)) != 0)
		s = NULL;
	bool started = kind_is(e, "subscription_started"), ended = kind_is(e, "subscription_ended");
	if (s && (started || ended || kind_is(e, "subscription_paused") ||
		  kind_is(e, "subscription_resumed"))) {
		s->status = ended ? "cancelled" : kind_is(e, "subscription_paused") ? "paused" : "active";
		s->updated = max64(s->updated, at);
	}
	bool reset = started || kind_is(e, "period_opened");
	if (s && reset && period) {
		s->cps = e->period_start.v;
		s->cpe = e->period_end.v;
		s->updated = max64(s->updated, at);
	}
	if (s && kind_is(e, "subscription_cancelled")) {
		s->cancel_at_period_end = true;
		s->cancel_at = opt_of(e->period_end);
		s->updated = max64(s->updated, at);
	}
	if (s && ended && !s->cancel_at.set)
		s->cancel_at = (struct opt){true, at};

	if (kind_is(e, "usage_recorded") && period &&
	    !tly_uuidmap_get(mf->map[T_PERIODS], &e->cause_event_id, NULL)) {
		struct period *p = alloc(mf, sizeof(*p));
		if (p) {
			*p = (struct period){e->cause_event_id, e->period_start.v, e->period_end.v};
			put(mf, T_PERIODS, &p->event_id, NULL, p);
		}
	}

	if (kind_is(e, "invoice") && !tly_uuidmap_get(mf->map[T_INVOICES], &e->ref_id, NULL)) {
		struct invoice *inv = alloc(mf, sizeof(*inv));
		if (inv) {
			*inv = (struct invoice){e->ref_id, *tenant, e->subscription_id, e->seq,
						e->period_start.v, e->period_end.v, e->amount_cents.v,
						-e->overage_delta, at, sdup(mf, e->currency),
						json_field(mf, ev, "lines", e->lines.n, "[]")};
			put(mf, T_INVOICES, &inv->id, NULL, inv);
		}
	}

	/* the wallet after this entry, per (tenant, subscription) */
	const tly_uuid *bsub = !tly_uuid_is_nil(&e->subscription_id) ? &e->subscription_id
			       : ended ? &e->ref_id : &NIL;
	struct balance *b = tly_uuidmap_get(mf->map[T_BALANCES], tenant, bsub);
	if (!b) {
		if (!(b = alloc(mf, sizeof(*b))))
			return;
		b->tenant = *tenant;
		b->sub = *bsub;
		put(mf, T_BALANCES, &b->tenant, &b->sub, b);
	}
	if (reset)
		b->used = 0;
	else if (kind_is(e, "debit"))
		b->used += e->overage_delta - e->allowance_delta - e->credits_delta;
	b->allowance = e->allowance_remaining;
	b->credits = e->credits_remaining;
	b->held = e->held;
	b->overage = e->overage_tokens;
	b->ps = opt_of(e->period_start);
	b->pe = opt_of(e->period_end);
	b->seq = e->seq;
	b->at = at;
}

int tly_memfold_add(struct tly_memfold *mf, const struct tly_event *ev)
{
	if (mf->finished)
		return TLY_E_INVALID;
	if (ev->type == TLY_EV_CLOCK_TICK || !tly_event_desc(ev->type))
		return 0;
	if (ev->type == TLY_EV_LEDGER_ENTRY) {
		mf->entries_started = true;
		add_entry(mf, ev);
	} else if (mf->entries_started) {
		return TLY_E_INVALID;
	} else {
		add_event(mf, ev);
	}
	return mf->oom ? TLY_E_NOMEM : 0;
}

size_t tly_memfold_rows(const struct tly_memfold *mf)
{
	size_t n = 0;
	for (int t = 0; t < N_T; t++)
		n += tly_uuidmap_count(mf->map[t]);
	return n;
}

static void opt_ts(struct tly_pgcopy *c, struct opt o)
{
	if (o.set)
		tly_pgcopy_timestamptz(c, o.v);
	else
		tly_pgcopy_null(c);
}

static void opt_uuid(struct tly_pgcopy *c, const tly_uuid *u)
{
	if (tly_uuid_is_nil(u))
		tly_pgcopy_null(c);
	else
		tly_pgcopy_uuid(c, u);
}

/*
 * Usage rows: per (tenant, external event id) the first report (feed order) whose subscription
 * exists, for the tenant, once every input is in (as fold.c, which joins the subscriptions after
 * folding its batch's). Into usage_ext.
 */
static void usage_winners(struct tly_memfold *mf)
{
	const struct tly_uuidmap *map = mf->map[T_USAGE];
	tly_uuidmap_clear(mf->usage_ext);
	for (size_t i = 0; i < tly_uuidmap_capacity(map); i++) {
		struct usage *u = tly_uuidmap_slot(map, i);
		const struct sub *s = u ? tly_uuidmap_get(mf->map[T_SUBS], &u->sub, NULL) : NULL;
		if (!s || memcmp(&s->tenant, &u->tenant, sizeof(u->tenant)) != 0)
			continue;
		tly_uuid ek = str_key(mf->md, &mf->oom, u->external_event_id, NULL, 0);
		const struct usage *w = tly_uuidmap_get(mf->usage_ext, &u->tenant, &ek);
		if ((!w || u->ord < w->ord) && tly_uuidmap_put(mf->usage_ext, &u->tenant, &ek, u) != 0)
			mf->oom = true;
	}
}

/*
 * One row of table t (a row of mf->map[t]) in the column order of COPY_COLUMNS[t], or nothing
 * when the row is not written; reads mf only (string keys are hashed with ctx, *fail set if that
 * fails).
 */
static void row_of(const struct tly_memfold *mf, int t, const void *row, struct tly_pgcopy *c,
		   EVP_MD_CTX *ctx, bool *fail)
{
	switch (t) {
	case T_TENANTS: {
		const struct tenant *r = row;
		tly_pgcopy_row(c, 5);
		tly_pgcopy_uuid(c, &r->id);
		tly_pgcopy_text(c, r->slug);
		tly_pgcopy_text(c, r->name);
		tly_pgcopy_timestamptz(c, r->created);
		tly_pgcopy_timestamptz(c, r->updated);
		break;
	}
	case T_USERS: {
		const struct user *r = row;
		tly_pgcopy_row(c, 8);
		tly_pgcopy_uuid(c, &r->id);
		tly_pgcopy_uuid(c, &r->tenant);
		tly_pgcopy_text(c, r->external_id);
		tly_pgcopy_text(c, r->username);
		tly_pgcopy_text(c, r->display_name);
		tly_pgcopy_text(c, r->email);
		tly_pgcopy_timestamptz(c, r->created);
		tly_pgcopy_timestamptz(c, r->updated);
		break;
	}
	case T_CONVS: {
		const struct conv *r = row;
		bool user = !tly_uuid_is_nil(&r->user) &&
			    tly_uuidmap_get(mf->map[T_USERS], &r->user, NULL) != NULL;
		tly_pgcopy_row(c, 17);
		tly_pgcopy_uuid(c, &r->id);
		tly_pgcopy_uuid(c, &r->tenant);
		if (user)
			tly_pgcopy_uuid(c, &r->user);
		else
			tly_pgcopy_null(c);
		tly_pgcopy_text(c, r->entrypoint);
		tly_pgcopy_text(c, r->active_agent);
		tly_pgcopy_text(c, r->status);
		tly_pgcopy_int4(c, r->message_count);
		tly_pgcopy_int8(c, r->prompt);
		tly_pgcopy_int8(c, r->completion);
		tly_pgcopy_int8(c, r->reasoning);
		tly_pgcopy_int8(c, r->cost);
		tly_pgcopy_int4(c, r->handoff_count);
		tly_pgcopy_text(c, r->source_channel);
		tly_pgcopy_text(c, r->topic_hint);
		opt_ts(c, r->last_message_at);
		tly_pgcopy_timestamptz(c, r->created);
		tly_pgcopy_timestamptz(c, r->updated);
		break;
	}
	case T_MESSAGES: {
		const struct message *r = row;
		tly_pgcopy_row(c, 20);
		tly_pgcopy_uuid(c, &r->message_id);
		tly_pgcopy_uuid(c, &r->tenant);
		tly_pgcopy_uuid(c, &r->conversation);
		opt_uuid(c, &r->user);
		tly_pgcopy_int4(c, r->position);
		tly_pgcopy_text(c, r->role);
		tly_pgcopy_text(c, r->agent_type);
		tly_pgcopy_jsonb(c, r->content);
		tly_pgcopy_text(c, r->tool_name);
		tly_pgcopy_text(c, r->tool_call_id);
		tly_pgcopy_text(c, r->provider);
		tly_pgcopy_text(c, r->model);
		tly_pgcopy_int8(c, r->prompt);
		tly_pgcopy_int8(c, r->completion);
		tly_pgcopy_int8(c, r->reasoning);
		tly_pgcopy_int4(c, (int32_t)r->latency_ms);
		tly_pgcopy_text(c, r->checksum);
		tly_pgcopy_int8(c, r->cost);
		opt_uuid(c, &r->reservation);
		tly_pgcopy_timestamptz(c, r->at);
		break;
	}
	case T_SUBS: {
		const struct sub *r = row;
		tly_uuid k = str_key(ctx, fail, r->plan_code, NULL, 0);
		const tly_uuid *plan = r->plan_code[0] ? tly_uuidmap_get(mf->plans, &k, NULL) : NULL;
		tly_pgcopy_row(c, 23);
		tly_pgcopy_uuid(c, &r->id);
		tly_pgcopy_uuid(c, &r->tenant);
		if (plan)
			tly_pgcopy_uuid(c, plan);
		else
			tly_pgcopy_null(c);
		tly_pgcopy_text(c, r->plan_code);
		tly_pgcopy_text(c, r->status);
		tly_pgcopy_bool(c, r->auto_renew);
		tly_pgcopy_text(c, r->billing_email);
		tly_pgcopy_timestamptz(c, r->starts_at);
		tly_pgcopy_timestamptz(c, r->cps);
		tly_pgcopy_timestamptz(c, r->cpe);
		opt_ts(c, r->trial_ends_at);
		opt_ts(c, r->cancel_at);
		tly_pgcopy_bool(c, r->cancel_at_period_end);
		tly_pgcopy_int4(c, r->seat_count);
		tly_pgcopy_int8(c, r->price_cents);
		tly_pgcopy_text(c, r->currency);
		tly_pgcopy_int8(c, r->tokens_per_period);
		if (r->overage_price.set)
			tly_pgcopy_int8(c, r->overage_price.v);
		else
			tly_pgcopy_null(c);
		tly_pgcopy_int8(c, r->rollover);
		tly_pgcopy_jsonb(c, r->metered_prices);
		tly_pgcopy_jsonb(c, r->metadata);
		tly_pgcopy_timestamptz(c, r->created);
		tly_pgcopy_timestamptz(c, r->updated);
		break;
	}
	case T_INVOICES: {
		const struct invoice *r = row;
		const struct invoice_status *st = tly_uuidmap_get(mf->map[T_INV_STATUS], &r->id, NULL);
		if (st && memcmp(&st->tenant, &r->tenant, sizeof(r->tenant)) != 0)
			st = NULL;
		tly_pgcopy_row(c, 15);
		tly_pgcopy_uuid(c, &r->id);
		tly_pgcopy_uuid(c, &r->tenant);
		tly_pgcopy_uuid(c, &r->sub);
		tly_pgcopy_int8(c, r->seq);
		tly_pgcopy_timestamptz(c, r->ps);
		tly_pgcopy_timestamptz(c, r->pe);
		tly_pgcopy_int8(c, r->amount);
		tly_pgcopy_text(c, r->currency);
		tly_pgcopy_int8(c, r->overage);
		tly_pgcopy_jsonb(c, r->lines);
		tly_pgcopy_text(c, st ? st->status : "issued");
		tly_pgcopy_text(c, st ? st->external_id : NULL);
		tly_pgcopy_text(c, st ? st->url : NULL);
		tly_pgcopy_timestamptz(c, r->at);
		tly_pgcopy_timestamptz(c, st ? max64(r->at, st->at) : r->at);
		break;
	}
	case T_USAGE: {
		const struct usage *r = row;
		tly_uuid ek = str_key(ctx, fail, r->external_event_id, NULL, 0);
		if (tly_uuidmap_get(mf->usage_ext, &r->tenant, &ek) != row)
			break;
		const struct period *p = tly_uuidmap_get(mf->map[T_PERIODS], &r->id, NULL);
		tly_pgcopy_row(c, 10);
		tly_pgcopy_uuid(c, &r->id);
		tly_pgcopy_uuid(c, &r->tenant);
		tly_pgcopy_uuid(c, &r->sub);
		tly_pgcopy_text(c, r->feature_key);
		tly_pgcopy_text(c, r->unit);
		opt_ts(c, (struct opt){p != NULL, p ? p->ps : 0});
		opt_ts(c, (struct opt){p != NULL, p ? p->pe : 0});
		tly_pgcopy_int8(c, r->quantity);
		tly_pgcopy_timestamptz(c, r->at);
		tly_pgcopy_text(c, r->external_event_id);
		break;
	}
	case T_BALANCES: {
		const struct balance *r = row;
		int64_t cost = 0;
		if (r->ps.set && r->pe.set) {
			int64_t from = r->ps.v >= 0 ? r->ps.v / DAY_US : (r->ps.v - DAY_US + 1) / DAY_US;
			int64_t to = r->pe.v >= 0 ? r->pe.v / DAY_US : (r->pe.v - DAY_US + 1) / DAY_US;
			for (const struct api_day *d = tly_uuidmap_get(mf->tenant_api, &r->tenant, NULL);
			     d; d = d->next_of_tenant)
				if (d->day >= from && d->day < to)
					cost += d->cost;
		}
		int64_t used_over = r->used - r->overage;
		tly_pgcopy_row(c, 13);
		tly_pgcopy_uuid(c, &r->tenant);
		opt_uuid(c, &r->sub);
		tly_pgcopy_int8(c, (used_over > 0 ? used_over : 0) + r->allowance + r->credits);
		tly_pgcopy_int8(c, r->used);
		tly_pgcopy_int8(c, max64(r->allowance + r->credits - r->held, 0));
		tly_pgcopy_int8(c, r->held);
		tly_pgcopy_int8(c, r->credits);
		tly_pgcopy_int8(c, r->overage);
		tly_pgcopy_int8(c, cost);
		opt_ts(c, r->ps);
		opt_ts(c, r->pe);
		tly_pgcopy_int8(c, r->seq);
		tly_pgcopy_timestamptz(c, r->at);
		break;
	}
	case T_API: {
		const struct api_day *r = row;
		tly_pgcopy_row(c, 11);
		tly_pgcopy_uuid(c, &r->tenant);
		tly_pgcopy_text(c, r->provider);
		tly_pgcopy_text(c, r->model);
		tly_pgcopy_date(c, r->day);
		tly_pgcopy_int8(c, r->prompt);
		tly_pgcopy_int8(c, r->completion);
		tly_pgcopy_int8(c, r->reasoning);
		tly_pgcopy_int8(c, r->prompt + r->completion + r->reasoning);
		tly_pgcopy_int8(c, r->cost);
		tly_pgcopy_int8(c, r->count);
		tly_pgcopy_timestamptz(c, r->updated);
		break;
	}
	case T_SEEN:
	case T_CALLS: {
		const struct key2 *r = row;
		tly_pgcopy_row(c, 2);
		tly_pgcopy_uuid(c, &r->a);
		tly_pgcopy_uuid(c, &r->b);
		break;
	}
	case T_APPLIED: {
		const struct applied *r = row;
		tly_pgcopy_row(c, 2);
		tly_pgcopy_uuid(c, &r->tenant);
		tly_pgcopy_int8(c, r->seq);
		break;
	}
	case T_INV_STATUS: {
		const struct invoice_status *r = row;
		tly_pgcopy_row(c, 6);
		tly_pgcopy_uuid(c, &r->id);
		tly_pgcopy_uuid(c, &r->tenant);
		tly_pgcopy_text(c, r->status);
		tly_pgcopy_text(c, r->external_id);
		tly_pgcopy_text(c, r->url);
		tly_pgcopy_timestamptz(c, r->at);
		break;
	}
	case T_PERIODS: {
		const struct period *r = row;
		tly_pgcopy_row(c, 3);
		tly_pgcopy_uuid(c, &r->event_id);
		tly_pgcopy_timestamptz(c, r->ps);
		tly_pgcopy_timestamptz(c, r->pe);
		break;
	}
	}
}

/* The rows of table t (row_of). */
static void rows_of(const struct tly_memfold *mf, int t, struct tly_pgcopy *c, EVP_MD_CTX *ctx, bool *fail)
{
	const struct tly_uuidmap *map = mf->map[t];
	for (size_t i = 0; i < tly_uuidmap_capacity(map); i++) {
		const void *row = tly_uuidmap_slot(map, i);
		if (row)
			row_of(mf, t, row, c, ctx, fail);
	}
}

/* The columns each table's rows carry (NULL: a table this fold does not write). */
static const char *const COPY_COLUMNS[N_T] = {
	[T_TENANTS] = "id, slug, name, created_at, updated_at",
	[T_USERS] = "id, tenant_id, external_id, username, display_name, email, created_at, updated_at",
	[T_CONVS] = "id, tenant_id, user_id, agent_entrypoint, active_agent, status, message_count, "
		    "total_tokens_prompt, total_tokens_completion, reasoning_tokens, total_cost_micros, "
		    "handoff_count, source_channel, topic_hint, last_message_at, created_at, updated_at",
	[T_MESSAGES] = "message_id, tenant_id, conversation_id, user_id, position, role, agent_type, "
		       "content, tool_name, tool_call_id, provider, model, token_count_prompt, "
		       "token_count_completion, reasoning_tokens, latency_ms, content_checksum, "
		       "cost_micros, reservation_id, created_at",
	[T_SUBS] = "id, tenant_id, plan_id, plan_code, status, auto_renew, billing_email, starts_at, "
		   "current_period_start, current_period_end, trial_ends_at, cancel_at, "
		   "cancel_at_period_end, seat_count, price_cents, currency, tokens_per_period, "
		   "overage_price_micros_per_1k_tokens, rollover_cap_tokens, metered_prices, "
		   "metadata_json, created_at, updated_at",
	[T_INVOICES] = "id, tenant_id, subscription_id, ledger_seq, period_start, period_end, "
		       "amount_cents, currency, overage_tokens, lines, status, external_invoice_id, "
		       "hosted_invoice_url, created_at, updated_at",
	[T_USAGE] = "id, tenant_id, subscription_id, feature_key, unit, period_start, period_end, "
		    "quantity, reported_at, external_event_id",
	[T_BALANCES] = "tenant_id, subscription_id, tokens_limit, tokens_used, tokens_remaining, held, "
		       "credits, overage_tokens, monthly_api_cost_micros, period_start, period_end, "
		       "ledger_seq, updated_at",
	[T_API] = "tenant_id, provider, model, usage_date, prompt_tokens, completion_tokens, "
		  "reasoning_tokens, total_tokens, cost_micros, request_count, updated_at",
	[T_SEEN] = "tenant_id, event_id",
	[T_APPLIED] = "tenant_id, seq",
	[T_CALLS] = "tenant_id, call_id",
	[T_INV_STATUS] = "invoice_id, tenant_id, status, external_invoice_id, hosted_invoice_url, changed_at",
	[T_PERIODS] = "event_id, period_start, period_end",
};

/* Whether the tables here (T_*) are fold.c's, in its order (tly_fold_tables). */
static bool tables_match(void)
{
	static const char *const TABLES[N_T] = {
		"tenant_accounts", "users", "agent_conversations", "agent_messages", "billing_plans",
		"plan_features", "tenant_subscriptions", "subscription_invoices", "subscription_usage",
		"token_balances", "api_usage", "projector_seen_events", "projector_ledger_applied",
		"projector_api_calls", "projector_invoice_status", "projector_usage_periods",
	};
	bool same = tly_fold_n_tables == N_T;
	for (int t = 0; same && t < N_T; t++)
		same = strcmp(tly_fold_tables[t], TABLES[t]) == 0;
	return same;
}

int tly_memfold_stream(struct tly_memfold *mf, size_t table, struct tly_pgcopy *c,
		       tly_memfold_added_fn *added, void *ud)
{
	if (!tables_match() || (table != T_SEEN && table != T_MESSAGES))
		return TLY_E_INVALID;
	mf->stream[table].c = c;
	mf->stream[table].added = added;
	mf->stream[table].ud = ud;
	return 0;
}

const char *tly_memfold_columns(size_t table)
{
	return tables_match() && table < N_T ? COPY_COLUMNS[table] : NULL;
}

int tly_memfold_finish(struct tly_memfold *mf)
{
	if (!mf->finished)
		usage_winners(mf);
	mf->finished = true;
	return mf->oom ? TLY_E_NOMEM : 0;
}

int tly_memfold_copy(struct tly_memfold *mf, PGconn *conn, const char *const names[],
		     struct tly_pg_error *err)
{
	if (!tables_match()) {
		snprintf(err->message, sizeof(err->message), "the in-memory fold's tables are not fold.c's");
		err->errclass = TLY_ERRCLASS_FATAL;
		return TLY_E_PG;
	}
	if (!mf->finished && tly_memfold_finish(mf) != 0)
		return TLY_E_NOMEM;
	struct tly_pgcopy *c = tly_pgcopy_new();
	EVP_MD_CTX *ctx = EVP_MD_CTX_new(); /* this call's own: copies may run on two threads */
	bool fail = false;
	int rc = c && ctx && !mf->oom ? 0 : TLY_E_NOMEM;
	for (int t = 0; t < N_T && rc == 0; t++) {
		if (!names[t] || !COPY_COLUMNS[t] || tly_uuidmap_count(mf->map[t]) == 0 ||
		    mf->stream[t].c ||
		    (t == T_USAGE && tly_uuidmap_count(mf->usage_ext) == 0))
			continue;
		char *q = PQescapeIdentifier(conn, names[t], strlen(names[t]));
		char *sql = NULL;
		if (!q || asprintf(&sql, "COPY %s (%s) FROM STDIN (FORMAT binary)", q, COPY_COLUMNS[t]) < 0) {
			PQfreemem(q);
			rc = TLY_E_NOMEM;
			break;
		}
		PQfreemem(q);
		tly_pgcopy_reset(c);
		rows_of(mf, t, c, ctx, &fail);
		rc = fail ? TLY_E_NOMEM : tly_pgcopy_send(conn, c, sql, err);
		free(sql);
	}
	EVP_MD_CTX_free(ctx);
	tly_pgcopy_free(c);
	return rc;
}
