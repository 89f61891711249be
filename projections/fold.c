/* The projection fold: a batch of decoded messages staged by COPY, folded by set-based SQL. */
#include "fold.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "event_json.h"

#define NAME_MAX_LEN 127
#define NIL_UUID "00000000-0000-0000-0000-000000000000"

const char *const tly_fold_tables[] = {
	"tenant_accounts",       "users",
	"agent_conversations",   "agent_messages",
	"billing_plans",         "plan_features",
	"tenant_subscriptions",  "subscription_invoices",
	"subscription_usage",    "token_balances",
	"api_usage",             "projector_seen_events",
	"projector_ledger_applied", "projector_api_calls",
	"projector_invoice_status", "projector_usage_periods",
};
const size_t tly_fold_n_tables = sizeof(tly_fold_tables) / sizeof(tly_fold_tables[0]);
#define N_TABLES (sizeof(tly_fold_tables) / sizeof(tly_fold_tables[0]))

struct tly_fold {
	char names[N_TABLES][NAME_MAX_LEN + 1]; /* target name of each table */
	char *data;                             /* COPY text of the staged rows; owned */
	size_t len, cap;
	size_t pending;
	uint64_t present;                       /* T() of the types and kinds pending */
	int64_t ord;                            /* feed order of the next row */
	PGconn *staged_on;                      /* borrowed: conn where the staging table exists */
};

/*
 * The fold, statement by statement, over the staging table tly_fold_stage (ord, type,
 * tenant_id, event_id, at, doc): doc is the message as JSON (lib/event_json), at its
 * occurred_at (events) or ledger_time (entries). @name@ is replaced by the target table's name.
 * Order matters: dedupe first, then the rows other rows reference (tenants, subscriptions,
 * conversations), then the rows and counters. Every counter adds only rows actually inserted.
 */
static const char *const FOLD_SQL[] = {
	/* 1. events seen before (or twice in this batch) are dropped */
	"WITH firsts AS (SELECT DISTINCT ON (tenant_id, event_id) ord, tenant_id, event_id "
	"  FROM tly_fold_stage WHERE event_id IS NOT NULL ORDER BY tenant_id, event_id, ord), "
	"ins AS (INSERT INTO @projector_seen_events@ (tenant_id, event_id) "
	"  SELECT tenant_id, event_id FROM firsts ON CONFLICT DO NOTHING RETURNING tenant_id, event_id) "
	"DELETE FROM tly_fold_stage s WHERE s.event_id IS NOT NULL AND s.ord NOT IN "
	"  (SELECT f.ord FROM firsts f JOIN ins i USING (tenant_id, event_id))",

	/* 2. ledger entries at or below the tenant's applied seq (republished) are dropped */
	"WITH firsts AS (SELECT DISTINCT ON (tenant_id, (doc->>'seq')::bigint) ord, tenant_id, "
	"  (doc->>'seq')::bigint AS seq FROM tly_fold_stage WHERE type = 'LedgerEntry' "
	"  ORDER BY tenant_id, (doc->>'seq')::bigint, ord), "
	"keep AS (SELECT f.ord, f.tenant_id, f.seq FROM firsts f "
	"  LEFT JOIN @projector_ledger_applied@ a ON a.tenant_id = f.tenant_id "
	"  WHERE a.seq IS NULL OR f.seq > a.seq), "
	"upd AS (INSERT INTO @projector_ledger_applied@ AS a (tenant_id, seq) "
	"  SELECT tenant_id, max(seq) FROM keep GROUP BY tenant_id "
	"  ON CONFLICT (tenant_id) DO UPDATE SET seq = GREATEST(a.seq, EXCLUDED.seq)) "
	"DELETE FROM tly_fold_stage s WHERE s.type = 'LedgerEntry' AND s.ord NOT IN (SELECT ord FROM keep)",

	/* 3. tenants: a placeholder for any tenant referenced first, TenantCreated fills it */
	"INSERT INTO @tenant_accounts@ (id, slug, name, created_at, updated_at) "
	"SELECT tenant_id, '', '', min(at), min(at) FROM tly_fold_stage "
	"WHERE tenant_id <> '" NIL_UUID "' GROUP BY tenant_id ON CONFLICT (id) DO NOTHING",

	"UPDATE @tenant_accounts@ t SET slug = x.doc->>'slug', name = x.doc->>'name', "
	"  created_at = x.at, updated_at = x.at "
	"FROM (SELECT DISTINCT ON (tenant_id) tenant_id, at, doc FROM tly_fold_stage "
	"  WHERE type = 'TenantCreated' ORDER BY tenant_id, ord DESC) x WHERE t.id = x.tenant_id",

	/* 4. users */
	"INSERT INTO @users@ AS u (id, tenant_id, external_id, username, display_name, email, "
	"  created_at, updated_at) "
	"SELECT DISTINCT ON ((doc->>'user_id')::uuid) (doc->>'user_id')::uuid, tenant_id, "
	"  doc->>'external_id', doc->>'username', doc->>'display_name', doc->>'email', at, at "
	"FROM tly_fold_stage WHERE type = 'UserRegistered' ORDER BY (doc->>'user_id')::uuid, ord DESC "
	"ON CONFLICT (id) DO UPDATE SET external_id = EXCLUDED.external_id, "
	"  username = EXCLUDED.username, display_name = EXCLUDED.display_name, email = EXCLUDED.email, "
	"  created_at = LEAST(u.created_at, EXCLUDED.created_at), "
	"  updated_at = GREATEST(u.updated_at, EXCLUDED.updated_at)",

	/* 5. plans and their features (the last PlanPublished of a plan wins) */
	"INSERT INTO @billing_plans@ AS p (id, code, name, \"interval\", interval_count, price_cents, "
	"  currency, trial_days, seat_included, tokens_per_period, overage_price_micros_per_1k_tokens, "
	"  feature_toggles, is_active, created_at, updated_at) "
	"SELECT DISTINCT ON ((doc->>'plan_id')::uuid) (doc->>'plan_id')::uuid, doc->>'code', "
	"  doc->>'name', doc->>'interval', (doc->>'interval_count')::int, "
	"  (doc->>'price_cents')::bigint, doc->>'currency', (doc->>'trial_days')::int, "
	"  (doc->>'seat_included')::int, (doc->>'tokens_per_period')::bigint, "
	"  (doc->>'overage_price_micros_per_1k_tokens')::bigint, "
	"  COALESCE(doc->'feature_toggles', '{}'::jsonb), (doc->>'is_active')::boolean, at, at "
	"FROM tly_fold_stage WHERE type = 'PlanPublished' ORDER BY (doc->>'plan_id')::uuid, ord DESC "
	"ON CONFLICT (id) DO UPDATE SET code = EXCLUDED.code, name = EXCLUDED.name, "
	"  \"interval\" = EXCLUDED.\"interval\", interval_count = EXCLUDED.interval_count, "
	"  price_cents = EXCLUDED.price_cents, currency = EXCLUDED.currency, "
	"  trial_days = EXCLUDED.trial_days, seat_included = EXCLUDED.seat_included, "
	"  tokens_per_period = EXCLUDED.tokens_per_period, "
	"  overage_price_micros_per_1k_tokens = EXCLUDED.overage_price_micros_per_1k_tokens, "
	"  feature_toggles = EXCLUDED.feature_toggles, is_active = EXCLUDED.is_active, "
	"  created_at = LEAST(p.created_at, EXCLUDED.created_at), "
	"  updated_at = GREATEST(p.updated_at, EXCLUDED.updated_at)",

	"WITH p AS (SELECT DISTINCT ON ((doc->>'plan_id')::uuid) (doc->>'plan_id')::uuid AS plan_id, "
	"  at, COALESCE(doc->'features', '[]'::jsonb) AS features FROM tly_fold_stage "
	"  WHERE type = 'PlanPublished' ORDER BY (doc->>'plan_id')::uuid, ord DESC), "
	"del AS (DELETE FROM @plan_features@ f USING p WHERE f.plan_id = p.plan_id AND NOT EXISTS "
	"  (SELECT 1 FROM jsonb_array_elements(p.features) e WHERE e->>'feature_key' = f.feature_key)) "
	"INSERT INTO @plan_features@ AS f (plan_id, feature_key, display_name, hard_limit, soft_limit, "
	"  is_metered, created_at) "
	"SELECT p.plan_id, e->>'feature_key', e->>'display_name', (e->>'hard_limit')::bigint, "
	"  (e->>'soft_limit')::bigint, (e->>'is_metered')::boolean, p.at "
	"FROM p CROSS JOIN LATERAL jsonb_array_elements(p.features) e "
	"ON CONFLICT (plan_id, feature_key) DO UPDATE SET display_name = EXCLUDED.display_name, "
	"  hard_limit = EXCLUDED.hard_limit, soft_limit = EXCLUDED.soft_limit, "
	"  is_metered = EXCLUDED.is_metered",

	/* 6. subscriptions: a placeholder for one the ledger names first (terms come from events) */
	"INSERT INTO @tenant_subscriptions@ (id, tenant_id, plan_code, status, starts_at, "
	"  current_period_start, current_period_end, price_cents, currency, tokens_per_period, "
	"  created_at, updated_at) "
	"SELECT DISTINCT ON ((doc->>'subscription_id')::uuid) (doc->>'subscription_id')::uuid, "
	"  tenant_id, '', 'pending', (doc->>'period_start')::timestamptz, "
	"  (doc->>'period_start')::timestamptz, (doc->>'period_end')::timestamptz, 0, 'XXX', 0, at, at "
	"FROM tly_fold_stage WHERE type = 'LedgerEntry' AND doc->>'subscription_id' IS NOT NULL "
	"  AND doc->>'period_start' IS NOT NULL AND doc->>'period_end' IS NOT NULL "
	"ORDER BY (doc->>'subscription_id')::uuid, ord ON CONFLICT (id) DO NOTHING",

	"INSERT INTO @tenant_subscriptions@ AS s (id, tenant_id, plan_id, plan_code, status, auto_renew, "
	"  billing_email, starts_at, current_period_start, current_period_end, trial_ends_at, "
	"  seat_count, price_cents, currency, tokens_per_period, overage_price_micros_per_1k_tokens, "
	"  rollover_cap_tokens, metered_prices, metadata_json, created_at, updated_at) "
	"SELECT DISTINCT ON ((x.doc->>'subscription_id')::uuid) (x.doc->>'subscription_id')::uuid, "
	"  x.tenant_id, (SELECT bp.id FROM @billing_plans@ bp WHERE bp.code = x.doc->>'plan_code'), "
	"  x.doc->>'plan_code', 'pending', (x.doc->>'auto_renew')::boolean, x.doc->>'billing_email', "
	"  (x.doc->>'period_start')::timestamptz, (x.doc->>'period_start')::timestamptz, "
	"  (x.doc->>'period_end')::timestamptz, (x.doc->>'trial_ends_at')::timestamptz, "
	"  (x.doc->>'seat_count')::int, (x.doc->>'price_cents')::bigint, x.doc->>'currency', "
	"  (x.doc->>'tokens_per_period')::bigint, "
	"  (x.doc->>'overage_price_micros_per_1k_tokens')::bigint, "
	"  (x.doc->>'rollover_cap_tokens')::bigint, COALESCE(x.doc->'metered_prices', '{}'::jsonb), "
	"  COALESCE(x.doc->'metadata', '{}'::jsonb), x.at, x.at "
	"FROM tly_fold_stage x WHERE x.type = 'SubscriptionStarted' "
	"ORDER BY (x.doc->>'subscription_id')::uuid, x.ord "
	"ON CONFLICT (id) DO UPDATE SET plan_id = EXCLUDED.plan_id, plan_code = EXCLUDED.plan_code, "
	"  auto_renew = EXCLUDED.auto_renew, billing_email = EXCLUDED.billing_email, "
	"  starts_at = EXCLUDED.starts_at, trial_ends_at = EXCLUDED.trial_ends_at, "
	"  seat_count = EXCLUDED.seat_count, price_cents = EXCLUDED.price_cents, "
	"  currency = EXCLUDED.currency, tokens_per_period = EXCLUDED.tokens_per_period, "
	"  overage_price_micros_per_1k_tokens = EXCLUDED.overage_price_micros_per_1k_tokens, "
	"  rollover_cap_tokens = EXCLUDED.rollover_cap_tokens, "
	"  metered_prices = EXCLUDED.metered_prices, metadata_json = EXCLUDED.metadata_json, "
	"  created_at = EXCLUDED.created_at, updated_at = GREATEST(s.updated_at, EXCLUDED.updated_at)",

	"UPDATE @tenant_subscriptions@ s SET "
	"  plan_id = (SELECT bp.id FROM @billing_plans@ bp WHERE bp.code = x.doc->>'plan_code'), "
	"  plan_code = x.doc->>'plan_code', seat_count = (x.doc->>'seat_count')::int, "
	"  price_cents = (x.doc->>'price_cents')::bigint, currency = x.doc->>'currency', "
	"  tokens_per_period = (x.doc->>'tokens_per_period')::bigint, "
	"  overage_price_micros_per_1k_tokens = (x.doc->>'overage_price_micros_per_1k_tokens')::bigint, "
	"  rollover_cap_tokens = (x.doc->>'rollover_cap_tokens')::bigint, "
	"  metered_prices = COALESCE(x.doc->'metered_prices', '{}'::jsonb), "
	"  updated_at = GREATEST(s.updated_at, x.at) "
	"FROM (SELECT DISTINCT ON ((doc->>'subscription_id')::uuid) tenant_id, at, doc "
	"  FROM tly_fold_stage WHERE type = 'SubscriptionChanged' "
	"  ORDER BY (doc->>'subscription_id')::uuid, ord DESC) x "
	"WHERE s.id = (x.doc->>'subscription_id')::uuid AND s.tenant_id = x.tenant_id",

	/* status and period from the ledger, the authority on what was accepted */
	"UPDATE @tenant_subscriptions@ s SET status = x.status, updated_at = GREATEST(s.updated_at, x.at) "
	"FROM (SELECT DISTINCT ON ((doc->>'ref_id')::uuid) (doc->>'ref_id')::uuid AS id, tenant_id, at, "
	"  CASE doc->>'kind' WHEN 'subscription_paused' THEN 'paused' "
	"  WHEN 'subscription_ended' THEN 'cancelled' ELSE 'active' END AS status "
	"  FROM tly_fold_stage WHERE type = 'LedgerEntry' AND doc->>'kind' IN ('subscription_started', "
	"  'subscription_paused', 'subscription_resumed', 'subscription_ended') "
	"  ORDER BY (doc->>'ref_id')::uuid, ord DESC) x WHERE s.id = x.id AND s.tenant_id = x.tenant_id",

	"UPDATE @tenant_subscriptions@ s SET current_period_start = x.ps, current_period_end = x.pe, "
	"  updated_at = GREATEST(s.updated_at, x.at) "
	"FROM (SELECT DISTINCT ON ((doc->>'ref_id')::uuid) (doc->>'ref_id')::uuid AS id, tenant_id, at, "
	"  (doc->>'period_start')::timestamptz AS ps, (doc->>'period_end')::timestamptz AS pe "
	"  FROM tly_fold_stage WHERE type = 'LedgerEntry' AND doc->>'kind' IN ('subscription_started', "
	"  'period_opened') AND doc->>'period_start' IS NOT NULL AND doc->>'period_end' IS NOT NULL "
	"  ORDER BY (doc->>'ref_id')::uuid, ord DESC) x WHERE s.id = x.id AND s.tenant_id = x.tenant_id",

	"UPDATE @tenant_subscriptions@ s SET cancel_at_period_end = true, cancel_at = x.pe, "
	"  updated_at = GREATEST(s.updated_at, x.at) "
	"FROM (SELECT DISTINCT ON ((doc->>'ref_id')::uuid) (doc->>'ref_id')::uuid AS id, tenant_id, at, "
	"  (doc->>'period_end')::timestamptz AS pe FROM tly_fold_stage WHERE type = 'LedgerEntry' "
	"  AND doc->>'kind' = 'subscription_cancelled' ORDER BY (doc->>'ref_id')::uuid, ord DESC) x "
	"WHERE s.id = x.id AND s.tenant_id = x.tenant_id",

	"UPDATE @tenant_subscriptions@ s SET cancel_at = COALESCE(s.cancel_at, x.at) "
	"FROM (SELECT DISTINCT ON ((doc->>'ref_id')::uuid) (doc->>'ref_id')::uuid AS id, tenant_id, at "
	"  FROM tly_fold_stage WHERE type = 'LedgerEntry' AND doc->>'kind' = 'subscription_ended' "
	"  ORDER BY (doc->>'ref_id')::uuid, ord) x WHERE s.id = x.id AND s.tenant_id = x.tenant_id",

	/* 7. conversations: a placeholder for one a message, handoff or close names first */
	"INSERT INTO @agent_conversations@ (id, tenant_id, agent_entrypoint, status, created_at, "
	"  updated_at) "
	"SELECT (doc->>'conversation_id')::uuid, min(tenant_id::text)::uuid, '', 'active', min(at), "
	"  min(at) FROM tly_fold_stage "
	"WHERE type IN ('MessageAppended', 'AgentHandoff', 'ConversationClosed') "
	"GROUP BY (doc->>'conversation_id')::uuid ON CONFLICT (id) DO NOTHING",

	"INSERT INTO @agent_conversations@ AS c (id, tenant_id, user_id, agent_entrypoint, active_agent, "
	"  status, source_channel, topic_hint, created_at, updated_at) "
	"SELECT DISTINCT ON ((x.doc->>'conversation_id')::uuid) (x.doc->>'conversation_id')::uuid, "
	"  x.tenant_id, (SELECT u.id FROM @users@ u WHERE u.id = (x.doc->>'user_id')::uuid), "
	"  x.doc->>'agent_entrypoint', x.doc->>'agent_entrypoint', 'active', x.doc->>'source_channel', "
	"  x.doc->>'topic_hint', x.at, x.at "
	"FROM tly_fold_stage x WHERE x.type = 'ConversationStarted' "
	"ORDER BY (x.doc->>'conversation_id')::uuid, x.ord "
	"ON CONFLICT (id) DO UPDATE SET user_id = EXCLUDED.user_id, "
	"  agent_entrypoint = EXCLUDED.agent_entrypoint, "
	"  active_agent = COALESCE(c.active_agent, EXCLUDED.active_agent), "
	"  source_channel = EXCLUDED.source_channel, topic_hint = EXCLUDED.topic_hint, "
	"  created_at = EXCLUDED.created_at, updated_at = GREATEST(c.updated_at, EXCLUDED.updated_at)",

	/* messages: one row per message id; the counters add only the rows inserted */
	"WITH m AS (SELECT DISTINCT ON ((doc->>'message_id')::uuid) (doc->>'message_id')::uuid AS mid, "
	"  (doc->>'conversation_id')::uuid AS cid, ord, tenant_id, at, doc FROM tly_fold_stage "
	"  WHERE type = 'MessageAppended' ORDER BY (doc->>'message_id')::uuid, ord), "
	"fresh AS (SELECT m.* FROM m WHERE NOT EXISTS "
	"  (SELECT 1 FROM @agent_messages@ a WHERE a.message_id = m.mid)), "
	"numbered AS (SELECT f.*, c.message_count + row_number() OVER (PARTITION BY f.cid "
	"  ORDER BY f.ord) - 1 AS pos FROM fresh f JOIN @agent_conversations@ c ON c.id = f.cid), "
	"ins AS (INSERT INTO @agent_messages@ (message_id, tenant_id, conversation_id, user_id, "
	"  position, role, agent_type, content, tool_name, tool_call_id, provider, model, "
	"  token_count_prompt, token_count_completion, reasoning_tokens, latency_ms, "
	"  content_checksum, cost_micros, reservation_id, created_at) "
	"  SELECT mid, tenant_id, cid, (doc->>'user_id')::uuid, pos, doc->>'role', doc->>'agent_type', "
	"  (doc->>'content')::jsonb, doc->>'tool_name', doc->>'tool_call_id', doc->>'provider', "
	"  doc->>'model', (doc->>'prompt_tokens')::bigint, (doc->>'completion_tokens')::bigint, "
	"  (doc->>'reasoning_tokens')::bigint, (doc->>'latency_ms')::int, "
	"  encode(sha256(convert_to(doc->>'content', 'UTF8')), 'hex'), (doc->>'cost_micros')::bigint, "
	"  (doc->>'reservation_id')::uuid, at FROM numbered ON CONFLICT DO NOTHING "
	"  RETURNING conversation_id, token_count_prompt, token_count_completion, reasoning_tokens, "
	"  cost_micros, created_at) "
	"UPDATE @agent_conversations@ c SET message_count = c.message_count + x.n, "
	"  total_tokens_prompt = c.total_tokens_prompt + x.p, "
	"  total_tokens_completion = c.total_tokens_completion + x.co, "
	"  reasoning_tokens = c.reasoning_tokens + x.r, total_cost_micros = c.total_cost_micros + x.cost, "
	"  last_message_at = GREATEST(c.last_message_at, x.last), "
	"  updated_at = GREATEST(c.updated_at, x.last) "
	"FROM (SELECT conversation_id, count(*) AS n, sum(token_count_prompt) AS p, "
	"  sum(token_count_completion) AS co, sum(reasoning_tokens) AS r, sum(cost_micros) AS cost, "
	"  max(created_at) AS last FROM ins GROUP BY conversation_id) x WHERE c.id = x.conversation_id",

	"UPDATE @agent_conversations@ c SET handoff_count = c.handoff_count + x.n, "
	"  active_agent = x.to_agent, updated_at = GREATEST(c.updated_at, x.last) "
	"FROM (SELECT (doc->>'conversation_id')::uuid AS cid, count(*) AS n, "
	"  (array_agg(doc->>'to_agent' ORDER BY ord DESC))[1] AS to_agent, max(at) AS last "
	"  FROM tly_fold_stage WHERE type = 'AgentHandoff' GROUP BY 1) x WHERE c.id = x.cid",

	"UPDATE @agent_conversations@ c SET status = x.status, updated_at = GREATEST(c.updated_at, x.at) "
	"FROM (SELECT DISTINCT ON ((doc->>'conversation_id')::uuid) (doc->>'conversation_id')::uuid "
	"  AS cid, doc->>'status' AS status, at FROM tly_fold_stage WHERE type = 'ConversationClosed' "
	"  ORDER BY (doc->>'conversation_id')::uuid, ord DESC) x WHERE c.id = x.cid",

	/* 8. metered usage, once per external event id; its period from the ledger's entry */
	"INSERT INTO @projector_usage_periods@ (event_id, period_start, period_end) "
	"SELECT DISTINCT ON ((doc->>'cause_event_id')::uuid) (doc->>'cause_event_id')::uuid, "
	"  (doc->>'period_start')::timestamptz, (doc->>'period_end')::timestamptz "
	"FROM tly_fold_stage WHERE type = 'LedgerEntry' AND doc->>'kind' = 'usage_recorded' "
	"  AND doc->>'period_start' IS NOT NULL AND doc->>'period_end' IS NOT NULL "
	"ORDER BY (doc->>'cause_event_id')::uuid, ord ON CONFLICT (event_id) DO NOTHING",

	"INSERT INTO @subscription_usage@ (id, tenant_id, subscription_id, feature_key, unit, "
	"  period_start, period_end, quantity, reported_at, external_event_id) "
	"SELECT DISTINCT ON (u.tenant_id, u.doc->>'external_event_id') u.event_id, u.tenant_id, s.id, "
	"  u.doc->>'feature_key', u.doc->>'unit', p.period_start, p.period_end, "
	"  (u.doc->>'quantity')::bigint, u.at, u.doc->>'external_event_id' "
	"FROM tly_fold_stage u JOIN @tenant_subscriptions@ s "
	"  ON s.id = (u.doc->>'subscription_id')::uuid AND s.tenant_id = u.tenant_id "
	"LEFT JOIN @projector_usage_periods@ p ON p.event_id = u.event_id "
	"WHERE u.type = 'UsageReported' AND NOT EXISTS (SELECT 1 FROM @subscription_usage@ x "
	"  WHERE x.tenant_id = u.tenant_id AND x.external_event_id = u.doc->>'external_event_id') "
	"ORDER BY u.tenant_id, u.doc->>'external_event_id', u.ord ON CONFLICT (id) DO NOTHING",

	"UPDATE @subscription_usage@ u SET period_start = p.period_start, period_end = p.period_end "
	"FROM @projector_usage_periods@ p WHERE p.event_id = u.id AND u.period_start IS NULL "
	"  AND p.event_id IN (SELECT (doc->>'cause_event_id')::uuid FROM tly_fold_stage "
	"  WHERE type = 'LedgerEntry' AND doc->>'kind' = 'usage_recorded')",

	/* 9. API usage per model and UTC day, once per model call (reservation or message) */
	"WITH z AS (SELECT ord, tenant_id, at, "
	"    COALESCE((doc->>'reservation_id')::uuid, (doc->>'message_id')::uuid) AS call_id, "
	"    doc->>'provider' AS provider, doc->>'model' AS model, (doc->>'prompt_tokens')::bigint AS p, "
	"    (doc->>'completion_tokens')::bigint AS co, (doc->>'reasoning_tokens')::bigint AS r, "
	"    (doc->>'cost_micros')::bigint AS cost FROM tly_fold_stage "
	"  WHERE type IN ('MessageAppended', 'ReservationSettled')), "
	"calls AS (SELECT DISTINCT ON (tenant_id, call_id) * FROM z "
	"  WHERE p + co + r > 0 OR cost > 0 ORDER BY tenant_id, call_id, ord), "
	"ins AS (INSERT INTO @projector_api_calls@ (tenant_id, call_id) "
	"  SELECT tenant_id, call_id FROM calls ON CONFLICT DO NOTHING RETURNING tenant_id, call_id) "
	"INSERT INTO @api_usage@ AS a (tenant_id, provider, model, usage_date, prompt_tokens, "
	"  completion_tokens, reasoning_tokens, total_tokens, cost_micros, request_count, updated_at) "
	"SELECT c.tenant_id, c.provider, c.model, (c.at AT TIME ZONE 'UTC')::date, sum(c.p), sum(c.co), "
	"  sum(c.r), sum(c.p + c.co + c.r), sum(c.cost), count(*), max(c.at) "
	"FROM calls c JOIN ins USING (tenant_id, call_id) GROUP BY 1, 2, 3, 4 "
	"ON CONFLICT (tenant_id, provider, model, usage_date) DO UPDATE SET "
	"  prompt_tokens = a.prompt_tokens + EXCLUDED.prompt_tokens, "
	"  completion_tokens = a.completion_tokens + EXCLUDED.completion_tokens, "
	"  reasoning_tokens = a.reasoning_tokens + EXCLUDED.reasoning_tokens, "
	"  total_tokens = a.total_tokens + EXCLUDED.total_tokens, "
	"  cost_micros = a.cost_micros + EXCLUDED.cost_micros, "
	"  request_count = a.request_count + EXCLUDED.request_count, "
	"  updated_at = GREATEST(a.updated_at, EXCLUDED.updated_at)",

	/* 10. token balances: the wallet after the last entry per (tenant, subscription) */
	"WITH e AS (SELECT ord, tenant_id, at, doc, doc->>'kind' AS kind, (doc->>'seq')::bigint AS seq, "
	"    CASE WHEN doc->>'subscription_id' IS NOT NULL THEN (doc->>'subscription_id')::uuid "
	"    WHEN doc->>'kind' = 'subscription_ended' THEN (doc->>'ref_id')::uuid END AS sub "
	"  FROM tly_fold_stage WHERE type = 'LedgerEntry'), "
	"k AS (SELECT tenant_id, sub, max(seq) FILTER (WHERE kind IN ('subscription_started', "
	"  'period_opened')) AS reset_seq, max(seq) AS last_seq FROM e GROUP BY tenant_id, sub), "
	"agg AS (SELECT k.tenant_id, k.sub, k.reset_seq, k.last_seq, COALESCE(sum("
	"    (e.doc->>'overage_delta')::bigint - (e.doc->>'allowance_delta')::bigint "
	"    - (e.doc->>'credits_delta')::bigint) FILTER (WHERE e.kind = 'debit' "
	"    AND (k.reset_seq IS NULL OR e.seq > k.reset_seq)), 0) AS used "
	"  FROM k JOIN e ON e.tenant_id = k.tenant_id "
	"    AND COALESCE(e.sub, '" NIL_UUID "') = COALESCE(k.sub, '" NIL_UUID "') "
	"  GROUP BY k.tenant_id, k.sub, k.reset_seq, k.last_seq), "
	"fin AS (SELECT agg.tenant_id, agg.sub, agg.last_seq, e.at, e.doc, "
	"    CASE WHEN agg.reset_seq IS NULL THEN COALESCE(b.tokens_used, 0) ELSE 0 END + agg.used AS used, "
	"    (e.doc->>'allowance_remaining')::bigint AS allowance, "
	"    (e.doc->>'credits_remaining')::bigint AS credits, (e.doc->>'held')::bigint AS held, "
	"    (e.doc->>'overage_tokens')::bigint AS overage "
	"  FROM agg JOIN e ON e.tenant_id = agg.tenant_id AND e.seq = agg.last_seq "
	"  LEFT JOIN @token_balances@ b ON b.tenant_id = agg.tenant_id "
	"    AND b.subscription_id IS NOT DISTINCT FROM agg.sub) "
	"INSERT INTO @token_balances@ AS b (tenant_id, subscription_id, tokens_limit, tokens_used, "
	"  tokens_remaining, held, credits, overage_tokens, period_start, period_end, ledger_seq, "
	"  updated_at) "
	"SELECT tenant_id, sub, GREATEST(used - overage, 0) + allowance + credits, used, "
	"  GREATEST(allowance + credits - held, 0), held, credits, overage, "
	"  (doc->>'period_start')::timestamptz, (doc->>'period_end')::timestamptz, last_seq, at FROM fin "
	"ON CONFLICT (tenant_id, subscription_id) DO UPDATE SET tokens_limit = EXCLUDED.tokens_limit, "
	"  tokens_used = EXCLUDED.tokens_used, tokens_remaining = EXCLUDED.tokens_remaining, "
	"  held = EXCLUDED.held, credits = EXCLUDED.credits, overage_tokens = EXCLUDED.overage_tokens, "
	"  period_start = EXCLUDED.period_start, period_end = EXCLUDED.period_end, "
	"  ledger_seq = EXCLUDED.ledger_seq, updated_at = EXCLUDED.updated_at",

	/* API cost of the UTC days of the current period, for tenants either side touched */
	"UPDATE @token_balances@ b SET monthly_api_cost_micros = COALESCE((SELECT sum(a.cost_micros) "
	"  FROM @api_usage@ a WHERE a.tenant_id = b.tenant_id "
	"  AND a.usage_date >= (b.period_start AT TIME ZONE 'UTC')::date "
	"  AND a.usage_date < (b.period_end AT TIME ZONE 'UTC')::date), 0) "
	"WHERE b.period_start IS NOT NULL AND b.tenant_id IN (SELECT tenant_id FROM tly_fold_stage "
	"  WHERE type IN ('LedgerEntry', 'MessageAppended', 'ReservationSettled'))",

	/* 11. invoices from the ledger's invoice entries; status from InvoiceStatusChanged */
	"INSERT INTO @subscription_invoices@ (id, tenant_id, subscription_id, ledger_seq, period_start, "
	"  period_end, amount_cents, currency, overage_tokens, lines, status, created_at, updated_at) "
	"SELECT (doc->>'ref_id')::uuid, tenant_id, (doc->>'subscription_id')::uuid, "
	"  (doc->>'seq')::bigint, (doc->>'period_start')::timestamptz, "
	"  (doc->>'period_end')::timestamptz, (doc->>'amount_cents')::bigint, doc->>'currency', "
	"  -(doc->>'overage_delta')::bigint, COALESCE(doc->'lines', '[]'::jsonb), 'issued', at, at "
	"FROM tly_fold_stage WHERE type = 'LedgerEntry' AND doc->>'kind' = 'invoice' "
	"ON CONFLICT (id) DO NOTHING",

	"INSERT INTO @projector_invoice_status@ AS p (invoice_id, tenant_id, status, "
	"  external_invoice_id, hosted_invoice_url, changed_at) "
	"SELECT DISTINCT ON ((doc->>'invoice_id')::uuid) (doc->>'invoice_id')::uuid, tenant_id, "
	"  doc->>'status', doc->>'external_invoice_id', doc->>'hosted_invoice_url', at "
	"FROM tly_fold_stage WHERE type = 'InvoiceStatusChanged' "
	"ORDER BY (doc->>'invoice_id')::uuid, ord DESC "
	"ON CONFLICT (invoice_id) DO UPDATE SET status = EXCLUDED.status, "
	"  external_invoice_id = COALESCE(EXCLUDED.external_invoice_id, p.external_invoice_id), "
	"  hosted_invoice_url = COALESCE(EXCLUDED.hosted_invoice_url, p.hosted_invoice_url), "
	"  changed_at = EXCLUDED.changed_at WHERE p.tenant_id = EXCLUDED.tenant_id",

	"UPDATE @subscription_invoices@ i SET status = p.status, "
	"  external_invoice_id = p.external_invoice_id, hosted_invoice_url = p.hosted_invoice_url, "
	"  updated_at = GREATEST(i.created_at, p.changed_at) "
	"FROM @projector_invoice_status@ p WHERE p.invoice_id = i.id AND p.tenant_id = i.tenant_id "
	"  AND i.id IN (SELECT (doc->>'invoice_id')::uuid FROM tly_fold_stage "
	"    WHERE type = 'InvoiceStatusChanged' "
	"  UNION ALL SELECT (doc->>'ref_id')::uuid FROM tly_fold_stage "
	"    WHERE type = 'LedgerEntry' AND doc->>'kind' = 'invoice')",
};

#define N_FOLD_SQL (sizeof(FOLD_SQL) / sizeof(FOLD_SQL[0]))

/*
 * What each statement of FOLD_SQL reads: it runs only when the batch holds a message of one of
 * these types or ledger entry kinds (a statement over none of them would change no row).
 */
#define T(type) (UINT64_C(1) << (type))
enum { K_SUB_STATUS = TLY_EV__COUNT, K_PERIOD, K_CANCELLED, K_ENDED, K_USAGE, K_INVOICE };
#define ANY_EVENT ((T(TLY_EV__COUNT) - 1) & ~T(TLY_EV_LEDGER_ENTRY))
#define ANY (T(TLY_EV__COUNT) - 1)
#define CONV_REF (T(TLY_EV_MESSAGE_APPENDED) | T(TLY_EV_AGENT_HANDOFF) | T(TLY_EV_CONVERSATION_CLOSED))
#define MODEL_CALL (T(TLY_EV_MESSAGE_APPENDED) | T(TLY_EV_RESERVATION_SETTLED))
static const uint64_t FOLD_NEEDS[] = {
	ANY_EVENT, T(TLY_EV_LEDGER_ENTRY),                              /* 1, 2: dedupe */
	ANY, T(TLY_EV_TENANT_CREATED), T(TLY_EV_USER_REGISTERED),       /* 3, 4 */
	T(TLY_EV_PLAN_PUBLISHED), T(TLY_EV_PLAN_PUBLISHED),             /* 5 */
	T(TLY_EV_LEDGER_ENTRY), T(TLY_EV_SUBSCRIPTION_STARTED),         /* 6 */
	T(TLY_EV_SUBSCRIPTION_CHANGED), T(K_SUB_STATUS), T(K_PERIOD), T(K_CANCELLED), T(K_ENDED),
	CONV_REF, T(TLY_EV_CONVERSATION_STARTED), T(TLY_EV_MESSAGE_APPENDED), /* 7 */
	T(TLY_EV_AGENT_HANDOFF), T(TLY_EV_CONVERSATION_CLOSED),
	T(K_USAGE), T(TLY_EV_USAGE_REPORTED), T(K_USAGE),               /* 8 */
	MODEL_CALL,                                                     /* 9 */
	T(TLY_EV_LEDGER_ENTRY), T(TLY_EV_LEDGER_ENTRY) | MODEL_CALL,    /* 10 */
	T(K_INVOICE), T(TLY_EV_INVOICE_STATUS_CHANGED),                 /* 11 */
	T(TLY_EV_INVOICE_STATUS_CHANGED) | T(K_INVOICE),
};
_Static_assert(sizeof(FOLD_NEEDS) / sizeof(FOLD_NEEDS[0]) == N_FOLD_SQL,
	       "one FOLD_NEEDS entry per FOLD_SQL statement");
_Static_assert(K_INVOICE < 64, "types and kinds fit the mask");

/* The mask bits of a ledger entry's kind (besides its type's). */
static uint64_t kind_bits(const char *kind)
{
	static const struct {
		const char *kind;
		uint64_t bits;
	} kinds[] = {
		{"subscription_started", T(K_SUB_STATUS) | T(K_PERIOD)},
		{"subscription_paused", T(K_SUB_STATUS)},
		{"subscription_resumed", T(K_SUB_STATUS)},
		{"subscription_ended", T(K_SUB_STATUS) | T(K_ENDED)},
		{"subscription_cancelled", T(K_CANCELLED)},
		{"period_opened", T(K_PERIOD)},
		{"usage_recorded", T(K_USAGE)},
		{"invoice", T(K_INVOICE)},
	};
	for (size_t i = 0; kind && i < sizeof(kinds) / sizeof(kinds[0]); i++)
		if (strcmp(kind, kinds[i].kind) == 0)
			return kinds[i].bits;
	return 0;
}

static const char STAGE_SQL[] =
	"CREATE TEMP TABLE tly_fold_stage (ord bigint NOT NULL, type text NOT NULL, "
	"tenant_id uuid NOT NULL, event_id uuid, at timestamptz NOT NULL, doc jsonb NOT NULL) "
	"ON COMMIT DELETE ROWS";

static void set_err(struct tly_pg_error *err, enum tly_errclass cls, const char *msg)
{
	if (!err)
		return;
	err->errclass = cls;
	err->sqlstate[0] = '\0';
	snprintf(err->message, sizeof(err->message), "%s", msg);
}

struct tly_fold *tly_fold_new(void)
{
	struct tly_fold *fold = calloc(1, sizeof(*fold));
	if (!fold)
		return NULL;
	for (size_t i = 0; i < N_TABLES; i++)
		snprintf(fold->names[i], sizeof(fold->names[i]), "%s", tly_fold_tables[i]);
	return fold;
}

void tly_fold_free(struct tly_fold *fold)
{
	if (!fold)
		return;
	free(fold->data);
	free(fold);
}

static bool valid_name(const char *name)
{
	size_t n = strlen(name), dots = 0;
	if (n == 0 || n > NAME_MAX_LEN || name[0] == '.' || name[n - 1] == '.' || isdigit((unsigned char)name[0]))
		return false;
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)name[i];
		if (ch == '.')
			dots++;
		else if (!(islower(ch) || isdigit(ch) || ch == '_'))
			return false;
	}
	return dots <= 1;
}

int tly_fold_set_table(struct tly_fold *fold, const char *table, const char *name)
{
	if (!valid_name(name))
		return TLY_E_INVALID;
	for (size_t i = 0; i < N_TABLES; i++) {
		if (strcmp(tly_fold_tables[i], table) == 0) {
			snprintf(fold->names[i], sizeof(fold->names[i]), "%s", name);
			return 0;
		}
	}
	return TLY_E_NOT_FOUND;
}

size_t tly_fold_pending(const struct tly_fold *fold)
{
	return fold->pending;
}

void tly_fold_clear(struct tly_fold *fold)
{
	fold->len = 0;
	fold->pending = 0;
	fold->present = 0;
}

static int reserve(struct tly_fold *fold, size_t more)
{
	if (fold->len + more <= fold->cap)
		return 0;
	size_t cap = fold->cap ? fold->cap : 1 << 16;
	while (cap < fold->len + more)
		cap *= 2;
	char *data = realloc(fold->data, cap);
	if (!data)
		return TLY_E_NOMEM;
	fold->data = data;
	fold->cap = cap;
	return 0;
}

static int put(struct tly_fold *fold, const char *s, size_t n)
{
	if (reserve(fold, n) != 0)
		return TLY_E_NOMEM;
	memcpy(fold->data + fold->len, s, n);
	fold->len += n;
	return 0;
}

/* One COPY text field: backslash, tab, newline and carriage return escaped. */
static int put_field(struct tly_fold *fold, const char *s)
{
	if (reserve(fold, 2 * strlen(s) + 1) != 0)
		return TLY_E_NOMEM;
	for (; *s; s++) {
		char esc = 0;
		switch (*s) {
		case '\\': esc = '\\'; break;
		case '\t': esc = 't'; break;
		case '\n': esc = 'n'; break;
		case '\r': esc = 'r'; break;
		default: break;
		}
		if (esc) {
			fold->data[fold->len++] = '\\';
			fold->data[fold->len++] = esc;
		} else {
			fold->data[fold->len++] = *s;
		}
	}
	return 0;
}

int tly_fold_add(struct tly_fold *fold, const struct tly_event *ev)
{
	const struct tly_event_desc *desc = tly_event_desc(ev->type);
	if (!desc || ev->type == TLY_EV_CLOCK_TICK)
		return 0;
	char *doc = tly_event_to_json_text(ev);
	if (!doc)
		return TLY_E_NOMEM;
	char head[256], tenant[37], event_id[37], at[40];
	tly_uuid_format(&ev->tenant_id, tenant);
	if (ev->type == TLY_EV_LEDGER_ENTRY)
		snprintf(event_id, sizeof(event_id), "\\N");
	else
		tly_uuid_format(&ev->event_id, event_id);
	tly_time_format_rfc3339(ev->type == TLY_EV_LEDGER_ENTRY ? ev->u.ledger_entry.ledger_time
								: ev->occurred_at,
				at);
	int n = snprintf(head, sizeof(head), "%" PRId64 "\t%s\t%s\t%s\t%s\t", fold->ord, desc->name,
			 tenant, event_id, at);
	size_t mark = fold->len;
	int rc = TLY_E_NOMEM;
	if (n > 0 && (size_t)n < sizeof(head) && put(fold, head, (size_t)n) == 0 &&
	    put_field(fold, doc) == 0 && put(fold, "\n", 1) == 0) {
		fold->ord++;
		fold->pending++;
		fold->present |= T(ev->type);
		if (ev->type == TLY_EV_LEDGER_ENTRY)
			fold->present |= kind_bits(ev->u.ledger_entry.kind);
		rc = 0;
	} else {
		fold->len = mark;
	}
	free(doc);
	return rc;
}

/* FOLD_SQL[i] with every @table@ replaced by its target name; malloc'd, NULL on OOM. */
static char *render(const struct tly_fold *fold, const char *sql)
{
	char *out = NULL;
	size_t outlen = 0;
	FILE *f = open_memstream(&out, &outlen);
	if (!f)
		return NULL;
	for (const char *p = sql; *p;) {
		const char *end = *p == '@' ? strchr(p + 1, '@') : NULL;
		bool replaced = false;
		for (size_t i = 0; end && i < N_TABLES; i++) {
			size_t len = strlen(tly_fold_tables[i]);
			if ((size_t)(end - p - 1) == len && strncmp(p + 1, tly_fold_tables[i], len) == 0) {
				fputs(fold->names[i], f);
				p = end + 1;
				replaced = true;
				break;
			}
		}
		if (!replaced)
			fputc(*p++, f);
	}
	if (fclose(f) != 0) {
		free(out);
		return NULL;
	}
	return out;
}

static int ensure_stage(struct tly_fold *fold, PGconn *conn, struct tly_pg_error *err)
{
	if (fold->staged_on == conn)
		return 0;
	PGresult *res = tly_pg_query(conn, "SELECT to_regclass('pg_temp.tly_fold_stage') IS NULL", 0,
				     NULL, err);
	if (!res)
		return TLY_E_PG;
	bool missing = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0;
	PQclear(res);
	if (missing && tly_pg_exec(conn, STAGE_SQL, 0, NULL, err) != 0)
		return TLY_E_PG;
	fold->staged_on = conn;
	return 0;
}

static int copy_stage(struct tly_fold *fold, PGconn *conn, struct tly_pg_error *err)
{
	PGresult *res = PQexec(conn, "COPY tly_fold_stage (ord, type, tenant_id, event_id, at, doc) "
				     "FROM STDIN");
	if (PQresultStatus(res) != PGRES_COPY_IN) {
		tly_pg_error_set(err, conn, res);
		PQclear(res);
		return TLY_E_PG;
	}
	PQclear(res);
	if (PQputCopyData(conn, fold->data, (int)fold->len) != 1 || PQputCopyEnd(conn, NULL) != 1) {
		tly_pg_error_set(err, conn, NULL);
		return TLY_E_PG;
	}
	res = PQgetResult(conn);
	bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
	if (!ok)
		tly_pg_error_set(err, conn, res);
	PQclear(res);
	while ((res = PQgetResult(conn)) != NULL)
		PQclear(res);
	return ok ? 0 : TLY_E_PG;
}

/*
 * Memory for the fold's sorts and hashes, for this transaction only: they carry the staged
 * documents, and with the default work_mem (4 MB) a batch of a few thousand messages spills to
 * temporary files. Twice the staged text, between 16 MB and 1 GB.
 */
static int set_work_mem(const struct tly_fold *fold, PGconn *conn, struct tly_pg_error *err)
{
	size_t kb = fold->len / 512;
	char value[32];
	kb = kb < 16 * 1024 ? 16 * 1024 : kb > 1024 * 1024 ? 1024 * 1024 : kb;
	snprintf(value, sizeof(value), "%zukB", kb);
	const char *const v[] = {value};
	return tly_pg_exec(conn, "SELECT set_config('work_mem', $1, true)", 1, v, err);
}

int tly_fold_flush(struct tly_fold *fold, PGconn *conn, struct tly_pg_error *err)
{
	if (fold->pending == 0)
		return 0;
	if (PQtransactionStatus(conn) != PQTRANS_INTRANS) {
		set_err(err, TLY_ERRCLASS_FATAL, "could not fold the batch: no transaction is open");
		return TLY_E_PG;
	}
	if (fold->len > INT32_MAX) {
		set_err(err, TLY_ERRCLASS_FATAL, "could not fold the batch: more than 2 GB of rows");
		return TLY_E_PG;
	}
	int rc = ensure_stage(fold, conn, err);
	if (rc == 0)
		rc = set_work_mem(fold, conn, err);
	if (rc == 0)
		rc = tly_pg_exec(conn, "DELETE FROM tly_fold_stage", 0, NULL, err);
	if (rc == 0)
		rc = copy_stage(fold, conn, err);
	for (size_t i = 0; rc == 0 && i < N_FOLD_SQL; i++) {
		if (!(fold->present & FOLD_NEEDS[i]))
			continue;
		char *sql = render(fold, FOLD_SQL[i]);
		if (!sql) {
			set_err(err, TLY_ERRCLASS_FATAL, "could not fold the batch: out of memory");
			return TLY_E_NOMEM;
		}
		rc = tly_pg_exec(conn, sql, 0, NULL, err);
		free(sql);
	}
	if (rc != 0) {
		/* the staging table may have been dropped with a rolled back creation */
		fold->staged_on = NULL;
		return TLY_E_PG;
	}
	tly_fold_clear(fold);
	return 0;
}
