/* The auditor's verifier: re-execution, hash chain, identities, holds and offsets of a ledger. */
#include "audit.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "codec.h"
#include "decide.h"
#include "audit_ids.h"
#include "wallet.h"

/* What the audit knows of one tenant. */
struct tenant {
	tly_uuid id;
	struct tly_wallet *w;     /* re-execution; NULL before its first input */
	int64_t last_seq;         /* last stored entry seen */
	unsigned char last_hash[32];
	int64_t allowance, credits, held, overage; /* after the last stored entry */
	int64_t open_held;        /* tokens of the holds placed and not ended, by the stored entries */
	bool counted;             /* has an entry in range */
	/* its event ids (struct seen) and holds (struct hold): a map per tenant, so that the maps
	 * the partition being audited reads stay small enough for the caches; NULL until used */
	struct tly_audit_ids *seen, *holds;
};

/* An event id of a tenant: where re-execution and the stored entries first applied it. */
struct seen {
	tly_uuid id;              /* the key: first */
	unsigned char digest[32]; /* re-execution's cause digest */
	bool replayed;
	int32_t partition;        /* stored: first cause with a non-duplicate entry; -1: none */
	int64_t offset;
};

struct hold {
	tly_uuid id;              /* the key: first */
	int64_t tokens;
	bool open;
};

/* One partition: its tenants in first-input order (a ClockTick reaches each of them). */
struct part {
	bool checked;             /* announced: offsets checked */
	int64_t next_offset;
	int64_t expect;           /* next offset that must have an outcome */
	int64_t *quarantined;
	size_t n_quarantined, qi;
	struct tenant **tenants;
	struct tly_wallet **wallets; /* tenants[i]->w, for the ClockTicks that reach them all */
	size_t n_tenants, cap_tenants;
};

struct tly_audit {
	struct tly_audit_opts opts;
	struct tly_codec *codec;
	struct tly_ledger_config cfg;
	struct tly_audit_ids *tenants; /* struct tenant */
	struct tenant *last_tenant; /* the last one looked up: an input's entries are its tenant's */
	struct tly_arena *arena;   /* tenants, seen, holds: live as long as the audit */
	struct part *parts;
	size_t n_parts;
	struct tly_event input;    /* the decoded input, reused */
	struct tly_entries produced;
	size_t *order;             /* produced, sorted by (tenant, seq) */
	size_t cap_order, n_order, next;
	bool group;                /* an input is open */
	int32_t g_partition;
	int64_t g_offset;
	bool g_tick;
	struct seen *g_seen;       /* the open input's event id, once looked up (NULL: not yet) */
	struct tly_audit_counts counts;
};

/* ---- failures ----------------------------------------------------------------------------- */

static bool in_range(const struct tly_audit *a, int64_t seq, int64_t time)
{
	return seq >= a->opts.from_seq && seq <= a->opts.to_seq && time >= a->opts.from_time &&
	       time <= a->opts.to_time;
}

__attribute__((format(printf, 7, 8))) static void fail(struct tly_audit *a, const char *check,
						       const tly_uuid *tenant, int64_t seq,
						       int32_t partition, int64_t offset,
						       const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	struct tly_audit_failure f = {check, {{0}}, seq, partition, offset, msg};
	if (tenant)
		f.tenant = *tenant;
	a->counts.failures++;
	if (a->opts.on_failure)
		a->opts.on_failure(&f, a->opts.ud);
}

/* ---- lifecycle ---------------------------------------------------------------------------- */

struct tly_audit *tly_audit_new(const struct tly_audit_opts *opts, char *errstr, size_t errlen)
{
	struct tly_audit *a = calloc(1, sizeof(*a));
	if (!a) {
		snprintf(errstr, errlen, "out of memory");
		return NULL;
	}
	a->opts = *opts;
	if (!(a->codec = tly_codec_new(errstr, errlen)))
		goto fail;
	a->cfg = (struct tly_ledger_config){opts->overdraft_limit, a->codec};
	if (!(a->tenants = tly_audit_ids_new()) || !(a->arena = tly_arena_new())) {
		snprintf(errstr, errlen, "out of memory");
		goto fail;
	}
	return a;
fail:
	tly_audit_free(a);
	return NULL;
}

void tly_audit_free(struct tly_audit *a)
{
	if (!a)
		return;
	if (a->tenants) {
		for (size_t i = 0; i < tly_audit_ids_capacity(a->tenants); i++) {
			struct tenant *t = tly_audit_ids_slot(a->tenants, i);
			if (t) {
				tly_wallet_free(t->w);
				tly_audit_ids_free(t->seen);
				tly_audit_ids_free(t->holds);
			}
		}
	}
	for (size_t i = 0; i < a->n_parts; i++) {
		free(a->parts[i].tenants);
		free(a->parts[i].wallets);
		free(a->parts[i].quarantined);
	}
	free(a->parts);
	tly_audit_ids_free(a->tenants);
	tly_arena_free(a->arena);
	tly_event_free(&a->input);
	tly_entries_free(&a->produced);
	free(a->order);
	tly_codec_free(a->codec);
	free(a);
}

void tly_audit_get_counts(const struct tly_audit *a, struct tly_audit_counts *out)
{
	*out = a->counts;
}

static struct part *part_get(struct tly_audit *a, int32_t partition)
{
	if (partition < 0)
		return NULL;
	if ((size_t)partition >= a->n_parts) {
		size_t n = (size_t)partition + 1;
		struct part *p = realloc(a->parts, n * sizeof(*p));
		if (!p)
			return NULL;
		memset(p + a->n_parts, 0, (n - a->n_parts) * sizeof(*p));
		a->parts = p;
		a->n_parts = n;
	}
	struct part *p = &a->parts[partition];
	return p;
}

static struct tenant *tenant_get(struct tly_audit *a, const tly_uuid *id)
{
	struct tenant *t = a->last_tenant;
	if (t && memcmp(t->id.b, id->b, 16) == 0)
		return t;
	if (!(t = tly_audit_ids_get(a->tenants, id))) {
		if (!(t = tly_arena_alloc(a->arena, sizeof(*t))))
			return NULL;
		memset(t, 0, sizeof(*t));
		t->id = *id;
		if (tly_audit_ids_add(a->tenants, t) != 0)
			return NULL;
	}
	return a->last_tenant = t;
}

/* ---- offsets ------------------------------------------------------------------------------ */

int tly_audit_partition(struct tly_audit *a, int32_t partition, int64_t next_offset,
			const int64_t *quarantined, size_t n_quarantined)
{
	struct part *p = part_get(a, partition);
	if (!p)
		return TLY_E_NOMEM;
	free(p->quarantined);
	p->quarantined = NULL;
	if (n_quarantined && !(p->quarantined = malloc(n_quarantined * sizeof(int64_t))))
		return TLY_E_NOMEM;
	if (n_quarantined)
		memcpy(p->quarantined, quarantined, n_quarantined * sizeof(int64_t));
	p->n_quarantined = n_quarantined;
	p->qi = 0;
	p->checked = true;
	p->next_offset = next_offset < 0 ? 0 : next_offset;
	p->expect = 0;
	return 0;
}

/* Every offset of p below upto is applied or quarantined; report the runs that are neither. */
static void offsets_upto(struct tly_audit *a, int32_t partition, struct part *p, int64_t upto)
{
	while (p->expect < upto) {
		while (p->qi < p->n_quarantined && p->quarantined[p->qi] < p->expect)
			p->qi++;
		if (p->qi < p->n_quarantined && p->quarantined[p->qi] == p->expect) {
			p->expect++;
			continue;
		}
		int64_t end = upto;
		if (p->qi < p->n_quarantined && p->quarantined[p->qi] < end)
			end = p->quarantined[p->qi];
		a->counts.checks++;
		fail(a, "offsets", NULL, 0, partition, p->expect,
		     "offsets %" PRId64 "..%" PRId64 " of partition %d were consumed (stored next "
		     "offset %" PRId64 ") but have no outcome: neither an applied input nor quarantined",
		     p->expect, end - 1, (int)partition, p->next_offset);
		p->expect = end;
	}
}

/* ---- re-execution ------------------------------------------------------------------------- */

static const struct tly_ledger_entry *le(const struct tly_event *ev)
{
	return &ev->u.ledger_entry;
}

/* Entry order inside one input's outcome: (tenant, seq). */
static int key_cmp(const struct tly_event *x, const struct tly_event *y)
{
	int c = memcmp(x->tenant_id.b, y->tenant_id.b, 16);
	if (c)
		return c;
	return le(x)->seq < le(y)->seq ? -1 : le(x)->seq > le(y)->seq;
}

static int order_cmp(const void *x, const void *y, void *produced)
{
	const struct tly_entries *p = produced;
	return key_cmp(&p->items[*(const size_t *)x], &p->items[*(const size_t *)y]);
}

/* The outcome of the open input is complete: what re-execution produced and nobody stored. */
static void close_group(struct tly_audit *a)
{
	for (; a->next < a->n_order; a->next++) {
		const struct tly_event *ev = &a->produced.items[a->order[a->next]];
		a->counts.checks++;
		if (in_range(a, le(ev)->seq, le(ev)->ledger_time))
			fail(a, "reexec", &ev->tenant_id, le(ev)->seq, a->g_partition, a->g_offset,
			     "entry is missing: re-executing input %d/%" PRId64 " (%s) yields seq %" PRId64
			     " (%s), not stored",
			     (int)a->g_partition, a->g_offset, le(ev)->cause_type, le(ev)->seq,
			     le(ev)->kind);
	}
	a->group = false;
	a->n_order = a->next = 0;
	tly_entries_clear(&a->produced);
}

/* The tenant's map *map, created on first use. NULL on OOM. */
static struct tly_audit_ids *map_of(struct tly_audit_ids **map)
{
	if (!*map)
		*map = tly_audit_ids_new();
	return *map;
}

/* A new event id of a tenant (not in its map yet). NULL on OOM. */
static struct seen *seen_add(struct tly_audit *a, struct tenant *t, const tly_uuid *id)
{
	struct seen *s = tly_arena_alloc(a->arena, sizeof(*s));
	if (!s || !map_of(&t->seen))
		return NULL;
	memset(s, 0, sizeof(*s));
	s->id = *id;
	s->partition = -1;
	s->offset = -1;
	return tly_audit_ids_add(t->seen, s) == 0 ? s : NULL;
}

static struct seen *seen_get(struct tly_audit *a, struct tenant *t, const tly_uuid *id,
			     bool create)
{
	if (a->g_seen && memcmp(id->b, a->input.event_id.b, 16) == 0 &&
	    memcmp(t->id.b, a->input.tenant_id.b, 16) == 0)
		return a->g_seen;
	struct seen *s = t->seen ? tly_audit_ids_get(t->seen, id) : NULL;
	return s || !create ? s : seen_add(a, t, id);
}

static int wallet_of(struct part *p, struct tenant *t)
{
	if (t->w)
		return 0;
	if (!(t->w = tly_wallet_new(&t->id)))
		return TLY_E_NOMEM;
	if (p->n_tenants == p->cap_tenants) {
		size_t cap = p->cap_tenants ? 2 * p->cap_tenants : 64;
		struct tenant **l = realloc(p->tenants, cap * sizeof(*l));
		if (l)
			p->tenants = l;
		struct tly_wallet **wl = realloc(p->wallets, cap * sizeof(*wl));
		if (wl)
			p->wallets = wl;
		if (!l || !wl)
			return TLY_E_NOMEM;
		p->cap_tenants = cap;
	}
	p->wallets[p->n_tenants] = t->w;
	p->tenants[p->n_tenants++] = t;
	return 0;
}

/* Decide one decoded input as tally-ledger does (see consumers/ledger_partition.c). */
static int replay(struct tly_audit *a, struct part *p, const tly_uuid *tenant,
		  const struct tly_cause *cause)
{
	char errstr[256];
	const struct tly_event *ev = &a->input;
	if (ev->type == TLY_EV_CLOCK_TICK) {
		for (size_t i = 0; i < p->n_tenants; i++) {
			if (tly_ledger_tick(&a->cfg, p->wallets[i], ev->occurred_at, cause,
					    &a->produced, errstr, sizeof(errstr)) != 0) {
				fail(a, "input", &p->tenants[i]->id, 0, cause->partition, cause->offset,
				     "could not re-execute clock tick: %s", errstr);
				return TLY_E_INVALID;
			}
		}
		return 0;
	}
	if (!tenant || memcmp(tenant->b, ev->tenant_id.b, 16) != 0) {
		fail(a, "input", &ev->tenant_id, 0, cause->partition, cause->offset,
		     "the stored input's tenant_id column is not its event's tenant");
		return TLY_E_INVALID;
	}
	struct tenant *t = tenant_get(a, &ev->tenant_id);
	if (!t || wallet_of(p, t) != 0)
		return TLY_E_NOMEM;
	struct seen *s = seen_get(a, t, &ev->event_id, false);
	struct tly_seen seen = {s && s->replayed, {0}};
	if (seen.seen)
		memcpy(seen.digest, s->digest, 32);
	size_t before = a->produced.n;
	int rc = tly_ledger_apply(&a->cfg, t->w, ev, cause, &seen, &a->produced, errstr,
				  sizeof(errstr));
	if (rc == TLY_E_NOMEM)
		return rc;
	if (rc != 0) {
		a->produced.n = before;
		fail(a, "input", &t->id, 0, cause->partition, cause->offset,
		     "the decision core refuses this applied input (the ledger would have quarantined "
		     "it): %s",
		     errstr);
		return TLY_E_INVALID;
	}
	if (a->produced.n > before && !seen.seen) {
		if (!s && !(s = seen_add(a, t, &ev->event_id)))
			return TLY_E_NOMEM;
		s->replayed = true;
		memcpy(s->digest, cause->digest, 32);
	}
	a->g_seen = s; /* the stored entries of this input look it up again */
	return 0;
}

#define EXPECT_PREFETCH 4 /* a ClockTick may end the holds of many tenants: those of the first */

/*
 * Offered to the codec: the ids an input's stored entries share with it, its event id and the
 * ids its entries act on (a reservation, a grant, a debit). Not the holds that expire on the way
 * (other inputs placed them), nor the tenant (the memo keeps the partition's few), nor the
 * subscription (in every entry, in few inputs).
 */
void tly_audit_expect(struct tly_audit *a, const struct tly_event *entries, size_t n)
{
	const tly_uuid *last = NULL;
	if (n == 0)
		return;
	tly_codec_uuid_hint(a->codec, &le(&entries[0])->cause_event_id);
	/* the maps re-execution and the checks will look the ids up in, loaded while it decodes */
	const struct tenant *t = tly_audit_ids_get(a->tenants, &entries[0].tenant_id);
	if (t && t->seen)
		tly_audit_ids_prefetch(t->seen, &le(&entries[0])->cause_event_id);
	for (size_t i = 0; i < n; i++) {
		const struct tly_ledger_entry *e = le(&entries[i]);
		if (t && t->holds && i < EXPECT_PREFETCH && !tly_uuid_is_nil(&e->ref_id))
			tly_audit_ids_prefetch(t->holds, &e->ref_id);
		if (tly_uuid_is_nil(&e->ref_id) || strcmp(e->kind, TLY_KIND_HOLD_EXPIRED) == 0 ||
		    (last && memcmp(last->b, e->ref_id.b, 16) == 0))
			continue;
		tly_codec_uuid_hint(a->codec, &e->ref_id);
		last = &e->ref_id;
	}
}

int tly_audit_input(struct tly_audit *a, int32_t partition, int64_t offset, const tly_uuid *tenant,
		    const void *value, size_t len)
{
	char errstr[256];
	if (a->group)
		close_group(a);
	struct part *p = part_get(a, partition);
	if (!p)
		return TLY_E_NOMEM;
	if (p->checked) {
		a->counts.checks++;
		if (offset >= p->next_offset)
			fail(a, "offsets", tenant, 0, partition, offset,
			     "input %d/%" PRId64 " is stored as applied but the stored next offset is %"
			     PRId64,
			     (int)partition, offset, p->next_offset);
		/* packed batches (migration 0010) have no key per offset: one stored twice shows here */
		if (offset < p->expect)
			fail(a, "offsets", tenant, 0, partition, offset,
			     "input %d/%" PRId64 " is stored more than once (or out of offset order)",
			     (int)partition, offset);
		offsets_upto(a, partition, p, offset);
		while (p->qi < p->n_quarantined && p->quarantined[p->qi] < offset)
			p->qi++;
		if (p->qi < p->n_quarantined && p->quarantined[p->qi] == offset)
			fail(a, "offsets", tenant, 0, partition, offset,
			     "input %d/%" PRId64 " is stored as applied and as quarantined", (int)partition,
			     offset);
		if (p->expect == offset)
			p->expect = offset + 1;
	}
	a->group = true;
	a->g_seen = NULL;
	a->g_partition = partition;
	a->g_offset = offset;
	a->counts.inputs++;
	/* decoded and validated as tally-ledger did; its cause digest from its current encoding */
	unsigned char digest[32];
	int rc = tly_codec_decode_digest(a->codec, value, len, &a->input, digest, errstr,
					 sizeof(errstr));
	if (rc == TLY_E_NOMEM)
		return rc;
	if (rc != 0) {
		fail(a, "input", tenant, 0, partition, offset,
		     "could not decode stored input %d/%" PRId64 ": %s", (int)partition, offset, errstr);
		return 0;
	}
	const struct tly_event_desc *desc = tly_event_desc(a->input.type);
	struct tly_cause cause = {a->input.event_id, desc->name, partition, offset, {0}};
	memcpy(cause.digest, digest, 32);
	a->g_tick = a->input.type == TLY_EV_CLOCK_TICK;
	rc = replay(a, p, tenant, &cause);
	if (rc == TLY_E_NOMEM)
		return rc;
	if (rc != 0) {
		tly_entries_clear(&a->produced);
		return 0;
	}
	if (a->produced.n > a->cap_order) {
		size_t *o = realloc(a->order, a->produced.n * sizeof(*o));
		if (!o)
			return TLY_E_NOMEM;
		a->order = o;
		a->cap_order = a->produced.n;
	}
	for (size_t i = 0; i < a->produced.n; i++)
		a->order[i] = i;
	a->n_order = a->produced.n;
	if (a->g_tick && a->n_order > 1) {
		qsort_r(a->order, a->n_order, sizeof(*a->order), order_cmp, &a->produced);
	}
	return 0;
}

/* ---- stored entries ----------------------------------------------------------------------- */

/* The first field (in schema order) where x and y differ, written into out; false if none. */
static bool field_diff(const struct tly_record_desc *d, const void *x, const void *y, char *out,
		       size_t outlen)
{
	for (size_t i = 0; i < d->n_fields; i++) {
		const struct tly_field *f = &d->fields[i];
		const char *px = (const char *)x + f->offset, *py = (const char *)y + f->offset;
		bool differ = false;
		char vx[64], vy[64]; /* written only for a difference */
		vx[0] = vy[0] = '\0';
		switch (f->kind) {
		case TLY_F_UUID:
		case TLY_F_OPT_UUID:
			differ = memcmp(px, py, sizeof(tly_uuid)) != 0;
			break;
		case TLY_F_STR:
		case TLY_F_OPT_STR:
		case TLY_F_JSON: {
			const char *sx = *(const char *const *)px, *sy = *(const char *const *)py;
			differ = sx != sy && ((sx == NULL) != (sy == NULL) || strcmp(sx, sy) != 0);
			if (differ) {
				snprintf(vx, sizeof(vx), "%s", sx ? sx : "null");
				snprintf(vy, sizeof(vy), "%s", sy ? sy : "null");
			}
			break;
		}
		case TLY_F_LONG:
		case TLY_F_TS: {
			int64_t ix = *(const int64_t *)px, iy = *(const int64_t *)py;
			if ((differ = ix != iy)) {
				snprintf(vx, sizeof(vx), "%" PRId64, ix);
				snprintf(vy, sizeof(vy), "%" PRId64, iy);
			}
			break;
		}
		case TLY_F_INT:
			if ((differ = *(const int32_t *)px != *(const int32_t *)py)) {
				snprintf(vx, sizeof(vx), "%d", (int)*(const int32_t *)px);
				snprintf(vy, sizeof(vy), "%d", (int)*(const int32_t *)py);
			}
			break;
		case TLY_F_BOOL:
			differ = *(const bool *)px != *(const bool *)py;
			break;
		case TLY_F_OPT_LONG:
		case TLY_F_OPT_TS: {
			const struct tly_opt_i64 *ox = (const void *)px, *oy = (const void *)py;
			if ((differ = ox->set != oy->set || (ox->set && ox->v != oy->v))) {
				snprintf(vx, sizeof(vx), ox->set ? "%" PRId64 : "null", ox->v);
				snprintf(vy, sizeof(vy), oy->set ? "%" PRId64 : "null", oy->v);
			}
			break;
		}
		case TLY_F_SHA256:
			differ = memcmp(px, py, 32) != 0;
			break;
		case TLY_F_RECORDS: {
			const struct tly_list *lx = (const void *)px, *ly = (const void *)py;
			if (lx->n != ly->n) {
				differ = true;
				snprintf(vx, sizeof(vx), "%zu items", lx->n);
				snprintf(vy, sizeof(vy), "%zu items", ly->n);
				break;
			}
			for (size_t k = 0; k < lx->n && !differ; k++) {
				const char *ix = (const char *)lx->items + k * f->sub->size;
				const char *iy = (const char *)ly->items + k * f->sub->size;
				char inner[256];
				if (field_diff(f->sub, ix, iy, inner, sizeof(inner))) {
					snprintf(out, outlen, "%s[%zu].%s", f->name, k, inner);
					return true;
				}
			}
			break;
		}
		case TLY_F_MAP_LONG:
		case TLY_F_MAP_STR:
		case TLY_F_MAP_BOOL:
			break; /* LedgerEntry has none */
		}
		if (differ) {
			if (vx[0])
				snprintf(out, outlen, "%s (stored %s, re-executed %s)", f->name, vx, vy);
			else
				snprintf(out, outlen, "%s", f->name);
			return true;
		}
	}
	return false;
}

/* Compare a stored entry of the open input with re-execution; true if proved equal. */
static bool match_produced(struct tly_audit *a, const struct tly_event *stored, bool report)
{
	const struct tly_ledger_entry *e = le(stored);
	while (a->next < a->n_order) {
		const struct tly_event *want = &a->produced.items[a->order[a->next]];
		int c = key_cmp(want, stored);
		if (c > 0)
			break;
		a->next++;
		if (c < 0) {
			a->counts.checks++;
			if (in_range(a, le(want)->seq, le(want)->ledger_time))
				fail(a, "reexec", &want->tenant_id, le(want)->seq, e->cause_partition,
				     e->cause_offset,
				     "entry is missing: re-executing input %d/%" PRId64 " (%s) yields seq %"
				     PRId64 " (%s), not stored",
				     (int)a->g_partition, a->g_offset, le(want)->cause_type,
				     le(want)->seq, le(want)->kind);
			continue;
		}
		char diff[320];
		a->counts.checks++;
		if (!field_diff(&tly_event_desc(TLY_EV_LEDGER_ENTRY)->record, stored, want, diff,
				sizeof(diff)))
			return true;
		if (report)
			fail(a, "reexec", &stored->tenant_id, e->seq, e->cause_partition,
			     e->cause_offset,
			     "entry differs from the re-execution of its cause %d/%" PRId64 " (%s) in "
			     "field %s",
			     (int)e->cause_partition, e->cause_offset, e->cause_type, diff);
		return false;
	}
	a->counts.checks++;
	if (report)
		fail(a, "reexec", &stored->tenant_id, e->seq, e->cause_partition, e->cause_offset,
		     "forged entry: re-executing its cause %d/%" PRId64 " (%s) yields no entry seq %"
		     PRId64 " (%s)",
		     (int)e->cause_partition, e->cause_offset, e->cause_type, e->seq, e->kind);
	return false;
}

static void hex8(const unsigned char *h, char out[17])
{
	for (int i = 0; i < 8; i++)
		snprintf(out + 2 * i, 3, "%02x", h[i]);
}

/* What the checks below need to know of an entry's kind, found once per entry. */
enum kind_class { KIND_OTHER, KIND_HOLD_PLACED, KIND_HOLD_ENDED, KIND_NOT_APPLIED };

static enum kind_class kind_class(const char *kind)
{
	if (strcmp(kind, TLY_KIND_HOLD_PLACED) == 0)
		return KIND_HOLD_PLACED;
	if (strcmp(kind, TLY_KIND_HOLD_RELEASED) == 0 || strcmp(kind, TLY_KIND_HOLD_EXPIRED) == 0)
		return KIND_HOLD_ENDED;
	if (strcmp(kind, TLY_KIND_DUPLICATE) == 0 || strcmp(kind, TLY_KIND_CONFLICT) == 0)
		return KIND_NOT_APPLIED;
	return KIND_OTHER;
}

static int check_holds(struct tly_audit *a, struct tenant *t, const struct tly_event *stored,
		       enum kind_class kc, bool report)
{
	const struct tly_ledger_entry *e = le(stored);
	bool placed = kc == KIND_HOLD_PLACED;
	if (!placed && kc != KIND_HOLD_ENDED)
		return 0;
	char ref[37] = ""; /* the hold's id, written only for a failure */
	if (report)
		tly_uuid_format(&e->ref_id, ref);
	struct hold *h = t->holds ? tly_audit_ids_get(t->holds, &e->ref_id) : NULL;
	a->counts.checks++;
	if (placed) {
		if (h && h->open) {
			if (report)
				fail(a, "hold", &t->id, e->seq, e->cause_partition, e->cause_offset,
				     "hold %s placed while it is already open", ref);
			return 0;
		}
		if (!h) {
			if (!(h = tly_arena_alloc(a->arena, sizeof(*h))) || !map_of(&t->holds))
				return TLY_E_NOMEM;
			h->id = e->ref_id;
			if (tly_audit_ids_add(t->holds, h) != 0)
				return TLY_E_NOMEM;
		}
		h->tokens = e->held_delta;
		h->open = true;
		t->open_held += e->held_delta;
		return 0;
	}
	if (!h || !h->open) {
		if (report)
			fail(a, "hold", &t->id, e->seq, e->cause_partition, e->cause_offset,
			     "%s ends hold %s, which is %s", e->kind, ref,
			     h ? "already ended (ended twice)" : "not placed");
		return 0;
	}
	h->open = false;
	t->open_held -= h->tokens;
	if (-e->held_delta != h->tokens && report)
		fail(a, "hold", &t->id, e->seq, e->cause_partition, e->cause_offset,
		     "%s of hold %s frees %" PRId64 " tokens; it held %" PRId64, e->kind, ref,
		     -e->held_delta, h->tokens);
	return 0;
}

static void check_identities(struct tly_audit *a, struct tenant *t, const struct tly_event *stored,
			     bool report)
{
	const struct tly_ledger_entry *e = le(stored);
	const char *bad = NULL;
	char detail[160] = "";
	a->counts.checks++;
	if (e->allowance_remaining - t->allowance != e->allowance_delta)
		bad = "allowance_remaining";
	else if (e->credits_remaining - t->credits != e->credits_delta)
		bad = "credits_remaining";
	else if (e->held - t->held != e->held_delta)
		bad = "held";
	else if (e->overage_tokens - t->overage != e->overage_delta)
		bad = "overage_tokens";
	if (bad)
		snprintf(detail, sizeof(detail), "%s is not the previous entry's plus this entry's delta",
			 bad);
	else if (e->allowance_remaining < 0 || e->credits_remaining < 0 || e->held < 0 ||
		 e->overage_tokens < 0)
		snprintf(detail, sizeof(detail), "a balance is negative (allowance %" PRId64
			 ", credits %" PRId64 ", held %" PRId64 ", overage %" PRId64 ")",
			 e->allowance_remaining, e->credits_remaining, e->held, e->overage_tokens);
	else if (e->held != t->open_held)
		snprintf(detail, sizeof(detail), "held %" PRId64 " is not the sum of the open holds %"
			 PRId64, e->held, t->open_held);
	else {
		int64_t available = e->allowance_remaining + e->credits_remaining - e->held;
		struct tly_balance b = {0};
		/* the wallet's terms only where they matter: a reservation below the limit */
		if (available < -a->opts.overdraft_limit && strcmp(e->kind, TLY_KIND_HOLD_PLACED) == 0 &&
		    t->w)
			tly_wallet_balance(t->w, &b);
		if (!b.overage_allowed && available < -a->opts.overdraft_limit &&
		    strcmp(e->kind, TLY_KIND_HOLD_PLACED) == 0)
			snprintf(detail, sizeof(detail), "available %" PRId64 " is below the limit -%"
				 PRId64 " after a reservation without overage",
				 available, a->opts.overdraft_limit);
	}
	if (detail[0] && report)
		fail(a, "identity", &stored->tenant_id, e->seq, e->cause_partition, e->cause_offset,
		     "%s", detail);
}

static int check_idempotency(struct tly_audit *a, struct tenant *t, const struct tly_event *stored,
			     enum kind_class kc, bool report)
{
	const struct tly_ledger_entry *e = le(stored);
	if (kc == KIND_NOT_APPLIED || strcmp(e->cause_type, "ClockTick") == 0)
		return 0;
	struct seen *s = seen_get(a, t, &e->cause_event_id, true);
	if (!s)
		return TLY_E_NOMEM;
	a->counts.checks++;
	if (s->partition < 0) {
		s->partition = e->cause_partition;
		s->offset = e->cause_offset;
	} else if ((s->partition != e->cause_partition || s->offset != e->cause_offset) && report) {
		char id[37];
		tly_uuid_format(&e->cause_event_id, id);
		fail(a, "idempotency", &t->id, e->seq, e->cause_partition, e->cause_offset,
		     "event_id %s applied twice: first by input %d/%" PRId64 ", again by %d/%" PRId64,
		     id, (int)s->partition, s->offset, (int)e->cause_partition, e->cause_offset);
	}
	return 0;
}

int tly_audit_entry(struct tly_audit *a, const struct tly_event *stored)
{
	const struct tly_ledger_entry *e = le(stored);
	struct tenant *t = tenant_get(a, &stored->tenant_id);
	if (!t)
		return TLY_E_NOMEM;
	bool report = in_range(a, e->seq, e->ledger_time);
	if (report) {
		a->counts.entries++;
		if (!t->counted)
			a->counts.tenants++;
		t->counted = true;
	}
	/* re-execution: the entry must be what its cause yields */
	bool proved = false;
	if (a->group && e->cause_partition == a->g_partition && e->cause_offset == a->g_offset)
		proved = match_produced(a, stored, report);
	else if (report) {
		a->counts.checks++;
		fail(a, "reexec", &t->id, e->seq, e->cause_partition, e->cause_offset,
		     "entry's cause %d/%" PRId64 " (%s) is not an applied input record",
		     (int)e->cause_partition, e->cause_offset, e->cause_type);
	}
	/* the chain: gap-free seq, prev_hash, hash of the canonical bytes */
	a->counts.checks += 2;
	if (e->seq != t->last_seq + 1 && report)
		fail(a, "seq", &t->id, e->seq, e->cause_partition, e->cause_offset,
		     "seq %" PRId64 " follows seq %" PRId64 " (expected %" PRId64 ")", e->seq,
		     t->last_seq, t->last_seq + 1);
	else if (memcmp(e->prev_hash, t->last_hash, 32) != 0 && report) {
		char want[17], got[17];
		hex8(t->last_hash, want);
		hex8(e->prev_hash, got);
		fail(a, "chain", &t->id, e->seq, e->cause_partition, e->cause_offset,
		     "prev_hash %s… is not the hash of seq %" PRId64 " (%s…)", got, t->last_seq, want);
	}
	if (proved) {
		a->counts.reexecuted++; /* equal fields: its hash is the core's, over the same bytes */
	} else {
		unsigned char h[32];
		int rc = tly_ledger_entry_hash(a->codec, stored, h);
		a->counts.rehashed++;
		if (rc == TLY_E_NOMEM)
			return rc;
		if ((rc != 0 || memcmp(h, e->hash, 32) != 0) && report) {
			char want[17], got[17];
			hex8(h, want);
			hex8(e->hash, got);
			if (rc)
				fail(a, "chain", &t->id, e->seq, e->cause_partition, e->cause_offset,
				     "entry has no canonical encoding: %s", tly_err_name(rc));
			else
				fail(a, "chain", &t->id, e->seq, e->cause_partition, e->cause_offset,
				     "hash %s… is not SHA-256(prev_hash || canonical bytes) = %s…",
				     got, want);
		}
	}
	enum kind_class kc = kind_class(e->kind);
	int rc = check_holds(a, t, stored, kc, report);
	if (rc == 0) {
		check_identities(a, t, stored, report);
		rc = check_idempotency(a, t, stored, kc, report);
	}
	t->last_seq = e->seq;
	memcpy(t->last_hash, e->hash, 32);
	t->allowance = e->allowance_remaining;
	t->credits = e->credits_remaining;
	t->held = e->held;
	t->overage = e->overage_tokens;
	return rc;
}

int tly_audit_finish(struct tly_audit *a)
{
	if (a->group)
		close_group(a);
	for (size_t i = 0; i < a->n_parts; i++) {
		struct part *p = &a->parts[i];
		if (p->checked)
			offsets_upto(a, (int32_t)i, p, p->next_offset);
	}
	return 0;
}
