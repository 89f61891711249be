/* A tenant's wallet: lifecycle, balances, and the JSON snapshot kept in PostgreSQL. */
#include "wallet_int.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tly_ledger_grow(void *items_ptr, size_t *cap, size_t n, size_t size)
{
	if (n < *cap)
		return 0;
	void *items;
	memcpy(&items, items_ptr, sizeof(items));
	size_t ncap = *cap ? *cap * 2 : 16;
	void *grown = realloc(items, ncap * size);
	if (!grown)
		return TLY_E_NOMEM;
	memcpy(items_ptr, &grown, sizeof(grown));
	*cap = ncap;
	return 0;
}

struct tly_wallet *tly_wallet_new(const tly_uuid *tenant)
{
	struct tly_wallet *w = calloc(1, sizeof(*w));
	if (!w)
		return NULL;
	w->tenant = *tenant;
	w->saving.as_of = -1;
	return w;
}

void tly_terms_clear(struct tly_terms *t)
{
	free(t->metered);
	memset(t, 0, sizeof(*t));
}

int tly_terms_copy(struct tly_terms *dst, const struct tly_terms *src)
{
	tly_terms_clear(dst);
	*dst = *src;
	dst->metered = NULL;
	if (src->n_metered) {
		dst->metered = malloc(src->n_metered * sizeof(*dst->metered));
		if (!dst->metered) {
			dst->n_metered = 0;
			return TLY_E_NOMEM;
		}
		memcpy(dst->metered, src->metered, src->n_metered * sizeof(*dst->metered));
	}
	return 0;
}

void tly_wallet_free(struct tly_wallet *w)
{
	if (!w)
		return;
	tly_terms_clear(&w->sub.terms);
	tly_terms_clear(&w->sub.pending);
	free(w->grants);
	free(w->holds);
	free(w->forgotten);
	free(w->usage);
	free(w->slots);
	free(w->heap);
	free(w);
}

/* ---- holds: index by id, heap by expiry ------------------------------------------------------ */

static size_t slot_of(const tly_uuid *id, size_t n_slots)
{
	/* ids need not be random (upstream may number them): mix all 16 bytes */
	uint64_t a, b;
	memcpy(&a, id->b, 8);
	memcpy(&b, id->b + 8, 8);
	uint64_t h = a * 0x9e3779b97f4a7c15ULL ^ b;
	h ^= h >> 31;
	h *= 0xbf58476d1ce4e5b9ULL;
	h ^= h >> 29;
	return (size_t)h & (n_slots - 1);
}

static void slot_insert(struct tly_wallet *w, size_t index)
{
	size_t s = slot_of(&w->holds[index].id, w->n_slots);
	while (w->slots[s])
		s = (s + 1) & (w->n_slots - 1);
	w->slots[s] = (uint32_t)index + 1;
}

static void heap_up(struct tly_due *h, size_t i)
{
	while (i > 0) {
		size_t parent = (i - 1) / 2;
		if (h[parent].at < h[i].at || (h[parent].at == h[i].at && h[parent].index <= h[i].index))
			break;
		struct tly_due t = h[i];
		h[i] = h[parent];
		h[parent] = t;
		i = parent;
	}
}

static void heap_down(struct tly_due *h, size_t n, size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < n && (h[l].at < h[m].at || (h[l].at == h[m].at && h[l].index < h[m].index)))
			m = l;
		if (r < n && (h[r].at < h[m].at || (h[r].at == h[m].at && h[r].index < h[m].index)))
			m = r;
		if (m == i)
			return;
		struct tly_due t = h[i];
		h[i] = h[m];
		h[m] = t;
		i = m;
	}
}

static int heap_push(struct tly_wallet *w, int64_t at, size_t index)
{
	if (tly_ledger_grow(&w->heap, &w->cap_heap, w->n_heap, sizeof(*w->heap)) != 0)
		return TLY_E_NOMEM;
	w->heap[w->n_heap] = (struct tly_due){at, (uint32_t)index};
	heap_up(w->heap, w->n_heap++);
	return 0;
}

int tly_wallet_reindex(struct tly_wallet *w)
{
	size_t n_slots = 16;
	while (n_slots < 2 * w->n_holds + 2)
		n_slots *= 2;
	uint32_t *slots = calloc(n_slots, sizeof(*slots));
	if (!slots)
		return TLY_E_NOMEM;
	free(w->slots);
	w->slots = slots;
	w->n_slots = n_slots;
	w->n_heap = 0;
	w->held_total = 0;
	w->due_floor = 0;
	for (size_t i = 0; i < w->n_holds; i++) {
		slot_insert(w, i);
		if (w->holds[i].open) {
			w->held_total += w->holds[i].tokens;
			if (heap_push(w, w->holds[i].expires_at, i) != 0)
				return TLY_E_NOMEM;
		}
	}
	return 0;
}

struct tly_hold *tly_wallet_find_hold(struct tly_wallet *w, const tly_uuid *id)
{
	if (!w->n_slots)
		return NULL;
	for (size_t s = slot_of(id, w->n_slots); w->slots[s]; s = (s + 1) & (w->n_slots - 1)) {
		struct tly_hold *h = &w->holds[w->slots[s] - 1];
		if (memcmp(h->id.b, id->b, 16) == 0)
			return h;
	}
	return NULL;
}

int tly_wallet_add_hold(struct tly_wallet *w, const struct tly_hold *h)
{
	if (tly_ledger_grow(&w->holds, &w->cap_holds, w->n_holds, sizeof(*w->holds)) != 0)
		return TLY_E_NOMEM;
	struct tly_hold *added = &w->holds[w->n_holds++];
	*added = *h;
	added->order = w->next_hold++;
	added->dirty = true;
	if (2 * w->n_holds + 2 > w->n_slots)
		return tly_wallet_reindex(w);
	slot_insert(w, w->n_holds - 1);
	w->held_total += h->tokens;
	return heap_push(w, h->expires_at, w->n_holds - 1);
}

void tly_wallet_end_hold(struct tly_wallet *w, struct tly_hold *h, int64_t at)
{
	h->open = false;
	h->ended_at = at;
	h->dirty = true;
	w->held_total -= h->tokens; /* its heap entry is dropped when it reaches the top */
}

struct tly_hold *tly_wallet_first_expiry(struct tly_wallet *w)
{
	while (w->n_heap > 0) {
		struct tly_hold *h = &w->holds[w->heap[0].index];
		if (h->open)
			return h;
		w->heap[0] = w->heap[--w->n_heap];
		heap_down(w->heap, w->n_heap, 0);
	}
	return NULL;
}


int tly_wallet_note_forgotten(struct tly_wallet *w, const struct tly_hold *h)
{
	if (tly_ledger_grow(&w->forgotten, &w->cap_forgotten, w->n_forgotten,
			    sizeof(*w->forgotten)) != 0)
		return TLY_E_NOMEM;
	w->forgotten[w->n_forgotten++] = h->order;
	return 0;
}

int tly_wallet_changed_holds(const struct tly_wallet *w,
			     int (*fn)(const struct tly_hold_row *row, void *ud), void *ud)
{
	for (size_t i = 0; i < w->n_holds; i++) {
		const struct tly_hold *h = &w->holds[i];
		if (!h->dirty)
			continue;
		struct tly_hold_row row = {h->order, h->id, h->tokens, h->expires_at,
					   h->open ? -1 : h->ended_at};
		int rc = fn(&row, ud);
		if (rc != 0)
			return rc;
	}
	return 0;
}

const int64_t *tly_wallet_forgotten(const struct tly_wallet *w, size_t *n)
{
	*n = w->n_forgotten;
	return w->forgotten;
}

struct tly_wallet_saving *tly_wallet_saving(struct tly_wallet *w)
{
	return &w->saving;
}

void tly_wallet_mark_saved(struct tly_wallet *w)
{
	for (size_t i = 0; i < w->n_holds; i++)
		w->holds[i].dirty = false;
	w->n_forgotten = 0;
}

int tly_wallet_load_hold(struct tly_wallet *w, const struct tly_hold_row *row)
{
	if (row->order < 0 || row->tokens < 0 ||
	    (w->n_holds && row->order <= w->holds[w->n_holds - 1].order))
		return TLY_E_INVALID;
	if (tly_ledger_grow(&w->holds, &w->cap_holds, w->n_holds, sizeof(*w->holds)) != 0)
		return TLY_E_NOMEM;
	w->holds[w->n_holds++] = (struct tly_hold){row->id, row->tokens, row->expires_at,
						   row->ended_at < 0, row->ended_at < 0 ? 0 : row->ended_at,
						   row->order, false};
	if (w->next_hold <= row->order)
		w->next_hold = row->order + 1;
	return 0;
}

int tly_wallet_loaded(struct tly_wallet *w)
{
	return tly_wallet_reindex(w);
}

static void *dup_array(const void *src, size_t n, size_t size)
{
	if (n == 0)
		return NULL;
	void *p = malloc(n * size);
	if (p)
		memcpy(p, src, n * size);
	return p;
}

struct tly_wallet *tly_wallet_clone(const struct tly_wallet *w)
{
	struct tly_wallet *c = malloc(sizeof(*c));
	if (!c)
		return NULL;
	*c = *w;
	c->grants = dup_array(w->grants, w->n_grants, sizeof(*w->grants));
	c->holds = dup_array(w->holds, w->n_holds, sizeof(*w->holds));
	c->forgotten = dup_array(w->forgotten, w->n_forgotten, sizeof(*w->forgotten));
	c->cap_forgotten = w->n_forgotten;
	c->usage = dup_array(w->usage, w->n_usage, sizeof(*w->usage));
	c->cap_grants = w->n_grants;
	c->cap_holds = w->n_holds;
	c->cap_usage = w->n_usage;
	memset(&c->sub.terms, 0, sizeof(c->sub.terms));
	memset(&c->sub.pending, 0, sizeof(c->sub.pending));
	c->slots = NULL;
	c->heap = NULL;
	c->n_slots = c->n_heap = c->cap_heap = 0;
	if ((w->n_grants && !c->grants) || (w->n_holds && !c->holds) || (w->n_usage && !c->usage) ||
	    (w->n_forgotten && !c->forgotten) ||
	    tly_terms_copy(&c->sub.terms, &w->sub.terms) != 0 ||
	    tly_terms_copy(&c->sub.pending, &w->sub.pending) != 0 || tly_wallet_reindex(c) != 0) {
		tly_wallet_free(c);
		return NULL;
	}
	return c;
}

const tly_uuid *tly_wallet_tenant(const struct tly_wallet *w)
{
	return &w->tenant;
}

const unsigned char *tly_wallet_last_hash(const struct tly_wallet *w)
{
	return w->hash;
}

int64_t tly_wallet_credits(const struct tly_wallet *w)
{
	return w->credits_total;
}

static bool grant_before(const struct tly_grant *x, const struct tly_grant *y)
{
	return x->expires_at < y->expires_at ||
	       (x->expires_at == y->expires_at && x->order < y->order);
}

void tly_wallet_place_grant(struct tly_wallet *w, size_t i)
{
	struct tly_grant g = w->grants[i];
	size_t to = i;
	while (to > 0 && grant_before(&g, &w->grants[to - 1]))
		to--;
	if (to < i) {
		memmove(&w->grants[to + 1], &w->grants[to], (i - to) * sizeof(g));
	} else {
		while (to + 1 < w->n_grants && grant_before(&w->grants[to + 1], &g))
			to++;
		memmove(&w->grants[i], &w->grants[i + 1], (to - i) * sizeof(g));
	}
	w->grants[to] = g;
}

int64_t tly_wallet_held(const struct tly_wallet *w)
{
	return w->held_total;
}

void tly_wallet_balance(const struct tly_wallet *w, struct tly_balance *out)
{
	memset(out, 0, sizeof(*out));
	out->seq = w->seq;
	out->ledger_time = w->time;
	out->allowance_remaining = w->allowance;
	out->credits_remaining = tly_wallet_credits(w);
	out->held = tly_wallet_held(w);
	out->overage_tokens = w->overage;
	out->available = out->allowance_remaining + out->credits_remaining - out->held;
	out->has_subscription = w->sub.active;
	out->paused = w->sub.active && w->sub.paused;
	out->overage_allowed = w->sub.active && w->sub.terms.overage_allowed;
	if (w->sub.active) {
		out->period_start = w->sub.period_start;
		out->period_end = w->sub.period_end;
	}
	for (size_t i = 0; i < w->n_holds; i++)
		out->open_holds += w->holds[i].open;
}

/* ---- snapshot ------------------------------------------------------------------------------- */

static json_t *uuid_json(const tly_uuid *u)
{
	char text[37];
	tly_uuid_format(u, text);
	return json_string(text);
}

static json_t *hex_json(const unsigned char *b, size_t n)
{
	char text[129];
	for (size_t i = 0; i < n && i < 64; i++)
		snprintf(text + 2 * i, 3, "%02x", b[i]);
	text[2 * n] = '\0';
	return json_string(text);
}

static json_t *prices_json(const struct tly_price *p, size_t n)
{
	json_t *o = json_object();
	for (size_t i = 0; o && i < n; i++)
		json_object_set_new(o, p[i].key, json_integer(p[i].value));
	return o;
}

static json_t *terms_json(const struct tly_terms *t)
{
	return json_pack("{s:s, s:I, s:s, s:i, s:I, s:s, s:b, s:I, s:I, s:o}", "plan_code",
			 t->plan_code, "tokens_per_period", (json_int_t)t->tokens_per_period,
			 "interval", t->interval, "interval_count", (int)t->interval_count,
			 "price_cents", (json_int_t)t->price_cents, "currency", t->currency,
			 "overage_allowed", (int)t->overage_allowed, "overage_price",
			 (json_int_t)t->overage_price, "rollover_cap", (json_int_t)t->rollover_cap,
			 "metered", prices_json(t->metered, t->n_metered));
}

char *tly_wallet_to_json(const struct tly_wallet *w, bool with_holds)
{
	json_t *grants = json_array(), *holds = with_holds ? json_array() : NULL;
	for (size_t i = 0; i < w->n_grants; i++) {
		const struct tly_grant *g = &w->grants[i];
		json_array_append_new(grants, json_pack("{s:o, s:I, s:I, s:I}", "id", uuid_json(&g->id),
							"remaining", (json_int_t)g->remaining,
							"expires_at", (json_int_t)g->expires_at,
							"order", (json_int_t)g->order));
	}
	for (size_t i = 0; holds && i < w->n_holds; i++) {
		const struct tly_hold *h = &w->holds[i];
		json_array_append_new(holds, json_pack("{s:o, s:I, s:I, s:b, s:I, s:I}", "id",
						       uuid_json(&h->id), "tokens", (json_int_t)h->tokens,
						       "expires_at", (json_int_t)h->expires_at, "open",
						       (int)h->open, "ended_at", (json_int_t)h->ended_at,
						       "order", (json_int_t)h->order));
	}
	json_t *sub = json_null();
	if (w->sub.active) {
		const struct tly_subscription *s = &w->sub;
		sub = json_pack("{s:o, s:o, s:I, s:I, s:i, s:b, s:b, s:b}", "id", uuid_json(&s->id),
				"terms", terms_json(&s->terms), "period_start", (json_int_t)s->period_start,
				"period_end", (json_int_t)s->period_end, "seats", (int)s->seats,
				"auto_renew", (int)s->auto_renew, "paused", (int)s->paused,
				"cancel_at_period_end", (int)s->cancel_at_period_end);
		if (sub && s->has_pending)
			json_object_set_new(sub, "pending",
					    json_pack("{s:o, s:i, s:I}", "terms", terms_json(&s->pending),
						      "seats", (int)s->pending_seats, "at",
						      (json_int_t)s->pending_at));
	}
	json_t *root = json_pack("{s:i, s:o, s:I, s:o, s:I, s:I, s:I, s:I, s:I, s:o, s:o, s:o}",
				 "version", 1, "tenant", uuid_json(&w->tenant), "seq", (json_int_t)w->seq,
				 "hash", hex_json(w->hash, 32), "time", (json_int_t)w->time,
				 "allowance", (json_int_t)w->allowance, "overage",
				 (json_int_t)w->overage, "next_grant", (json_int_t)w->next_grant,
				 "next_hold", (json_int_t)w->next_hold, "grants", grants, "usage",
				 prices_json(w->usage, w->n_usage), "subscription", sub);
	if (!root) {
		json_decref(holds);
		return NULL;
	}
	if (holds && json_object_set_new(root, "holds", holds) != 0) {
		json_decref(root);
		return NULL;
	}
	char *text = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(root);
	return text;
}

static int get_uuid(json_t *o, const char *key, tly_uuid *out)
{
	return tly_uuid_parse(json_string_value(json_object_get(o, key)), out);
}

static int get_i64(json_t *o, const char *key, int64_t *out)
{
	json_t *v = json_object_get(o, key);
	if (!json_is_integer(v))
		return TLY_E_INVALID;
	*out = json_integer_value(v);
	return 0;
}

static int get_prices(json_t *o, struct tly_price **out, size_t *n)
{
	if (!json_is_object(o))
		return TLY_E_INVALID;
	size_t count = json_object_size(o);
	*out = NULL;
	*n = 0;
	if (count == 0)
		return 0;
	struct tly_price *p = calloc(count, sizeof(*p));
	if (!p)
		return TLY_E_NOMEM;
	const char *key;
	json_t *v;
	size_t i = 0;
	json_object_foreach(o, key, v)
	{
		if (strlen(key) >= sizeof(p[i].key) || !json_is_integer(v)) {
			free(p);
			return TLY_E_INVALID;
		}
		snprintf(p[i].key, sizeof(p[i].key), "%s", key);
		p[i].value = json_integer_value(v);
		i++;
	}
	/* json_object_foreach order is not guaranteed: keep keys sorted for determinism */
	for (size_t a = 1; a < count; a++)
		for (size_t b = a; b > 0 && strcmp(p[b - 1].key, p[b].key) > 0; b--) {
			struct tly_price t = p[b];
			p[b] = p[b - 1];
			p[b - 1] = t;
		}
	*out = p;
	*n = count;
	return 0;
}

static int get_terms(json_t *o, struct tly_terms *t)
{
	const char *plan = json_string_value(json_object_get(o, "plan_code"));
	const char *interval = json_string_value(json_object_get(o, "interval"));
	const char *currency = json_string_value(json_object_get(o, "currency"));
	json_t *count = json_object_get(o, "interval_count");
	if (!plan || !interval || !currency || !json_is_integer(count) ||
	    get_i64(o, "tokens_per_period", &t->tokens_per_period) ||
	    get_i64(o, "price_cents", &t->price_cents) ||
	    get_i64(o, "overage_price", &t->overage_price) ||
	    get_i64(o, "rollover_cap", &t->rollover_cap))
		return TLY_E_INVALID;
	snprintf(t->plan_code, sizeof(t->plan_code), "%s", plan);
	snprintf(t->interval, sizeof(t->interval), "%s", interval);
	snprintf(t->currency, sizeof(t->currency), "%s", currency);
	t->interval_count = (int32_t)json_integer_value(count);
	t->overage_allowed = json_is_true(json_object_get(o, "overage_allowed"));
	return get_prices(json_object_get(o, "metered"), &t->metered, &t->n_metered);
}

struct tly_wallet *tly_wallet_from_json(const char *text, char *errstr, size_t errlen)
{
	json_error_t jerr;
	tly_uuid tenant;
	struct tly_wallet *w = NULL;
	json_t *root = json_loads(text, 0, &jerr);
	if (!root) {
		snprintf(errstr, errlen, "wallet snapshot is not JSON: %s", jerr.text);
		return NULL;
	}
	if (json_integer_value(json_object_get(root, "version")) != 1 ||
	    get_uuid(root, "tenant", &tenant) != 0)
		goto bad;
	if (!(w = tly_wallet_new(&tenant)))
		goto oom;
	const char *hash = json_string_value(json_object_get(root, "hash"));
	if (!hash || strlen(hash) != 64)
		goto bad;
	for (int i = 0; i < 32; i++) {
		unsigned v;
		if (sscanf(hash + 2 * i, "%2x", &v) != 1)
			goto bad;
		w->hash[i] = (unsigned char)v;
	}
	if (get_i64(root, "seq", &w->seq) || get_i64(root, "time", &w->time) ||
	    get_i64(root, "allowance", &w->allowance) || get_i64(root, "overage", &w->overage) ||
	    get_i64(root, "next_grant", &w->next_grant))
		goto bad;
	json_t *grants = json_object_get(root, "grants"), *holds = json_object_get(root, "holds");
	json_t *next_hold = json_object_get(root, "next_hold");
	if (!json_is_array(grants) || (holds && !json_is_array(holds)) ||
	    (next_hold && !json_is_integer(next_hold)))
		goto bad;
	w->next_hold = next_hold ? json_integer_value(next_hold) : 0;
	size_t n = json_array_size(grants);
	if (n && !(w->grants = calloc(n, sizeof(*w->grants))))
		goto oom;
	w->cap_grants = n;
	for (size_t i = 0; i < n; i++, w->n_grants++) {
		json_t *g = json_array_get(grants, i);
		struct tly_grant *gr = &w->grants[i];
		if (get_uuid(g, "id", &gr->id) || get_i64(g, "remaining", &gr->remaining) ||
		    get_i64(g, "expires_at", &gr->expires_at) || get_i64(g, "order", &gr->order))
			goto bad;
		w->credits_total += gr->remaining;
		/* snapshots before the grants were kept by expiry list them in grant order */
		tly_wallet_place_grant(w, i);
	}
	n = json_array_size(holds);
	if (n && !(w->holds = calloc(n, sizeof(*w->holds))))
		goto oom;
	w->cap_holds = n;
	for (size_t i = 0; i < n; i++, w->n_holds++) {
		json_t *h = json_array_get(holds, i);
		struct tly_hold *ho = &w->holds[i];
		if (get_uuid(h, "id", &ho->id) || get_i64(h, "tokens", &ho->tokens) ||
		    get_i64(h, "expires_at", &ho->expires_at) || get_i64(h, "ended_at", &ho->ended_at))
			goto bad;
		ho->open = json_is_true(json_object_get(h, "open"));
		ho->order = (int64_t)i;
		if (json_object_get(h, "order") && get_i64(h, "order", &ho->order))
			goto bad;
		if (ho->order < 0 || (i && ho->order <= w->holds[i - 1].order))
			goto bad;
		ho->dirty = true; /* not saved apart yet */
		if (w->next_hold <= ho->order)
			w->next_hold = ho->order + 1;
	}
	if (get_prices(json_object_get(root, "usage"), &w->usage, &w->n_usage) != 0)
		goto bad;
	if (tly_wallet_reindex(w) != 0)
		goto oom;
	w->cap_usage = w->n_usage;
	json_t *sub = json_object_get(root, "subscription");
	if (json_is_object(sub)) {
		struct tly_subscription *s = &w->sub;
		json_t *seats = json_object_get(sub, "seats");
		s->active = true;
		if (get_uuid(sub, "id", &s->id) || get_terms(json_object_get(sub, "terms"), &s->terms) ||
		    get_i64(sub, "period_start", &s->period_start) ||
		    get_i64(sub, "period_end", &s->period_end) || !json_is_integer(seats))
			goto bad;
		s->seats = (int32_t)json_integer_value(seats);
		s->auto_renew = json_is_true(json_object_get(sub, "auto_renew"));
		s->paused = json_is_true(json_object_get(sub, "paused"));
		s->cancel_at_period_end = json_is_true(json_object_get(sub, "cancel_at_period_end"));
		json_t *p = json_object_get(sub, "pending");
		if (json_is_object(p)) {
			json_t *pseats = json_object_get(p, "seats");
			s->has_pending = true;
			if (get_terms(json_object_get(p, "terms"), &s->pending) ||
			    get_i64(p, "at", &s->pending_at) || !json_is_integer(pseats))
				goto bad;
			s->pending_seats = (int32_t)json_integer_value(pseats);
		}
	} else if (!json_is_null(sub)) {
		goto bad;
	}
	json_decref(root);
	return w;
bad:
	snprintf(errstr, errlen, "wallet snapshot is malformed");
	goto fail;
oom:
	snprintf(errstr, errlen, "out of memory");
fail:
	tly_wallet_free(w);
	json_decref(root);
	return NULL;
}
