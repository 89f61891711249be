/* The load generator's model of tenants and their traffic, driven by a seeded xoshiro256** PRNG. */
#include "loadgen.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "arena.h"
#include "codec.h"
#include "event_json.h"

#define HOUR_US 3600000000LL
#define MINUTE_US 60000000LL
#define MAX_USERS 8
#define MAX_HOLDS 8
#define MAX_QUEUE 8
#define DUP_RING 64
#define ZIPF_S 1.07

/* ---- PRNG: splitmix64 seeds xoshiro256** (never rand()) ------------------------------------- */

struct rng {
	uint64_t s[4];
};

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

static uint64_t next_u64(struct rng *r)
{
	uint64_t *s = r->s;
	uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return result;
}

static void rng_seed(struct rng *r, uint64_t seed)
{
	for (int i = 0; i < 4; i++)
		r->s[i] = splitmix64(&seed);
}

/* Uniform in [0, n). */
static uint64_t below(struct rng *r, uint64_t n)
{
	return n ? next_u64(r) % n : 0;
}

static int64_t between(struct rng *r, int64_t lo, int64_t hi)
{
	return lo + (int64_t)below(r, (uint64_t)(hi - lo + 1));
}

/* Uniform in [0, 1) with 53 bits. */
static double unit(struct rng *r)
{
	return (double)(next_u64(r) >> 11) * 0x1.0p-53;
}

static bool chance(struct rng *r, int pct)
{
	return (int)below(r, 100) < pct;
}

static void rand_uuid(struct rng *r, tly_uuid *u)
{
	uint64_t a = next_u64(r), b = next_u64(r);
	memcpy(u->b, &a, 8);
	memcpy(u->b + 8, &b, 8);
	u->b[6] = (unsigned char)((u->b[6] & 0x0F) | 0x40); /* version 4 */
	u->b[8] = (unsigned char)((u->b[8] & 0x3F) | 0x80); /* RFC 4122 variant */
}

/* ---- the world ------------------------------------------------------------------------------ */

struct model {
	const char *provider, *name;
	int64_t in_per_m, out_per_m; /* micro-USD per million tokens */
	bool reasoning;
};

static const struct model models[] = {
	{"openai", "gpt-4o", 2500000, 10000000, false},
	{"openai", "gpt-4o-mini", 150000, 600000, false},
	{"openai", "o3-mini", 1100000, 4400000, true},
	{"anthropic", "claude-sonnet-4", 3000000, 15000000, false},
	{"anthropic", "claude-haiku-3.5", 800000, 4000000, false},
};
#define N_MODELS (sizeof(models) / sizeof(models[0]))

static const char *const agents[] = {"triage", "billing", "support", "research", "coder"};
static const char *const channels[] = {"web", "slack", "api", "mobile"};
static const char *const topics[] = {"billing question", "bug report", "summarise a document",
				     "write SQL", "plan a trip"};
static const char *const words[] = {"hello", "invoice", "refund", "please", "summary", "table",
				    "token", "limit", "thanks", "error", "deploy", "report"};

static const struct tly_map_entry pro_metered[] = {{.key = "api_calls", .i = 100}};

struct hold {
	tly_uuid id;
	int model;
	tly_uuid conversation; /* nil: an agent call without a conversation */
	int64_t tokens;
};

struct tenant {
	bool created;
	tly_uuid id;
	char key[37];
	char slug[32], name[48];
	int plan; /* 0 Starter, 1 Pro */
	tly_uuid subscription;
	bool paused;
	int n_users;
	tly_uuid users[MAX_USERS];
	bool in_conversation;
	tly_uuid conversation;
	int conv_model;
	int conv_agent;
	struct hold holds[MAX_HOLDS];
	int n_holds;
};

struct dup {
	char *json;
	unsigned char *bytes;
	size_t len;
	char key[37];
};

struct loadgen {
	struct loadgen_opts o;
	struct rng rng;
	struct tenant *tenants;
	double *zipf_cdf;
	int64_t now, next_tick;
	uint64_t counter;
	struct tly_event queue[MAX_QUEUE]; /* events of the scenario under way */
	int q_head, q_len;
	struct tly_arena *arena;           /* strings of queued events; reset when the queue empties */
	struct tly_event current;
	struct tly_codec *codec;
	struct tly_buf buf;
	char *json;                        /* of the last item (jansson's malloc) */
	struct dup ring[DUP_RING];
	int ring_len, ring_next;
	int n_created;
};

static void plan_terms(struct tly_plan_terms *t, int plan)
{
	memset(t, 0, sizeof(*t));
	t->interval = "month";
	t->interval_count = 1;
	t->currency = "USD";
	if (plan == 0) {
		t->plan_code = "starter";
		t->tokens_per_period = 1000000;
		t->price_cents = 1900;
	} else {
		t->plan_code = "pro";
		t->tokens_per_period = 10000000;
		t->price_cents = 9900;
		t->overage_price_micros_per_1k_tokens = (struct tly_opt_i64){true, 2000};
		t->metered_prices = (struct tly_map){pro_metered, 1};
	}
}

static int64_t add_month(int64_t us)
{
	time_t t = (time_t)(us / 1000000);
	struct tm tm;
	gmtime_r(&t, &tm);
	tm.tm_mon += 1;
	return (int64_t)timegm(&tm) * 1000000 + us % 1000000;
}

struct loadgen *loadgen_new(const struct loadgen_opts *opts, char *errstr, size_t errlen)
{
	struct loadgen *lg = calloc(1, sizeof(*lg));
	if (!lg) {
		snprintf(errstr, errlen, "out of memory");
		return NULL;
	}
	lg->o = *opts;
	if (lg->o.tenants < 1 || lg->o.step_us < 1) {
		snprintf(errstr, errlen, "need at least one tenant and a positive time step");
		goto fail;
	}
	rng_seed(&lg->rng, opts->seed);
	lg->now = opts->start_us;
	lg->next_tick = (opts->start_us / HOUR_US + 1) * HOUR_US;
	lg->tenants = calloc((size_t)lg->o.tenants, sizeof(*lg->tenants));
	lg->zipf_cdf = calloc((size_t)lg->o.tenants, sizeof(double));
	if (!lg->tenants || !lg->zipf_cdf || !(lg->arena = tly_arena_new())) {
		snprintf(errstr, errlen, "out of memory");
		goto fail;
	}
	if (!(lg->codec = tly_codec_new(errstr, errlen)))
		goto fail;
	double sum = 0;
	for (int i = 0; i < lg->o.tenants; i++) {
		sum += 1.0 / pow(i + 1, ZIPF_S);
		lg->zipf_cdf[i] = sum;
	}
	for (int i = 0; i < lg->o.tenants; i++) {
		struct tenant *t = &lg->tenants[i];
		lg->zipf_cdf[i] /= sum;
		rand_uuid(&lg->rng, &t->id);
		tly_uuid_format(&t->id, t->key);
		snprintf(t->slug, sizeof(t->slug), "tenant-%d", i + 1);
		snprintf(t->name, sizeof(t->name), "Tenant %d", i + 1);
		t->plan = chance(&lg->rng, 30) ? 1 : 0;
	}
	return lg;
fail:
	loadgen_free(lg);
	return NULL;
}

void loadgen_free(struct loadgen *lg)
{
	if (!lg)
		return;
	for (int i = 0; i < DUP_RING; i++) {
		free(lg->ring[i].json);
		free(lg->ring[i].bytes);
	}
	free(lg->json);
	tly_buf_free(&lg->buf);
	tly_codec_free(lg->codec);
	tly_arena_free(lg->arena);
	free(lg->tenants);
	free(lg->zipf_cdf);
	free(lg);
}

static struct tenant *pick_tenant(struct loadgen *lg)
{
	double u = unit(&lg->rng);
	int lo = 0, hi = lg->o.tenants - 1;
	while (lo < hi) {
		int mid = (lo + hi) / 2;
		if (lg->zipf_cdf[mid] < u)
			lo = mid + 1;
		else
			hi = mid;
	}
	return &lg->tenants[lo];
}

/* A new event of type for tenant t (NULL: no tenant) at the current time, appended to the queue. */
static struct tly_event *push(struct loadgen *lg, enum tly_event_type type, const struct tenant *t)
{
	struct tly_event *ev = &lg->queue[(lg->q_head + lg->q_len) % MAX_QUEUE];
	lg->q_len++;
	memset(ev, 0, sizeof(*ev));
	tly_event_init(ev, type);
	rand_uuid(&lg->rng, &ev->event_id);
	if (t)
		ev->tenant_id = t->id;
	/* Events of one scenario are a few hundred milliseconds apart. */
	lg->now += between(&lg->rng, 50000, 900000);
	ev->occurred_at = lg->now;
	return ev;
}

static const char *astr(struct loadgen *lg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static const char *astr(struct loadgen *lg, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	return tly_arena_strndup(lg->arena, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

/* A short JSON message body of n random words. */
static const char *content(struct loadgen *lg, int n)
{
	json_t *obj = json_object();
	char text[256] = "";
	size_t len = 0;
	for (int i = 0; i < n && len < sizeof(text) - 16; i++)
		len += (size_t)snprintf(text + len, sizeof(text) - len, "%s%s", i ? " " : "",
					words[below(&lg->rng, sizeof(words) / sizeof(words[0]))]);
	json_object_set_new(obj, "text", json_string(text));
	char *dump = json_dumps(obj, JSON_COMPACT);
	json_decref(obj);
	const char *s = dump ? tly_arena_strndup(lg->arena, dump, strlen(dump)) : "{}";
	free(dump);
	return s ? s : "{}";
}

static void onboard(struct loadgen *lg, struct tenant *t)
{
	struct tly_event *ev = push(lg, TLY_EV_TENANT_CREATED, t);
	ev->u.tenant_created = (struct tly_ev_tenant_created){t->slug, t->name};
	t->n_users = (int)between(&lg->rng, 1, t->plan ? 5 : 2);
	for (int i = 0; i < t->n_users; i++) {
		rand_uuid(&lg->rng, &t->users[i]);
		ev = push(lg, TLY_EV_USER_REGISTERED, t);
		struct tly_ev_user_registered *u = &ev->u.user_registered;
		u->user_id = t->users[i];
		u->external_id = astr(lg, "ext-%s-%d", t->slug, i + 1);
		u->username = chance(&lg->rng, 70) ? astr(lg, "user%d", i + 1) : NULL;
		u->display_name = astr(lg, "User %d of %s", i + 1, t->name);
		u->email = chance(&lg->rng, 80) ? astr(lg, "user%d@%s.example", i + 1, t->slug) : NULL;
	}
	rand_uuid(&lg->rng, &t->subscription);
	ev = push(lg, TLY_EV_SUBSCRIPTION_STARTED, t);
	struct tly_ev_subscription_started *s = &ev->u.subscription_started;
	s->subscription_id = t->subscription;
	plan_terms(&s->terms, t->plan);
	s->period_start = ev->occurred_at;
	s->period_end = add_month(ev->occurred_at);
	s->seat_count = t->plan ? 5 : 1;
	s->auto_renew = true;
	s->billing_email = astr(lg, "billing@%s.example", t->slug);
	t->created = true;
	lg->n_created++;
}

/* Realistic usage of one model call. */
static void usage(struct loadgen *lg, int m, int64_t *prompt, int64_t *completion, int64_t *reasoning,
		  int64_t *cost, int64_t *latency)
{
	double a = unit(&lg->rng), b = unit(&lg->rng);
	*prompt = 150 + (int64_t)(a * a * 12000);
	*completion = 20 + (int64_t)(b * b * 1500);
	*reasoning = models[m].reasoning ? between(&lg->rng, 200, 4000) : 0;
	*cost = (*prompt * models[m].in_per_m + (*completion + *reasoning) * models[m].out_per_m) / 1000000;
	*latency = 250 + *completion * 12 + *reasoning * 4 + between(&lg->rng, 0, 400);
}

static void reserve(struct loadgen *lg, struct tenant *t, bool in_conversation)
{
	if (t->n_holds >= MAX_HOLDS)
		return;
	struct hold *h = &t->holds[t->n_holds++];
	rand_uuid(&lg->rng, &h->id);
	h->model = in_conversation ? t->conv_model : (int)below(&lg->rng, N_MODELS);
	memset(&h->conversation, 0, sizeof(h->conversation));
	if (in_conversation)
		h->conversation = t->conversation;
	/* Upstream holds the prompt estimate plus the completion cap (and a reasoning budget). */
	h->tokens = between(&lg->rng, 1000, 12000) + 4096 + (models[h->model].reasoning ? 8192 : 0);
	struct tly_event *ev = push(lg, TLY_EV_TOKENS_RESERVED, t);
	ev->u.tokens_reserved = (struct tly_ev_tokens_reserved){
		h->id, h->tokens, ev->occurred_at + 10 * MINUTE_US, models[h->model].name, h->conversation};
}

static void resolve(struct loadgen *lg, struct tenant *t)
{
	int i = (int)below(&lg->rng, (uint64_t)t->n_holds);
	struct hold h = t->holds[i];
	t->holds[i] = t->holds[--t->n_holds];
	int r = (int)below(&lg->rng, 100);
	if (r < 4)
		return; /* abandoned: the hold expires in the ledger */
	if (r < 14) {
		struct tly_event *ev = push(lg, TLY_EV_RESERVATION_RELEASED, t);
		static const char *const reasons[] = {"client aborted", "provider error", "timeout"};
		ev->u.reservation_released = (struct tly_ev_reservation_released){
			h.id, reasons[below(&lg->rng, 3)]};
		return;
	}
	int64_t prompt, completion, reasoning, cost, latency;
	usage(lg, h.model, &prompt, &completion, &reasoning, &cost, &latency);
	if (chance(&lg->rng, 3))
		completion += h.tokens; /* past the hold: debited anyway, overage beyond zero */
	if (!tly_uuid_is_nil(&h.conversation) && t->in_conversation &&
	    memcmp(&h.conversation, &t->conversation, sizeof(h.conversation)) == 0) {
		/* A chat reply settles its reservation through the message. */
		struct tly_event *ev = push(lg, TLY_EV_MESSAGE_APPENDED, t);
		struct tly_ev_message_appended *m = &ev->u.message_appended;
		m->conversation_id = h.conversation;
		rand_uuid(&lg->rng, &m->message_id);
		m->role = "assistant";
		m->agent_type = agents[t->conv_agent];
		m->content = content(lg, (int)between(&lg->rng, 3, 20));
		m->provider = models[h.model].provider;
		m->model = models[h.model].name;
		m->prompt_tokens = prompt;
		m->completion_tokens = completion;
		m->reasoning_tokens = reasoning;
		m->latency_ms = latency;
		m->cost_micros = cost;
		m->reservation_id = h.id;
		return;
	}
	struct tly_event *ev = push(lg, TLY_EV_RESERVATION_SETTLED, t);
	ev->u.reservation_settled = (struct tly_ev_reservation_settled){
		h.id, models[h.model].provider, models[h.model].name, prompt, completion, reasoning, cost};
}

static void chat(struct loadgen *lg, struct tenant *t)
{
	if (!t->in_conversation) {
		rand_uuid(&lg->rng, &t->conversation);
		t->in_conversation = true;
		t->conv_model = (int)below(&lg->rng, N_MODELS);
		t->conv_agent = 0;
		struct tly_event *ev = push(lg, TLY_EV_CONVERSATION_STARTED, t);
		struct tly_ev_conversation_started *c = &ev->u.conversation_started;
		c->conversation_id = t->conversation;
		c->user_id = t->users[below(&lg->rng, (uint64_t)t->n_users)];
		c->agent_entrypoint = agents[0];
		c->source_channel = channels[below(&lg->rng, 4)];
		c->topic_hint = chance(&lg->rng, 50) ? topics[below(&lg->rng, 5)] : NULL;
		return;
	}
	struct tly_event *ev = push(lg, TLY_EV_MESSAGE_APPENDED, t);
	struct tly_ev_message_appended *m = &ev->u.message_appended;
	m->conversation_id = t->conversation;
	rand_uuid(&lg->rng, &m->message_id);
	m->user_id = t->users[below(&lg->rng, (uint64_t)t->n_users)];
	m->role = "user";
	m->agent_type = agents[t->conv_agent];
	m->content = content(lg, (int)between(&lg->rng, 2, 12));
	m->provider = models[t->conv_model].provider;
	m->model = models[t->conv_model].name;
	reserve(lg, t, true);
}

/* One scenario step of tenant t: pushes one or more events. */
static void act(struct loadgen *lg, struct tenant *t)
{
	struct tly_event *ev;
	if (!t->created) {
		onboard(lg, t);
		return;
	}
	if (t->n_holds && chance(&lg->rng, 45)) {
		resolve(lg, t);
		return;
	}
	int r = (int)below(&lg->rng, 1000);
	if (t->paused && r < 900) {
		if (r < 100) {
			t->paused = false;
			ev = push(lg, TLY_EV_SUBSCRIPTION_RESUMED, t);
			ev->u.subscription_resumed.subscription_id = t->subscription;
		} else {
			chat(lg, t); /* traffic goes on; the ledger rejects the reservations */
		}
		return;
	}
	if (r < 450) {
		chat(lg, t);
	} else if (r < 650) {
		reserve(lg, t, false); /* an agent's model call outside a conversation */
	} else if (r < 700) {
		ev = push(lg, TLY_EV_TOKENS_DEBITED, t);
		int64_t tokens = between(&lg->rng, 500, 60000);
		rand_uuid(&lg->rng, &ev->u.tokens_debited.debit_id);
		ev->u.tokens_debited.tokens = tokens;
		ev->u.tokens_debited.cost_micros = tokens * 20 / 1000; /* embeddings: $0.02 / 1M */
		ev->u.tokens_debited.reason = "embedding batch";
	} else if (r >= 700 && r < 760 && t->plan == 1) {
		ev = push(lg, TLY_EV_USAGE_REPORTED, t);
		struct tly_ev_usage_reported *u = &ev->u.usage_reported;
		u->subscription_id = t->subscription;
		u->feature_key = "api_calls";
		u->unit = "call";
		u->quantity = between(&lg->rng, 1, 200);
		u->external_event_id = astr(lg, "gw-%llu", (unsigned long long)++lg->counter);
	} else if (r >= 760 && r < 780) {
		ev = push(lg, TLY_EV_CREDITS_GRANTED, t);
		struct tly_ev_credits_granted *c = &ev->u.credits_granted;
		rand_uuid(&lg->rng, &c->grant_id);
		c->tokens = between(&lg->rng, 1, 10) * 100000;
		c->reason = chance(&lg->rng, 50) ? "top-up" : "goodwill";
		if (chance(&lg->rng, 60))
			c->expires_at = (struct tly_opt_i64){true, ev->occurred_at + 90 * 24 * HOUR_US};
	} else if (r >= 780 && r < 830 && t->in_conversation) {
		int to = (int)below(&lg->rng, 4) + 1;
		if (to == t->conv_agent)
			to = 0;
		ev = push(lg, TLY_EV_AGENT_HANDOFF, t);
		ev->u.agent_handoff = (struct tly_ev_agent_handoff){t->conversation, agents[t->conv_agent],
								    agents[to]};
		t->conv_agent = to;
	} else if (r >= 830 && r < 900 && t->in_conversation) {
		static const char *const statuses[] = {"completed", "completed", "completed", "abandoned",
						       "failed"};
		ev = push(lg, TLY_EV_CONVERSATION_CLOSED, t);
		ev->u.conversation_closed = (struct tly_ev_conversation_closed){
			t->conversation, statuses[below(&lg->rng, 5)]};
		t->in_conversation = false;
	} else if (r == 900) {
		t->plan = 1 - t->plan;
		ev = push(lg, TLY_EV_SUBSCRIPTION_CHANGED, t);
		struct tly_ev_subscription_changed *c = &ev->u.subscription_changed;
		c->subscription_id = t->subscription;
		plan_terms(&c->terms, t->plan);
		c->seat_count = t->plan ? 5 : 1;
		c->effective_at = ev->occurred_at;
	} else if (r >= 901 && r < 903) {
		t->paused = true;
		ev = push(lg, TLY_EV_SUBSCRIPTION_PAUSED, t);
		ev->u.subscription_paused.subscription_id = t->subscription;
	} else if (r >= 903 && r < 920 && t->n_users < MAX_USERS) {
		rand_uuid(&lg->rng, &t->users[t->n_users]);
		ev = push(lg, TLY_EV_USER_REGISTERED, t);
		struct tly_ev_user_registered *u = &ev->u.user_registered;
		u->user_id = t->users[t->n_users];
		u->external_id = astr(lg, "ext-%s-%d", t->slug, t->n_users + 1);
		u->display_name = astr(lg, "User %d of %s", t->n_users + 1, t->name);
		t->n_users++;
	} else {
		chat(lg, t);
	}
}

static struct tenant *pick_created(struct loadgen *lg)
{
	for (int tries = 0; tries < 8; tries++) {
		struct tenant *t = pick_tenant(lg);
		if (t->created)
			return t;
	}
	for (int i = 0; i < lg->o.tenants; i++) {
		if (lg->tenants[i].created)
			return &lg->tenants[i];
	}
	return &lg->tenants[0];
}

/* Remember a valid item for later duplicates. */
static int remember(struct loadgen *lg, const struct loadgen_item *item)
{
	struct dup *d = &lg->ring[lg->ring_next];
	free(d->json);
	free(d->bytes);
	d->json = strdup(item->json);
	d->bytes = malloc(item->len);
	if (!d->json || !d->bytes)
		return TLY_E_NOMEM;
	memcpy(d->bytes, item->bytes, item->len);
	d->len = item->len;
	snprintf(d->key, sizeof(d->key), "%s", item->key);
	lg->ring_next = (lg->ring_next + 1) % DUP_RING;
	if (lg->ring_len < DUP_RING)
		lg->ring_len++;
	return 0;
}

/* A bad message for a created tenant: the bytes and the equally bad JSON line. */
static int make_bad(struct loadgen *lg, struct loadgen_item *item, char *errstr, size_t errlen)
{
	static const char status[] = "completed"; /* the last field: the encoding ends with its text */
	struct tenant *t = pick_created(lg);
	struct tly_event *ev = &lg->current;
	tly_event_init(ev, TLY_EV_CONVERSATION_CLOSED);
	rand_uuid(&lg->rng, &ev->event_id);
	ev->tenant_id = t->id;
	ev->occurred_at = lg->now;
	rand_uuid(&lg->rng, &ev->u.conversation_closed.conversation_id);
	ev->u.conversation_closed.status = status;
	int rc = tly_codec_encode(lg->codec, ev, &lg->buf, errstr, errlen);
	if (rc != 0)
		return rc;
	json_t *obj = tly_event_to_json(ev);
	if (!obj)
		return TLY_E_NOMEM;
	item->kind = LOADGEN_BAD;
	item->label = "bad";
	item->key = t->key;
	item->bytes = lg->buf.data;
	item->len = lg->buf.len;
	int which = (int)below(&lg->rng, 4);
	if (which == 0) {
		/* Decodes, but breaks a rule: a status outside its set. */
		item->bad = "invalid_value";
		lg->buf.data[lg->buf.len - (sizeof(status) - 1)] = 'C';
		json_object_set_new(obj, "status", json_string("Completed"));
	} else if (which == 1) {
		item->bad = "garbage";
		size_t n = (size_t)between(&lg->rng, 1, 64);
		for (size_t i = 0; i < n; i++)
			lg->buf.data[i] = (unsigned char)next_u64(&lg->rng);
		if (lg->buf.data[0] == 0xC3)
			lg->buf.data[0] = 0x00;
		item->len = n;
	} else if (which == 2) {
		item->bad = "truncated";
		item->len = lg->buf.len / 2;
	} else {
		item->bad = "unknown_fingerprint";
		for (int i = 2; i < TLY_CODEC_HEADER; i++)
			lg->buf.data[i] ^= 0x5A;
		json_object_set_new(obj, "type", json_string("ConversationClosedV0"));
	}
	char *dump = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(obj);
	if (!dump)
		return TLY_E_NOMEM;
	if (which == 1) {
		/* Garbage as a line: the bytes in hex, not JSON at all. */
		free(dump);
		if (!(dump = malloc(item->len * 2 + 1)))
			return TLY_E_NOMEM;
		for (size_t i = 0; i < item->len; i++)
			snprintf(dump + 2 * i, 3, "%02x", item->bytes[i]);
	} else if (which == 2) {
		dump[strlen(dump) / 2] = '\0';
	}
	free(lg->json);
	lg->json = dump;
	item->json = dump;
	return 0;
}

int loadgen_next(struct loadgen *lg, struct loadgen_item *item, char *errstr, size_t errlen)
{
	memset(item, 0, sizeof(*item));
	if (lg->q_len == 0) {
		tly_arena_reset(lg->arena);
		bool created = lg->n_created > 0;
		if (created && lg->ring_len && chance(&lg->rng, lg->o.duplicate_pct)) {
			struct dup *d = &lg->ring[below(&lg->rng, (uint64_t)lg->ring_len)];
			*item = (struct loadgen_item){.kind = LOADGEN_DUPLICATE, .label = "duplicate",
						      .json = d->json, .bytes = d->bytes, .len = d->len,
						      .key = d->key};
			return 0;
		}
		if (created && chance(&lg->rng, lg->o.bad_pct))
			return make_bad(lg, item, errstr, errlen);
		lg->now += between(&lg->rng, 0, 2 * lg->o.step_us);
		if (lg->now >= lg->next_tick) {
			lg->now = lg->next_tick;
			lg->next_tick += HOUR_US;
			struct tly_event *ev = push(lg, TLY_EV_CLOCK_TICK, NULL);
			ev->occurred_at = lg->now;
		} else {
			act(lg, pick_tenant(lg));
		}
		if (lg->q_len == 0) /* a scenario with nothing to say (e.g. a hold left to expire) */
			return loadgen_next(lg, item, errstr, errlen);
	}
	lg->current = lg->queue[lg->q_head];
	lg->q_head = (lg->q_head + 1) % MAX_QUEUE;
	lg->q_len--;
	const struct tly_event *ev = &lg->current;
	int rc = tly_codec_encode(lg->codec, ev, &lg->buf, errstr, errlen);
	if (rc != 0)
		return rc; /* a bug in the model: every event it makes must be valid */
	free(lg->json);
	if (!(lg->json = tly_event_to_json_text(ev)))
		return TLY_E_NOMEM;
	item->kind = LOADGEN_EVENT;
	item->ev = ev;
	item->label = tly_event_desc(ev->type)->name;
	item->json = lg->json;
	item->bytes = lg->buf.data;
	item->len = lg->buf.len;
	item->key = NULL;
	if (ev->type != TLY_EV_CLOCK_TICK) {
		for (int i = 0; i < lg->o.tenants; i++) {
			if (memcmp(&lg->tenants[i].id, &ev->tenant_id, sizeof(tly_uuid)) == 0) {
				item->key = lg->tenants[i].key;
				break;
			}
		}
		if ((rc = remember(lg, item)) != 0)
			return rc;
	}
	return 0;
}
