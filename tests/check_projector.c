/*
 * Suite "projector": the projection fold directly against a fresh database (out-of-order and
 * duplicate input, republished ledger entries, an invoice status before its invoice, a replay
 * that changes nothing), and tally-projector through the real binaries with a dev broker and the
 * real tally-ledger (a known scenario with exact rows; loadgen traffic with duplicates checked
 * against an independent count, across a kill -9 and restart of the projector).
 */
#include <check.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"
#include "codec.h"
#include "compare.h"
#include "config.h"
#include "event_json.h"
#include "fold.h"
#include "harness.h"
#include "memfold.h"
#include "pg.h"
#include "pgcopy.h"
#include "proc.h"
#include "producer.h"
#include "suites.h"

#define PARTITIONS 4
#define TENANT "11111111-1111-4111-8111-111111111111"
#define USER "22222222-2222-4222-8222-222222222222"
#define SUB "33333333-3333-4333-8333-333333333333"
#define CONV "44444444-4444-4444-8444-444444444444"
#define RES "55555555-5555-4555-8555-555555555555"
#define INVOICE "66666666-6666-4666-8666-666666666666"
#define M1 "77777777-7777-4777-8777-777777777771"
#define M2 "77777777-7777-4777-8777-777777777772"
#define ZERO64 "0000000000000000000000000000000000000000000000000000000000000000"

static char *q_text(PGconn *conn, const char *sql)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, 0, NULL, &err);
	ck_assert_msg(res != NULL, "%s: %s", sql, err.message);
	char *out = strdup(PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ? PQgetvalue(res, 0, 0) : "(null)");
	PQclear(res);
	return out;
}

static void expect(PGconn *conn, const char *sql, const char *want)
{
	char *have = q_text(conn, sql);
	ck_assert_msg(strcmp(have, want) == 0, "%s\n  want: %s\n  have: %s", sql, want, have);
	free(have);
}

static long q_long(PGconn *conn, const char *sql)
{
	char *t = q_text(conn, sql);
	long v = strcmp(t, "(null)") == 0 ? -1 : atol(t);
	free(t);
	return v;
}

/* ---- the fold, directly ------------------------------------------------------------------- */

static void add_json(struct tly_fold *fold, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Every message the batches below add, in feed order (memfold_equals_fold replays them). */
#define MAX_RECORDED 256
static char *recorded[MAX_RECORDED];
static size_t n_recorded;

static void add_json(struct tly_fold *fold, const char *fmt, ...)
{
	char text[4096], errstr[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	ck_assert(n > 0 && (size_t)n < sizeof(text));
	ck_assert(n_recorded < MAX_RECORDED);
	ck_assert_ptr_nonnull(recorded[n_recorded++] = strdup(text));
	struct tly_event ev = {0};
	ck_assert_msg(tly_event_from_json_text(text, strlen(text), 0, &ev, errstr, sizeof(errstr)) == 0,
		      "%s: %s", text, errstr);
	ck_assert_msg(ev.type == TLY_EV_LEDGER_ENTRY ||
			      tly_event_validate(&ev, errstr, sizeof(errstr)) == 0, "%s: %s", text, errstr);
	ck_assert_int_eq(tly_fold_add(fold, &ev), 0);
	tly_event_free(&ev);
}

/* A ledger entry of TENANT with the fields every entry has, and extra (JSON members). */
static void add_entry(struct tly_fold *fold, int seq, const char *kind, const char *at,
		      const char *extra)
{
	add_json(fold,
		 "{\"type\": \"LedgerEntry\", \"tenant_id\": \"" TENANT "\", \"seq\": %d, \"kind\": \"%s\", "
		 "\"cause_event_id\": \"88888888-8888-4888-8888-8888888888%02d\", \"cause_type\": \"X\", "
		 "\"cause_partition\": 0, \"cause_offset\": %d, \"cause_digest\": \"" ZERO64 "\", "
		 "\"ledger_time\": \"%s\", \"prev_hash\": \"" ZERO64 "\", \"hash\": \"" ZERO64 "\""
		 "%s%s%s, %s}",
		 seq, kind, seq, seq, at,
		 strstr(extra, "\"allowance_delta\"") ? "" : ", \"allowance_delta\": 0",
		 strstr(extra, "\"credits_delta\"") ? "" : ", \"credits_delta\": 0",
		 ", \"held_delta\": 0, \"overage_delta\": 0", extra);
}

static void flush_in_tx(PGconn *conn, struct tly_fold *fold)
{
	struct tly_pg_error err;
	ck_assert(tly_pg_begin(conn, &err) == 0);
	ck_assert_msg(tly_fold_flush(fold, conn, &err) == 0, "%s", err.message);
	ck_assert_int_eq(tly_fold_pending(fold), 0);
	ck_assert(tly_pg_commit(conn, &err) == 0);
}

#define SUB_PERIOD "\"subscription_id\": \"" SUB "\", \"period_start\": \"2026-01-01T00:00:00Z\", " \
		   "\"period_end\": \"2026-02-01T00:00:00Z\""
#define SUB_PERIOD2 "\"subscription_id\": \"" SUB "\", \"period_start\": \"2026-02-01T00:00:00Z\", " \
		    "\"period_end\": \"2026-03-01T00:00:00Z\""

static void batch1(struct tly_fold *f)
{
	add_json(f, "{\"type\": \"TenantCreated\", \"event_id\": \"a0000000-0000-4000-8000-000000000001\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:00:00Z\", "
		    "\"slug\": \"acme\", \"name\": \"Acme\"}");
	add_json(f, "{\"type\": \"UserRegistered\", \"event_id\": \"a0000000-0000-4000-8000-000000000002\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:00:01Z\", "
		    "\"user_id\": \"" USER "\", \"external_id\": \"ext-u\", \"display_name\": \"Ada\"}");
	/* a message before its conversation starts */
	add_json(f, "{\"type\": \"MessageAppended\", \"event_id\": \"a0000000-0000-4000-8000-000000000003\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:01:00Z\", "
		    "\"conversation_id\": \"" CONV "\", \"message_id\": \"" M1 "\", \"role\": \"user\", "
		    "\"agent_type\": \"human\", \"content\": {\"text\": \"hi\"}, \"provider\": \"none\", "
		    "\"model\": \"none\", \"prompt_tokens\": 0, \"completion_tokens\": 0, "
		    "\"reasoning_tokens\": 0, \"latency_ms\": 0, \"cost_micros\": 0}");
	/* an invoice status before the invoice */
	add_json(f, "{\"type\": \"InvoiceStatusChanged\", \"event_id\": \"a0000000-0000-4000-8000-000000000004\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-02-02T00:00:00Z\", "
		    "\"invoice_id\": \"" INVOICE "\", \"status\": \"paid\", \"external_invoice_id\": \"in_1\"}");
	add_entry(f, 1, "subscription_started", "2026-01-01T00:00:00Z",
		  "\"ref_id\": \"" SUB "\", " SUB_PERIOD ", \"allowance_delta\": 1000, "
		  "\"allowance_remaining\": 1000, \"credits_remaining\": 0, \"held\": 0, \"overage_tokens\": 0");
}

#define M2_EVENT(id) \
	"{\"type\": \"MessageAppended\", \"event_id\": \"" id "\", " \
	"\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:02:00Z\", " \
	"\"conversation_id\": \"" CONV "\", \"message_id\": \"" M2 "\", \"role\": \"assistant\", " \
	"\"agent_type\": \"triage\", \"content\": \"{\\\"text\\\": \\\"hello\\\"}\", \"provider\": \"openai\", " \
	"\"model\": \"gpt-4o\", \"prompt_tokens\": 100, \"completion_tokens\": 50, " \
	"\"reasoning_tokens\": 10, \"latency_ms\": 900, \"cost_micros\": 1234, \"reservation_id\": \"" RES "\"}"

/* The wallet's events (tly_fold_keeps_event_id false), of tenant at a time */
#define WALLET_RESERVED(tenant, at) \
	"{\"type\": \"TokensReserved\", \"event_id\": \"b0000000-0000-4000-8000-000000000001\", " \
	"\"tenant_id\": \"" tenant "\", \"occurred_at\": \"" at "\", " \
	"\"reservation_id\": \"" RES "\", \"tokens\": 500, \"expires_at\": \"2026-01-01T01:00:00Z\", " \
	"\"model\": \"gpt-4o\", \"conversation_id\": \"" CONV "\"}"
#define WALLET_GRANT(tenant, at) \
	"{\"type\": \"CreditsGranted\", \"event_id\": \"b0000000-0000-4000-8000-000000000002\", " \
	"\"tenant_id\": \"" tenant "\", \"occurred_at\": \"" at "\", " \
	"\"grant_id\": \"b0000000-0000-4000-8000-0000000000ff\", \"tokens\": 100, \"reason\": \"goodwill\"}"

static void batch2(struct tly_fold *f)
{
	add_json(f, "{\"type\": \"ConversationStarted\", \"event_id\": \"a0000000-0000-4000-8000-000000000005\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:00:30Z\", "
		    "\"conversation_id\": \"" CONV "\", \"user_id\": \"" USER "\", "
		    "\"agent_entrypoint\": \"triage\", \"source_channel\": \"web\"}");
	add_json(f, M2_EVENT("a0000000-0000-4000-8000-000000000006"));
	add_json(f, M2_EVENT("a0000000-0000-4000-8000-000000000006"));  /* the same event twice */
	add_json(f, M2_EVENT("a0000000-0000-4000-8000-000000000007"));  /* the same message, new event */
	add_json(f, "{\"type\": \"ReservationSettled\", \"event_id\": \"a0000000-0000-4000-8000-000000000008\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:02:01Z\", "
		    "\"reservation_id\": \"" RES "\", \"provider\": \"openai\", \"model\": \"gpt-4o\", "
		    "\"prompt_tokens\": 100, \"completion_tokens\": 50, \"reasoning_tokens\": 10, "
		    "\"cost_micros\": 1234}");
	add_json(f, "{\"type\": \"AgentHandoff\", \"event_id\": \"a0000000-0000-4000-8000-000000000009\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:03:00Z\", "
		    "\"conversation_id\": \"" CONV "\", \"from_agent\": \"triage\", \"to_agent\": \"billing\"}");
	add_json(f, "{\"type\": \"UsageReported\", \"event_id\": \"a0000000-0000-4000-8000-000000000010\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-02T00:00:00Z\", "
		    "\"subscription_id\": \"" SUB "\", \"feature_key\": \"api_calls\", \"unit\": \"call\", "
		    "\"quantity\": 7, \"external_event_id\": \"ext-1\"}");
	add_json(f, "{\"type\": \"UsageReported\", \"event_id\": \"a0000000-0000-4000-8000-000000000011\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-02T00:00:01Z\", "
		    "\"subscription_id\": \"" SUB "\", \"feature_key\": \"api_calls\", \"unit\": \"call\", "
		    "\"quantity\": 7, \"external_event_id\": \"ext-1\"}");
	/* the wallet's events (twice, the same event): their entries do the rest, no seen row */
	add_json(f, WALLET_RESERVED(TENANT, "2026-01-01T00:01:59Z"));
	add_json(f, WALLET_RESERVED(TENANT, "2026-01-01T00:01:59Z"));
	add_json(f, WALLET_GRANT(TENANT, "2026-01-01T00:04:00Z"));
	add_entry(f, 1, "subscription_started", "2026-01-01T00:00:00Z", /* republished */
		  "\"ref_id\": \"" SUB "\", " SUB_PERIOD ", \"allowance_delta\": 1000, "
		  "\"allowance_remaining\": 1000, \"credits_remaining\": 0, \"held\": 0, \"overage_tokens\": 0");
	add_entry(f, 2, "debit", "2026-01-01T00:02:00Z",
		  "\"ref_id\": \"" RES "\", " SUB_PERIOD ", \"allowance_delta\": -160, "
		  "\"allowance_remaining\": 840, \"credits_remaining\": 0, \"held\": 0, \"overage_tokens\": 0");
	add_json(f, "{\"type\": \"LedgerEntry\", \"tenant_id\": \"" TENANT "\", \"seq\": 3, "
		    "\"kind\": \"usage_recorded\", \"cause_event_id\": \"a0000000-0000-4000-8000-000000000010\", "
		    "\"cause_type\": \"UsageReported\", \"cause_partition\": 0, \"cause_offset\": 3, "
		    "\"cause_digest\": \"" ZERO64 "\", \"ref_id\": \"" SUB "\", " SUB_PERIOD ", "
		    "\"allowance_remaining\": 840, \"credits_remaining\": 0, \"held\": 0, "
		    "\"overage_tokens\": 0, \"ledger_time\": \"2026-01-02T00:00:00Z\", \"allowance_delta\": 0, "
		    "\"credits_delta\": 0, \"held_delta\": 0, \"overage_delta\": 0, "
		    "\"prev_hash\": \"" ZERO64 "\", \"hash\": \"" ZERO64 "\"}");
	add_entry(f, 4, "period_closed", "2026-02-01T00:00:00Z",
		  "\"ref_id\": \"" SUB "\", " SUB_PERIOD ", \"allowance_delta\": -840, "
		  "\"allowance_remaining\": 0, \"credits_remaining\": 0, \"held\": 0, \"overage_tokens\": 0");
	add_entry(f, 5, "invoice", "2026-02-01T00:00:00Z",
		  "\"ref_id\": \"" INVOICE "\", " SUB_PERIOD ", \"amount_cents\": 9914, \"currency\": \"USD\", "
		  "\"lines\": [{\"kind\": \"plan\", \"quantity\": 1, \"unit_price_micros\": 99000000, "
		  "\"amount_cents\": 9900}, {\"kind\": \"metered\", \"feature_key\": \"api_calls\", "
		  "\"quantity\": 7, \"unit_price_micros\": 20000, \"amount_cents\": 14}], "
		  "\"allowance_remaining\": 0, \"credits_remaining\": 0, \"held\": 0, \"overage_tokens\": 0");
	add_entry(f, 6, "period_opened", "2026-02-01T00:00:00Z",
		  "\"ref_id\": \"" SUB "\", " SUB_PERIOD2 ", \"allowance_delta\": 1000, "
		  "\"allowance_remaining\": 1000, \"credits_remaining\": 0, \"held\": 0, \"overage_tokens\": 0");
	/* the terms arrive after the ledger made the subscription known */
	add_json(f, "{\"type\": \"SubscriptionStarted\", \"event_id\": \"a0000000-0000-4000-8000-000000000012\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:00:00Z\", "
		    "\"subscription_id\": \"" SUB "\", \"plan_code\": \"pro\", \"tokens_per_period\": 1000, "
		    "\"period_start\": \"2026-01-01T00:00:00Z\", \"period_end\": \"2026-02-01T00:00:00Z\", "
		    "\"interval\": \"month\", \"interval_count\": 1, \"price_cents\": 9900, "
		    "\"currency\": \"USD\", \"rollover_cap_tokens\": 0, "
		    "\"metered_prices\": {\"api_calls\": 20000}, \"seat_count\": 5, \"auto_renew\": true}");
}

static void batch3(struct tly_fold *f)
{
	add_entry(f, 7, "debit", "2026-02-01T01:00:00Z",
		  "\"ref_id\": \"" RES "\", " SUB_PERIOD2 ", \"allowance_delta\": -40, "
		  "\"allowance_remaining\": 960, \"credits_remaining\": 0, \"held\": 0, \"overage_tokens\": 0");
	add_entry(f, 8, "debit", "2026-02-01T02:00:00Z",
		  "\"ref_id\": \"" RES "\", " SUB_PERIOD2 ", \"allowance_delta\": -10, "
		  "\"allowance_remaining\": 950, \"credits_remaining\": 0, \"held\": 25, \"overage_tokens\": 0");
}

/* One digest of every projection row: equal digests, equal projections. */
static char *digest(PGconn *conn)
{
	struct tly_pg_error err;
	char *d = tly_compare_digest(conn, &err);
	ck_assert_msg(d != NULL, "could not digest the projections: %s", err.message);
	return d;
}

/* The projections' digest is want's (a digest() of the same database before). */
static void expect_digest(PGconn *conn, const char *want)
{
	char *have = digest(conn);
	ck_assert_str_eq(want, have);
	free(have);
}

/* Forget the recorded messages (add_json). */
static void forget_recorded(void)
{
	for (size_t i = 0; i < n_recorded; i++)
		free(recorded[i]);
	n_recorded = 0;
}

/* Messages whose conversation (of their tenant) or tenant is missing: the fold creates both first. */
#define MESSAGES_UNREFERENCED \
	"SELECT count(*) FROM agent_messages m LEFT JOIN agent_conversations c " \
	"ON c.id = m.conversation_id AND c.tenant_id = m.tenant_id " \
	"LEFT JOIN tenant_accounts t ON t.id = m.tenant_id WHERE c.id IS NULL OR t.id IS NULL"

static void check_fold_rows(PGconn *c)
{
	expect(c, MESSAGES_UNREFERENCED, "0");
	expect(c, "SELECT slug || ' ' || name FROM tenant_accounts", "acme Acme");
	expect(c, "SELECT concat_ws(' ', message_count, total_tokens_prompt, total_tokens_completion, "
		  "reasoning_tokens, total_cost_micros, handoff_count, active_agent, agent_entrypoint, "
		  "status, user_id, created_at, last_message_at) FROM agent_conversations",
	       "2 100 50 10 1234 1 billing triage active " USER " 2026-01-01 00:00:30+00 2026-01-01 00:02:00+00");
	expect(c, "SELECT string_agg(message_id || ':' || position || ':' || content::text, ' ' "
		  "ORDER BY position) FROM agent_messages",
	       M1 ":0:{\"text\": \"hi\"} " M2 ":1:{\"text\": \"hello\"}");
	expect(c, "SELECT content_checksum = encode(sha256('{\"text\": \"hello\"}'::bytea), 'hex') "
		  "FROM agent_messages WHERE message_id = '" M2 "'", "t");
	expect(c, "SELECT concat_ws(' ', provider, model, usage_date, prompt_tokens, completion_tokens, "
		  "reasoning_tokens, total_tokens, cost_micros, request_count) FROM api_usage",
	       "openai gpt-4o 2026-01-01 100 50 10 160 1234 1");
	expect(c, "SELECT concat_ws(' ', count(*), sum(quantity), min(period_start), min(period_end)) "
		  "FROM subscription_usage", "1 7 2026-01-01 00:00:00+00 2026-02-01 00:00:00+00");
	expect(c, "SELECT concat_ws(' ', status, external_invoice_id, amount_cents, currency, ledger_seq, "
		  "jsonb_array_length(lines), period_start, updated_at) FROM subscription_invoices "
		  "WHERE id = '" INVOICE "'", "paid in_1 9914 USD 5 2 2026-01-01 00:00:00+00 2026-02-02 00:00:00+00");
	expect(c, "SELECT concat_ws(' ', plan_code, status, price_cents, currency, seat_count, "
		  "current_period_start, current_period_end, metered_prices::text) FROM tenant_subscriptions",
	       "pro active 9900 USD 5 2026-02-01 00:00:00+00 2026-03-01 00:00:00+00 {\"api_calls\": 20000}");
	expect(c, "SELECT concat_ws(' ', tokens_limit, tokens_used, tokens_remaining, held, credits, "
		  "ledger_seq, period_start, monthly_api_cost_micros) FROM token_balances "
		  "WHERE subscription_id = '" SUB "'", "1000 50 925 25 0 8 2026-02-01 00:00:00+00 0");
	expect(c, "SELECT count(*) FROM token_balances", "1");
	/* one seen row per event id of batch1 and batch2, none of the wallet's events */
	expect(c, "SELECT count(*) FROM projector_seen_events", "12");
	expect(c, "SELECT count(*) FROM projector_seen_events WHERE event_id::text LIKE 'b0000000-%'", "0");
}

/* The whole message's rendering of field name, as tly_fold_field_json made it before. */
static char *whole_json(const struct tly_event *ev, const char *name)
{
	json_t *all = tly_event_to_json(ev);
	ck_assert_ptr_nonnull(all);
	char *text = json_dumps(json_object_get(all, name), JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(all);
	ck_assert_ptr_nonnull(text);
	return text;
}

static void expect_field_json(const struct tly_event *ev, const char *name)
{
	char *got = tly_fold_field_json(ev, name), *want = whole_json(ev, name);
	ck_assert_ptr_nonnull(got);
	ck_assert_str_eq(got, want);
	free(got);
	free(want);
}

/* Maps and record lists rendered alone (no whole message) read as lib/event_json renders them. */
START_TEST(field_json_as_event_json)
{
	struct tly_event ev = {0};
	static const struct tly_map_entry prices[] = {{.key = "search", .i = 1500},
						      {.key = "ocr", .i = -1}};
	static const struct tly_map_entry meta[] = {{.key = "region", .s = "eu \"west\""},
						    {.key = "none", .s = NULL}};
	static const struct tly_map_entry toggles[] = {{.key = "sso", .b = true},
						       {.key = "audit", .b = false}};
	static const struct tly_plan_feature features[] = {
		{.feature_key = "search", .display_name = "Search", .hard_limit = {true, 10},
		 .is_metered = true},
		{.feature_key = "ocr", .display_name = "OCR", .soft_limit = {true, 0}}};
	static const struct tly_invoice_line lines[] = {
		{.kind = "plan", .quantity = 1, .unit_price_micros = 2900000, .amount_cents = 2900},
		{.kind = "metered", .feature_key = "search", .quantity = 3, .unit_price_micros = 7,
		 .amount_cents = 1}};
	tly_event_init(&ev, TLY_EV_SUBSCRIPTION_STARTED);
	ev.u.subscription_started.terms.metered_prices = (struct tly_map){prices, 2};
	ev.u.subscription_started.metadata = (struct tly_map){meta, 2};
	expect_field_json(&ev, "metered_prices");
	expect_field_json(&ev, "metadata");
	tly_event_init(&ev, TLY_EV_PLAN_PUBLISHED);
	ev.u.plan_published.feature_toggles = (struct tly_map){toggles, 2};
	ev.u.plan_published.features = (struct tly_list){features, 2};
	expect_field_json(&ev, "feature_toggles");
	expect_field_json(&ev, "features");
	tly_event_init(&ev, TLY_EV_LEDGER_ENTRY);
	ev.u.ledger_entry.lines = (struct tly_list){lines, 2};
	expect_field_json(&ev, "lines");
	tly_event_free(&ev);
}
END_TEST

START_TEST(fold_direct)
{
	struct tly_test_db d;
	tly_test_db_up(&d, "check_projector");
	struct tly_fold *f = tly_fold_new();
	ck_assert_ptr_nonnull(f);
	struct tly_pg_error err;
	ck_assert_int_eq(tly_fold_set_table(f, "no_such_table", "x"), TLY_E_NOT_FOUND);
	ck_assert_int_eq(tly_fold_set_table(f, "users", "users; DROP TABLE x"), TLY_E_INVALID);

	/* outside a transaction the fold refuses (its staging rows live until commit) */
	batch1(f);
	ck_assert_int_ne(tly_fold_flush(f, d.conn, &err), 0);
	flush_in_tx(d.conn, f);
	expect(d.conn, "SELECT status FROM subscription_invoices", "(null)");
	batch2(f);
	flush_in_tx(d.conn, f);
	batch3(f);
	flush_in_tx(d.conn, f);
	check_fold_rows(d.conn);

	/* everything again, in one batch: nothing changes */
	char *before = digest(d.conn);
	batch1(f);
	batch2(f);
	batch3(f);
	flush_in_tx(d.conn, f);
	char *after = digest(d.conn);
	ck_assert_str_eq(before, after);
	check_fold_rows(d.conn);

	/* a rolled back batch leaves nothing behind, and the next one works */
	struct tly_fold *g = tly_fold_new();
	add_entry(g, 9, "debit", "2026-02-01T03:00:00Z",
		  "\"ref_id\": \"" RES "\", " SUB_PERIOD2 ", \"allowance_delta\": -5, "
		  "\"allowance_remaining\": 945, \"credits_remaining\": 0, \"held\": 0, \"overage_tokens\": 0");
	ck_assert(tly_pg_begin(d.conn, &err) == 0);
	ck_assert(tly_fold_flush(g, d.conn, &err) == 0);
	ck_assert(tly_pg_rollback(d.conn, &err) == 0);
	char *rolled = digest(d.conn);
	ck_assert_str_eq(before, rolled);
	add_entry(g, 9, "debit", "2026-02-01T03:00:00Z",
		  "\"ref_id\": \"" RES "\", " SUB_PERIOD2 ", \"allowance_delta\": -5, "
		  "\"allowance_remaining\": 945, \"credits_remaining\": 0, \"held\": 0, \"overage_tokens\": 0");
	flush_in_tx(d.conn, g);
	expect(d.conn, "SELECT tokens_used || ' ' || tokens_remaining FROM token_balances", "55 945");

	/* a table renamed after flushes (their statements are rendered once, then reused) */
	static const char *const again[] = {"token_balances", "projector_seen_events",
					    "projector_ledger_applied"};
	for (size_t i = 0; i < 3; i++) {
		char sql[160], name[64];
		snprintf(name, sizeof(name), "%s_again", again[i]);
		snprintf(sql, sizeof(sql), "CREATE TABLE %s (LIKE %s INCLUDING ALL)", name, again[i]);
		PGresult *r = tly_pg_query(d.conn, sql, 0, NULL, &err);
		ck_assert_msg(r, "%s", err.message);
		PQclear(r);
		ck_assert_int_eq(tly_fold_set_table(f, again[i], name), 0);
	}
	batch1(f);
	batch2(f);
	batch3(f);
	flush_in_tx(d.conn, f);
	expect(d.conn, "SELECT count(*) FROM token_balances_again", "1");
	expect(d.conn, "SELECT count(*) FROM projector_seen_events_again", "12");
	for (size_t i = 0; i < 3; i++)
		ck_assert_int_eq(tly_fold_set_table(f, again[i], again[i]), 0);
	free(before);
	free(after);
	free(rolled);
	tly_fold_free(g);
	tly_fold_free(f);
	tly_test_db_down(&d);
}
END_TEST

/*
 * The projector's overlapped commit: the fold's statements and COMMIT sent in one pipeline,
 * polled without blocking; the rows are committed once poll says done (another session sees
 * them), a failure anywhere in the pipeline leaves nothing, and a batch of offsets only (no
 * message: ClockTicks) still commits the caller's statements.
 */
START_TEST(flush_in_flight)
{
	struct tly_test_db d;
	tly_test_db_up(&d, "check_projector");
	PGconn *other = PQconnectdb(d.conninfo);
	ck_assert(PQstatus(other) == CONNECTION_OK);
	struct tly_fold *f = tly_fold_new();
	struct tly_pg_error err;
	int rc;

	batch1(f);
	ck_assert(tly_pg_begin(d.conn, &err) == 0);
	ck_assert_msg(tly_fold_flush_send(f, d.conn, "COMMIT", &err) == 0, "%s", err.message);
	ck_assert(tly_fold_in_flight(f));
	while ((rc = tly_fold_flush_poll(f, d.conn, false, &err)) == 1)
		usleep(1000);
	ck_assert_msg(rc == 0, "%s", err.message);
	ck_assert(!tly_fold_in_flight(f));
	ck_assert_int_eq(tly_fold_pending(f), 0);
	ck_assert_int_eq(PQtransactionStatus(d.conn), PQTRANS_IDLE);
	expect(other, "SELECT count(*) FROM tenant_accounts WHERE slug = 'acme'", "1");
	ck_assert_int_eq(tly_fold_flush_poll(f, d.conn, true, &err), 0); /* nothing in flight */

	/* a failing statement after the fold: the whole transaction goes */
	char *before = digest(other);
	batch2(f);
	ck_assert(tly_pg_begin(d.conn, &err) == 0);
	ck_assert(tly_fold_flush_send(f, d.conn, "SELECT 1 / 0", &err) == 0);
	ck_assert_int_eq(tly_fold_flush_poll(f, d.conn, true, &err), TLY_E_PG);
	ck_assert_str_eq(err.sqlstate, "22012");
	ck_assert_int_eq(PQtransactionStatus(d.conn), PQTRANS_INERROR);
	ck_assert(tly_pg_rollback(d.conn, &err) == 0);
	char *after = digest(other);
	ck_assert_str_eq(before, after);
	ck_assert_int_gt(tly_fold_pending(f), 0);
	tly_fold_clear(f);

	/* no message, only the caller's statements and the tail */
	ck_assert(tly_pg_begin(d.conn, &err) == 0);
	ck_assert(tly_pg_exec(d.conn, "INSERT INTO consumer_offsets (consumer, topic, partition, "
			      "next_offset) VALUES ('t', 'tally.events', 0, 7)", 0, NULL, &err) == 0);
	ck_assert(tly_fold_flush_send(f, d.conn, "COMMIT", &err) == 0);
	ck_assert_int_eq(tly_fold_flush_poll(f, d.conn, true, &err), 0);
	expect(other, "SELECT next_offset FROM consumer_offsets WHERE consumer = 't'", "7");
	free(before);
	free(after);
	PQfinish(other);
	tly_fold_free(f);
	tly_test_db_down(&d);
}
END_TEST

/* Every row the fold wrote goes, but the plans (the migrations seed them; memfold does not fold them). */
static void empty_projections(PGconn *conn)
{
	struct tly_pg_error err;
	ck_assert_msg(tly_fold_truncate(conn, &err) == 0, "%s", err.message);
}

/* One recorded message into the in-memory fold. */
static void memfold_add_text(struct tly_memfold *mf, const char *text)
{
	char errstr[512];
	struct tly_event ev = {0};
	ck_assert_msg(tly_event_from_json_text(text, strlen(text), 0, &ev, errstr, sizeof(errstr)) == 0,
		      "%s: %s", text, errstr);
	ck_assert_int_eq(tly_memfold_add(mf, &ev), 0);
	tly_event_free(&ev);
}

/*
 * The recorded messages, in feed order, through a new in-memory fold into the emptied tables (no
 * ledger entries among them: memfold_rebuild orders those); the projections' digest must be want.
 */
static void memfold_replay(PGconn *conn, const char *want)
{
	struct tly_pg_error err;
	empty_projections(conn);
	struct tly_memfold *mf = tly_memfold_new();
	ck_assert_ptr_nonnull(mf);
	for (size_t i = 0; i < n_recorded; i++)
		memfold_add_text(mf, recorded[i]);
	forget_recorded();
	ck_assert_int_eq(tly_memfold_finish(mf), 0);
	ck_assert(tly_pg_begin(conn, &err) == 0);
	ck_assert_msg(tly_memfold_copy(mf, conn, (const char *const *)tly_fold_tables, &err) == 0, "%s",
		      err.message);
	ck_assert(tly_pg_commit(conn, &err) == 0);
	expect_digest(conn, want);
	tly_memfold_free(mf);
}

/* A fresh database and fold with the three fixture batches, each folded in a transaction of its own,
 * the fixture's messages recorded. */
static struct tly_fold *fold_three_batches(struct tly_test_db *d)
{
	tly_test_db_up(d, "check_projector");
	struct tly_fold *f = tly_fold_new();
	ck_assert_ptr_nonnull(f);
	PGconn *conn = d->conn;
	n_recorded = 0;
	batch1(f);
	flush_in_tx(conn, f);
	batch2(f);
	flush_in_tx(conn, f);
	batch3(f);
	flush_in_tx(conn, f);
	return f;
}

/* A table's rows a memfold streams (tly_memfold_stream), for a COPY sent in parts. */
struct row_stream {
	PGconn *conn;
	size_t rows, sends;
};

static void row_added(void *ud, struct tly_pgcopy *c)
{
	struct row_stream *st = ud;
	struct tly_pg_error err;
	st->rows++;
	ck_assert_uint_eq(tly_pgcopy_rows(c), st->rows - 3 * st->sends);
	if (tly_pgcopy_rows(c) == 3) { /* several sends, a partial one at the end */
		ck_assert_msg(tly_pgcopy_send_rows(st->conn, c, &err) == 0, "%s", err.message);
		ck_assert_uint_eq(tly_pgcopy_rows(c), 0);
		st->sends++;
	}
}

/*
 * The recorded messages into a new in-memory fold in a rebuild's order (the seeded plans first,
 * events in feed order, then entries by seq), its rows COPYed into the emptied tables in one
 * transaction. With stream (a table of tly_fold_tables, or NULL), that table's rows are
 * streamed into a COPY begun before the first message and ended after the last (into a temporary
 * copy of the table, moved in after the others: the tables' foreign keys check each statement).
 */
static void memfold_rebuild(PGconn *conn, const char *stream)
{
	struct tly_pg_error err;
	struct row_stream st = {conn, 0, 0};
	struct tly_pgcopy *c = tly_pgcopy_new();
	struct tly_memfold *mf = tly_memfold_new();
	ck_assert_ptr_nonnull(mf);
	ck_assert_ptr_nonnull(c);
	ck_assert_int_eq(tly_memfold_stream(mf, 0, c, row_added, &st), TLY_E_INVALID); /* tenants change */
	PGresult *res = tly_pg_query(conn, "SELECT code, id FROM billing_plans", 0, NULL, &err);
	ck_assert_msg(res != NULL, "%s", err.message);
	for (int r = 0; r < PQntuples(res); r++) {
		tly_uuid id;
		ck_assert_int_eq(tly_uuid_parse(PQgetvalue(res, r, 1), &id), 0);
		ck_assert_int_eq(tly_memfold_plan(mf, PQgetvalue(res, r, 0), &id), 0);
	}
	PQclear(res);
	ck_assert(tly_pg_begin(conn, &err) == 0);
	if (stream) {
		size_t t = 0;
		while (strcmp(tly_fold_tables[t], stream) != 0)
			t++;
		char sql[512];
		snprintf(sql, sizeof(sql), "CREATE TEMP TABLE streamed (LIKE %s INCLUDING DEFAULTS) "
			 "ON COMMIT DROP", stream);
		ck_assert_msg(tly_pg_exec(conn, sql, 0, NULL, &err) == 0, "%s", err.message);
		snprintf(sql, sizeof(sql), "COPY streamed (%s) FROM STDIN (FORMAT binary)",
			 tly_memfold_columns(t));
		ck_assert_int_eq(tly_memfold_stream(mf, t, c, row_added, &st), 0);
		ck_assert_msg(tly_pgcopy_begin(conn, sql, &err) == 0, "%s", err.message);
	}
	int max_seq = 0;
	for (size_t i = 0; i < n_recorded; i++) {
		const char *seq = strstr(recorded[i], "\"seq\": ");
		if (!strstr(recorded[i], "\"LedgerEntry\""))
			memfold_add_text(mf, recorded[i]);
		else if (seq && atoi(seq + 7) > max_seq)
			max_seq = atoi(seq + 7);
	}
	for (int s = 1; s <= max_seq; s++) {
		for (size_t i = 0; i < n_recorded; i++) {
			const char *seq = strstr(recorded[i], "\"seq\": ");
			if (strstr(recorded[i], "\"LedgerEntry\"") && seq && atoi(seq + 7) == s)
				memfold_add_text(mf, recorded[i]);
		}
	}
	/* an event after the entries is refused: the in-memory fold needs a rebuild's order */
	struct tly_event late = {0};
	char errstr[256];
	ck_assert_int_eq(tly_event_from_json_text(recorded[0], strlen(recorded[0]), 0, &late, errstr,
						  sizeof(errstr)), 0);
	ck_assert_int_eq(tly_memfold_add(mf, &late), TLY_E_INVALID);
	ck_assert_int_gt(tly_memfold_rows(mf), 10);
	if (stream) {
		ck_assert_uint_gt(st.rows, 0);
		ck_assert_uint_eq(st.sends, st.rows / 3);
		ck_assert_msg(tly_pgcopy_send_rows(conn, c, &err) == 0 && tly_pgcopy_end(conn, &err) == 0,
			      "%s", err.message);
	}
	ck_assert_int_eq(tly_memfold_finish(mf), 0);
	ck_assert_int_eq(tly_memfold_add(mf, &late), TLY_E_INVALID); /* nothing after the end */
	tly_event_free(&late);
	ck_assert_msg(tly_memfold_copy(mf, conn, (const char *const *)tly_fold_tables, &err) == 0, "%s",
		      err.message);
	if (stream) { /* every row went through the stream, and the copy did not write them */
		char sql[256];
		snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s", stream);
		ck_assert_int_eq(q_long(conn, sql), 0);
		ck_assert_int_eq(st.rows, q_long(conn, "SELECT count(*) FROM streamed"));
		snprintf(sql, sizeof(sql), "INSERT INTO %s SELECT * FROM streamed", stream);
		ck_assert_msg(tly_pg_exec(conn, sql, 0, NULL, &err) == 0, "%s", err.message);
	}
	ck_assert(tly_pg_commit(conn, &err) == 0);
	tly_memfold_free(mf);
	tly_pgcopy_free(c);
}

/* A throw-away database and a new fold whose messages are recorded from the first (add_json...). */
static struct tly_fold *recording_fold_up(struct tly_test_db *d)
{
	tly_test_db_up(d, "check_projector");
	struct tly_fold *f = tly_fold_new();
	ck_assert_ptr_nonnull(f);
	n_recorded = 0;
	return f;
}

/* The in-memory fold of the recorded messages, into the emptied tables, gives the live fold's rows. */
static void expect_memfold_same(PGconn *conn)
{
	char *want = digest(conn);
	empty_projections(conn);
	memfold_rebuild(conn, NULL);
	expect_digest(conn, want);
	free(want);
}

/*
 * The wallet's events (TokensReserved, CreditsGranted...) reach the projections through the ledger's
 * entries only: the fold writes no projector_seen_events row for them, in any number of repeats,
 * but their tenant gets its placeholder row (created at the earliest of them), as from any message;
 * the in-memory fold of a rebuild gives the same rows.
 */
START_TEST(wallet_events_no_seen_row)
{
#define TENANT2 "12121212-1212-4212-8212-121212121212"
	struct tly_test_db d;
	tly_test_db_up(&d, "check_projector");
	struct tly_fold *f = tly_fold_new();
	ck_assert_ptr_nonnull(f);
	for (int round = 0; round < 2; round++) {
		add_json(f, WALLET_GRANT(TENANT2, "2026-01-01T00:05:00Z"));
		add_json(f, WALLET_RESERVED(TENANT2, "2026-01-01T00:03:00Z"));
		add_json(f, WALLET_RESERVED(TENANT2, "2026-01-01T00:03:00Z"));
		flush_in_tx(d.conn, f);
	}
	expect(d.conn, "SELECT count(*) FROM projector_seen_events", "0");
	expect(d.conn, "SELECT concat_ws(' ', id, slug = '', created_at) FROM tenant_accounts",
	       TENANT2 " t 2026-01-01 00:03:00+00");
	expect(d.conn, "SELECT count(*) FROM tenant_accounts", "1");
	char *want = digest(d.conn);

	/* the same messages through the in-memory fold into the emptied tables */
	memfold_replay(d.conn, want);
	free(want);
	tly_fold_free(f);
	tly_test_db_down(&d);
#undef TENANT2
}
END_TEST

/*
 * The fold's session compiles nothing: the first flush on a connection (which creates its staging
 * table) turns JIT off for the session, which the server has on by default, so that a large
 * batch's statements, each run once, are not compiled first.
 */
START_TEST(session_without_jit)
{
	struct tly_test_db d;
	tly_test_db_up(&d, "check_projector");
	expect(d.conn, "SELECT current_setting('jit')", "on");
	struct tly_fold *f = tly_fold_new();
	ck_assert_ptr_nonnull(f);
	add_json(f, WALLET_GRANT("12121212-1212-4212-8212-121212121212", "2026-01-01T00:05:00Z"));
	flush_in_tx(d.conn, f);
	expect(d.conn, "SELECT current_setting('jit')", "off");
	tly_fold_free(f);
	tly_test_db_down(&d);
}
END_TEST

/*
 * Entries of kinds no statement names (holds, rejections...) are staged as runs, one row per run
 * of consecutive seqs with one subscription and period (tly_fold_add): token_balances comes out as
 * from every entry, across a debit inside a run, an entry of another subscription (none) between
 * two runs, a run republished over an applied one and one that continues it, and a seq gap; the
 * in-memory fold of the same messages (every entry, one by one) gives the same rows.
 */
#define RUN_BAL(allowance, held) \
	"\"allowance_remaining\": " #allowance ", \"credits_remaining\": 0, \"held\": " #held ", " \
	"\"overage_tokens\": 0"
static void run_entry(struct tly_fold *f, int seq, const char *kind, const char *extra)
{
	char at[32];
	snprintf(at, sizeof(at), "2026-01-01T01:%02d:00Z", seq);
	add_entry(f, seq, kind, at, extra);
}

START_TEST(entry_runs)
{
	struct tly_test_db d;
	struct tly_fold *f = recording_fold_up(&d);
	batch1(f); /* the tenant, a user, a message, an invoice status; entry 1 starts SUB */
	run_entry(f, 2, "hold_placed", SUB_PERIOD ", " RUN_BAL(1000, 100));
	run_entry(f, 3, "hold_placed", SUB_PERIOD ", " RUN_BAL(1000, 300));
	run_entry(f, 4, "rejected", RUN_BAL(1000, 300)); /* no subscription */
	run_entry(f, 5, "hold_expired", SUB_PERIOD ", " RUN_BAL(1000, 200));
	run_entry(f, 6, "debit", SUB_PERIOD ", \"allowance_delta\": -70, " RUN_BAL(930, 100));
	run_entry(f, 7, "hold_placed", SUB_PERIOD ", " RUN_BAL(930, 150));
	flush_in_tx(d.conn, f);
	expect(d.conn, "SELECT string_agg(concat_ws(' ', subscription_id, ledger_seq, tokens_used, held, "
		       "tokens_remaining, updated_at), ', ' ORDER BY ledger_seq) FROM token_balances",
	       "4 0 300 700 2026-01-01 01:04:00+00, " SUB " 7 70 150 780 2026-01-01 01:07:00+00");

	/* republished 5 to 7 (applied), then 8 and 9 continue the run; 11 after a gap */
	run_entry(f, 5, "hold_expired", SUB_PERIOD ", " RUN_BAL(1000, 200));
	run_entry(f, 6, "debit", SUB_PERIOD ", \"allowance_delta\": -70, " RUN_BAL(930, 100));
	run_entry(f, 7, "hold_placed", SUB_PERIOD ", " RUN_BAL(930, 150));
	run_entry(f, 8, "hold_released", SUB_PERIOD ", " RUN_BAL(930, 100));
	run_entry(f, 9, "hold_placed", SUB_PERIOD ", " RUN_BAL(930, 400));
	flush_in_tx(d.conn, f);
	expect(d.conn, "SELECT concat_ws(' ', ledger_seq, tokens_used, held) FROM token_balances "
		       "WHERE subscription_id IS NOT NULL", "9 70 400");
	expect(d.conn, "SELECT seq FROM projector_ledger_applied", "9");
	run_entry(f, 11, "hold_expired", SUB_PERIOD ", " RUN_BAL(930, 0));
	run_entry(f, 12, "hold_placed", SUB_PERIOD ", " RUN_BAL(930, 50));
	flush_in_tx(d.conn, f);
	expect(d.conn, "SELECT concat_ws(' ', ledger_seq, tokens_used, held, tokens_remaining) "
		       "FROM token_balances WHERE subscription_id IS NOT NULL", "12 70 50 880");
	expect_memfold_same(d.conn);
	forget_recorded();
	tly_fold_free(f);
	tly_test_db_down(&d);
}
END_TEST

/* A conversation event of TENANT: type, event id suffix, time, conversation (CONV or CONV2), fields */
#define CONV2 "44444444-4444-4444-8444-444444444442"
static void conv_event(struct tly_fold *f, const char *type, int id, const char *at, const char *conv,
		       const char *fields)
{
	add_json(f, "{\"type\": \"%s\", \"event_id\": \"c0000000-0000-4000-8000-0000000000%02d\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:%s\", "
		    "\"conversation_id\": \"%s\", %s}", type, id, at, conv, fields);
}

static void conv_message(struct tly_fold *f, int id, const char *at, const char *conv, int tokens)
{
	char fields[512];
	snprintf(fields, sizeof(fields),
		 "\"message_id\": \"c1000000-0000-4000-8000-0000000000%02d\", \"role\": \"assistant\", "
		 "\"agent_type\": \"triage\", \"content\": \"{}\", \"provider\": \"openai\", "
		 "\"model\": \"gpt-4o\", \"prompt_tokens\": %d, \"completion_tokens\": 1, "
		 "\"reasoning_tokens\": 2, \"latency_ms\": 5, \"cost_micros\": 3", id, tokens);
	conv_event(f, "MessageAppended", id, at, conv, fields);
}

#define CONV_ROW(conv) \
	"SELECT concat_ws(' ', message_count, total_tokens_prompt, total_tokens_completion, " \
	"reasoning_tokens, total_cost_micros, handoff_count, active_agent, status, " \
	"last_message_at, updated_at) FROM agent_conversations WHERE id = '" conv "'"

/* Fold the batch in a transaction: "inserted updated" row counts of table in it. */
static char *flush_writes(PGconn *conn, struct tly_fold *fold, const char *table)
{
	struct tly_pg_error err;
	char writes[64], sql[256];
	snprintf(sql, sizeof(sql), "SELECT pg_stat_get_xact_tuples_inserted('%s'::regclass) * 1000000 "
		 "+ pg_stat_get_xact_tuples_updated('%s'::regclass)", table, table);
	ck_assert(tly_pg_begin(conn, &err) == 0);
	long before = q_long(conn, sql); /* the session's counts not yet reported, too */
	ck_assert_msg(tly_fold_flush(fold, conn, &err) == 0, "%s", err.message);
	long n = q_long(conn, sql) - before;
	ck_assert(tly_pg_commit(conn, &err) == 0);
	snprintf(writes, sizeof(writes), "%ld %ld", n / 1000000, n % 1000000);
	return strdup(writes);
}

/*
 * Each conversation of a batch is written once: inserted when the batch starts it (no placeholder
 * first), else updated by one statement with its inserted messages' counters,
 * its handoffs (the last one's agent) and its last close, whichever of them the batch holds:
 * messages alone, a handoff alone, a close alone, all three, a close of a conversation never seen
 * (its placeholder), repeats of folded events; every other column is left as it was, and the
 * in-memory fold of the same messages gives the same rows.
 */
START_TEST(conversation_one_update)
{
	struct tly_test_db d;
	struct tly_fold *f = recording_fold_up(&d);
	conv_event(f, "ConversationStarted", 1, "00:00Z", CONV,
		   "\"user_id\": \"" USER "\", \"agent_entrypoint\": \"triage\", \"source_channel\": \"web\"");
	conv_message(f, 2, "01:00Z", CONV, 10);
	conv_message(f, 3, "02:00Z", CONV, 20);
	char *writes = flush_writes(d.conn, f, "agent_conversations");
	ck_assert_str_eq(writes, "1 1"); /* started in the batch: inserted, not a placeholder first */
	free(writes);
	expect(d.conn, CONV_ROW(CONV), "2 30 2 4 6 0 triage active "
	       "2026-01-01 00:02:00+00 2026-01-01 00:02:00+00");
	conv_event(f, "AgentHandoff", 4, "03:00Z", CONV, "\"from_agent\": \"triage\", \"to_agent\": \"billing\"");
	flush_in_tx(d.conn, f);
	expect(d.conn, CONV_ROW(CONV), "2 30 2 4 6 1 billing active "
	       "2026-01-01 00:02:00+00 2026-01-01 00:03:00+00");
	conv_event(f, "ConversationClosed", 5, "04:00Z", CONV, "\"status\": \"completed\"");
	conv_event(f, "ConversationClosed", 6, "05:00Z", CONV2, "\"status\": \"abandoned\"");
	flush_in_tx(d.conn, f);
	expect(d.conn, CONV_ROW(CONV), "2 30 2 4 6 1 billing completed "
	       "2026-01-01 00:02:00+00 2026-01-01 00:04:00+00");
	expect(d.conn, CONV_ROW(CONV2), "0 0 0 0 0 0 abandoned 2026-01-01 00:05:00+00");
	/* all three in one batch, twice over, with a message and a handoff folded before */
	conv_message(f, 3, "02:00Z", CONV, 20);
	conv_event(f, "AgentHandoff", 4, "03:00Z", CONV, "\"from_agent\": \"triage\", \"to_agent\": \"billing\"");
	conv_message(f, 7, "06:00Z", CONV, 40);
	conv_event(f, "AgentHandoff", 8, "07:00Z", CONV, "\"from_agent\": \"billing\", \"to_agent\": \"sales\"");
	conv_event(f, "AgentHandoff", 9, "08:00Z", CONV, "\"from_agent\": \"sales\", \"to_agent\": \"support\"");
	conv_event(f, "ConversationClosed", 10, "09:00Z", CONV, "\"status\": \"failed\"");
	conv_event(f, "ConversationClosed", 11, "08:30Z", CONV, "\"status\": \"completed\"");
	conv_message(f, 12, "10:00Z", CONV2, 5);
	writes = flush_writes(d.conn, f, "agent_conversations");
	ck_assert_str_eq(writes, "0 2"); /* one update of each conversation */
	free(writes);
	/* the status of the close last in feed order, updated_at the latest close's time (before,
	 * the live fold took the last close's time, and a rebuild differed) */
	expect(d.conn, CONV_ROW(CONV), "3 70 3 6 9 3 support completed "
	       "2026-01-01 00:06:00+00 2026-01-01 00:09:00+00");
	expect(d.conn, CONV_ROW(CONV2), "1 5 1 2 3 0 abandoned 2026-01-01 00:10:00+00 "
	       "2026-01-01 00:10:00+00");
	expect(d.conn, "SELECT string_agg(concat_ws(':', conversation_id = '" CONV "', position, "
		       "token_count_prompt), ' ' ORDER BY created_at) FROM agent_messages",
	       "t:0:10 t:1:20 t:2:40 f:0:5");
	expect(d.conn, "SELECT concat_ws(' ', agent_entrypoint, source_channel, created_at) "
		       "FROM agent_conversations WHERE id = '" CONV "'", "triage web 2026-01-01 00:00:00+00");
	char *want = digest(d.conn);

	/* the same messages through the in-memory fold into the emptied tables */
	memfold_replay(d.conn, want);
	free(want);
	tly_fold_free(f);
	tly_test_db_down(&d);
}
END_TEST
#undef CONV2

/*
 * The month's API cost of a token balance is written only when it changed: a batch of the tenant
 * with a message that costs something updates its balance row once, with the new sum; a batch
 * with only a message that costs nothing writes no new version of the row (before, every balance
 * of every tenant of the batch was rewritten); the in-memory fold gives the same rows.
 */
START_TEST(monthly_cost_written_when_changed)
{
	struct tly_test_db d;
	struct tly_fold *f = recording_fold_up(&d);
	batch1(f); /* the tenant, a user, a message, an invoice status; entry 1 starts SUB */
	flush_in_tx(d.conn, f);
	char *before = q_text(d.conn, "SELECT monthly_api_cost_micros FROM token_balances");
	conv_message(f, 20, "20:00Z", CONV, 10); /* costs 3 */
	char *writes = flush_writes(d.conn, f, "token_balances");
	ck_assert_str_eq(writes, "0 1");
	free(writes);
	char *after = q_text(d.conn, "SELECT monthly_api_cost_micros - 3 FROM token_balances");
	ck_assert_str_eq(after, before);
	conv_event(f, "MessageAppended", 21, "21:00Z", CONV,
		   "\"message_id\": \"c1000000-0000-4000-8000-000000000021\", \"role\": \"user\", "
		   "\"agent_type\": \"triage\", \"content\": \"{}\", \"provider\": \"openai\", "
		   "\"model\": \"gpt-4o\", \"prompt_tokens\": 0, \"completion_tokens\": 0, "
		   "\"reasoning_tokens\": 0, \"latency_ms\": 5, \"cost_micros\": 0");
	writes = flush_writes(d.conn, f, "token_balances");
	ck_assert_str_eq(writes, "0 0");
	free(writes);
	expect(d.conn, "SELECT count(*) FROM agent_messages WHERE message_id = "
		       "'c1000000-0000-4000-8000-000000000021'", "1");
	expect(d.conn, "SELECT monthly_api_cost_micros - 3 FROM token_balances", before);
	free(before);
	free(after);
	expect_memfold_same(d.conn);
	forget_recorded();
	tly_fold_free(f);
	tly_test_db_down(&d);
}
END_TEST

/* Two sessions folding at once (test database, a second connection to it, a fold for each). */
struct race {
	struct tly_test_db d;
	PGconn *other;
	struct tly_fold *first, *second;
};

static void race_up(struct race *r)
{
	tly_test_db_up(&r->d, "check_projector");
	r->other = PQconnectdb(r->d.conninfo);
	ck_assert(PQstatus(r->other) == CONNECTION_OK);
	r->first = tly_fold_new();
	r->second = tly_fold_new();
	ck_assert(r->first && r->second);
}

/*
 * The first fold's batch flushed and left open on the test connection, the second's sent on the
 * other: it waits for the first, then fails with a unique violation classed retriable once the
 * first commits. The second fold is cleared, the other connection's transaction rolled back.
 */
static void race_second_retriable(struct race *r)
{
	struct tly_pg_error err;
	ck_assert(tly_pg_begin(r->d.conn, &err) == 0);
	ck_assert_msg(tly_fold_flush(r->first, r->d.conn, &err) == 0, "%s", err.message);
	ck_assert(tly_pg_begin(r->other, &err) == 0);
	ck_assert_msg(tly_fold_flush_send(r->second, r->other, "COMMIT", &err) == 0, "%s", err.message);
	for (int i = 0; i < 50; i++) { /* the second waits for the first's row */
		ck_assert_int_eq(tly_fold_flush_poll(r->second, r->other, false, &err), 1);
		usleep(2000);
	}
	ck_assert(tly_pg_commit(r->d.conn, &err) == 0);
	ck_assert_int_eq(tly_fold_flush_poll(r->second, r->other, true, &err), TLY_E_PG);
	ck_assert_str_eq(err.sqlstate, "23505");
	ck_assert_int_eq(err.errclass, TLY_ERRCLASS_RETRIABLE);
	ck_assert(tly_pg_rollback(r->other, &err) == 0);
	tly_fold_clear(r->second);
}

static void race_down(struct race *r)
{
	forget_recorded();
	PQfinish(r->other);
	tly_fold_free(r->first);
	tly_fold_free(r->second);
	tly_test_db_down(&r->d);
}

/*
 * The message insert is a plain insert after its checks: a message id that another session
 * inserts meanwhile (two tenants' batches folded at once, as two lanes or processes do) fails the
 * second batch with a unique violation once the first commits, classed retriable; the retry skips
 * the message, which stays the first tenant's.
 */
START_TEST(message_id_race_retried)
{
#define TENANT2 "12121212-1212-4212-8212-121212121212"
#define RACED_MESSAGE(tenant, event, conv) \
	"{\"type\": \"MessageAppended\", \"event_id\": \"" event "\", \"tenant_id\": \"" tenant "\", " \
	"\"occurred_at\": \"2026-01-01T00:01:00Z\", \"conversation_id\": \"" conv "\", " \
	"\"message_id\": \"" M1 "\", \"role\": \"user\", \"agent_type\": \"human\", " \
	"\"content\": \"{}\", \"provider\": \"none\", \"model\": \"none\", \"prompt_tokens\": 1, " \
	"\"completion_tokens\": 0, \"reasoning_tokens\": 0, \"latency_ms\": 0, \"cost_micros\": 0}"
	struct race r;
	race_up(&r);
	add_json(r.first, RACED_MESSAGE(TENANT, "d0000000-0000-4000-8000-000000000001", CONV));
	add_json(r.second, RACED_MESSAGE(TENANT2, "d0000000-0000-4000-8000-000000000002",
					 "44444444-4444-4444-8444-444444444442"));
	race_second_retriable(&r);
	add_json(r.second, RACED_MESSAGE(TENANT2, "d0000000-0000-4000-8000-000000000002",
					 "44444444-4444-4444-8444-444444444442"));
	flush_in_tx(r.other, r.second);
	expect(r.d.conn, "SELECT string_agg(concat_ws(' ', tenant_id, conversation_id, position), ', ') "
			 "FROM agent_messages", TENANT " " CONV " 0");
	expect(r.d.conn, "SELECT string_agg(concat_ws(' ', tenant_id, message_count), ', ' ORDER BY "
			 "tenant_id) FROM agent_conversations", TENANT " 1, " TENANT2 " 0");
	expect(r.d.conn, "SELECT count(*) FROM projector_seen_events", "2");
	race_down(&r);
#undef RACED_MESSAGE
#undef TENANT2
}
END_TEST

/*
 * A model call is counted once in api_usage whichever of its events comes first and however the
 * batches fall: a settle, then in a later batch a message naming the same reservation (another
 * event id), then a message with a call of its own (no reservation).
 */
START_TEST(api_call_once_across_batches)
{
	struct tly_test_db d;
	struct tly_fold *f = recording_fold_up(&d);
	add_json(f, "{\"type\": \"ReservationSettled\", \"event_id\": \"e0000000-0000-4000-8000-000000000001\", "
		    "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:02:01Z\", "
		    "\"reservation_id\": \"" RES "\", \"provider\": \"openai\", \"model\": \"gpt-4o\", "
		    "\"prompt_tokens\": 100, \"completion_tokens\": 50, \"reasoning_tokens\": 10, "
		    "\"cost_micros\": 1234}");
	flush_in_tx(d.conn, f);
	add_json(f, M2_EVENT("e0000000-0000-4000-8000-000000000002"));
	flush_in_tx(d.conn, f);
	static const char usage[] = "SELECT concat_ws(' ', total_tokens, cost_micros, request_count) FROM api_usage";
	expect(d.conn, usage, "160 1234 1");
	conv_message(f, 3, "04:00Z", CONV, 7);
	flush_in_tx(d.conn, f);
	expect(d.conn, usage, "170 1237 2");
	expect(d.conn, "SELECT count(*) FROM projector_api_calls", "2");
	forget_recorded();
	tly_fold_free(f);
	tly_test_db_down(&d);
}
END_TEST

/*
 * Events seen before are looked up, then recorded with a plain insert: the same event folded by
 * two sessions at once (a partition handed over while its old owner's batch is in flight) fails
 * the second batch with a unique violation once the first commits, classed retriable; the retry
 * drops the event, whose effect (a handoff counted) is applied once.
 */
START_TEST(seen_event_race_retried)
{
#define HANDOFF "\"from_agent\": \"triage\", \"to_agent\": \"billing\""
	struct race r;
	race_up(&r);
	conv_event(r.first, "AgentHandoff", 1, "01:00Z", CONV, HANDOFF);
	conv_event(r.second, "AgentHandoff", 1, "01:00Z", CONV, HANDOFF);
	race_second_retriable(&r);
	conv_event(r.second, "AgentHandoff", 1, "01:00Z", CONV, HANDOFF);
	flush_in_tx(r.other, r.second);
	expect(r.d.conn, "SELECT concat_ws(' ', handoff_count, active_agent) FROM agent_conversations",
	       "1 billing");
	expect(r.d.conn, "SELECT count(*) FROM projector_seen_events", "1");
	race_down(&r);
#undef HANDOFF
}
END_TEST

/*
 * The in-memory fold of a rebuild gives fold.c's rows: the batches of fold_direct (out of order:
 * entries before their subscription's event, an invoice status before its invoice, messages and
 * a handoff before their conversation's start; duplicate events and republished entries; then
 * all of it again), folded by fold.c batch by batch, then the same messages by memfold in a
 * rebuild's order (events in feed order, then entries by seq) into the emptied tables; again with
 * the seen events, then the messages, streamed as a rebuild does.
 */
START_TEST(memfold_equals_fold)
{
	struct tly_test_db d;
	struct tly_fold *f = fold_three_batches(&d);
	batch1(f);
	batch2(f);
	batch3(f);
	flush_in_tx(d.conn, f);
	check_fold_rows(d.conn);
	char *want = digest(d.conn);

	static const char *const streams[] = {NULL, "projector_seen_events", "agent_messages"};
	for (size_t k = 0; k < sizeof(streams) / sizeof(streams[0]); k++) {
		/* every row the fold wrote goes (the plans are not memfold's: they stay) */
		empty_projections(d.conn);
		char *emptied = digest(d.conn);
		ck_assert_str_ne(want, emptied);
		memfold_rebuild(d.conn, streams[k]);
		expect_digest(d.conn, want);
		check_fold_rows(d.conn);
		free(emptied);
	}

	forget_recorded();
	free(want);
	tly_fold_free(f);
	tly_test_db_down(&d);
}
END_TEST

/* A recorded LedgerEntry message (JSON) stored in ledger_entries, as tally-ledger would have. */
static void store_entry(PGconn *conn, const char *text)
{
	struct tly_pg_error err;
	const char *const v[] = {text};
	ck_assert_msg(tly_pg_exec(conn,
		"INSERT INTO ledger_entries SELECT * FROM jsonb_populate_record(NULL::ledger_entries, "
		"$1::jsonb || jsonb_build_object('prev_hash', '\\x' || repeat('00', 32), "
		"'hash', '\\x' || repeat('00', 32), 'cause_digest', '\\x' || repeat('00', 32), "
		"'recorded_at', '2026-01-01T00:00:00Z')) ON CONFLICT DO NOTHING", 1, v, &err) == 0,
		"%s", err.message);
}

/* The seq of a recorded message, 0 for an event. */
static int recorded_seq(size_t i)
{
	const char *seq = strstr(recorded[i], "\"seq\": ");
	return strstr(recorded[i], "\"LedgerEntry\"") && seq ? atoi(seq + 7) : 0;
}

/*
 * tally.ledger lost a tenant's older entries (the topic's retention; DESIGN.md: nothing may
 * depend on it) or skipped some: the fold reads them back from ledger_entries, so the rows are
 * those of a fold of every entry. Before, the subscription stayed 'pending' (its
 * subscription_started was lost), the usage row had no period, the balance missed a debit.
 */
START_TEST(ledger_gap_read_back)
{
	struct tly_test_db d;
	struct tly_fold *f = fold_three_batches(&d);
	check_fold_rows(d.conn);
	char *want = digest(d.conn);
	size_t n = n_recorded;

	/* entries that never went through tally-ledger (not in ledger_entries) are folded as they come */
	add_entry(f, 10, "debit", "2026-02-01T04:00:00Z",
		  "\"ref_id\": \"" RES "\", " SUB_PERIOD2 ", \"allowance_delta\": -5, "
		  "\"allowance_remaining\": 945, \"credits_remaining\": 0, \"held\": 25, \"overage_tokens\": 0");
	flush_in_tx(d.conn, f);
	expect(d.conn, "SELECT ledger_seq || ' ' || tokens_used FROM token_balances", "10 55");

	/* the ledger's record of entries 1 to 8; the topic kept 5, 7 and 8 */
	for (size_t i = 0; i < n; i++)
		if (recorded_seq(i) > 0)
			store_entry(d.conn, recorded[i]);
	empty_projections(d.conn);
	struct tly_fold *g = tly_fold_new();
	ck_assert_ptr_nonnull(g);
	for (size_t i = 0; i < n; i++) {
		int seq = recorded_seq(i);
		if (seq == 0 || seq == 5 || seq == 7)
			add_json(g, "%s", recorded[i]);
	}
	flush_in_tx(d.conn, g);
	expect(d.conn, "SELECT status FROM tenant_subscriptions", "active");
	expect(d.conn, "SELECT count(*) FROM projector_usage_periods", "1");
	for (size_t i = 0; i < n; i++)
		if (recorded_seq(i) == 8)
			add_json(g, "%s", recorded[i]);
	flush_in_tx(d.conn, g);
	check_fold_rows(d.conn);
	expect_digest(d.conn, want);

	/* one seq missing between batches: 1 to 4 folded, then 6 and 7 (5, the invoice, read back) */
	empty_projections(d.conn);
	for (int part = 0; part < 3; part++) {
		for (size_t i = 0; i < n; i++) {
			int seq = recorded_seq(i);
			if ((part == 0 && seq <= 4) || (part == 1 && (seq == 6 || seq == 7)) ||
			    (part == 2 && seq == 8))
				add_json(g, "%s", recorded[i]);
		}
		flush_in_tx(d.conn, g);
	}
	check_fold_rows(d.conn);
	expect_digest(d.conn, want);
	forget_recorded();
	free(want);
	tly_fold_free(g);
	tly_fold_free(f);
	tly_test_db_down(&d);
}
END_TEST

/* ---- the daemon, with the real ledger ----------------------------------------------------- */

struct env {
	struct tly_test_broker b;
	struct tly_test_db d;
	struct tly_producer *prod;
	pid_t ledger, projector;
	char ledger_log[400], projector_log[400];
};

static pid_t projector_spawn(struct env *e)
{
	return tly_test_projector_spawn(e->b.bootstraps, e->d.conninfo, e->projector_log);
}

/* Lines of the projector's log (appended to by every run) that hold needle. */
static int log_count(const struct env *e, const char *needle)
{
	char line[4096];
	int n = 0;
	FILE *f = fopen(e->projector_log, "r");
	while (f && fgets(line, sizeof(line), f))
		n += strstr(line, needle) != NULL;
	if (f)
		fclose(f);
	return n;
}

/*
 * A projector again, returned once it has started (its SIGTERM handler is installed before
 * that): a test that stops it at once otherwise kills it before it handles the signal.
 */
static pid_t projector_respawn(struct env *e)
{
	int before = log_count(e, "msg=\"tally-projector started\"");
	pid_t pid = projector_spawn(e);
	for (int i = 0; i < 600 && log_count(e, "msg=\"tally-projector started\"") <= before; i++)
		usleep(50000);
	ck_assert_msg(log_count(e, "msg=\"tally-projector started\"") > before,
		      "tally-projector did not start; see %s", e->projector_log);
	return pid;
}

static void env_up(struct env *e)
{
	char errstr[512];
	memset(e, 0, sizeof(*e));
	tly_test_broker_start(&e->b, 1, PARTITIONS);
	tly_test_db_up(&e->d, "check_projector");
	snprintf(e->ledger_log, sizeof(e->ledger_log), "%s/ledger.log", e->b.dir);
	snprintf(e->projector_log, sizeof(e->projector_log), "%s/projector.log", e->b.dir);
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert(tly_config_set(cfg, "kafka.bootstrap.servers", e->b.bootstraps, errstr, sizeof(errstr)) == 0);
	e->prod = tly_producer_new(cfg, NULL, NULL, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(e->prod != NULL, "%s", errstr);
	e->ledger = tly_test_ledger_spawn(e->b.bootstraps, e->d.conninfo, "ledger-test", PARTITIONS,
					  e->ledger_log);
	e->projector = projector_spawn(e);
}

static void projector_stop(struct env *e)
{
	tly_test_projector_stop(e->projector, e->projector_log);
	e->projector = 0;
}

static void env_down(struct env *e)
{
	if (e->projector)
		projector_stop(e);
	tly_test_ledger_stop(e->ledger, e->ledger_log);
	tly_producer_free(e->prod, 5000);
	tly_test_db_down(&e->d);
	tly_test_broker_stop(&e->b);
}

static void publish_json(struct env *e, const char *text)
{
	char errstr[512];
	struct tly_event ev = {0};
	ck_assert_msg(tly_event_from_json_text(text, strlen(text), 0, &ev, errstr, sizeof(errstr)) == 0,
		      "%s: %s", text, errstr);
	ck_assert_msg(tly_producer_publish(e->prod, &ev, NULL, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_msg(tly_producer_flush(e->prod, 15000) == 0, "not delivered");
	tly_event_free(&ev);
}

/* Wait until sql gives want (up to timeout_ms); fail with the last answer and the logs. */
static void wait_for(struct env *e, const char *sql, const char *want, int timeout_ms)
{
	int64_t deadline = tly_clock_ms() + timeout_ms;
	char *have = NULL;
	for (;;) {
		free(have);
		have = q_text(e->d.conn, sql);
		if (strcmp(have, want) == 0 || tly_clock_ms() > deadline)
			break;
		usleep(100000);
	}
	ck_assert_msg(strcmp(have, want) == 0, "%s\n  want: %s\n  have: %s\n  (see %s and %s)", sql,
		      want, have, e->projector_log, e->ledger_log);
	free(have);
}

START_TEST(scenario)
{
	struct env e;
	env_up(&e);
	/* the scenario of fold_direct, through the real ledger: its entries, not hand-made ones */
	static const char *const events[] = {
		"{\"type\": \"TenantCreated\", \"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:00:00Z\", "
		"\"slug\": \"acme\", \"name\": \"Acme\", \"event_id\": \"b0000000-0000-4000-8000-000000000001\"}",
		"{\"type\": \"UserRegistered\", \"event_id\": \"b0000000-0000-4000-8000-000000000002\", "
		"\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:00:01Z\", "
		"\"user_id\": \"" USER "\", \"external_id\": \"ext-u\", \"display_name\": \"Ada\"}",
		"{\"type\": \"SubscriptionStarted\", \"event_id\": \"b0000000-0000-4000-8000-000000000003\", "
		"\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:00:02Z\", "
		"\"subscription_id\": \"" SUB "\", \"plan_code\": \"pro\", \"tokens_per_period\": 1000, "
		"\"period_start\": \"2026-01-01T00:00:00Z\", \"period_end\": \"2026-02-01T00:00:00Z\", "
		"\"interval\": \"month\", \"interval_count\": 1, \"price_cents\": 9900, "
		"\"currency\": \"USD\", \"rollover_cap_tokens\": 0, \"overage_price_micros_per_1k_tokens\": 2000, "
		"\"metered_prices\": {\"api_calls\": 20000}, \"seat_count\": 5, \"auto_renew\": true}",
		"{\"type\": \"MessageAppended\", \"event_id\": \"b0000000-0000-4000-8000-000000000004\", "
		"\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:01:00Z\", "
		"\"conversation_id\": \"" CONV "\", \"message_id\": \"" M1 "\", \"role\": \"user\", "
		"\"agent_type\": \"human\", \"content\": {\"text\": \"hi\"}, \"provider\": \"none\", "
		"\"model\": \"none\", \"prompt_tokens\": 0, \"completion_tokens\": 0, "
		"\"reasoning_tokens\": 0, \"latency_ms\": 0, \"cost_micros\": 0}",
		"{\"type\": \"ConversationStarted\", \"event_id\": \"b0000000-0000-4000-8000-000000000005\", "
		"\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:00:30Z\", "
		"\"conversation_id\": \"" CONV "\", \"user_id\": \"" USER "\", "
		"\"agent_entrypoint\": \"triage\", \"source_channel\": \"web\"}",
		"{\"type\": \"TokensReserved\", \"event_id\": \"b0000000-0000-4000-8000-000000000006\", "
		"\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:01:30Z\", "
		"\"reservation_id\": \"" RES "\", \"tokens\": 300, \"expires_at\": \"2026-01-01T01:00:00Z\", "
		"\"model\": \"gpt-4o\"}",
		M2_EVENT("b0000000-0000-4000-8000-000000000007"),
		M2_EVENT("b0000000-0000-4000-8000-000000000007"), /* an upstream retry */
		"{\"type\": \"AgentHandoff\", \"event_id\": \"b0000000-0000-4000-8000-000000000008\", "
		"\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-01T00:03:00Z\", "
		"\"conversation_id\": \"" CONV "\", \"from_agent\": \"triage\", \"to_agent\": \"billing\"}",
		"{\"type\": \"UsageReported\", \"event_id\": \"b0000000-0000-4000-8000-000000000009\", "
		"\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-02T00:00:00Z\", "
		"\"subscription_id\": \"" SUB "\", \"feature_key\": \"api_calls\", \"unit\": \"call\", "
		"\"quantity\": 7, \"external_event_id\": \"ext-1\"}",
		"{\"type\": \"ConversationClosed\", \"event_id\": \"b0000000-0000-4000-8000-000000000010\", "
		"\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-01-03T00:00:00Z\", "
		"\"conversation_id\": \"" CONV "\", \"status\": \"completed\"}",
		"{\"type\": \"PlanPublished\", \"event_id\": \"b0000000-0000-4000-8000-000000000011\", "
		"\"occurred_at\": \"2026-01-05T00:00:00Z\", \"plan_id\": \"a3c073b5-6121-49e1-8c02-bbfbffaa1a70\", "
		"\"code\": \"pro\", \"name\": \"Pro 2026\", \"interval\": \"month\", \"interval_count\": 1, "
		"\"price_cents\": 9900, \"currency\": \"USD\", \"trial_days\": 7, \"seat_included\": 5, "
		"\"tokens_per_period\": 10000000, \"overage_price_micros_per_1k_tokens\": 2000, "
		"\"feature_toggles\": {\"api_access\": true}, \"is_active\": true, \"features\": ["
		"{\"feature_key\": \"tokens\", \"display_name\": \"Tokens\", \"soft_limit\": 10000000, \"is_metered\": false}, "
		"{\"feature_key\": \"api_calls\", \"display_name\": \"API calls\", \"is_metered\": true}]}",
		"{\"type\": \"ClockTick\", \"event_id\": \"b0000000-0000-4000-8000-000000000012\", "
		"\"occurred_at\": \"2026-02-01T00:01:00Z\"}",
	};
	/* undecodable records on the projector's inputs are logged and skipped */
	char errstr[512];
	ck_assert(tly_producer_publish_raw(e.prod, "tally.catalog", NULL, 0, 0, "garbage", 7, NULL,
					   errstr, sizeof(errstr)) == 0);
	ck_assert(tly_producer_publish_raw(e.prod, "tally.events", TENANT, 36, RD_KAFKA_PARTITION_UA,
					   "\xc3\x01junk", 6, NULL, errstr, sizeof(errstr)) == 0);
	/* a ClockTick is skipped by its schema fingerprint, never decoded: a corrupt body goes unnoticed */
	struct tly_codec *codec = tly_codec_new(errstr, sizeof(errstr));
	struct tly_event tick = {0};
	struct tly_buf tick_bytes = {0};
	const char *tick_json = "{\"type\": \"ClockTick\", \"event_id\": "
				"\"b0000000-0000-4000-8000-000000000099\", \"occurred_at\": \"2026-01-01T00:00:00Z\"}";
	ck_assert_msg(codec != NULL, "%s", errstr);
	ck_assert(tly_event_from_json_text(tick_json, strlen(tick_json), 0, &tick, errstr, sizeof(errstr)) == 0);
	ck_assert_msg(tly_codec_encode(codec, &tick, &tick_bytes, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert(tick_bytes.len > TLY_CODEC_HEADER + 4);
	memcpy(tick_bytes.data + TLY_CODEC_HEADER, "\xff\xff\xff\xff", 4); /* a varint that never ends */
	ck_assert(tly_codec_decode(codec, tick_bytes.data, tick_bytes.len, &tick, errstr, sizeof(errstr)) != 0);
	ck_assert(tly_producer_publish_raw(e.prod, "tally.events", TENANT, 36, RD_KAFKA_PARTITION_UA,
					   tick_bytes.data, tick_bytes.len, NULL, errstr, sizeof(errstr)) == 0);
	tly_buf_free(&tick_bytes);
	tly_event_free(&tick);
	tly_codec_free(codec);
	for (size_t i = 0; i < sizeof(events) / sizeof(events[0]); i++)
		publish_json(&e, events[i]);

	wait_for(&e, "SELECT count(*) FROM subscription_invoices", "1", 30000);
	wait_for(&e, "SELECT status FROM agent_conversations", "completed", 30000);
	PGconn *c = e.d.conn;
	expect(c, "SELECT slug || ' ' || name FROM tenant_accounts", "acme Acme");
	expect(c, "SELECT display_name FROM users WHERE id = '" USER "'", "Ada");
	expect(c, "SELECT concat_ws(' ', message_count, total_tokens_prompt, total_tokens_completion, "
		  "reasoning_tokens, total_cost_micros, handoff_count, active_agent, agent_entrypoint, "
		  "created_at, last_message_at) FROM agent_conversations",
	       "2 100 50 10 1234 1 billing triage 2026-01-01 00:00:30+00 2026-01-01 00:02:00+00");
	expect(c, "SELECT string_agg(message_id || ':' || position, ' ' ORDER BY position) FROM agent_messages",
	       M1 ":0 " M2 ":1");
	expect(c, "SELECT concat_ws(' ', provider, model, total_tokens, cost_micros, request_count) FROM api_usage",
	       "openai gpt-4o 160 1234 1");
	expect(c, "SELECT concat_ws(' ', quantity, period_start) FROM subscription_usage",
	       "7 2026-01-01 00:00:00+00");
	/* the plan the catalog republished, its features replaced */
	wait_for(&e, "SELECT concat_ws(' ', name, trial_days, updated_at, (SELECT string_agg(feature_key, ',' "
		     "ORDER BY feature_key) FROM plan_features f WHERE f.plan_id = p.id)) FROM billing_plans p "
		     "WHERE code = 'pro'", "Pro 2026 7 2026-01-05 00:00:00+00 api_calls,tokens", 30000);
	/* the subscription: terms from the event, status and period from the ledger */
	wait_for(&e, "SELECT concat_ws(' ', plan_code, plan_id, status, seat_count, current_period_start, "
		     "current_period_end) FROM tenant_subscriptions",
		 "pro a3c073b5-6121-49e1-8c02-bbfbffaa1a70 active 5 2026-02-01 00:00:00+00 2026-03-01 00:00:00+00",
		 30000);
	/* the invoice equals the ledger's invoice entry */
	expect(c, "SELECT count(*) FROM subscription_invoices i JOIN ledger_entries l ON l.ref_id = i.id "
		  "AND l.kind = 'invoice' AND l.tenant_id = i.tenant_id AND l.seq = i.ledger_seq "
		  "AND l.amount_cents = i.amount_cents AND l.lines = i.lines AND i.status = 'issued' "
		  "AND i.amount_cents = 9914", "1");
	/* balances: the ledger's last entry of the tenant */
	wait_for(&e, "SELECT count(*) FROM token_balances b JOIN ledger_entries l ON l.tenant_id = b.tenant_id "
		     "AND l.seq = b.ledger_seq AND l.seq = (SELECT max(seq) FROM ledger_entries) "
		     "AND b.tokens_remaining = l.allowance_remaining + l.credits_remaining - l.held "
		     "AND b.held = l.held AND b.credits = l.credits_remaining "
		     "AND b.subscription_id = l.subscription_id", "1", 30000);
	expect(c, "SELECT concat_ws(' ', tokens_used, tokens_remaining, period_start) FROM token_balances",
	       "0 1000 2026-02-01 00:00:00+00");

	/* the payment processor's status, now that the invoice is known */
	char *invoice = q_text(c, "SELECT id FROM subscription_invoices");
	char text[1024];
	snprintf(text, sizeof(text),
		 "{\"type\": \"InvoiceStatusChanged\", \"event_id\": \"b0000000-0000-4000-8000-000000000013\", "
		 "\"tenant_id\": \"" TENANT "\", \"occurred_at\": \"2026-02-03T00:00:00Z\", "
		 "\"invoice_id\": \"%s\", \"status\": \"paid\", \"hosted_invoice_url\": \"https://pay/x\"}",
		 invoice);
	publish_json(&e, text);
	wait_for(&e, "SELECT concat_ws(' ', status, hosted_invoice_url, updated_at) FROM subscription_invoices",
		 "paid https://pay/x 2026-02-03 00:00:00+00", 30000);
	free(invoice);

	/* the projector's offsets: all three topics, committed with the rows */
	expect(c, "SELECT count(DISTINCT topic) FROM consumer_offsets WHERE consumer = 'tally-projector'", "3");
	char grep[600];
	/* distinct records: a batch that failed as retriable reads (and logs) them again */
	snprintf(grep, sizeof(grep),
		 "grep 'could not decode record' %s | grep -o 'topic=[^ ]* partition=[0-9]* offset=[0-9]*' "
		 "| sort -u | wc -l",
		 e.projector_log);
	FILE *g = popen(grep, "r");
	int skipped = 0;
	ck_assert(g && fscanf(g, "%d", &skipped) == 1);
	pclose(g);
	ck_assert_int_eq(skipped, 2); /* the garbage and the junk; not the corrupt ClockTick */
	env_down(&e);
}
END_TEST

/* ---- loadgen traffic, kill -9 and restart ------------------------------------------------- */

struct truth {
	long messages;         /* distinct message ids */
	long prompt, completion, reasoning;
	long tenants;
	long handoffs;         /* distinct AgentHandoff event ids */
};

/* The independent fold: loadgen's NDJSON for the same seed, counted by message id. */
static void loadgen_truth(const char *args_seed, const char *events, struct truth *t)
{
	char cmd[1024];
	snprintf(cmd, sizeof(cmd), "%s --seed %s --tenants 20 --events %s --duplicates 10 --dry-run 2>/dev/null",
		 tly_test_bin("tally-loadgen"), args_seed, events);
	FILE *f = popen(cmd, "r");
	ck_assert_ptr_nonnull(f);
	json_t *messages = json_object(), *handoffs = json_object(), *tenants = json_object();
	char *line = NULL;
	size_t cap = 0;
	memset(t, 0, sizeof(*t));
	while (getline(&line, &cap, f) > 0) {
		json_error_t jerr;
		json_t *o = json_loads(line, 0, &jerr);
		ck_assert_msg(o != NULL, "loadgen line does not parse: %s", jerr.text);
		const char *type = json_string_value(json_object_get(o, "type"));
		const char *tenant = json_string_value(json_object_get(o, "tenant_id"));
		if (type && tenant && strcmp(type, "TenantCreated") == 0)
			json_object_set_new(tenants, tenant, json_true());
		if (type && strcmp(type, "MessageAppended") == 0) {
			const char *mid = json_string_value(json_object_get(o, "message_id"));
			if (mid && !json_object_get(messages, mid)) {
				json_object_set_new(messages, mid, json_true());
				t->prompt += (long)json_integer_value(json_object_get(o, "prompt_tokens"));
				t->completion += (long)json_integer_value(json_object_get(o, "completion_tokens"));
				t->reasoning += (long)json_integer_value(json_object_get(o, "reasoning_tokens"));
			}
		}
		if (type && strcmp(type, "AgentHandoff") == 0)
			json_object_set_new(handoffs, json_string_value(json_object_get(o, "event_id")),
					    json_true());
		json_decref(o);
	}
	free(line);
	ck_assert_int_eq(pclose(f), 0);
	t->messages = (long)json_object_size(messages);
	t->handoffs = (long)json_object_size(handoffs);
	t->tenants = (long)json_object_size(tenants);
	json_decref(messages);
	json_decref(handoffs);
	json_decref(tenants);
}

static void run_loadgen(struct env *e, const char *seed, const char *events)
{
	char kset[600], out[4096];
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", e->b.bootstraps);
	char *const argv[] = {(char *)tly_test_bin("tally-loadgen"), "--seed", (char *)seed, "--tenants",
			      "20", "--events", (char *)events, "--duplicates", "10", "-s", kset, NULL};
	int rc = tly_proc_run(argv, out, sizeof(out));
	ck_assert_msg(rc == 0, "tally-loadgen exited %d: %s", rc, out);
}

/* The projections agree with the independent count and with the ledger's entries. */
static void check_against_truth(struct env *e, const struct truth *t)
{
	char want[256];
	snprintf(want, sizeof(want), "%ld %ld %ld %ld", t->messages, t->prompt, t->completion, t->reasoning);
	wait_for(e, "SELECT concat_ws(' ', count(*), sum(token_count_prompt), sum(token_count_completion), "
		    "sum(reasoning_tokens)) FROM agent_messages", want, 60000);
	expect(e->d.conn, "SELECT concat_ws(' ', sum(message_count), sum(total_tokens_prompt), "
			  "sum(total_tokens_completion), sum(reasoning_tokens)) FROM agent_conversations", want);
	snprintf(want, sizeof(want), "%ld", t->handoffs);
	expect(e->d.conn, "SELECT sum(handoff_count) FROM agent_conversations", want);
	snprintf(want, sizeof(want), "%ld", t->tenants);
	expect(e->d.conn, "SELECT count(*) FROM tenant_accounts WHERE slug <> ''", want);
	/* what the tenant key agent_messages had (migration 0009) would have refused: none */
	expect(e->d.conn, MESSAGES_UNREFERENCED, "0");
	/* positions 0..n-1 per conversation */
	expect(e->d.conn, "SELECT count(*) FROM (SELECT conversation_id FROM agent_messages GROUP BY 1 "
			  "HAVING min(position) <> 0 OR max(position) <> count(*) - 1) x", "0");
	/* every tenant's balance row is its last ledger entry */
	int64_t mismatched = -1;
	struct tly_pg_error err;
	for (int64_t deadline = tly_clock_ms() + 60000; mismatched != 0 && tly_clock_ms() < deadline;) {
		ck_assert_msg(tly_compare_balances(e->d.conn, &mismatched, &err) == 0, "%s", err.message);
		if (mismatched != 0)
			usleep(100000);
	}
	ck_assert_msg(mismatched == 0, "%lld tenant(s) whose balance is not their last entry (see %s)",
		      (long long)mismatched, e->projector_log);
	/* one invoice row per invoice entry, with its amount */
	expect(e->d.conn, "SELECT (SELECT count(*) FROM ledger_entries WHERE kind = 'invoice') - "
			  "(SELECT count(*) FROM subscription_invoices i JOIN ledger_entries l ON "
			  "l.kind = 'invoice' AND l.ref_id = i.id AND l.amount_cents = i.amount_cents)", "0");
	/* api usage counts each model call once */
	expect(e->d.conn, "SELECT (SELECT sum(request_count) FROM api_usage) = "
			  "(SELECT count(*) FROM projector_api_calls)", "t");
}

START_TEST(loadgen_kill_restart)
{
	struct env e;
	struct truth t;
	env_up(&e);
	loadgen_truth("7", "3000", &t);
	ck_assert_int_gt(t.messages, 100);
	run_loadgen(&e, "7", "3000");
	/* kill -9 while it works through the traffic */
	wait_for(&e, "SELECT count(*) > 0 FROM agent_messages", "t", 60000);
	ck_assert_int_eq(kill(e.projector, SIGKILL), 0);
	int status = 0;
	ck_assert_int_eq(tly_proc_wait(e.projector, 10000, &status), 0);
	long partial = q_long(e.d.conn, "SELECT count(*) FROM agent_messages");
	ck_assert_int_lt(partial, t.messages + 1);
	e.projector = projector_respawn(&e); /* the kill may have come after the last batch */
	check_against_truth(&e, &t);
	/* a clean stop and restart, and everything read again from the start: nothing double counts */
	projector_stop(&e);
	char *before = digest(e.d.conn);
	char *consumed = q_text(e.d.conn, "SELECT sum(next_offset) FROM consumer_offsets "
					   "WHERE consumer = 'tally-projector'");
	ck_assert(tly_pg_exec(e.d.conn, "UPDATE consumer_offsets SET next_offset = 0 "
			      "WHERE consumer = 'tally-projector'", 0, NULL, NULL) == 0);
	e.projector = projector_spawn(&e);
	wait_for(&e, "SELECT sum(next_offset) FROM consumer_offsets WHERE consumer = 'tally-projector'",
		 consumed, 60000);
	free(consumed);
	/*
	 * The partitions were folded over two connections (lanes), each committing its own offsets.
	 * Here, where every partition was read again, both lanes had batches: a lane connects at its
	 * first batch, and the projector restarted after kill -9 may have had none for one of them.
	 * Waited for, as the stopped projector's backends leave pg_stat_activity after it exits.
	 */
	wait_for(&e, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tally-projector' "
		     "AND datname = current_database()", "2", 60000);
	/*
	 * Stopped at once: a batch's rows commit with its offsets in one transaction, so the offsets
	 * back at consumed mean every record was folded again, and the stop returns once the
	 * projector exited 0 (nothing is written after); a record folded twice shows in the digest.
	 */
	projector_stop(&e);
	char *after = digest(e.d.conn);
	ck_assert_str_eq(before, after);
	check_against_truth(&e, &t);
	free(before);
	free(after);
	env_down(&e);
}
END_TEST

/* The projector's tally.events offsets equal the ledger's, partition by partition. */
#define EVENTS_CAUGHT_UP                                                                          \
	"SELECT count(*) > 0 AND bool_and(p.next_offset IS NOT DISTINCT FROM l.next_offset) "         \
	"FROM consumer_offsets l LEFT JOIN consumer_offsets p ON p.consumer = 'tally-projector' "    \
	"AND p.topic = l.topic AND p.partition = l.partition "                                       \
	"WHERE l.consumer = 'tally-ledger' AND l.topic = 'tally.events'"

/* Whether the file at path contains needle. */
static bool file_has(const char *path, const char *needle)
{
	size_t cap = 1 << 22;
	char *text = malloc(cap);
	FILE *f = fopen(path, "r");
	ck_assert(text && f);
	size_t n = fread(text, 1, cap - 1, f);
	fclose(f);
	text[n] = '\0';
	bool found = strstr(text, needle) != NULL;
	free(text);
	return found;
}

/*
 * Another process commits the stored offsets while the projector runs (the test moves every
 * tally.events offset one record on): the projector's next batch fails its compare-and-set and
 * is rolled back, and it goes on from the offsets the other process stored to the topic's end.
 */
START_TEST(fenced_by_moved_offsets)
{
	static const char fenced[] = "another process moved a stored offset";
	struct env e;
	env_up(&e);
	run_loadgen(&e, "8", "300");
	wait_for(&e, EVENTS_CAUGHT_UP, "t", 60000);
	ck_assert_int_eq(q_long(e.d.conn, "SELECT count(*) FROM consumer_offsets "
					  "WHERE consumer = 'tally-projector' AND topic = 'tally.events'"),
			 PARTITIONS);
	ck_assert(!file_has(e.projector_log, fenced));
	ck_assert(tly_pg_exec(e.d.conn, "UPDATE consumer_offsets SET next_offset = next_offset + 1 "
			      "WHERE consumer = 'tally-projector' AND topic = 'tally.events'", 0, NULL,
			      NULL) == 0);
	/* more traffic: ClockTicks reach every partition, so the moved ones get batches */
	run_loadgen(&e, "9", "300");
	for (int64_t give_up = tly_clock_ms() + 60000; !file_has(e.projector_log, fenced);) {
		ck_assert_msg(tly_clock_ms() < give_up, "no batch was fenced (see %s)", e.projector_log);
		usleep(100000);
	}
	wait_for(&e, EVENTS_CAUGHT_UP, "t", 60000);
	env_down(&e);
}
END_TEST

Suite *projector_suite(void)
{
	Suite *s = suite_create("projector");
	TCase *tc = tcase_create("fold");
	tcase_add_test(tc, field_json_as_event_json);
	tcase_add_test(tc, fold_direct);
	tcase_add_test(tc, flush_in_flight);
	tcase_add_test(tc, wallet_events_no_seen_row);
	tcase_add_test(tc, session_without_jit);
	tcase_add_test(tc, entry_runs);
	tcase_add_test(tc, conversation_one_update);
	tcase_add_test(tc, monthly_cost_written_when_changed);
	tcase_add_test(tc, message_id_race_retried);
	tcase_add_test(tc, seen_event_race_retried);
	tcase_add_test(tc, api_call_once_across_batches);
	tcase_add_test(tc, memfold_equals_fold);
	tcase_add_test(tc, ledger_gap_read_back);
	tcase_set_timeout(tc, 60);
	suite_add_tcase(s, tc);
	tc = tcase_create("daemon");
	tcase_add_test(tc, scenario);
	tcase_add_test(tc, loadgen_kill_restart);
	tcase_add_test(tc, fenced_by_moved_offsets);
	tcase_set_timeout(tc, 240);
	suite_add_tcase(s, tc);
	return s;
}
