/* The projection fold: a batch of decoded messages staged by binary COPY, folded by set-based SQL. */
#include "fold.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entries.h"
#include "event_json.h"
#include "pgcopy.h"
#include "uuidmap.h"

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

/*
 * The message fields the fold reads, by their names in lib/event's descriptors: each is a
 * column of the staging table, typed by the field's kind (uuid, text, bigint, int, boolean,
 * timestamptz; maps and lists of records as jsonb, as lib/event_json renders them).
 */
static const char *const STAGE_FIELDS[] = {
	"slug", "name", "user_id", "external_id", "username", "display_name", "email",
	"plan_id", "code", "interval", "interval_count", "price_cents", "currency", "trial_days",
	"seat_included", "tokens_per_period", "overage_price_micros_per_1k_tokens",
	"feature_toggles", "is_active", "features", "subscription_id", "period_start", "period_end",
	"plan_code", "auto_renew", "billing_email", "trial_ends_at", "seat_count",
	"rollover_cap_tokens", "metered_prices", "metadata", "kind", "seq", "ref_id",
	"cause_event_id", "overage_delta", "allowance_delta", "credits_delta", "allowance_remaining",
	"credits_remaining", "held", "overage_tokens", "amount_cents", "lines", "conversation_id",
	"agent_entrypoint", "source_channel", "topic_hint", "message_id", "role", "agent_type",
	"content", "tool_name", "tool_call_id", "provider", "model", "prompt_tokens",
	"completion_tokens", "reasoning_tokens", "latency_ms", "cost_micros", "reservation_id",
	"to_agent", "status", "feature_key", "unit", "quantity", "external_event_id", "invoice_id",
	"external_invoice_id", "hosted_invoice_url",
};
#define N_STAGE_FIELDS (sizeof(STAGE_FIELDS) / sizeof(STAGE_FIELDS[0]))
/* ord, type, tenant_id, event_id, at, run_seq, run_at, then the fields */
#define N_STAGE_COLUMNS (7 + (int)N_STAGE_FIELDS)

/*
 * What a batch holds back per tenant until it is sent (see tly_fold_add): a run of ledger entries
 * that only token_balances reads, and only through its last entry (kinds no statement names:
 * holds, rejections, duplicates...), and the earliest of the tenant's wallet events, which only
 * its placeholder row reads. Each goes to the staging table as one row.
 */
struct held {
	tly_uuid tenant;
	bool run;                /* an entry run is held */
	struct tly_event last;   /* its last entry; strings dropped, kind copied to kind[] */
	char kind[32];
	int64_t first_seq;       /* seq and ledger time of its first entry */
	int64_t first_at;
	bool wallet;             /* a wallet event is held */
	enum tly_event_type wallet_type;
	int64_t wallet_at;       /* the earliest occurred_at of the tenant's wallet events */
};

struct tly_fold {
	char names[N_TABLES][NAME_MAX_LEN + 1]; /* target name of each table */
	char **rendered; /* N_FOLD_SQL: each statement rendered with names, on first use; owned */
	struct tly_pgcopy *rows;                /* the staged rows (binary COPY); owned */
	struct tly_pgcopy *fill;                /* entries read back for a seq gap (fill_gaps); owned */
	size_t pending;
	uint64_t present;                       /* T() of the types and kinds pending */
	int64_t ord;                            /* feed order of the next row */
	PGconn *staged_on;                      /* borrowed: conn where the staging table exists */
	char *stage_sql;                        /* CREATE TEMP TABLE tly_fold_stage ...; ALTER ...; owned */
	bool sent;                              /* statements sent, results not all read */
	int rc;                                 /* of the statements sent: 0 or the first failure */
	const struct tly_field *fields[TLY_EV__COUNT][N_STAGE_FIELDS]; /* NULL: the type has none */
	struct tly_uuidmap *held_of;            /* tenant -> its struct held in held; owned */
	struct tly_uuidmap *staged_ids;         /* (tenant, event id) of the batch's events; owned */
	struct held **held;                     /* the batch's, in the order first held; owned */
	size_t n_held, cap_held;                /* in use (this batch), allocated */
};

/*
 * The fold, statement by statement, over the staging table tly_fold_stage (ord, type,
 * tenant_id, event_id, at, run_seq, run_at, then one column per STAGE_FIELDS name holding that
 * field of the message, NULL for a type without it): at is occurred_at (events) or ledger_time
 * (entries). A row may stand for a run of a tenant's entries (struct held): it is the run's last
 * entry, with run_seq and run_at the first's seq and ledger time (NULL: the row is one message).
 * @name@ is replaced by the target table's name.
 * Order matters: dedupe first, then the rows other rows reference (tenants, subscriptions,
 * conversations), then the rows and counters. Every counter adds only rows actually inserted.
 */
static const char *const FOLD_SQL[] = {
	/* 1. events seen before are dropped (tly_fold_add stages an event id once per batch), then
	 * the rest recorded with a plain insert, in key order (neighbours in the index one after the
	 * other). The lookup is a scalar subquery so that it stays one probe of the key per staged
	 * event, whatever the statistics (a join could hash the whole table every batch); a plain
	 * insert, not a speculative one (ON CONFLICT), which wrote and confirmed a token per row.
	 * Only a session inserting the same id meanwhile can make the insert fail (a unique
	 * violation, retriable: tly_fold_flush_poll), as the message insert */
	"DELETE FROM tly_fold_stage s WHERE s.event_id IS NOT NULL AND (SELECT true "
	"  FROM @projector_seen_events@ e WHERE e.tenant_id = s.tenant_id AND e.event_id = s.event_id)",
	"INSERT INTO @projector_seen_events@ (tenant_id, event_id) "
	"  SELECT tenant_id, event_id FROM tly_fold_stage WHERE event_id IS NOT NULL "
	"  ORDER BY tenant_id, event_id",

	/* 2. ledger entries at or below the tenant's applied seq (republished) are dropped */
	"WITH firsts AS (SELECT DISTINCT ON (tenant_id, (seq)::bigint) ord, tenant_id, "
	"  (seq)::bigint AS seq FROM tly_fold_stage WHERE type = 'LedgerEntry' "
	"  ORDER BY tenant_id, (seq)::bigint, ord), "
	"keep AS (SELECT f.ord, f.tenant_id, f.seq FROM firsts f "
	"  LEFT JOIN @projector_ledger_applied@ a ON a.tenant_id = f.tenant_id "
	"  WHERE a.seq IS NULL OR f.seq > a.seq), "
	"upd AS (INSERT INTO @projector_ledger_applied@ AS a (tenant_id, seq) "
	"  SELECT tenant_id, max(seq) FROM keep GROUP BY tenant_id "
	"  ON CONFLICT (tenant_id) DO UPDATE SET seq = GREATEST(a.seq, EXCLUDED.seq)) "
	"DELETE FROM tly_fold_stage s WHERE s.type = 'LedgerEntry' AND s.ord NOT IN (SELECT ord FROM keep)",

	/* 3. tenants: a placeholder for any tenant referenced first, TenantCreated fills it */
	"INSERT INTO @tenant_accounts@ (id, slug, name, created_at, updated_at) "
	"SELECT tenant_id, '', '', min(COALESCE(run_at, at)), min(COALESCE(run_at, at)) FROM tly_fold_stage "
	"WHERE tenant_id <> '" NIL_UUID "' GROUP BY tenant_id ON CONFLICT (id) DO NOTHING",

	"UPDATE @tenant_accounts@ t SET slug = x.slug, name = x.name, "
	"  created_at = x.at, updated_at = x.at "
	"FROM (SELECT DISTINCT ON (tenant_id) * FROM tly_fold_stage "
	"  WHERE type = 'TenantCreated' ORDER BY tenant_id, ord DESC) x WHERE t.id = x.tenant_id",

	/* 4. users */
	"INSERT INTO @users@ AS u (id, tenant_id, external_id, username, display_name, email, "
	"  created_at, updated_at) "
	"SELECT DISTINCT ON ((user_id)::uuid) (user_id)::uuid, tenant_id, "
	"  external_id, username, display_name, email, at, at "
	"FROM tly_fold_stage WHERE type = 'UserRegistered' ORDER BY (user_id)::uuid, ord DESC "
	"ON CONFLICT (id) DO UPDATE SET external_id = EXCLUDED.external_id, "
	"  username = EXCLUDED.username, display_name = EXCLUDED.display_name, email = EXCLUDED.email, "
	"  created_at = LEAST(u.created_at, EXCLUDED.created_at), "
	"  updated_at = GREATEST(u.updated_at, EXCLUDED.updated_at)",

	/* 5. plans and their features (the last PlanPublished of a plan wins) */
	"INSERT INTO @billing_plans@ AS p (id, code, name, \"interval\", interval_count, price_cents, "
	"  currency, trial_days, seat_included, tokens_per_period, overage_price_micros_per_1k_tokens, "
	"  feature_toggles, is_active, created_at, updated_at) "
	"SELECT DISTINCT ON ((plan_id)::uuid) (plan_id)::uuid, code, "
	"  name, \"interval\", (interval_count)::int, "
	"  (price_cents)::bigint, currency, (trial_days)::int, "
	"  (seat_included)::int, (tokens_per_period)::bigint, "
	"  (overage_price_micros_per_1k_tokens)::bigint, "
	"  COALESCE(feature_toggles, '{}'::jsonb), (is_active)::boolean, at, at "
	"FROM tly_fold_stage WHERE type = 'PlanPublished' ORDER BY (plan_id)::uuid, ord DESC "
	"ON CONFLICT (id) DO UPDATE SET code = EXCLUDED.code, name = EXCLUDED.name, "
	"  \"interval\" = EXCLUDED.\"interval\", interval_count = EXCLUDED.interval_count, "
	"  price_cents = EXCLUDED.price_cents, currency = EXCLUDED.currency, "
	"  trial_days = EXCLUDED.trial_days, seat_included = EXCLUDED.seat_included, "
	"  tokens_per_period = EXCLUDED.tokens_per_period, "
	"  overage_price_micros_per_1k_tokens = EXCLUDED.overage_price_micros_per_1k_tokens, "
	"  feature_toggles = EXCLUDED.feature_toggles, is_active = EXCLUDED.is_active, "
	"  created_at = LEAST(p.created_at, EXCLUDED.created_at), "
	"  updated_at = GREATEST(p.updated_at, EXCLUDED.updated_at)",

	"WITH p AS (SELECT DISTINCT ON ((plan_id)::uuid) (plan_id)::uuid AS plan_id, "
	"  at, COALESCE(features, '[]'::jsonb) AS features FROM tly_fold_stage "
	"  WHERE type = 'PlanPublished' ORDER BY (plan_id)::uuid, ord DESC), "
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
	"SELECT DISTINCT ON ((subscription_id)::uuid) (subscription_id)::uuid, "
	"  tenant_id, '', 'pending', (period_start)::timestamptz, "
	"  (period_start)::timestamptz, (period_end)::timestamptz, 0, 'XXX', 0, "
	"  COALESCE(run_at, at), COALESCE(run_at, at) "
	"FROM tly_fold_stage WHERE type = 'LedgerEntry' AND subscription_id IS NOT NULL "
	"  AND period_start IS NOT NULL AND period_end IS NOT NULL "
	"ORDER BY (subscription_id)::uuid, ord ON CONFLICT (id) DO NOTHING",

	"INSERT INTO @tenant_subscriptions@ AS s (id, tenant_id, plan_id, plan_code, status, auto_renew, "
	"  billing_email, starts_at, current_period_start, current_period_end, trial_ends_at, "
	"  seat_count, price_cents, currency, tokens_per_period, overage_price_micros_per_1k_tokens, "
	"  rollover_cap_tokens, metered_prices, metadata_json, created_at, updated_at) "
	"SELECT DISTINCT ON ((x.subscription_id)::uuid) (x.subscription_id)::uuid, "
	"  x.tenant_id, (SELECT bp.id FROM @billing_plans@ bp WHERE bp.code = x.plan_code), "
	"  x.plan_code, 'pending', (x.auto_renew)::boolean, x.billing_email, "
	"  (x.period_start)::timestamptz, (x.period_start)::timestamptz, "
	"  (x.period_end)::timestamptz, (x.trial_ends_at)::timestamptz, "
	"  (x.seat_count)::int, (x.price_cents)::bigint, x.currency, "
	"  (x.tokens_per_period)::bigint, "
	"  (x.overage_price_micros_per_1k_tokens)::bigint, "
	"  (x.rollover_cap_tokens)::bigint, COALESCE(x.metered_prices, '{}'::jsonb), "
	"  COALESCE(x.metadata, '{}'::jsonb), x.at, x.at "
	"FROM tly_fold_stage x WHERE x.type = 'SubscriptionStarted' "
	"ORDER BY (x.subscription_id)::uuid, x.ord "
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
	"  plan_id = (SELECT bp.id FROM @billing_plans@ bp WHERE bp.code = x.plan_code), "
	"  plan_code = x.plan_code, seat_count = (x.seat_count)::int, "
	"  price_cents = (x.price_cents)::bigint, currency = x.currency, "
	"  tokens_per_period = (x.tokens_per_period)::bigint, "
	"  overage_price_micros_per_1k_tokens = (x.overage_price_micros_per_1k_tokens)::bigint, "
	"  rollover_cap_tokens = (x.rollover_cap_tokens)::bigint, "
	"  metered_prices = COALESCE(x.metered_prices, '{}'::jsonb), "
	"  updated_at = GREATEST(s.updated_at, x.at) "
	"FROM (SELECT DISTINCT ON ((subscription_id)::uuid) * "
	"  FROM tly_fold_stage WHERE type = 'SubscriptionChanged' "
	"  ORDER BY (subscription_id)::uuid, ord DESC) x "
	"WHERE s.id = (x.subscription_id)::uuid AND s.tenant_id = x.tenant_id",

	/* status and period from the ledger, the authority on what was accepted */
	"UPDATE @tenant_subscriptions@ s SET status = x.status, updated_at = GREATEST(s.updated_at, x.at) "
	"FROM (SELECT DISTINCT ON ((ref_id)::uuid) (ref_id)::uuid AS id, tenant_id, at, "
	"  CASE kind WHEN 'subscription_paused' THEN 'paused' "
	"  WHEN 'subscription_ended' THEN 'cancelled' ELSE 'active' END AS status "
	"  FROM tly_fold_stage WHERE type = 'LedgerEntry' AND kind IN ('subscription_started', "
	"  'subscription_paused', 'subscription_resumed', 'subscription_ended') "
	"  ORDER BY (ref_id)::uuid, ord DESC) x WHERE s.id = x.id AND s.tenant_id = x.tenant_id",

	"UPDATE @tenant_subscriptions@ s SET current_period_start = x.ps, current_period_end = x.pe, "
	"  updated_at = GREATEST(s.updated_at, x.at) "
	"FROM (SELECT DISTINCT ON ((ref_id)::uuid) (ref_id)::uuid AS id, tenant_id, at, "
	"  (period_start)::timestamptz AS ps, (period_end)::timestamptz AS pe "
	"  FROM tly_fold_stage WHERE type = 'LedgerEntry' AND kind IN ('subscription_started', "
	"  'period_opened') AND period_start IS NOT NULL AND period_end IS NOT NULL "
	"  ORDER BY (ref_id)::uuid, ord DESC) x WHERE s.id = x.id AND s.tenant_id = x.tenant_id",

	"UPDATE @tenant_subscriptions@ s SET cancel_at_period_end = true, cancel_at = x.pe, "
	"  updated_at = GREATEST(s.updated_at, x.at) "
	"FROM (SELECT DISTINCT ON ((ref_id)::uuid) (ref_id)::uuid AS id, tenant_id, at, "
	"  (period_end)::timestamptz AS pe FROM tly_fold_stage WHERE type = 'LedgerEntry' "
	"  AND kind = 'subscription_cancelled' ORDER BY (ref_id)::uuid, ord DESC) x "
	"WHERE s.id = x.id AND s.tenant_id = x.tenant_id",

	"UPDATE @tenant_subscriptions@ s SET cancel_at = COALESCE(s.cancel_at, x.at) "
	"FROM (SELECT DISTINCT ON ((ref_id)::uuid) (ref_id)::uuid AS id, tenant_id, at "
	"  FROM tly_fold_stage WHERE type = 'LedgerEntry' AND kind = 'subscription_ended' "
	"  ORDER BY (ref_id)::uuid, ord) x WHERE s.id = x.id AND s.tenant_id = x.tenant_id",

	/* 7. conversations: a placeholder for one a message, handoff or close names first (not one
	 * the batch starts: the next statement inserts it, rather than a second version of it) */
	"INSERT INTO @agent_conversations@ (id, tenant_id, agent_entrypoint, status, created_at, "
	"  updated_at) "
	"SELECT (conversation_id)::uuid, min(tenant_id::text)::uuid, '', 'active', min(at), "
	"  min(at) FROM tly_fold_stage "
	"WHERE type IN ('MessageAppended', 'AgentHandoff', 'ConversationClosed') "
	"GROUP BY (conversation_id)::uuid HAVING (conversation_id)::uuid NOT IN "
	"  (SELECT (conversation_id)::uuid FROM tly_fold_stage WHERE type = 'ConversationStarted' "
	"    AND conversation_id IS NOT NULL) "
	"ON CONFLICT (id) DO NOTHING",

	"INSERT INTO @agent_conversations@ AS c (id, tenant_id, user_id, agent_entrypoint, active_agent, "
	"  status, source_channel, topic_hint, created_at, updated_at) "
	"SELECT DISTINCT ON ((x.conversation_id)::uuid) (x.conversation_id)::uuid, "
	"  x.tenant_id, (SELECT u.id FROM @users@ u WHERE u.id = (x.user_id)::uuid), "
	"  x.agent_entrypoint, x.agent_entrypoint, 'active', x.source_channel, "
	"  x.topic_hint, x.at, x.at "
	"FROM tly_fold_stage x WHERE x.type = 'ConversationStarted' "
	"ORDER BY (x.conversation_id)::uuid, x.ord "
	"ON CONFLICT (id) DO UPDATE SET user_id = EXCLUDED.user_id, "
	"  agent_entrypoint = EXCLUDED.agent_entrypoint, "
	"  active_agent = COALESCE(c.active_agent, EXCLUDED.active_agent), "
	"  source_channel = EXCLUDED.source_channel, topic_hint = EXCLUDED.topic_hint, "
	"  created_at = EXCLUDED.created_at, updated_at = GREATEST(c.updated_at, EXCLUDED.updated_at)",

	/* messages: one row per message id; then each conversation of the batch is updated once
	 * (one new row version, one check of its keys), with the counters of the message rows
	 * actually inserted, its handoffs (the last one's agent) and its closes (the last one's
	 * status; updated_at, as everywhere, the latest time). Only the columns the insert reads go
	 * through its sorts and window, not the staging row. A plain insert (a speculative one, ON
	 * CONFLICT, cost a tenth more): the message ids and positions it writes are checked free
	 * first, a message at a taken position is skipped; only a session inserting the same
	 * message id meanwhile can make it fail (a unique violation, retriable: tly_fold_flush_poll) */
	"WITH m AS (SELECT DISTINCT ON ((message_id)::uuid) (message_id)::uuid AS mid, "
	"  (conversation_id)::uuid AS cid, ord, tenant_id, at, user_id, role, agent_type, content, "
	"  tool_name, tool_call_id, provider, model, prompt_tokens, completion_tokens, "
	"  reasoning_tokens, latency_ms, cost_micros, reservation_id FROM tly_fold_stage "
	"  WHERE type = 'MessageAppended' ORDER BY (message_id)::uuid, ord), "
	"fresh AS (SELECT m.* FROM m WHERE NOT EXISTS "
	"  (SELECT 1 FROM @agent_messages@ a WHERE a.message_id = m.mid)), "
	"numbered AS (SELECT f.*, c.message_count + row_number() OVER (PARTITION BY f.cid "
	"  ORDER BY f.ord) - 1 AS pos FROM fresh f JOIN @agent_conversations@ c ON c.id = f.cid), "
	"ins AS (INSERT INTO @agent_messages@ (message_id, tenant_id, conversation_id, user_id, "
	"  position, role, agent_type, content, tool_name, tool_call_id, provider, model, "
	"  token_count_prompt, token_count_completion, reasoning_tokens, latency_ms, "
	"  content_checksum, cost_micros, reservation_id, created_at) "
	"  SELECT mid, tenant_id, cid, (user_id)::uuid, pos, role, agent_type, "
	"  (content)::jsonb, tool_name, tool_call_id, provider, "
	"  model, (prompt_tokens)::bigint, (completion_tokens)::bigint, "
	"  (reasoning_tokens)::bigint, (latency_ms)::int, "
	"  encode(sha256(convert_to(content, 'UTF8')), 'hex'), (cost_micros)::bigint, "
	"  (reservation_id)::uuid, at FROM numbered n WHERE NOT EXISTS (SELECT 1 "
	"  FROM @agent_messages@ a WHERE a.conversation_id = n.cid AND a.position = n.pos) "
	"  RETURNING conversation_id, token_count_prompt, token_count_completion, reasoning_tokens, "
	"  cost_micros, created_at), "
	"msg AS (SELECT conversation_id AS cid, count(*) AS n, sum(token_count_prompt) AS p, "
	"  sum(token_count_completion) AS co, sum(reasoning_tokens) AS r, sum(cost_micros) AS cost, "
	"  max(created_at) AS last FROM ins GROUP BY conversation_id), "
	"hand AS (SELECT (conversation_id)::uuid AS cid, count(*) AS handoffs, "
	"  (array_agg(to_agent ORDER BY ord DESC))[1] AS to_agent, max(at) AS handoff_at "
	"  FROM tly_fold_stage WHERE type = 'AgentHandoff' GROUP BY 1), "
	"clo AS (SELECT (conversation_id)::uuid AS cid, (array_agg(status ORDER BY ord DESC))[1] "
	"  AS closed, max(at) AS closed_at FROM tly_fold_stage WHERE type = 'ConversationClosed' "
	"  GROUP BY 1) "
	"UPDATE @agent_conversations@ c SET message_count = c.message_count + COALESCE(x.n, 0), "
	"  total_tokens_prompt = c.total_tokens_prompt + COALESCE(x.p, 0), "
	"  total_tokens_completion = c.total_tokens_completion + COALESCE(x.co, 0), "
	"  reasoning_tokens = c.reasoning_tokens + COALESCE(x.r, 0), "
	"  total_cost_micros = c.total_cost_micros + COALESCE(x.cost, 0), "
	"  last_message_at = GREATEST(c.last_message_at, x.last), "
	"  handoff_count = c.handoff_count + COALESCE(x.handoffs, 0), "
	"  active_agent = CASE WHEN x.handoffs IS NULL THEN c.active_agent ELSE x.to_agent END, "
	"  status = CASE WHEN x.closed_at IS NULL THEN c.status ELSE x.closed END, "
	"  updated_at = GREATEST(c.updated_at, x.last, x.handoff_at, x.closed_at) "
	"FROM (msg FULL JOIN hand USING (cid) FULL JOIN clo USING (cid)) x WHERE c.id = x.cid",

	/* 8. metered usage, once per external event id; its period from the ledger's entry */
	"INSERT INTO @projector_usage_periods@ (event_id, period_start, period_end) "
	"SELECT DISTINCT ON ((cause_event_id)::uuid) (cause_event_id)::uuid, "
	"  (period_start)::timestamptz, (period_end)::timestamptz "
	"FROM tly_fold_stage WHERE type = 'LedgerEntry' AND kind = 'usage_recorded' "
	"  AND period_start IS NOT NULL AND period_end IS NOT NULL "
	"ORDER BY (cause_event_id)::uuid, ord ON CONFLICT (event_id) DO NOTHING",

	"INSERT INTO @subscription_usage@ (id, tenant_id, subscription_id, feature_key, unit, "
	"  period_start, period_end, quantity, reported_at, external_event_id) "
	"SELECT DISTINCT ON (u.tenant_id, u.external_event_id) u.event_id, u.tenant_id, s.id, "
	"  u.feature_key, u.unit, p.period_start, p.period_end, "
	"  (u.quantity)::bigint, u.at, u.external_event_id "
	"FROM tly_fold_stage u JOIN @tenant_subscriptions@ s "
	"  ON s.id = (u.subscription_id)::uuid AND s.tenant_id = u.tenant_id "
	"LEFT JOIN @projector_usage_periods@ p ON p.event_id = u.event_id "
	"WHERE u.type = 'UsageReported' AND NOT EXISTS (SELECT 1 FROM @subscription_usage@ x "
	"  WHERE x.tenant_id = u.tenant_id AND x.external_event_id = u.external_event_id) "
	"ORDER BY u.tenant_id, u.external_event_id, u.ord ON CONFLICT (id) DO NOTHING",

	"UPDATE @subscription_usage@ u SET period_start = p.period_start, period_end = p.period_end "
	"FROM @projector_usage_periods@ p WHERE p.event_id = u.id AND u.period_start IS NULL "
	"  AND p.event_id IN (SELECT (cause_event_id)::uuid FROM tly_fold_stage "
	"  WHERE type = 'LedgerEntry' AND kind = 'usage_recorded')",

	/* 9. API usage per model and UTC day, once per model call (reservation or message): calls
	 * recorded before are looked up (a key probe per call, as the seen events) and the new
	 * ones recorded with a plain insert */
	"WITH z AS (SELECT ord, tenant_id, at, "
	"    COALESCE((reservation_id)::uuid, (message_id)::uuid) AS call_id, "
	"    provider AS provider, model AS model, (prompt_tokens)::bigint AS p, "
	"    (completion_tokens)::bigint AS co, (reasoning_tokens)::bigint AS r, "
	"    (cost_micros)::bigint AS cost FROM tly_fold_stage "
	"  WHERE type IN ('MessageAppended', 'ReservationSettled')), "
	"calls AS (SELECT DISTINCT ON (tenant_id, call_id) * FROM z "
	"  WHERE (p + co + r > 0 OR cost > 0) AND (SELECT true FROM @projector_api_calls@ k "
	"  WHERE k.tenant_id = z.tenant_id AND k.call_id = z.call_id) IS NULL "
	"  ORDER BY tenant_id, call_id, ord), "
	"ins AS (INSERT INTO @projector_api_calls@ (tenant_id, call_id) "
	"  SELECT tenant_id, call_id FROM calls) "
	"INSERT INTO @api_usage@ AS a (tenant_id, provider, model, usage_date, prompt_tokens, "
	"  completion_tokens, reasoning_tokens, total_tokens, cost_micros, request_count, updated_at) "
	"SELECT c.tenant_id, c.provider, c.model, (c.at AT TIME ZONE 'UTC')::date, sum(c.p), sum(c.co), "
	"  sum(c.r), sum(c.p + c.co + c.r), sum(c.cost), count(*), max(c.at) "
	"FROM calls c GROUP BY 1, 2, 3, 4 "
	"ON CONFLICT (tenant_id, provider, model, usage_date) DO UPDATE SET "
	"  prompt_tokens = a.prompt_tokens + EXCLUDED.prompt_tokens, "
	"  completion_tokens = a.completion_tokens + EXCLUDED.completion_tokens, "
	"  reasoning_tokens = a.reasoning_tokens + EXCLUDED.reasoning_tokens, "
	"  total_tokens = a.total_tokens + EXCLUDED.total_tokens, "
	"  cost_micros = a.cost_micros + EXCLUDED.cost_micros, "
	"  request_count = a.request_count + EXCLUDED.request_count, "
	"  updated_at = GREATEST(a.updated_at, EXCLUDED.updated_at)",

	/* 10. token balances: the wallet after the last entry per (tenant, subscription) */
	"WITH e AS (SELECT ord, tenant_id, at, kind, seq, period_start, period_end, overage_delta, "
	"    allowance_delta, credits_delta, allowance_remaining, credits_remaining, held, "
	"    overage_tokens, "
	"    CASE WHEN subscription_id IS NOT NULL THEN (subscription_id)::uuid "
	"    WHEN kind = 'subscription_ended' THEN (ref_id)::uuid END AS sub "
	"  FROM tly_fold_stage WHERE type = 'LedgerEntry'), "
	"k AS (SELECT tenant_id, sub, max(seq) FILTER (WHERE kind IN ('subscription_started', "
	"  'period_opened')) AS reset_seq, max(seq) AS last_seq FROM e GROUP BY tenant_id, sub), "
	"agg AS (SELECT k.tenant_id, k.sub, k.reset_seq, k.last_seq, COALESCE(sum("
	"    (e.overage_delta)::bigint - (e.allowance_delta)::bigint "
	"    - (e.credits_delta)::bigint) FILTER (WHERE e.kind = 'debit' "
	"    AND (k.reset_seq IS NULL OR e.seq > k.reset_seq)), 0) AS used "
	"  FROM k JOIN e ON e.tenant_id = k.tenant_id "
	"    AND COALESCE(e.sub, '" NIL_UUID "') = COALESCE(k.sub, '" NIL_UUID "') "
	"  GROUP BY k.tenant_id, k.sub, k.reset_seq, k.last_seq), "
	"fin AS (SELECT agg.tenant_id, agg.sub, agg.last_seq, e.at, e.period_start, e.period_end, "
	"    CASE WHEN agg.reset_seq IS NULL THEN COALESCE(b.tokens_used, 0) ELSE 0 END + agg.used AS used, "
	"    (e.allowance_remaining)::bigint AS allowance, "
	"    (e.credits_remaining)::bigint AS credits, (e.held)::bigint AS held, "
	"    (e.overage_tokens)::bigint AS overage "
	"  FROM agg JOIN e ON e.tenant_id = agg.tenant_id AND e.seq = agg.last_seq "
	"  LEFT JOIN @token_balances@ b ON b.tenant_id = agg.tenant_id "
	"    AND b.subscription_id IS NOT DISTINCT FROM agg.sub) "
	"INSERT INTO @token_balances@ AS b (tenant_id, subscription_id, tokens_limit, tokens_used, "
	"  tokens_remaining, held, credits, overage_tokens, period_start, period_end, ledger_seq, "
	"  updated_at) "
	"SELECT tenant_id, sub, GREATEST(used - overage, 0) + allowance + credits, used, "
	"  GREATEST(allowance + credits - held, 0), held, credits, overage, "
	"  (period_start)::timestamptz, (period_end)::timestamptz, last_seq, at FROM fin "
	"ON CONFLICT (tenant_id, subscription_id) DO UPDATE SET tokens_limit = EXCLUDED.tokens_limit, "
	"  tokens_used = EXCLUDED.tokens_used, tokens_remaining = EXCLUDED.tokens_remaining, "
	"  held = EXCLUDED.held, credits = EXCLUDED.credits, overage_tokens = EXCLUDED.overage_tokens, "
	"  period_start = EXCLUDED.period_start, period_end = EXCLUDED.period_end, "
	"  ledger_seq = EXCLUDED.ledger_seq, updated_at = EXCLUDED.updated_at",

	/* API cost of the UTC days of the current period, for tenants either side touched; a row
	 * whose cost did not change is not written again (a new version of it, its key checks) */
	"UPDATE @token_balances@ b SET monthly_api_cost_micros = x.cost "
	"FROM (SELECT t.id, COALESCE((SELECT sum(a.cost_micros) FROM @api_usage@ a "
	"  WHERE a.tenant_id = t.tenant_id AND a.usage_date >= (t.period_start AT TIME ZONE 'UTC')::date "
	"  AND a.usage_date < (t.period_end AT TIME ZONE 'UTC')::date), 0) AS cost "
	"  FROM @token_balances@ t WHERE t.period_start IS NOT NULL AND t.tenant_id IN "
	"  (SELECT tenant_id FROM tly_fold_stage "
	"    WHERE type IN ('LedgerEntry', 'MessageAppended', 'ReservationSettled'))) x "
	"WHERE b.id = x.id AND b.monthly_api_cost_micros IS DISTINCT FROM x.cost",

	/* 11. invoices from the ledger's invoice entries; status from InvoiceStatusChanged */
	"INSERT INTO @subscription_invoices@ (id, tenant_id, subscription_id, ledger_seq, period_start, "
	"  period_end, amount_cents, currency, overage_tokens, lines, status, created_at, updated_at) "
	"SELECT (ref_id)::uuid, tenant_id, (subscription_id)::uuid, "
	"  (seq)::bigint, (period_start)::timestamptz, "
	"  (period_end)::timestamptz, (amount_cents)::bigint, currency, "
	"  -(overage_delta)::bigint, COALESCE(lines, '[]'::jsonb), 'issued', at, at "
	"FROM tly_fold_stage WHERE type = 'LedgerEntry' AND kind = 'invoice' "
	"ON CONFLICT (id) DO NOTHING",

	"INSERT INTO @projector_invoice_status@ AS p (invoice_id, tenant_id, status, "
	"  external_invoice_id, hosted_invoice_url, changed_at) "
	"SELECT DISTINCT ON ((invoice_id)::uuid) (invoice_id)::uuid, tenant_id, "
	"  status, external_invoice_id, hosted_invoice_url, at "
	"FROM tly_fold_stage WHERE type = 'InvoiceStatusChanged' "
	"ORDER BY (invoice_id)::uuid, ord DESC "
	"ON CONFLICT (invoice_id) DO UPDATE SET status = EXCLUDED.status, "
	"  external_invoice_id = COALESCE(EXCLUDED.external_invoice_id, p.external_invoice_id), "
	"  hosted_invoice_url = COALESCE(EXCLUDED.hosted_invoice_url, p.hosted_invoice_url), "
	"  changed_at = EXCLUDED.changed_at WHERE p.tenant_id = EXCLUDED.tenant_id",

	"UPDATE @subscription_invoices@ i SET status = p.status, "
	"  external_invoice_id = p.external_invoice_id, hosted_invoice_url = p.hosted_invoice_url, "
	"  updated_at = GREATEST(i.created_at, p.changed_at) "
	"FROM @projector_invoice_status@ p WHERE p.invoice_id = i.id AND p.tenant_id = i.tenant_id "
	"  AND i.id IN (SELECT (invoice_id)::uuid FROM tly_fold_stage "
	"    WHERE type = 'InvoiceStatusChanged' "
	"  UNION ALL SELECT (ref_id)::uuid FROM tly_fold_stage "
	"    WHERE type = 'LedgerEntry' AND kind = 'invoice')",
};

#define N_FOLD_SQL (sizeof(FOLD_SQL) / sizeof(FOLD_SQL[0]))

/*
 * A tenant's ledger entries in the batch that do not continue its applied seq without a gap
 * (tally.ledger lost the older ones to retention, or never carried them): when ledger_entries,
 * the system of record, holds every seq from the applied one up to the batch's last, the batch's
 * entries of that tenant are dropped from the staging table and this returns the whole range,
 * which fill_gaps stages instead, in seq order. Seqs are gap-free per tenant (DESIGN.md), so a
 * gap is always entries the fold has not seen. A range the database does not hold in full (entries
 * that never went through tally-ledger) is left as it came. The gap is found from the seq ranges
 * the staged rows cover (run_seq or seq, to seq) in order, without listing every seq: a range
 * that starts more than one after the greatest seq before it (or the applied one).
 */
static const char GAP_SQL[] =
	"WITH r AS (SELECT s.tenant_id, COALESCE(a.seq, 0) AS applied, s.seq AS hi, "
	"  GREATEST(COALESCE(s.run_seq, s.seq), COALESCE(a.seq, 0) + 1) AS lo "
	"  FROM tly_fold_stage s LEFT JOIN @projector_ledger_applied@ a ON a.tenant_id = s.tenant_id "
	"  WHERE s.type = 'LedgerEntry' AND s.seq > COALESCE(a.seq, 0)), "
	"w AS (SELECT r.*, max(hi) OVER (PARTITION BY tenant_id ORDER BY lo, hi "
	"  ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before FROM r), "
	"t AS (SELECT tenant_id, max(applied) AS applied, max(hi) AS hi, "
	"  bool_or(lo > COALESCE(before, applied) + 1) AS holed FROM w GROUP BY tenant_id), "
	"gap AS (SELECT t.tenant_id, t.applied, t.hi FROM t WHERE t.holed "
	"  AND (SELECT count(*) FROM ledger_entries e WHERE e.tenant_id = t.tenant_id "
	"    AND e.seq > t.applied AND e.seq <= t.hi) = t.hi - t.applied), "
	"del AS (DELETE FROM tly_fold_stage s USING gap g "
	"  WHERE s.type = 'LedgerEntry' AND s.tenant_id = g.tenant_id) "
	"SELECT " TLY_ENTRIES_SELECT " FROM gap g JOIN ledger_entries e ON e.tenant_id = g.tenant_id "
	"  AND e.seq > g.applied AND e.seq <= g.hi ORDER BY e.tenant_id, e.seq";

/*
 * What each statement of FOLD_SQL reads: it runs only when the batch holds a message of one of
 * these types or ledger entry kinds (a statement over none of them would change no row).
 */
#define T(type) (UINT64_C(1) << (type))
enum { K_SUB_STATUS = TLY_EV__COUNT, K_PERIOD, K_CANCELLED, K_ENDED, K_USAGE, K_INVOICE, K_DEBIT };
#define ANY_EVENT ((T(TLY_EV__COUNT) - 1) & ~T(TLY_EV_LEDGER_ENTRY))
#define ANY (T(TLY_EV__COUNT) - 1)
#define CONV_REF (T(TLY_EV_MESSAGE_APPENDED) | T(TLY_EV_AGENT_HANDOFF) | T(TLY_EV_CONVERSATION_CLOSED))
#define MODEL_CALL (T(TLY_EV_MESSAGE_APPENDED) | T(TLY_EV_RESERVATION_SETTLED))
/* The events that reach the projections only through the ledger's entries (tly_fold_keeps_event_id) */
#define WALLET (T(TLY_EV_SUBSCRIPTION_CANCELLED) | T(TLY_EV_SUBSCRIPTION_PAUSED) | \
		T(TLY_EV_SUBSCRIPTION_RESUMED) | T(TLY_EV_CREDITS_GRANTED) | T(TLY_EV_TOKENS_RESERVED) | \
		T(TLY_EV_RESERVATION_RELEASED) | T(TLY_EV_TOKENS_DEBITED))
#define KEEPS_ID (ANY_EVENT & ~WALLET & ~T(TLY_EV_CLOCK_TICK))
static const uint64_t FOLD_NEEDS[] = {
	KEEPS_ID, KEEPS_ID, T(TLY_EV_LEDGER_ENTRY),                     /* 1, 2: dedupe */
	ANY, T(TLY_EV_TENANT_CREATED), T(TLY_EV_USER_REGISTERED),       /* 3, 4 */
	T(TLY_EV_PLAN_PUBLISHED), T(TLY_EV_PLAN_PUBLISHED),             /* 5 */
	T(TLY_EV_LEDGER_ENTRY), T(TLY_EV_SUBSCRIPTION_STARTED),         /* 6 */
	T(TLY_EV_SUBSCRIPTION_CHANGED), T(K_SUB_STATUS), T(K_PERIOD), T(K_CANCELLED), T(K_ENDED),
	CONV_REF, T(TLY_EV_CONVERSATION_STARTED), CONV_REF,             /* 7 */
	T(K_USAGE), T(TLY_EV_USAGE_REPORTED), T(K_USAGE),               /* 8 */
	MODEL_CALL,                                                     /* 9 */
	T(TLY_EV_LEDGER_ENTRY), T(TLY_EV_LEDGER_ENTRY) | MODEL_CALL,    /* 10 */
	T(K_INVOICE), T(TLY_EV_INVOICE_STATUS_CHANGED),                 /* 11 */
	T(TLY_EV_INVOICE_STATUS_CHANGED) | T(K_INVOICE),
};
_Static_assert(sizeof(FOLD_NEEDS) / sizeof(FOLD_NEEDS[0]) == N_FOLD_SQL,
	       "one FOLD_NEEDS entry per FOLD_SQL statement");
_Static_assert(K_DEBIT < 64, "types and kinds fit the mask");

/*
 * The mask bits of a ledger entry's kind (besides its type's): 0 for a kind no statement names,
 * which only token_balances reads, through the last entry of each tenant and subscription.
 */
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
		{"debit", T(K_DEBIT)}, /* token_balances sums them */
	};
	for (size_t i = 0; kind && i < sizeof(kinds) / sizeof(kinds[0]); i++)
		if (strcmp(kind, kinds[i].kind) == 0)
			return kinds[i].bits;
	return 0;
}

/* The staging column type of a field kind; NULL for a kind the fold does not stage. */
static const char *column_type(enum tly_field_kind kind)
{
	switch (kind) {
	case TLY_F_UUID:
	case TLY_F_OPT_UUID: return "uuid";
	case TLY_F_STR:
	case TLY_F_OPT_STR:
	case TLY_F_JSON: return "text";
	case TLY_F_LONG:
	case TLY_F_OPT_LONG: return "bigint";
	case TLY_F_INT: return "integer";
	case TLY_F_BOOL: return "boolean";
	case TLY_F_TS:
	case TLY_F_OPT_TS: return "timestamptz";
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL:
	case TLY_F_RECORDS: return "jsonb";
	case TLY_F_SHA256: return NULL;
	}
	return NULL;
}

/*
 * The statistics target of the staging columns the planner estimates by (type, tenant_id, kind):
 * each flush's ANALYZE samples 300 rows per unit (PostgreSQL's rule), 6,000 rather than every row
 * of a 20,000-message batch at the default 100; enough for the frequencies of a few dozen types
 * and kinds and a tenant count, at a fifth of the cost.
 */
#define STAGE_STATISTICS "20"

/*
 * Each type's field of each STAGE_FIELDS name, and the staging table's CREATE script: 0, or
 * -1 when a name is no field of any type, or fields of one name have kinds of different column
 * types (the descriptors and STAGE_FIELDS disagree), or out of memory.
 */
static int map_fields(struct tly_fold *fold)
{
	char *sql = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&sql, &len);
	if (!f)
		return -1;
	fputs("CREATE TEMP TABLE tly_fold_stage (ord bigint NOT NULL, type text NOT NULL, "
	      "tenant_id uuid NOT NULL, event_id uuid, at timestamptz NOT NULL, run_seq bigint, "
	      "run_at timestamptz", f);
	bool ok = true;
	for (size_t i = 0; i < N_STAGE_FIELDS; i++) {
		const char *type = NULL;
		for (int t = 0; t < TLY_EV__COUNT; t++) {
			const struct tly_event_desc *d = tly_event_desc((enum tly_event_type)t);
			for (size_t k = 0; d && k < d->record.n_fields; k++) {
				const struct tly_field *fd = &d->record.fields[k];
				if (strcmp(fd->name, STAGE_FIELDS[i]) != 0)
					continue;
				const char *ct = column_type(fd->kind);
				ok &= ct && (!type || strcmp(type, ct) == 0);
				type = ct;
				fold->fields[t][i] = fd;
			}
		}
		ok &= type != NULL;
		fprintf(f, ", \"%s\" %s", STAGE_FIELDS[i], type ? type : "?");
	}
	fputs(") ON COMMIT DELETE ROWS; ALTER TABLE tly_fold_stage "
	      "ALTER type SET STATISTICS " STAGE_STATISTICS ", ALTER tenant_id SET STATISTICS "
	      STAGE_STATISTICS ", ALTER kind SET STATISTICS " STAGE_STATISTICS, f);
	if (fclose(f) != 0 || !ok) {
		free(sql);
		return -1;
	}
	fold->stage_sql = sql;
	return 0;
}

static void set_err(struct tly_pg_error *err, enum tly_errclass cls, const char *msg)
{
	if (!err)
		return;
	err->errclass = cls;
	err->sqlstate[0] = '\0';
	snprintf(err->message, sizeof(err->message), "%s", msg);
}

static void forget_rendered(struct tly_fold *fold)
{
	for (size_t i = 0; fold->rendered && i < N_FOLD_SQL; i++) {
		free(fold->rendered[i]);
		fold->rendered[i] = NULL;
	}
}

struct tly_fold *tly_fold_new(void)
{
	struct tly_fold *fold = calloc(1, sizeof(*fold));
	if (!fold)
		return NULL;
	for (size_t i = 0; i < N_TABLES; i++)
		snprintf(fold->names[i], sizeof(fold->names[i]), "%s", tly_fold_tables[i]);
	if (!(fold->rendered = calloc(N_FOLD_SQL, sizeof(*fold->rendered))) ||
	    !(fold->rows = tly_pgcopy_new()) || !(fold->fill = tly_pgcopy_new()) ||
	    !(fold->held_of = tly_uuidmap_new()) || !(fold->staged_ids = tly_uuidmap_new()) ||
	    map_fields(fold) != 0) {
		tly_fold_free(fold);
		return NULL;
	}
	return fold;
}

void tly_fold_free(struct tly_fold *fold)
{
	if (!fold)
		return;
	forget_rendered(fold);
	free(fold->rendered);
	tly_pgcopy_free(fold->rows);
	tly_pgcopy_free(fold->fill);
	free(fold->stage_sql);
	tly_uuidmap_free(fold->held_of);
	tly_uuidmap_free(fold->staged_ids);
	for (size_t i = 0; i < fold->cap_held; i++)
		free(fold->held[i]);
	free(fold->held);
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
			forget_rendered(fold);
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
	tly_uuidmap_clear(fold->held_of);
	tly_uuidmap_clear(fold->staged_ids);
	fold->n_held = 0;
	tly_pgcopy_reset(fold->rows);
	fold->pending = 0;
	fold->present = 0;
}

char *tly_fold_field_json(const struct tly_event *ev, const char *name)
{
	json_t *v = tly_event_field_to_json(ev, name);
	char *text = v ? json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
	json_decref(v);
	return text;
}

/*
 * One staged field: its value at base + f->offset, in f's column type. A map or a list of
 * records with items is rendered as lib/event_json renders it.
 */
static int stage_field(struct tly_pgcopy *rows, const struct tly_field *f, const struct tly_event *ev)
{
	const unsigned char *src = (const unsigned char *)ev + f->offset;
	const char *s;
	int64_t l;
	int32_t i32;
	bool b;
	struct tly_opt_i64 o;
	struct tly_map m;
	struct tly_list list;
	size_t items = 0;

	switch (f->kind) {
	case TLY_F_UUID:
		tly_pgcopy_uuid(rows, (const tly_uuid *)src);
		return 0;
	case TLY_F_OPT_UUID:
		if (tly_uuid_is_nil((const tly_uuid *)src))
			tly_pgcopy_null(rows);
		else
			tly_pgcopy_uuid(rows, (const tly_uuid *)src);
		return 0;
	case TLY_F_STR:
	case TLY_F_OPT_STR:
	case TLY_F_JSON:
		memcpy(&s, src, sizeof(s));
		tly_pgcopy_text(rows, s);
		return 0;
	case TLY_F_LONG:
		memcpy(&l, src, sizeof(l));
		tly_pgcopy_int8(rows, l);
		return 0;
	case TLY_F_INT:
		memcpy(&i32, src, sizeof(i32));
		tly_pgcopy_int4(rows, i32);
		return 0;
	case TLY_F_BOOL:
		memcpy(&b, src, sizeof(b));
		tly_pgcopy_bool(rows, b);
		return 0;
	case TLY_F_TS:
		memcpy(&l, src, sizeof(l));
		tly_pgcopy_timestamptz(rows, l);
		return 0;
	case TLY_F_OPT_LONG:
	case TLY_F_OPT_TS:
		memcpy(&o, src, sizeof(o));
		if (!o.set)
			tly_pgcopy_null(rows);
		else if (f->kind == TLY_F_OPT_LONG)
			tly_pgcopy_int8(rows, o.v);
		else
			tly_pgcopy_timestamptz(rows, o.v);
		return 0;
	case TLY_F_MAP_LONG:
	case TLY_F_MAP_STR:
	case TLY_F_MAP_BOOL:
	case TLY_F_RECORDS:
		if (f->kind == TLY_F_RECORDS) {
			memcpy(&list, src, sizeof(list));
			items = list.n;
		} else {
			memcpy(&m, src, sizeof(m));
			items = m.n;
		}
		if (items == 0) {
			tly_pgcopy_jsonb(rows, f->kind == TLY_F_RECORDS ? "[]" : "{}");
			return 0;
		}
		char *text = tly_fold_field_json(ev, f->name);
		if (!text)
			return TLY_E_NOMEM;
		tly_pgcopy_jsonb(rows, text);
		free(text);
		return 0;
	case TLY_F_SHA256:
		break;
	}
	return TLY_E_INVALID; /* map_fields stages no such field */
}

/*
 * One message as a staging row of rows, numbered ord; run: the run of entries it ends (NULL: it
 * stands for itself). 0, or an error with the row incomplete.
 */
static int stage_row(struct tly_fold *fold, struct tly_pgcopy *rows, const struct tly_event *ev,
		     int64_t ord, const struct held *run)
{
	const struct tly_event_desc *desc = tly_event_desc(ev->type);
	bool entry = ev->type == TLY_EV_LEDGER_ENTRY;
	int rc = 0;
	bool keeps = !entry && tly_fold_keeps_event_id(ev->type);
	tly_pgcopy_row(rows, N_STAGE_COLUMNS);
	tly_pgcopy_int8(rows, ord);
	tly_pgcopy_text(rows, desc->name);
	tly_pgcopy_uuid(rows, &ev->tenant_id);
	if (keeps)
		tly_pgcopy_uuid(rows, &ev->event_id);
	else
		tly_pgcopy_null(rows); /* no projector_seen_events row */
	tly_pgcopy_timestamptz(rows, entry ? ev->u.ledger_entry.ledger_time : ev->occurred_at);
	if (run) {
		tly_pgcopy_int8(rows, run->first_seq);
		tly_pgcopy_timestamptz(rows, run->first_at);
	} else {
		tly_pgcopy_null(rows);
		tly_pgcopy_null(rows);
	}
	for (size_t i = 0; rc == 0 && i < N_STAGE_FIELDS; i++) {
		const struct tly_field *f = entry || keeps ? fold->fields[ev->type][i] : NULL;
		if (f)
			rc = stage_field(rows, f, ev);
		else
			tly_pgcopy_null(rows);
	}
	if (rc == 0) {
		fold->present |= T(ev->type);
		if (entry)
			fold->present |= kind_bits(ev->u.ledger_entry.kind);
	}
	return rc;
}

bool tly_fold_keeps_event_id(enum tly_event_type type)
{
	return (unsigned)type < TLY_EV__COUNT && (KEEPS_ID & T(type));
}

/* The tenant's struct held of this batch; with create, a new one if none (NULL on OOM). */
static struct held *held_of(struct tly_fold *fold, const tly_uuid *tenant, bool create)
{
	struct held *h = tly_uuidmap_get(fold->held_of, tenant, NULL);
	if (h || !create)
		return h;
	if (fold->n_held == fold->cap_held) {
		size_t cap = fold->cap_held ? 2 * fold->cap_held : 64;
		struct held **held = realloc(fold->held, cap * sizeof(*held));
		if (!held)
			return NULL;
		memset(held + fold->cap_held, 0, (cap - fold->cap_held) * sizeof(*held));
		fold->held = held;
		fold->cap_held = cap;
	}
	if (!fold->held[fold->n_held] && !(fold->held[fold->n_held] = malloc(sizeof(*h))))
		return NULL;
	h = fold->held[fold->n_held];
	*h = (struct held){.tenant = *tenant};
	if (tly_uuidmap_put(fold->held_of, tenant, NULL, h) != 0)
		return NULL;
	fold->n_held++;
	return h;
}

/* The held run (if any) and wallet event (with wallet) as staging rows. 0 or an error. */
static int emit_held(struct tly_fold *fold, struct held *h, bool wallet)
{
	int rc = 0;
	if (h->run && (rc = stage_row(fold, fold->rows, &h->last, fold->ord, h)) == 0) {
		fold->ord++;
		h->run = false;
	}
	if (rc == 0 && wallet && h->wallet) {
		struct tly_event w = {.type = h->wallet_type, .tenant_id = h->tenant,
				      .occurred_at = h->wallet_at};
		if ((rc = stage_row(fold, fold->rows, &w, fold->ord, NULL)) == 0) {
			fold->ord++;
			h->wallet = false;
		}
	}
	return rc;
}

/* Whether entry e continues the run h holds: the next seq, same subscription and period. */
static bool continues(const struct held *h, const struct tly_ledger_entry *e)
{
	const struct tly_ledger_entry *l = &h->last.u.ledger_entry;
	return h->run && e->seq == l->seq + 1 &&
	       memcmp(&e->subscription_id, &l->subscription_id, sizeof(e->subscription_id)) == 0 &&
	       e->period_start.set == l->period_start.set && e->period_start.v == l->period_start.v &&
	       e->period_end.set == l->period_end.set && e->period_end.v == l->period_end.v;
}

/*
 * A ledger entry of a kind only token_balances reads, held as (the new end of) its tenant's run:
 * a copy without the strings no statement reads of such an entry (cause type, currency, reason,
 * lines). 0, or TLY_E_NOMEM.
 */
static int hold_entry(struct tly_fold *fold, struct held *h, const struct tly_event *ev)
{
	const struct tly_ledger_entry *e = &ev->u.ledger_entry;
	if (h->run && !continues(h, e)) {
		int rc = emit_held(fold, h, false);
		if (rc != 0)
			return rc;
	}
	if (!h->run) {
		h->first_seq = e->seq;
		h->first_at = e->ledger_time;
	}
	h->last = *ev;
	struct tly_ledger_entry *l = &h->last.u.ledger_entry;
	snprintf(h->kind, sizeof(h->kind), "%s", e->kind);
	l->kind = h->kind;
	l->cause_type = NULL;
	l->currency = NULL;
	l->reason = NULL;
	l->lines = (struct tly_list){0};
	h->run = true;
	return 0;
}

/*
 * Messages that only a few rows of the staging table need are held per tenant (struct held) and
 * staged when the batch is sent: a tenant's wallet events (tly_fold_keeps_event_id) as one row
 * at the earliest of their times (its placeholder row reads that much), and each run of its
 * ledger entries with consecutive seqs, one subscription and period, of kinds no statement
 * names (kind_bits 0: holds placed, expired and released, rejections, duplicates...), as its last
 * entry, which is all token_balances reads of them; any other entry of the tenant stages its
 * run first, so that the tenant's rows stay in seq order. An event id already staged in the
 * batch is not staged again (the first of them is folded, if its id was not seen before).
 */
int tly_fold_add(struct tly_fold *fold, const struct tly_event *ev)
{
	if (!tly_event_desc(ev->type) || ev->type == TLY_EV_CLOCK_TICK)
		return 0;
	int rc = 0;
	bool entry = ev->type == TLY_EV_LEDGER_ENTRY;
	if (entry) {
		const char *kind = ev->u.ledger_entry.kind;
		bool only_last = kind && kind_bits(kind) == 0 && strlen(kind) < sizeof(((struct held *)0)->kind);
		struct held *h = held_of(fold, &ev->tenant_id, only_last);
		if (only_last && !h)
			return TLY_E_NOMEM;
		if (only_last)
			rc = hold_entry(fold, h, ev);
		else if (h)
			rc = emit_held(fold, h, false);
		if (rc != 0 || only_last) {
			fold->pending += rc == 0;
			return rc;
		}
	} else if (!tly_fold_keeps_event_id(ev->type)) {
		struct held *h = held_of(fold, &ev->tenant_id, true);
		if (!h)
			return TLY_E_NOMEM;
		if (!h->wallet || ev->occurred_at < h->wallet_at) {
			h->wallet_type = ev->type;
			h->wallet_at = ev->occurred_at;
		}
		h->wallet = true;
		fold->pending++;
		return 0;
	} else if (tly_uuidmap_get(fold->staged_ids, &ev->tenant_id, &ev->event_id)) {
		fold->pending++; /* a repeat in the batch: folded once, as a repeat from an earlier batch */
		return 0;
	} else if (tly_uuidmap_put(fold->staged_ids, &ev->tenant_id, &ev->event_id, fold) != 0) {
		return TLY_E_NOMEM;
	}
	rc = stage_row(fold, fold->rows, ev, fold->ord, NULL);
	if (rc != 0)
		return rc; /* the row is incomplete: the batch is cleared or the send fails */
	fold->ord++;
	fold->pending++;
	return 0;
}

/* State of fill_gaps' staging of the entries read back. */
struct fill {
	struct tly_fold *fold;
	int64_t ord;
};

static int fill_entry(const struct tly_event *entry, void *ud)
{
	struct fill *f = ud;
	return stage_row(f->fold, f->fold->fill, entry, f->ord++, NULL);
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

int tly_fold_truncate(PGconn *conn, struct tly_pg_error *err)
{
	char *sql = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&sql, &len);
	if (!f) {
		set_err(err, TLY_ERRCLASS_FATAL, "could not empty the projections: out of memory");
		return TLY_E_NOMEM;
	}
	fputs("TRUNCATE", f);
	for (size_t i = 0, n = 0; i < N_TABLES; i++)
		if (strcmp(tly_fold_tables[i], "billing_plans") != 0 &&
		    strcmp(tly_fold_tables[i], "plan_features") != 0) /* constant names */
			fprintf(f, "%s %s", n++ ? "," : "", tly_fold_tables[i]);
	fputs(" CASCADE", f);
	if (fclose(f) != 0) {
		free(sql);
		set_err(err, TLY_ERRCLASS_FATAL, "could not empty the projections: out of memory");
		return TLY_E_NOMEM;
	}
	int rc = tly_pg_exec(conn, sql, 0, NULL, err);
	free(sql);
	return rc;
}

/* Local buffers of a session (a maximum, allocated as used): a batch's staging table stays in memory. */
#define STAGE_TEMP_BUFFERS "256MB"

/*
 * No JIT either: a batch's statements run once each, and the planner's cost of the probes per
 * staged row (seen events, model calls) passes jit_above_cost once a batch holds about 12,000
 * event ids, so that the server compiled expressions it then ran once (auto_explain on the large
 * backlog: the seen events' and API usage's statements, 11 and 25 functions).
 */
int tly_fold_prepare_session(PGconn *conn, struct tly_pg_error *err)
{
	const char *const v[] = {STAGE_TEMP_BUFFERS};
	return tly_pg_exec(conn, "SELECT set_config('temp_buffers', $1, false), set_config('jit', 'off', false)",
			   1, v, err);
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
	if (missing && (tly_fold_prepare_session(conn, err) != 0 ||
			tly_pg_exec_script(conn, fold->stage_sql, err) != 0))
		return TLY_E_PG;
	fold->staged_on = conn;
	return 0;
}

/*
 * Memory for the fold's sorts and hashes, for this transaction only: they carry the staged
 * documents, and with the default work_mem (4 MB) a batch of a few thousand messages spills to
 * temporary files. 2 kB per staged message, between 16 MB and 1 GB.
 */
static int set_work_mem(const struct tly_fold *fold, PGconn *conn, struct tly_pg_error *err)
{
	size_t kb = 2 * fold->pending;
	char value[32];
	kb = kb < 16 * 1024 ? 16 * 1024 : kb > 1024 * 1024 ? 1024 * 1024 : kb;
	snprintf(value, sizeof(value), "%zukB", kb);
	const char *const v[] = {value};
	return tly_pg_exec(conn, "SELECT set_config('work_mem', $1, true)", 1, v, err);
}

/*
 * After the batch's COPY: a tenant whose entries skip seqs gets its entries from ledger_entries
 * instead (GAP_SQL), staged with orders before the batch's first (the relative order of entries
 * and events does not matter, a tenant's entries stay in seq order). The statements run for the
 * kinds read back too. 0, TLY_E_PG or TLY_E_NOMEM with err filled.
 */
static int fill_gaps(struct tly_fold *fold, PGconn *conn, struct tly_pg_error *err)
{
	char *sql = render(fold, GAP_SQL);
	if (!sql) {
		set_err(err, TLY_ERRCLASS_FATAL, "could not fold the batch: out of memory");
		return TLY_E_NOMEM;
	}
	PGresult *res = tly_pg_query(conn, sql, 0, NULL, err);
	free(sql);
	if (!res)
		return TLY_E_PG;
	int n = PQntuples(res), rc = 0;
	if (n > 0) {
		struct fill f = {fold, fold->ord - (int64_t)fold->pending - n};
		tly_pgcopy_reset(fold->fill);
		rc = tly_entries_each(res, fill_entry, &f);
		if (rc != 0)
			set_err(err, TLY_ERRCLASS_FATAL, rc == TLY_E_NOMEM ?
				"could not fold the batch: out of memory" :
				"could not fold the batch: a stored ledger entry does not read back");
		else
			rc = tly_pgcopy_send(conn, fold->fill, "COPY tly_fold_stage FROM STDIN (FORMAT binary)",
					     err);
	}
	PQclear(res);
	return rc;
}

int tly_fold_flush_send(struct tly_fold *fold, PGconn *conn, const char *tail,
			struct tly_pg_error *err)
{
	fold->sent = false;
	if (fold->pending == 0 && !tail)
		return 0;
	if (PQtransactionStatus(conn) != PQTRANS_INTRANS) {
		set_err(err, TLY_ERRCLASS_FATAL, "could not fold the batch: no transaction is open");
		return TLY_E_PG;
	}
	int rc = 0;
	for (size_t i = 0; i < fold->n_held && rc == 0; i++)
		rc = emit_held(fold, fold->held[i], true);
	if (rc != 0) {
		set_err(err, TLY_ERRCLASS_FATAL, "could not fold the batch: out of memory");
		return rc;
	}
	if (fold->pending > 0) {
		rc = ensure_stage(fold, conn, err);
		if (rc == 0)
			rc = set_work_mem(fold, conn, err);
		if (rc == 0)
			rc = tly_pg_exec(conn, "DELETE FROM tly_fold_stage", 0, NULL, err);
		if (rc == 0)
			rc = tly_pgcopy_send(conn, fold->rows, "COPY tly_fold_stage FROM STDIN (FORMAT binary)",
					     err);
		if (rc == 0 && (fold->present & T(TLY_EV_LEDGER_ENTRY)))
			rc = fill_gaps(fold, conn, err);
	}
	/* the planner's row counts first (a temporary table has no others), then the fold and the
	 * tail, in one round trip */
	const char *sqls[2 + N_FOLD_SQL];
	size_t n = 0;
	if (fold->pending > 0)
		sqls[n++] = "ANALYZE tly_fold_stage (type, tenant_id, kind)";
	for (size_t i = 0; rc == 0 && fold->pending > 0 && i < N_FOLD_SQL; i++) {
		if (!(fold->present & FOLD_NEEDS[i]))
			continue;
		if (!fold->rendered[i] && !(fold->rendered[i] = render(fold, FOLD_SQL[i]))) {
			set_err(err, TLY_ERRCLASS_FATAL, "could not fold the batch: out of memory");
			rc = TLY_E_NOMEM;
		}
		sqls[n++] = fold->rendered[i];
	}
	if (tail)
		sqls[n++] = tail;
	if (rc == 0 && (tly_pg_pipeline_send(conn, sqls, n, &fold->rc, err) == 0 ||
			PQpipelineStatus(conn) != PQ_PIPELINE_OFF))
		fold->sent = true;
	else if (rc == 0)
		rc = fold->rc;
	if (rc == TLY_E_PG)
		fold->staged_on = NULL; /* the staging table may have been dropped with a rolled back creation */
	return rc;
}

int tly_fold_flush_poll(struct tly_fold *fold, PGconn *conn, bool wait, struct tly_pg_error *err)
{
	if (!fold->sent)
		return 0;
	if (!tly_pg_pipeline_poll(conn, wait, &fold->rc, err))
		return 1;
	fold->sent = false;
	if (fold->rc != 0) {
		fold->staged_on = NULL;
		/* another session committed a key this batch also wrote (a message id, after the
		 * checks saw it free): the next attempt's checks see it */
		if (err && strcmp(err->sqlstate, "23505") == 0)
			err->errclass = TLY_ERRCLASS_RETRIABLE;
		return TLY_E_PG;
	}
	tly_fold_clear(fold);
	return 0;
}

bool tly_fold_in_flight(const struct tly_fold *fold)
{
	return fold->sent;
}

int tly_fold_flush(struct tly_fold *fold, PGconn *conn, struct tly_pg_error *err)
{
	int rc = tly_fold_flush_send(fold, conn, NULL, err);
	return rc != 0 ? rc : tly_fold_flush_poll(fold, conn, true, err);
}
