/*
 * Typed C structs for every message in Tally's catalog (tally.events, tally.catalog, tally.ledger),
 * their field descriptors (one table per type, shared by the Avro codec and the JSON tools) and
 * their validation rules.
 *
 * Ownership: strings, maps and lists inside a struct tly_event are borrowed. When the codec decodes
 * a message they point into the event's arena and live until tly_event_reset / tly_event_free;
 * when a caller builds an event they point to the caller's memory, which must outlive the encode.
 */
#ifndef TLY_EVENT_H
#define TLY_EVENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

struct tly_arena;

/* A UUID by value; the nil UUID means "absent" for optional fields and is invalid elsewhere. */
typedef struct {
	unsigned char b[16];
} tly_uuid;

struct tly_opt_i64 {
	bool set;
	int64_t v;
};

/* Avro map entry; only the member matching the map's value type is meaningful. */
struct tly_map_entry {
	const char *key;
	int64_t i;     /* map<long> */
	const char *s; /* map<string> */
	bool b;        /* map<boolean> */
};

struct tly_map {
	const struct tly_map_entry *items;
	size_t n;
};

/* An Avro array of records; items points to n structs of the field's record type. */
struct tly_list {
	const void *items;
	size_t n;
};

enum tly_event_type {
	TLY_EV_TENANT_CREATED,
	TLY_EV_USER_REGISTERED,
	TLY_EV_SUBSCRIPTION_STARTED,
	TLY_EV_SUBSCRIPTION_CHANGED,
	TLY_EV_SUBSCRIPTION_CANCELLED,
	TLY_EV_SUBSCRIPTION_PAUSED,
	TLY_EV_SUBSCRIPTION_RESUMED,
	TLY_EV_CREDITS_GRANTED,
	TLY_EV_TOKENS_RESERVED,
	TLY_EV_RESERVATION_SETTLED,
	TLY_EV_RESERVATION_RELEASED,
	TLY_EV_TOKENS_DEBITED,
	TLY_EV_CONVERSATION_STARTED,
	TLY_EV_MESSAGE_APPENDED,
	TLY_EV_AGENT_HANDOFF,
	TLY_EV_CONVERSATION_CLOSED,
	TLY_EV_USAGE_REPORTED,
	TLY_EV_INVOICE_STATUS_CHANGED,
	TLY_EV_CLOCK_TICK,
	TLY_EV_PLAN_PUBLISHED, /* tally.catalog */
	TLY_EV_LEDGER_ENTRY,   /* tally.ledger */
	TLY_EV__COUNT
};

/* Plan terms carried by SubscriptionStarted and SubscriptionChanged (the ledger never reads the catalog). */
struct tly_plan_terms {
	const char *plan_code;
	int64_t tokens_per_period;
	const char *interval; /* day, week, month, year */
	int32_t interval_count;
	int64_t price_cents;
	const char *currency; /* ISO 4217, three capital letters */
	struct tly_opt_i64 overage_price_micros_per_1k_tokens; /* unset: no overage allowed */
	int64_t rollover_cap_tokens;
	struct tly_map metered_prices; /* map<long>: feature_key -> micros per unit */
};

struct tly_ev_tenant_created {
	const char *slug;
	const char *name;
};

struct tly_ev_user_registered {
	tly_uuid user_id;
	const char *external_id;
	const char *username; /* optional */
	const char *display_name;
	const char *email; /* optional */
};

struct tly_ev_subscription_started {
	tly_uuid subscription_id;
	struct tly_plan_terms terms;
	int64_t period_start, period_end; /* µs since the epoch */
	int32_t seat_count;
	bool auto_renew;
	const char *billing_email;        /* optional */
	struct tly_opt_i64 trial_ends_at;
	struct tly_map metadata;          /* map<string> */
};

struct tly_ev_subscription_changed {
	tly_uuid subscription_id;
	struct tly_plan_terms terms;
	int32_t seat_count;
	int64_t effective_at;
};

struct tly_ev_subscription_cancelled {
	tly_uuid subscription_id;
	bool at_period_end;
};

/* SubscriptionPaused and SubscriptionResumed. */
struct tly_ev_subscription_ref {
	tly_uuid subscription_id;
};

struct tly_ev_credits_granted {
	tly_uuid grant_id;
	int64_t tokens;
	const char *reason;
	struct tly_opt_i64 expires_at;
};

struct tly_ev_tokens_reserved {
	tly_uuid reservation_id;
	int64_t tokens;
	int64_t expires_at;
	const char *model;
	tly_uuid conversation_id; /* optional */
};

struct tly_ev_reservation_settled {
	tly_uuid reservation_id;
	const char *provider;
	const char *model;
	int64_t prompt_tokens, completion_tokens, reasoning_tokens;
	int64_t cost_micros;
};

struct tly_ev_reservation_released {
	tly_uuid reservation_id;
	const char *reason;
};

struct tly_ev_tokens_debited {
	tly_uuid debit_id;
	int64_t tokens;
	int64_t cost_micros;
	const char *reason;
};

struct tly_ev_conversation_started {
	tly_uuid conversation_id;
	tly_uuid user_id;
	const char *agent_entrypoint;
	const char *source_channel;
	const char *topic_hint; /* optional */
};

struct tly_ev_message_appended {
	tly_uuid conversation_id;
	tly_uuid message_id;
	tly_uuid user_id; /* optional */
	const char *role; /* user, assistant, system, tool */
	const char *agent_type;
	const char *content; /* JSON text */
	const char *tool_name;    /* optional */
	const char *tool_call_id; /* optional */
	const char *provider;
	const char *model;
	int64_t prompt_tokens, completion_tokens, reasoning_tokens;
	int64_t latency_ms;
	int64_t cost_micros;
	tly_uuid reservation_id; /* optional */
};

struct tly_ev_agent_handoff {
	tly_uuid conversation_id;
	const char *from_agent;
	const char *to_agent;
};

struct tly_ev_conversation_closed {
	tly_uuid conversation_id;
	const char *status; /* completed, abandoned, failed */
};

struct tly_ev_usage_reported {
	tly_uuid subscription_id;
	const char *feature_key;
	const char *unit;
	int64_t quantity;
	const char *external_event_id;
};

struct tly_ev_invoice_status_changed {
	tly_uuid invoice_id;
	const char *status; /* issued, paid, void, uncollectible */
	const char *external_invoice_id; /* optional */
	const char *hosted_invoice_url;  /* optional */
};

struct tly_plan_feature {
	const char *feature_key;
	const char *display_name;
	struct tly_opt_i64 hard_limit;
	struct tly_opt_i64 soft_limit;
	bool is_metered;
};

struct tly_ev_plan_published {
	tly_uuid plan_id;
	const char *code;
	const char *name;
	const char *interval;
	int32_t interval_count;
	int64_t price_cents;
	const char *currency;
	int32_t trial_days;
	int32_t seat_included;
	int64_t tokens_per_period;
	struct tly_opt_i64 overage_price_micros_per_1k_tokens;
	struct tly_map feature_toggles; /* map<boolean> */
	struct tly_list features;       /* of struct tly_plan_feature */
	bool is_active;
};

struct tly_invoice_line {
	const char *kind;        /* plan, overage, metered */
	const char *feature_key; /* optional; metered lines */
	int64_t quantity;
	int64_t unit_price_micros;
	int64_t amount_cents;
};

/* One entry of a tenant's ledger; the tenant is struct tly_event's tenant_id. */
struct tly_ledger_entry {
	int64_t seq;
	const char *kind;
	tly_uuid cause_event_id;
	const char *cause_type;
	int32_t cause_partition;
	int64_t cause_offset;
	unsigned char cause_digest[32]; /* SHA-256 of the cause event's current encoding */
	tly_uuid ref_id;          /* optional */
	tly_uuid subscription_id; /* optional */
	int64_t allowance_delta, credits_delta, held_delta, overage_delta; /* signed */
	int64_t allowance_remaining, credits_remaining, held, overage_tokens;
	struct tly_opt_i64 period_start, period_end;
	struct tly_opt_i64 amount_cents;
	const char *currency; /* optional */
	struct tly_list lines; /* of struct tly_invoice_line */
	const char *reason;   /* optional */
	int64_t ledger_time;
	unsigned char prev_hash[32];
	unsigned char hash[32];
};

struct tly_event {
	enum tly_event_type type;
	tly_uuid event_id;    /* nil for LedgerEntry */
	tly_uuid tenant_id;   /* nil for ClockTick and PlanPublished */
	int64_t occurred_at;  /* µs since the epoch; 0 for LedgerEntry */
	union {
		struct tly_ev_tenant_created tenant_created;
		struct tly_ev_user_registered user_registered;
		struct tly_ev_subscription_started subscription_started;
		struct tly_ev_subscription_changed subscription_changed;
		struct tly_ev_subscription_cancelled subscription_cancelled;
		struct tly_ev_subscription_ref subscription_paused;
		struct tly_ev_subscription_ref subscription_resumed;
		struct tly_ev_credits_granted credits_granted;
		struct tly_ev_tokens_reserved tokens_reserved;
		struct tly_ev_reservation_settled reservation_settled;
		struct tly_ev_reservation_released reservation_released;
		struct tly_ev_tokens_debited tokens_debited;
		struct tly_ev_conversation_started conversation_started;
		struct tly_ev_message_appended message_appended;
		struct tly_ev_agent_handoff agent_handoff;
		struct tly_ev_conversation_closed conversation_closed;
		struct tly_ev_usage_reported usage_reported;
		struct tly_ev_invoice_status_changed invoice_status_changed;
		struct tly_ev_plan_published plan_published;
		struct tly_ledger_entry ledger_entry;
	} u;
	struct tly_arena *arena; /* owns decoded strings, maps and lists; NULL until first decode */
};

/* ---- field descriptors ------------------------------------------------------------------ */

enum tly_field_kind {
	TLY_F_UUID,     /* tly_uuid, Avro string (logicalType uuid) */
	TLY_F_OPT_UUID, /* tly_uuid (nil = null), Avro ["null", uuid] */
	TLY_F_STR,      /* const char *, Avro string */
	TLY_F_OPT_STR,  /* const char * (NULL = null), Avro ["null", string] */
	TLY_F_JSON,     /* const char * holding JSON text, Avro string */
	TLY_F_LONG,     /* int64_t, Avro long */
	TLY_F_INT,      /* int32_t, Avro int */
	TLY_F_BOOL,     /* bool, Avro boolean */
	TLY_F_TS,       /* int64_t µs, Avro long (logicalType timestamp-micros) */
	TLY_F_OPT_LONG, /* struct tly_opt_i64, Avro ["null", long] */
	TLY_F_OPT_TS,   /* struct tly_opt_i64, Avro ["null", timestamp-micros] */
	TLY_F_MAP_LONG, /* struct tly_map, Avro map<long> */
	TLY_F_MAP_STR,  /* struct tly_map, Avro map<string> */
	TLY_F_MAP_BOOL, /* struct tly_map, Avro map<boolean> */
	TLY_F_RECORDS,  /* struct tly_list, Avro array<record> (see tly_field.sub) */
	TLY_F_SHA256,   /* unsigned char[32], Avro bytes of length 32 */
};

struct tly_record_desc;

struct tly_field {
	const char *name;               /* Avro field name */
	enum tly_field_kind kind;
	size_t offset;                  /* in struct tly_event, or in the list item for sub-records */
	int64_t min;                    /* numbers: smallest valid value */
	size_t max_len;                 /* strings: longest valid length in bytes (0: default bound) */
	const char *const *one_of;      /* strings: NULL-terminated allowed values, or NULL */
	const struct tly_record_desc *sub; /* TLY_F_RECORDS: the item record */
	unsigned flags;                 /* TLY_FF_* */
};

#define TLY_FF_CURRENCY 0x1u /* three capital letters (ISO 4217) */
#define TLY_FF_EMAIL 0x2u    /* contains one '@' with text on both sides */
#define TLY_FF_FRESH 0x4u    /* a new value in every message (its own id): a decoder does not
			      * remember it for the messages that follow (lib/codec_plan) */

struct tly_record_desc {
	const char *name;        /* Avro record name */
	size_t size;             /* sizeof the C item struct */
	const struct tly_field *fields;
	size_t n_fields;
};

struct tly_event_desc {
	enum tly_event_type type;
	const char *name;     /* "TokensReserved" */
	const char *fullname; /* "tally.events.TokensReserved" */
	const char *topic;    /* "tally.events" */
	struct tly_record_desc record;
	/* cross-field rules beyond the per-field ones; NULL if none */
	int (*check)(const struct tly_event *ev, char *errstr, size_t errlen);
};

/* Descriptor of a type; NULL for an out-of-range type. */
const struct tly_event_desc *tly_event_desc(enum tly_event_type type);

/* Descriptor by short name ("TokensReserved") or full name; NULL if unknown. */
const struct tly_event_desc *tly_event_desc_by_name(const char *name);

/* Zero ev (keeping its arena) and set its type. */
void tly_event_init(struct tly_event *ev, enum tly_event_type type);

/* Drop everything the event owns (its arena is reset, not freed) and zero it. */
void tly_event_reset(struct tly_event *ev);

/* Free the event's arena; the struct itself is the caller's. Accepts NULL. */
void tly_event_free(struct tly_event *ev);

/* The event's arena, created on first use; NULL on OOM. */
struct tly_arena *tly_event_arena(struct tly_event *ev);

/*
 * Check every rule: required fields present, UUIDs non-nil, numbers within bounds (amounts
 * non-negative), strings non-empty, bounded, valid UTF-8 and in their allowed set, JSON text
 * parses, cross-field rules. TLY_E_INVALID with errstr naming the field on the first failure.
 */
int tly_event_validate(const struct tly_event *ev, char *errstr, size_t errlen) TLY_MUST_CHECK;

/*
 * The same rules for an event a decoder filled (lib/codec), whose strings were checked as valid
 * UTF-8 while they were read (lib/codec_plan, lib/validate_bytes): that check is not run again.
 */
int tly_event_validate_decoded(const struct tly_event *ev, char *errstr,
			       size_t errlen) TLY_MUST_CHECK;

/* UUID text <-> tly_uuid through libuuid. Parse returns TLY_E_INVALID for malformed text. */
int tly_uuid_parse(const char *text, tly_uuid *out) TLY_MUST_CHECK;
void tly_uuid_format(const tly_uuid *u, char out[37]);
bool tly_uuid_is_nil(const tly_uuid *u);
void tly_uuid_generate(tly_uuid *out);

/* True if s[0..len) is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF). */
bool tly_utf8_valid(const char *s, size_t len);

#endif
