/* Field descriptors of every message type and the validation rules they carry. */
#include "event.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <uuid/uuid.h>

#include "arena.h"

#define EV(member) offsetof(struct tly_event, member)
#define MAX_STR 256            /* default bound of a string field, in bytes */
#define MAX_CONTENT (1 << 20)  /* message content: 1 MiB of JSON */
#define MAX_MAP 1000           /* entries of a map, items of a list */

#define UUID(n, m) {.name = n, .kind = TLY_F_UUID, .offset = EV(m)}
#define OPT_UUID(n, m) {.name = n, .kind = TLY_F_OPT_UUID, .offset = EV(m)}
#define STR(n, m) {.name = n, .kind = TLY_F_STR, .offset = EV(m)}
#define STR_IN(n, m, set) {.name = n, .kind = TLY_F_STR, .offset = EV(m), .one_of = set}
#define OPT_STR(n, m) {.name = n, .kind = TLY_F_OPT_STR, .offset = EV(m)}
#define LONG(n, m) {.name = n, .kind = TLY_F_LONG, .offset = EV(m)}
#define LONG_MIN_(n, m, lo) {.name = n, .kind = TLY_F_LONG, .offset = EV(m), .min = lo}
#define DELTA(n, m) {.name = n, .kind = TLY_F_LONG, .offset = EV(m), .min = INT64_MIN}
#define INT(n, m, lo) {.name = n, .kind = TLY_F_INT, .offset = EV(m), .min = lo}
#define BOOL(n, m) {.name = n, .kind = TLY_F_BOOL, .offset = EV(m)}
#define TS(n, m) {.name = n, .kind = TLY_F_TS, .offset = EV(m)}
#define OPT_LONG(n, m) {.name = n, .kind = TLY_F_OPT_LONG, .offset = EV(m)}
#define OPT_TS(n, m) {.name = n, .kind = TLY_F_OPT_TS, .offset = EV(m)}
#define CURRENCY(n, m) {.name = n, .kind = TLY_F_STR, .offset = EV(m), .flags = TLY_FF_CURRENCY}

#define EVENT_ID                                                                                   \
	{.name = "event_id", .kind = TLY_F_UUID, .offset = EV(event_id), .flags = TLY_FF_FRESH}
#define COMMON EVENT_ID, UUID("tenant_id", tenant_id), TS("occurred_at", occurred_at)

static const char *const intervals[] = {"day", "week", "month", "year", NULL};
static const char *const roles[] = {"user", "assistant", "system", "tool", NULL};
static const char *const conversation_statuses[] = {"completed", "abandoned", "failed", NULL};
static const char *const invoice_statuses[] = {"issued", "paid", "void", "uncollectible", NULL};
static const char *const line_kinds[] = {"plan", "overage", "metered", NULL};

#define TERMS(p)                                                                                   \
	STR("plan_code", p.plan_code), LONG("tokens_per_period", p.tokens_per_period),             \
		STR_IN("interval", p.interval, intervals), INT("interval_count", p.interval_count, 1), \
		LONG("price_cents", p.price_cents), CURRENCY("currency", p.currency),              \
		OPT_LONG("overage_price_micros_per_1k_tokens", p.overage_price_micros_per_1k_tokens), \
		LONG("rollover_cap_tokens", p.rollover_cap_tokens),                                \
		{.name = "metered_prices", .kind = TLY_F_MAP_LONG, .offset = EV(p.metered_prices)}

static const struct tly_field f_tenant_created[] = {
	COMMON, STR("slug", u.tenant_created.slug), STR("name", u.tenant_created.name)};

static const struct tly_field f_user_registered[] = {
	COMMON,
	UUID("user_id", u.user_registered.user_id),
	STR("external_id", u.user_registered.external_id),
	OPT_STR("username", u.user_registered.username),
	STR("display_name", u.user_registered.display_name),
	{.name = "email", .kind = TLY_F_OPT_STR, .offset = EV(u.user_registered.email),
	 .max_len = 320, .flags = TLY_FF_EMAIL},
};

static const struct tly_field f_subscription_started[] = {
	COMMON,
	UUID("subscription_id", u.subscription_started.subscription_id),
	TERMS(u.subscription_started.terms),
	TS("period_start", u.subscription_started.period_start),
	TS("period_end", u.subscription_started.period_end),
	INT("seat_count", u.subscription_started.seat_count, 1),
	BOOL("auto_renew", u.subscription_started.auto_renew),
	{.name = "billing_email", .kind = TLY_F_OPT_STR,
	 .offset = EV(u.subscription_started.billing_email), .max_len = 320, .flags = TLY_FF_EMAIL},
	OPT_TS("trial_ends_at", u.subscription_started.trial_ends_at),
	{.name = "metadata", .kind = TLY_F_MAP_STR, .offset = EV(u.subscription_started.metadata),
	 .max_len = 1024},
};

static const struct tly_field f_subscription_changed[] = {
	COMMON,
	UUID("subscription_id", u.subscription_changed.subscription_id),
	TERMS(u.subscription_changed.terms),
	INT("seat_count", u.subscription_changed.seat_count, 1),
	TS("effective_at", u.subscription_changed.effective_at),
};

static const struct tly_field f_subscription_cancelled[] = {
	COMMON,
	UUID("subscription_id", u.subscription_cancelled.subscription_id),
	BOOL("at_period_end", u.subscription_cancelled.at_period_end),
};

static const struct tly_field f_subscription_paused[] = {
	COMMON, UUID("subscription_id", u.subscription_paused.subscription_id)};

static const struct tly_field f_subscription_resumed[] = {
	COMMON, UUID("subscription_id", u.subscription_resumed.subscription_id)};

static const struct tly_field f_credits_granted[] = {
	COMMON,
	UUID("grant_id", u.credits_granted.grant_id),
	LONG_MIN_("tokens", u.credits_granted.tokens, 1),
	STR("reason", u.credits_granted.reason),
	OPT_TS("expires_at", u.credits_granted.expires_at),
};

static const struct tly_field f_tokens_reserved[] = {
	COMMON,
	UUID("reservation_id", u.tokens_reserved.reservation_id),
	LONG_MIN_("tokens", u.tokens_reserved.tokens, 1),
	TS("expires_at", u.tokens_reserved.expires_at),
	STR("model", u.tokens_reserved.model),
	OPT_UUID("conversation_id", u.tokens_reserved.conversation_id),
};

static const struct tly_field f_reservation_settled[] = {
	COMMON,
	UUID("reservation_id", u.reservation_settled.reservation_id),
	STR("provider", u.reservation_settled.provider),
	STR("model", u.reservation_settled.model),
	LONG("prompt_tokens", u.reservation_settled.prompt_tokens),
	LONG("completion_tokens", u.reservation_settled.completion_tokens),
	LONG("reasoning_tokens", u.reservation_settled.reasoning_tokens),
	LONG("cost_micros", u.reservation_settled.cost_micros),
};

static const struct tly_field f_reservation_released[] = {
	COMMON,
	UUID("reservation_id", u.reservation_released.reservation_id),
	STR("reason", u.reservation_released.reason),
};

static const struct tly_field f_tokens_debited[] = {
	COMMON,
	UUID("debit_id", u.tokens_debited.debit_id),
	LONG("tokens", u.tokens_debited.tokens),
	LONG("cost_micros", u.tokens_debited.cost_micros),
	STR("reason", u.tokens_debited.reason),
};

static const struct tly_field f_conversation_started[] = {
	COMMON,
	UUID("conversation_id", u.conversation_started.conversation_id),
	UUID("user_id", u.conversation_started.user_id),
	STR("agent_entrypoint", u.conversation_started.agent_entrypoint),
	STR("source_channel", u.conversation_started.source_channel),
	OPT_STR("topic_hint", u.conversation_started.topic_hint),
};

static const struct tly_field f_message_appended[] = {
	COMMON,
	UUID("conversation_id", u.message_appended.conversation_id),
	{.name = "message_id", .kind = TLY_F_UUID, .offset = EV(u.message_appended.message_id),
	 .flags = TLY_FF_FRESH},
	OPT_UUID("user_id", u.message_appended.user_id),
	STR_IN("role", u.message_appended.role, roles),
	STR("agent_type", u.message_appended.agent_type),
	{.name = "content", .kind = TLY_F_JSON, .offset = EV(u.message_appended.content),
	 .max_len = MAX_CONTENT},
	OPT_STR("tool_name", u.message_appended.tool_name),
	OPT_STR("tool_call_id", u.message_appended.tool_call_id),
	STR("provider", u.message_appended.provider),
	STR("model", u.message_appended.model),
	LONG("prompt_tokens", u.message_appended.prompt_tokens),
	LONG("completion_tokens", u.message_appended.completion_tokens),
	LONG("reasoning_tokens", u.message_appended.reasoning_tokens),
	LONG("latency_ms", u.message_appended.latency_ms),
	LONG("cost_micros", u.message_appended.cost_micros),
	OPT_UUID("reservation_id", u.message_appended.reservation_id),
};

static const struct tly_field f_agent_handoff[] = {
	COMMON,
	UUID("conversation_id", u.agent_handoff.conversation_id),
	STR("from_agent", u.agent_handoff.from_agent),
	STR("to_agent", u.agent_handoff.to_agent),
};

static const struct tly_field f_conversation_closed[] = {
	COMMON,
	UUID("conversation_id", u.conversation_closed.conversation_id),
	STR_IN("status", u.conversation_closed.status, conversation_statuses),
};

static const struct tly_field f_usage_reported[] = {
	COMMON,
	UUID("subscription_id", u.usage_reported.subscription_id),
	STR("feature_key", u.usage_reported.feature_key),
	STR("unit", u.usage_reported.unit),
	LONG("quantity", u.usage_reported.quantity),
	STR("external_event_id", u.usage_reported.external_event_id),
};

static const struct tly_field f_invoice_status_changed[] = {
	COMMON,
	UUID("invoice_id", u.invoice_status_changed.invoice_id),
	STR_IN("status", u.invoice_status_changed.status, invoice_statuses),
	OPT_STR("external_invoice_id", u.invoice_status_changed.external_invoice_id),
	{.name = "hosted_invoice_url", .kind = TLY_F_OPT_STR,
	 .offset = EV(u.invoice_status_changed.hosted_invoice_url), .max_len = 2048},
};

static const struct tly_field f_clock_tick[] = {
	EVENT_ID,
	TS("occurred_at", occurred_at),
};

#define IT(type, m) offsetof(struct type, m)
static const struct tly_field f_plan_feature[] = {
	{.name = "feature_key", .kind = TLY_F_STR, .offset = IT(tly_plan_feature, feature_key)},
	{.name = "display_name", .kind = TLY_F_STR, .offset = IT(tly_plan_feature, display_name)},
	{.name = "hard_limit", .kind = TLY_F_OPT_LONG, .offset = IT(tly_plan_feature, hard_limit)},
	{.name = "soft_limit", .kind = TLY_F_OPT_LONG, .offset = IT(tly_plan_feature, soft_limit)},
	{.name = "is_metered", .kind = TLY_F_BOOL, .offset = IT(tly_plan_feature, is_metered)},
};
static const struct tly_record_desc d_plan_feature = {
	"PlanFeature", sizeof(struct tly_plan_feature), f_plan_feature,
	sizeof(f_plan_feature) / sizeof(f_plan_feature[0])};

static const struct tly_field f_plan_published[] = {
	EVENT_ID,
	TS("occurred_at", occurred_at),
	UUID("plan_id", u.plan_published.plan_id),
	STR("code", u.plan_published.code),
	STR("name", u.plan_published.name),
	STR_IN("interval", u.plan_published.interval, intervals),
	INT("interval_count", u.plan_published.interval_count, 1),
	LONG("price_cents", u.plan_published.price_cents),
	CURRENCY("currency", u.plan_published.currency),
	INT("trial_days", u.plan_published.trial_days, 0),
	INT("seat_included", u.plan_published.seat_included, 0),
	LONG("tokens_per_period", u.plan_published.tokens_per_period),
	OPT_LONG("overage_price_micros_per_1k_tokens",
		 u.plan_published.overage_price_micros_per_1k_tokens),
	{.name = "feature_toggles", .kind = TLY_F_MAP_BOOL, .offset = EV(u.plan_published.feature_toggles)},
	{.name = "features", .kind = TLY_F_RECORDS, .offset = EV(u.plan_published.features),
	 .sub = &d_plan_feature},
	BOOL("is_active", u.plan_published.is_active),
};

static const struct tly_field f_invoice_line[] = {
	{.name = "kind", .kind = TLY_F_STR, .offset = IT(tly_invoice_line, kind), .one_of = line_kinds},
	{.name = "feature_key", .kind = TLY_F_OPT_STR, .offset = IT(tly_invoice_line, feature_key)},
	{.name = "quantity", .kind = TLY_F_LONG, .offset = IT(tly_invoice_line, quantity)},
	{.name = "unit_price_micros", .kind = TLY_F_LONG, .offset = IT(tly_invoice_line, unit_price_micros)},
	{.name = "amount_cents", .kind = TLY_F_LONG, .offset = IT(tly_invoice_line, amount_cents)},
};
static const struct tly_record_desc d_invoice_line = {
	"InvoiceLine", sizeof(struct tly_invoice_line), f_invoice_line,
	sizeof(f_invoice_line) / sizeof(f_invoice_line[0])};

#define LE(m) u.ledger_entry.m
static const struct tly_field f_ledger_entry[] = {
	UUID("tenant_id", tenant_id),
	LONG_MIN_("seq", LE(seq), 1),
	STR("kind", LE(kind)),
	UUID("cause_event_id", LE(cause_event_id)),
	STR("cause_type", LE(cause_type)),
	INT("cause_partition", LE(cause_partition), 0),
	LONG("cause_offset", LE(cause_offset)),
	{.name = "cause_digest", .kind = TLY_F_SHA256, .offset = EV(LE(cause_digest))},
	OPT_UUID("ref_id", LE(ref_id)),
	OPT_UUID("subscription_id", LE(subscription_id)),
	DELTA("allowance_delta", LE(allowance_delta)),
	DELTA("credits_delta", LE(credits_delta)),
	DELTA("held_delta", LE(held_delta)),
	DELTA("overage_delta", LE(overage_delta)),
	LONG("allowance_remaining", LE(allowance_remaining)),
	LONG("credits_remaining", LE(credits_remaining)),
	LONG("held", LE(held)),
	LONG("overage_tokens", LE(overage_tokens)),
	OPT_TS("period_start", LE(period_start)),
	OPT_TS("period_end", LE(period_end)),
	OPT_LONG("amount_cents", LE(amount_cents)),
	{.name = "currency", .kind = TLY_F_OPT_STR, .offset = EV(LE(currency)), .flags = TLY_FF_CURRENCY},
	{.name = "lines", .kind = TLY_F_RECORDS, .offset = EV(LE(lines)), .sub = &d_invoice_line},
	{.name = "reason", .kind = TLY_F_OPT_STR, .offset = EV(LE(reason)), .max_len = 1024},
	TS("ledger_time", LE(ledger_time)),
	{.name = "prev_hash", .kind = TLY_F_SHA256, .offset = EV(LE(prev_hash))},
	{.name = "hash", .kind = TLY_F_SHA256, .offset = EV(LE(hash))},
};

/* ---- cross-field rules ------------------------------------------------------------------- */

static int check_subscription_started(const struct tly_event *ev, char *errstr, size_t errlen)
{
	const struct tly_ev_subscription_started *s = &ev->u.subscription_started;
	if (s->period_end <= s->period_start) {
		snprintf(errstr, errlen, "field period_end: must be after period_start");
		return TLY_E_INVALID;
	}
	return 0;
}

static int check_tokens_reserved(const struct tly_event *ev, char *errstr, size_t errlen)
{
	if (ev->u.tokens_reserved.expires_at <= ev->occurred_at) {
		snprintf(errstr, errlen, "field expires_at: must be after occurred_at");
		return TLY_E_INVALID;
	}
	return 0;
}

static int check_credits_granted(const struct tly_event *ev, char *errstr, size_t errlen)
{
	const struct tly_opt_i64 *exp = &ev->u.credits_granted.expires_at;
	if (exp->set && exp->v <= ev->occurred_at) {
		snprintf(errstr, errlen, "field expires_at: must be after occurred_at");
		return TLY_E_INVALID;
	}
	return 0;
}

static int check_ledger_entry(const struct tly_event *ev, char *errstr, size_t errlen)
{
	const struct tly_ledger_entry *e = &ev->u.ledger_entry;
	if (e->period_start.set != e->period_end.set ||
	    (e->period_start.set && e->period_end.v <= e->period_start.v)) {
		snprintf(errstr, errlen, "field period_end: must be set with period_start and after it");
		return TLY_E_INVALID;
	}
	if (e->amount_cents.set != (e->currency != NULL)) {
		snprintf(errstr, errlen, "field currency: must be set exactly when amount_cents is");
		return TLY_E_INVALID;
	}
	return 0;
}

/* ---- the catalog ------------------------------------------------------------------------- */

#define N(a) (sizeof(a) / sizeof((a)[0]))
#define DESC(T, nm, ns, topic, f, chk) \
	[T] = {T, nm, ns "." nm, topic, {nm, sizeof(struct tly_event), f, N(f)}, chk}

static const struct tly_event_desc descs[TLY_EV__COUNT] = {
	DESC(TLY_EV_TENANT_CREATED, "TenantCreated", "tally.events", "tally.events", f_tenant_created, NULL),
	DESC(TLY_EV_USER_REGISTERED, "UserRegistered", "tally.events", "tally.events", f_user_registered, NULL),
	DESC(TLY_EV_SUBSCRIPTION_STARTED, "SubscriptionStarted", "tally.events", "tally.events",
	     f_subscription_started, check_subscription_started),
	DESC(TLY_EV_SUBSCRIPTION_CHANGED, "SubscriptionChanged", "tally.events", "tally.events",
	     f_subscription_changed, NULL),
	DESC(TLY_EV_SUBSCRIPTION_CANCELLED, "SubscriptionCancelled", "tally.events", "tally.events",
	     f_subscription_cancelled, NULL),
	DESC(TLY_EV_SUBSCRIPTION_PAUSED, "SubscriptionPaused", "tally.events", "tally.events",
	     f_subscription_paused, NULL),
	DESC(TLY_EV_SUBSCRIPTION_RESUMED, "SubscriptionResumed", "tally.events", "tally.events",
	     f_subscription_resumed, NULL),
	DESC(TLY_EV_CREDITS_GRANTED, "CreditsGranted", "tally.events", "tally.events", f_credits_granted,
	     check_credits_granted),
	DESC(TLY_EV_TOKENS_RESERVED, "TokensReserved", "tally.events", "tally.events", f_tokens_reserved,
	     check_tokens_reserved),
	DESC(TLY_EV_RESERVATION_SETTLED, "ReservationSettled", "tally.events", "tally.events",
	     f_reservation_settled, NULL),
	DESC(TLY_EV_RESERVATION_RELEASED, "ReservationReleased", "tally.events", "tally.events",
	     f_reservation_released, NULL),
	DESC(TLY_EV_TOKENS_DEBITED, "TokensDebited", "tally.events", "tally.events", f_tokens_debited, NULL),
	DESC(TLY_EV_CONVERSATION_STARTED, "ConversationStarted", "tally.events", "tally.events",
	     f_conversation_started, NULL),
	DESC(TLY_EV_MESSAGE_APPENDED, "MessageAppended", "tally.events", "tally.events",
	     f_message_appended, NULL),
	DESC(TLY_EV_AGENT_HANDOFF, "AgentHandoff", "tally.events", "tally.events", f_agent_handoff, NULL),
	DESC(TLY_EV_CONVERSATION_CLOSED, "ConversationClosed", "tally.events", "tally.events",
	     f_conversation_closed, NULL),
	DESC(TLY_EV_USAGE_REPORTED, "UsageReported", "tally.events", "tally.events", f_usage_reported, NULL),
	DESC(TLY_EV_INVOICE_STATUS_CHANGED, "InvoiceStatusChanged", "tally.events", "tally.events",
	     f_invoice_status_changed, NULL),
	DESC(TLY_EV_CLOCK_TICK, "ClockTick", "tally.events", "tally.events", f_clock_tick, NULL),
	DESC(TLY_EV_PLAN_PUBLISHED, "PlanPublished", "tally.catalog", "tally.catalog", f_plan_published,
	     NULL),
	DESC(TLY_EV_LEDGER_ENTRY, "LedgerEntry", "tally.ledger", "tally.ledger", f_ledger_entry,
	     check_ledger_entry),
};

const struct tly_event_desc *tly_event_desc(enum tly_event_type type)
{
	if ((int)type < 0 || type >= TLY_EV__COUNT)
		return NULL;
	return &descs[type];
}

const struct tly_event_desc *tly_event_desc_by_name(const char *name)
{
	for (int i = 0; i < TLY_EV__COUNT; i++) {
		if (strcmp(descs[i].name, name) == 0 || strcmp(descs[i].fullname, name) == 0)
			return &descs[i];
	}
	return NULL;
}

/* ---- lifecycle --------------------------------------------------------------------------- */

void tly_event_init(struct tly_event *ev, enum tly_event_type type)
{
	struct tly_arena *arena = ev->arena;
	memset(ev, 0, sizeof(*ev));
	ev->arena = arena;
	ev->type = type;
}

void tly_event_reset(struct tly_event *ev)
{
	tly_arena_reset(ev->arena);
	tly_event_init(ev, ev->type);
}

void tly_event_free(struct tly_event *ev)
{
	if (!ev)
		return;
	tly_arena_free(ev->arena);
	ev->arena = NULL;
}

/*
 * First block of an event's arena: a decoded event's strings and arrays are mostly a few dozen
 * bytes, and a batch keeps an event (and its arena) for each of up to thousands of records;
 * with the arena's usual 8 KiB every record touched two fresh pages (tally-ledger, session 9).
 */
#define EVENT_ARENA_FIRST 512

struct tly_arena *tly_event_arena(struct tly_event *ev)
{
	if (!ev->arena)
		ev->arena = tly_arena_new_sized(EVENT_ARENA_FIRST);
	return ev->arena;
}

/* ---- UUIDs and UTF-8 ---------------------------------------------------------------------- */

int tly_uuid_parse(const char *text, tly_uuid *out)
{
	if (!text || strlen(text) != 36 || uuid_parse(text, out->b) != 0)
		return TLY_E_INVALID;
	return 0;
}

void tly_uuid_format(const tly_uuid *u, char out[37])
{
	uuid_unparse_lower(u->b, out);
}

bool tly_uuid_is_nil(const tly_uuid *u)
{
	return uuid_is_null(u->b) != 0;
}

void tly_uuid_generate(tly_uuid *out)
{
	uuid_generate(out->b);
}

bool tly_utf8_valid(const char *str, size_t len)
{
	const unsigned char *s = (const unsigned char *)str;
	size_t i = 0;
	while (i < len) {
		unsigned char c = s[i];
		if (c < 0x80) {
			uint64_t eight;
			/* ASCII runs eight bytes at a time */
			while (len - i >= 8 && (memcpy(&eight, s + i, 8),
						(eight & 0x8080808080808080ull) == 0))
				i += 8;
			if (i < len && s[i] < 0x80)
				i++;
			continue;
		}
		size_t n;
		uint32_t cp;
		if (c >= 0xC2 && c <= 0xDF) {
			n = 1;
			cp = c & 0x1F;
		} else if (c >= 0xE0 && c <= 0xEF) {
			n = 2;
			cp = c & 0x0F;
		} else if (c >= 0xF0 && c <= 0xF4) {
			n = 3;
			cp = c & 0x07;
		} else {
			return false;
		}
		if (len - i <= n)
			return false;
		for (size_t k = 1; k <= n; k++) {
			if ((s[i + k] & 0xC0) != 0x80)
				return false;
			cp = (cp << 6) | (s[i + k] & 0x3F);
		}
		if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10FFFF ||
		    (cp >= 0xD800 && cp <= 0xDFFF))
			return false;
		i += n + 1;
	}
	return true;
}

/* ---- validation --------------------------------------------------------------------------- */

static int fail(char *errstr, size_t errlen, const char *prefix, const char *field, const char *why)
{
	snprintf(errstr, errlen, "field %s%s: %s", prefix, field, why);
	return TLY_E_INVALID;
}

/* decoded: s was checked as UTF-8 when it was decoded */
static int check_string(const struct tly_field *f, const char *s, bool decoded, const char *prefix,
			char *errstr, size_t errlen)
{
	size_t max = f->max_len ? f->max_len : MAX_STR;
	size_t len = strlen(s);
	if (len == 0)
		return fail(errstr, errlen, prefix, f->name, "must not be empty");
	if (len > max) {
		char why[64];
		snprintf(why, sizeof(why), "longer than %zu bytes", max);
		return fail(errstr, errlen, prefix, f->name, why);
	}
	if (!decoded && !tly_utf8_valid(s, len))
		return fail(errstr, errlen, prefix, f->name, "not valid UTF-8");
	if (f->one_of) {
		bool found = false;
		for (const char *const *v = f->one_of; *v && !found; v++)
			found = strcmp(*v, s) == 0;
		if (!found) {
			char why[256];
			size_t n = (size_t)snprintf(why, sizeof(why), "\"%.64s\" is not one of", s);
			for (const char *const *v = f->one_of; *v && n < sizeof(why); v++)
				n += (size_t)snprintf(why + n, sizeof(why) - n, " %s", *v);
			return fail(errstr, errlen, prefix, f->name, why);
		}
	}
	if ((f->flags & TLY_FF_CURRENCY) &&
	    !(len == 3 && s[0] >= 'A' && s[0] <= 'Z' && s[1] >= 'A' && s[1] <= 'Z' && s[2] >= 'A' &&
	      s[2] <= 'Z'))
		return fail(errstr, errlen, prefix, f->name, "not a three-letter ISO 4217 code");
	if (f->flags & TLY_FF_EMAIL) {
		const char *at = strchr(s, '@');
		if (!at || at == s || at[1] == '\0' || strchr(at + 1, '@'))
			return fail(errstr, errlen, prefix, f->name, "not an email address");
	}
	if (f->kind == TLY_F_JSON) {
		json_error_t jerr;
		json_t *j = json_loadb(s, len, JSON_DECODE_ANY, &jerr);
		if (!j) {
			char why[256];
			snprintf(why, sizeof(why), "not JSON: %s", jerr.text);
			return fail(errstr, errlen, prefix, f->name, why);
		}
		json_decref(j);
	}
	return 0;
}

static int check_min(const struct tly_field *f, int64_t v, const char *prefix, char *errstr,
		     size_t errlen)
{
	if (v < f->min) {
		char why[64];
		if (f->min == 0)
			snprintf(why, sizeof(why), "must not be negative");
		else
			snprintf(why, sizeof(why), "must be at least %lld", (long long)f->min);
		return fail(errstr, errlen, prefix, f->name, why);
	}
	return 0;
}

static int check_map(const struct tly_field *f, const struct tly_map *m, bool decoded,
		     const char *prefix, char *errstr, size_t errlen)
{
	if (m->n > MAX_MAP)
		return fail(errstr, errlen, prefix, f->name, "has more than 1000 entries");
	if (m->n && !m->items)
		return fail(errstr, errlen, prefix, f->name, "entries missing");
	for (size_t i = 0; i < m->n; i++) {
		const struct tly_map_entry *e = &m->items[i];
		if (!e->key || !*e->key || strlen(e->key) > 128 ||
		    (!decoded && !tly_utf8_valid(e->key, strlen(e->key))))
			return fail(errstr, errlen, prefix, f->name,
				    "has a key that is empty, longer than 128 bytes or not UTF-8");
		for (size_t j = 0; j < i; j++) {
			if (strcmp(m->items[j].key, e->key) == 0)
				return fail(errstr, errlen, prefix, f->name, "has a duplicate key");
		}
		if (f->kind == TLY_F_MAP_LONG && e->i < 0)
			return fail(errstr, errlen, prefix, f->name, "has a negative value");
		if (f->kind == TLY_F_MAP_STR) {
			size_t max = f->max_len ? f->max_len : MAX_STR;
			if (!e->s || strlen(e->s) > max ||
			    (!decoded && !tly_utf8_valid(e->s, strlen(e->s))))
				return fail(errstr, errlen, prefix, f->name,
					    "has a value that is missing, too long or not UTF-8");
		}
	}
	return 0;
}

static int validate_record(const struct tly_record_desc *rd, const unsigned char *base,
			   bool decoded, const char *prefix, char *errstr, size_t errlen);

static int validate_field(const struct tly_field *f, const unsigned char *base, bool decoded,
			  const char *prefix, char *errstr, size_t errlen)
{
	const void *p = base + f->offset;
	const char *s;
	struct tly_opt_i64 o;
	int64_t l;
	int32_t i32;

	switch (f->kind) {
	case TLY_F_UUID:
		if (tly_uuid_is_nil(p))
			return fail(errstr, errlen, prefix, f->name, "missing (nil UUID)");
		return 0;
	case TLY_F_OPT_UUID:
	case TLY_F_BOOL:
	case TLY_F_SHA256:
		return 0;
	case TLY_F_STR:
	case TLY_F_JSON:
		memcpy(&s, p, sizeof(s));
		if (!s)
			return fail(errstr, errlen, prefix, f->name, "missing");
		return check_string(f, s, decoded, prefix, errstr, errlen);
	case TLY_F_OPT_STR:
		memcpy(&s, p, sizeof(s));
		return s ? check_string(f, s, decoded, prefix, errstr, errlen) : 0;
	case TLY_F_LONG:
	case TLY_F_TS:
		memcpy(&l, p, sizeof(l));
		return check_min(f, l, prefix, errstr, errlen);
	case TLY_F_INT:
		memcpy(&i32, p, sizeof(i32));
		return check_min(f, i32, prefix, errstr, errlen);
	case TLY_F_OPT_LONG:
	case TLY_F_OPT_TS:
		memcpy(&o, p, sizeof(o));
		return o.set ? check_min(f, o.v, prefix, errstr, errlen) : 0;
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL:
		return check_map(f, p, decoded, prefix, errstr, errlen);
	case TLY_F_RECORDS: {
		struct tly_list list;
		memcpy(&list, p, sizeof(list));
		if (list.n > MAX_MAP)
			return fail(errstr, errlen, prefix, f->name, "has more than 1000 items");
		if (list.n && !list.items)
			return fail(errstr, errlen, prefix, f->name, "items missing");
		for (size_t k = 0; k < list.n; k++) {
			char sub[128];
			snprintf(sub, sizeof(sub), "%s%s[%zu].", prefix, f->name, k);
			int rc = validate_record(f->sub, (const unsigned char *)list.items + k * f->sub->size,
						 decoded, sub, errstr, errlen);
			if (rc != 0)
				return rc;
		}
		return 0;
	}
	}
	return fail(errstr, errlen, prefix, f->name, "has an unknown kind");
}

static int validate_record(const struct tly_record_desc *rd, const unsigned char *base,
			   bool decoded, const char *prefix, char *errstr, size_t errlen)
{
	for (size_t i = 0; i < rd->n_fields; i++) {
		int rc = validate_field(&rd->fields[i], base, decoded, prefix, errstr, errlen);
		if (rc != 0)
			return rc;
	}
	return 0;
}

static int validate_event(const struct tly_event *ev, bool decoded, char *errstr, size_t errlen)
{
	const struct tly_event_desc *d = tly_event_desc(ev->type);
	if (!d) {
		snprintf(errstr, errlen, "unknown event type %d", (int)ev->type);
		return TLY_E_INVALID;
	}
	int rc = validate_record(&d->record, (const unsigned char *)ev, decoded, "", errstr,
				 errlen);
	if (rc == 0 && d->check)
		rc = d->check(ev, errstr, errlen);
	return rc;
}

int tly_event_validate(const struct tly_event *ev, char *errstr, size_t errlen)
{
	return validate_event(ev, false, errstr, errlen);
}

int tly_event_validate_decoded(const struct tly_event *ev, char *errstr, size_t errlen)
{
	return validate_event(ev, true, errstr, errlen);
}
