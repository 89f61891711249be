/* Valid, fully populated sample events (every optional field set) for codec and validation tests. */
#include "fixtures.h"

#include <string.h>

static void uuid_from(tly_uuid *u, unsigned seed, unsigned char tag)
{
	for (int i = 0; i < 16; i++)
		u->b[i] = (unsigned char)(seed * 31 + (unsigned)i * 7 + tag);
	u->b[6] = (unsigned char)((u->b[6] & 0x0F) | 0x40); /* version 4 */
	u->b[8] = (unsigned char)((u->b[8] & 0x3F) | 0x80); /* variant */
}

static const struct tly_map_entry metered[] = {{.key = "web_search", .i = 2500},
					       {.key = "code_interpreter", .i = 30000}};
static const struct tly_map_entry metadata[] = {{.key = "source", .s = "sales"},
						{.key = "crm_id", .s = "ü-123"}};
static const struct tly_map_entry toggles[] = {{.key = "sso", .b = true}, {.key = "audit_log", .b = false}};
static const struct tly_plan_feature features[] = {
	{"seats", "Seats", {true, 50}, {true, 40}, false},
	{"web_search", "Web search", {false, 0}, {true, 1000}, true},
};
static const struct tly_invoice_line lines[] = {
	{"plan", NULL, 1, 9900000000, 9900},
	{"overage", NULL, 1500, 2000, 300},
	{"metered", "web_search", 12, 2500, 3},
};

static void terms(struct tly_plan_terms *t, unsigned seed)
{
	t->plan_code = "pro";
	t->tokens_per_period = 10000000 + seed;
	t->interval = "month";
	t->interval_count = 1;
	t->price_cents = 9900;
	t->currency = "USD";
	t->overage_price_micros_per_1k_tokens = (struct tly_opt_i64){true, 2000};
	t->rollover_cap_tokens = 500000;
	t->metered_prices = (struct tly_map){metered, 2};
}

void tly_fixture_event(struct tly_event *ev, enum tly_event_type type, unsigned seed)
{
	tly_event_init(ev, type);
	uuid_from(&ev->event_id, seed, 1);
	uuid_from(&ev->tenant_id, seed, 2);
	ev->occurred_at = 1767225600000000LL + (int64_t)seed * 1000; /* 2026-01-01 */
	tly_uuid a, b, c;
	uuid_from(&a, seed, 3);
	uuid_from(&b, seed, 4);
	uuid_from(&c, seed, 5);

	switch (type) {
	case TLY_EV_TENANT_CREATED:
		ev->u.tenant_created = (struct tly_ev_tenant_created){"acme", "Acme Ltd — Ωmega"};
		break;
	case TLY_EV_USER_REGISTERED:
		ev->u.user_registered = (struct tly_ev_user_registered){a, "ext-42", "ada", "Ada L.",
									 "ada@example.com"};
		break;
	case TLY_EV_SUBSCRIPTION_STARTED: {
		struct tly_ev_subscription_started *s = &ev->u.subscription_started;
		s->subscription_id = a;
		terms(&s->terms, seed);
		s->period_start = ev->occurred_at;
		s->period_end = ev->occurred_at + 2678400000000LL;
		s->seat_count = 5;
		s->auto_renew = true;
		s->billing_email = "billing@example.com";
		s->trial_ends_at = (struct tly_opt_i64){true, ev->occurred_at + 1000};
		s->metadata = (struct tly_map){metadata, 2};
		break;
	}
	case TLY_EV_SUBSCRIPTION_CHANGED: {
		struct tly_ev_subscription_changed *s = &ev->u.subscription_changed;
		s->subscription_id = a;
		terms(&s->terms, seed);
		s->seat_count = 7;
		s->effective_at = ev->occurred_at;
		break;
	}
	case TLY_EV_SUBSCRIPTION_CANCELLED:
		ev->u.subscription_cancelled = (struct tly_ev_subscription_cancelled){a, true};
		break;
	case TLY_EV_SUBSCRIPTION_PAUSED:
		ev->u.subscription_paused.subscription_id = a;
		break;
	case TLY_EV_SUBSCRIPTION_RESUMED:
		ev->u.subscription_resumed.subscription_id = a;
		break;
	case TLY_EV_CREDITS_GRANTED:
		ev->u.credits_granted = (struct tly_ev_credits_granted){
			a, 250000, "top-up", {true, ev->occurred_at + 86400000000LL}};
		break;
	case TLY_EV_TOKENS_RESERVED:
		ev->u.tokens_reserved = (struct tly_ev_tokens_reserved){
			a, 4096 + seed, ev->occurred_at + 60000000, "gpt-4o", b};
		break;
	case TLY_EV_RESERVATION_SETTLED:
		ev->u.reservation_settled = (struct tly_ev_reservation_settled){
			a, "openai", "gpt-4o", 1200, 800, 300, 15250};
		break;
	case TLY_EV_RESERVATION_RELEASED:
		ev->u.reservation_released = (struct tly_ev_reservation_released){a, "client aborted"};
		break;
	case TLY_EV_TOKENS_DEBITED:
		ev->u.tokens_debited = (struct tly_ev_tokens_debited){a, 512, 900, "embedding batch"};
		break;
	case TLY_EV_CONVERSATION_STARTED:
		ev->u.conversation_started = (struct tly_ev_conversation_started){
			a, b, "triage", "web", "billing question"};
		break;
	case TLY_EV_MESSAGE_APPENDED:
		ev->u.message_appended = (struct tly_ev_message_appended){
			.conversation_id = a, .message_id = b, .user_id = c, .role = "assistant",
			.agent_type = "billing", .content = "{\"text\":\"Hello, \\u00e9t\\u00e9\",\"parts\":[1,2]}",
			.tool_name = "lookup_invoice", .tool_call_id = "call_01", .provider = "anthropic",
			.model = "claude", .prompt_tokens = 100, .completion_tokens = 50,
			.reasoning_tokens = 10, .latency_ms = 830, .cost_micros = 1234, .reservation_id = a};
		break;
	case TLY_EV_AGENT_HANDOFF:
		ev->u.agent_handoff = (struct tly_ev_agent_handoff){a, "triage", "billing"};
		break;
	case TLY_EV_CONVERSATION_CLOSED:
		ev->u.conversation_closed = (struct tly_ev_conversation_closed){a, "completed"};
		break;
	case TLY_EV_USAGE_REPORTED:
		ev->u.usage_reported = (struct tly_ev_usage_reported){a, "web_search", "call", 12, "evt_9"};
		break;
	case TLY_EV_INVOICE_STATUS_CHANGED:
		ev->u.invoice_status_changed = (struct tly_ev_invoice_status_changed){
			a, "paid", "in_123", "https://pay.example.com/in_123"};
		break;
	case TLY_EV_CLOCK_TICK:
		memset(&ev->tenant_id, 0, sizeof(ev->tenant_id));
		break;
	case TLY_EV_PLAN_PUBLISHED: {
		memset(&ev->tenant_id, 0, sizeof(ev->tenant_id));
		struct tly_ev_plan_published *p = &ev->u.plan_published;
		p->plan_id = a;
		p->code = "pro";
		p->name = "Pro";
		p->interval = "month";
		p->interval_count = 1;
		p->price_cents = 9900;
		p->currency = "EUR";
		p->trial_days = 14;
		p->seat_included = 5;
		p->tokens_per_period = 10000000;
		p->overage_price_micros_per_1k_tokens = (struct tly_opt_i64){true, 2000};
		p->feature_toggles = (struct tly_map){toggles, 2};
		p->features = (struct tly_list){features, 2};
		p->is_active = true;
		break;
	}
	case TLY_EV_LEDGER_ENTRY: {
		memset(&ev->event_id, 0, sizeof(ev->event_id));
		ev->occurred_at = 0;
		struct tly_ledger_entry *e = &ev->u.ledger_entry;
		e->seq = 7 + seed;
		e->kind = "invoice";
		e->cause_event_id = a;
		e->cause_type = "ClockTick";
		e->cause_partition = 3;
		e->cause_offset = 1234567;
		e->ref_id = b;
		e->subscription_id = c;
		e->allowance_delta = -1500;
		e->credits_delta = 0;
		e->held_delta = -200;
		e->overage_delta = 1500;
		e->allowance_remaining = 0;
		e->credits_remaining = 42;
		e->held = 100;
		e->overage_tokens = 1500;
		e->period_start = (struct tly_opt_i64){true, 1767225600000000LL};
		e->period_end = (struct tly_opt_i64){true, 1769904000000000LL};
		e->amount_cents = (struct tly_opt_i64){true, 10203};
		e->currency = "USD";
		e->lines = (struct tly_list){lines, 3};
		e->reason = NULL;
		e->ledger_time = 1769904000000000LL;
		for (int i = 0; i < 32; i++) {
			e->prev_hash[i] = (unsigned char)(i + seed);
			e->hash[i] = (unsigned char)(255 - i);
		}
		break;
	}
	case TLY_EV__COUNT:
		break;
	}
}
