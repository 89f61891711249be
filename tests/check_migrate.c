/* Migration runner, baseline schema, PostgreSQL helpers and the throw-away cluster, on real PostgreSQL. */
#include <check.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "devpg.h"
#include "embedded.h"
#include "harness.h"
#include "migrate.h"
#include "pg.h"
#include "suites.h"

#define STARTER_ID "3fa09318-72db-4d77-8517-623d07bcd2c4"
#define PRO_ID "a3c073b5-6121-49e1-8c02-bbfbffaa1a70"
#define TENANT_ID "11111111-1111-4111-8111-111111111111"

/* ---- helpers ---------------------------------------------------------------------------- */

static PGconn *connect_fresh(void)
{
	char errstr[512];
	char *conninfo = tly_test_pg_fresh_db();
	PGconn *conn = tly_pg_connect(conninfo, "check_migrate", errstr, sizeof(errstr));
	ck_assert_msg(conn != NULL, "%s", errstr);
	free(conninfo);
	return conn;
}

static PGconn *connect_migrated(void)
{
	char errstr[512];
	int applied = -1;
	PGconn *conn = connect_fresh();
	struct tly_migrate_set *set = tly_migrate_load_embedded(errstr, sizeof(errstr));
	ck_assert_msg(set != NULL, "%s", errstr);
	ck_assert_msg(tly_migrate_up(conn, set, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_int_eq(applied, (int)tly_migrate_count(set));
	tly_migrate_free(set);
	return conn;
}

/* The single value of a one-row, one-column parameterised query, as a long. */
static long query_long(PGconn *conn, const char *sql, int n, const char *const *vals)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, n, vals, &err);
	ck_assert_msg(res != NULL, "%s: %s", sql, err.message);
	ck_assert_int_eq(PQntuples(res), 1);
	long v = atol(PQgetvalue(res, 0, 0));
	PQclear(res);
	return v;
}

static char *query_text(PGconn *conn, const char *sql, int n, const char *const *vals)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, n, vals, &err);
	ck_assert_msg(res != NULL, "%s: %s", sql, err.message);
	ck_assert_int_eq(PQntuples(res), 1);
	char *v = strdup(PQgetvalue(res, 0, 0));
	PQclear(res);
	return v;
}

/* Run sql; sqlstate NULL: it must succeed, else it must fail with that SQLSTATE. */
static void expect_state(PGconn *conn, const char *sqlstate, const char *sql, int n,
			 const char *const *vals)
{
	struct tly_pg_error err;
	int rc = tly_pg_exec(conn, sql, n, vals, &err);
	if (!sqlstate) {
		ck_assert_msg(rc == 0, "%s: %s", sql, err.message);
		return;
	}
	ck_assert_msg(rc == TLY_E_PG, "%s: succeeded, expected SQLSTATE %s", sql, sqlstate);
	ck_assert_msg(strcmp(err.sqlstate, sqlstate) == 0, "%s: got %s, expected SQLSTATE %s", sql,
		      err.message, sqlstate);
}

static void write_file(const char *dir, const char *name, const char *data, size_t len)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "wb");
	ck_assert_msg(f != NULL, "could not open file \"%s\": %s", path, strerror(errno));
	ck_assert_uint_eq(fwrite(data, 1, len, f), len);
	ck_assert_int_eq(fclose(f), 0);
}

static void write_text(const char *dir, const char *name, const char *text)
{
	write_file(dir, name, text, strlen(text));
}

static void remove_file(const char *dir, const char *name)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	unlink(path);
}

/* A temp dir holding the embedded migrations (as files); caller removes it with remove_dir. */
static char *make_dir_set(void)
{
	char *dir = strdup("/tmp/tally-migrations-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	for (const struct tly_embedded *e = tly_embedded_migrations; e->name; e++)
		write_file(dir, e->name, e->data, e->len);
	return dir;
}

static void remove_dir(char *dir)
{
	char cmd[600];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	ck_assert_int_eq(system(cmd), 0);
	free(dir);
}

static struct tly_migrate_set *load_dir(const char *dir)
{
	char errstr[512];
	struct tly_migrate_set *set = tly_migrate_load_dir(dir, errstr, sizeof(errstr));
	ck_assert_msg(set != NULL, "%s", errstr);
	return set;
}

static int up(PGconn *conn, const struct tly_migrate_set *set, int *applied, char *errstr,
	      size_t errlen)
{
	errstr[0] = '\0';
	return tly_migrate_up(conn, set, applied, errstr, errlen);
}

/* ---- migrate up ------------------------------------------------------------------------ */

START_TEST(test_up_empty_db_twice)
{
	char errstr[512];
	int applied = -1;
	PGconn *conn = connect_fresh();
	struct tly_migrate_set *set = tly_migrate_load_embedded(errstr, sizeof(errstr));
	ck_assert_msg(set != NULL, "%s", errstr);
	ck_assert_uint_ge(tly_migrate_count(set), 1);
	ck_assert_int_ge(tly_migrate_head(set), 1);

	ck_assert_int_eq(tly_migrate_check_head(conn, set, errstr, sizeof(errstr)), TLY_E_MIGRATION);
	ck_assert_msg(strstr(errstr, "schema_migrations") != NULL, "%s", errstr);

	ck_assert_msg(up(conn, set, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_int_eq(applied, (int)tly_migrate_count(set));
	ck_assert_msg(tly_migrate_check_head(conn, set, errstr, sizeof(errstr)) == 0, "%s", errstr);

	/* Second run: nothing to do, nothing changes. */
	char *before = query_text(conn, "SELECT string_agg(version || ' ' || checksum || ' ' || "
				  "applied_at, ',' ORDER BY version) FROM schema_migrations", 0, NULL);
	ck_assert_msg(up(conn, set, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_int_eq(applied, 0);
	char *after = query_text(conn, "SELECT string_agg(version || ' ' || checksum || ' ' || "
				 "applied_at, ',' ORDER BY version) FROM schema_migrations", 0, NULL);
	ck_assert_str_eq(before, after);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM schema_migrations", 0, NULL),
			 (long)tly_migrate_count(set));
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM billing_plans", 0, NULL), 2);

	/* The recorded checksum is the sha256 of the file's bytes. */
	const struct tly_embedded *first = &tly_embedded_migrations[0];
	const char *const name[] = {first->name};
	char *stored = query_text(conn, "SELECT checksum FROM schema_migrations WHERE name = $1", 1,
				  name);
	char *computed = query_text(conn, "SELECT encode(sha256(convert_to($1, 'UTF8')), 'hex')", 1,
				    (const char *const[]){first->data});
	ck_assert_str_eq(stored, computed);
	free(stored);
	free(computed);
	free(before);
	free(after);
	tly_migrate_free(set);
	PQfinish(conn);
}
END_TEST

/* ---- the baseline schema ---------------------------------------------------------------- */

static const char *const all_tables[] = {
	"ledger_entries", "consumer_offsets", "topic_partitions", "quarantine",
	"tenant_accounts", "users", "agent_conversations", "agent_messages",
	"billing_plans", "plan_features", "tenant_subscriptions", "subscription_invoices",
	"subscription_usage", "token_balances", "api_usage", "schema_migrations",
};

static const char *const tenant_tables[] = {
	"ledger_entries", "users", "agent_conversations", "agent_messages",
	"tenant_subscriptions", "subscription_invoices", "subscription_usage", "token_balances",
	"api_usage",
};

START_TEST(test_schema_catalog)
{
	PGconn *conn = connect_migrated();

	for (size_t i = 0; i < sizeof(all_tables) / sizeof(all_tables[0]); i++) {
		const char *const t[] = {all_tables[i]};
		ck_assert_msg(query_long(conn,
					 "SELECT count(*) FROM information_schema.tables "
					 "WHERE table_schema = 'public' AND table_name = $1",
					 1, t) == 1,
			      "table %s is missing", t[0]);
		ck_assert_msg(query_long(conn,
					 "SELECT count(*) FROM pg_constraint "
					 "WHERE conrelid = $1::regclass AND contype = 'p'",
					 1, t) == 1,
			      "table %s has no primary key", t[0]);
	}
	for (size_t i = 0; i < sizeof(tenant_tables) / sizeof(tenant_tables[0]); i++) {
		const char *const t[] = {tenant_tables[i]};
		ck_assert_msg(query_long(conn,
					 "SELECT count(*) FROM information_schema.columns "
					 "WHERE table_schema = 'public' AND table_name = $1 "
					 "AND column_name = 'tenant_id' AND data_type = 'uuid' "
					 "AND is_nullable = 'NO'",
					 1, t) == 1,
			      "table %s has no tenant_id", t[0]);
	}

	/* The ledger's key is (tenant_id, seq), and its two lookup indexes exist. */
	char *key = query_text(conn,
			       "SELECT string_agg(a.attname, ',' ORDER BY k.ord) "
			       "FROM pg_constraint c, unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord), "
			       "pg_attribute a WHERE c.conrelid = 'ledger_entries'::regclass "
			       "AND c.contype = 'p' AND a.attrelid = c.conrelid AND a.attnum = k.attnum",
			       0, NULL);
	ck_assert_str_eq(key, "tenant_id,seq");
	free(key);
	const char *const idx[][1] = {{"%(tenant_id, cause_event_id)%"},
				      {"%(cause_partition, cause_offset)%"}};
	for (size_t i = 0; i < 2; i++)
		ck_assert_msg(query_long(conn,
					 "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' "
					 "AND tablename = 'ledger_entries' AND indexdef LIKE $1",
					 1, idx[i]) == 1,
			      "no index %s on ledger_entries", idx[i][0]);
	const char *const qkey[] = {"%UNIQUE%(topic, partition, \"offset\")%"};
	ck_assert_int_eq(query_long(conn,
				    "SELECT count(*) FROM pg_constraint WHERE conrelid = "
				    "'quarantine'::regclass AND pg_get_constraintdef(oid) LIKE $1",
				    1, qkey),
			 1);

	/* Foreign keys follow the ERD. */
	static const char *const fks[][2] = {
		{"users", "tenant_accounts"},
		{"agent_conversations", "tenant_accounts"},
		{"agent_conversations", "users"},
		{"plan_features", "billing_plans"},
		{"tenant_subscriptions", "tenant_accounts"},
		{"tenant_subscriptions", "billing_plans"},
		{"subscription_invoices", "tenant_subscriptions"},
		{"subscription_usage", "tenant_subscriptions"},
		{"token_balances", "tenant_accounts"},
		{"api_usage", "tenant_accounts"},
		{"agent_messages", "agent_conversations"},
	};
	for (size_t i = 0; i < sizeof(fks) / sizeof(fks[0]); i++)
		ck_assert_msg(query_long(conn,
					 "SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
					 "AND conrelid = $1::regclass AND confrelid = $2::regclass",
					 2, fks[i]) == 1,
			      "no foreign key %s -> %s", fks[i][0], fks[i][1]);
	/* agent_messages keeps only the seeds' key: migration 0009 dropped the implied tenant key */
	const char *const messages[] = {"agent_messages"};
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
				    "AND conrelid = $1::regclass", 1, messages), 1);

	/* Balances and totals are checked non-negative; deltas are not. */
	static const char *const checks[][2] = {
		{"ledger_entries", "%allowance_remaining >= 0%"},
		{"ledger_entries", "%credits_remaining >= 0%"},
		{"ledger_entries", "%held >= 0%"},
		{"ledger_entries", "%overage_tokens >= 0%"},
		{"ledger_entries", "%amount_cents >= 0%"},
		{"ledger_entries", "%octet_length(hash) = 32%"},
		{"token_balances", "%tokens_remaining >= 0%"},
		{"token_balances", "%credits >= 0%"},
		{"billing_plans", "%price_cents >= 0%"},
		{"subscription_invoices", "%amount_cents >= 0%"},
		{"api_usage", "%cost_micros >= 0%"},
		{"consumer_offsets", "%next_offset >= 0%"},
	};
	for (size_t i = 0; i < sizeof(checks) / sizeof(checks[0]); i++)
		ck_assert_msg(query_long(conn,
					 "SELECT count(*) FROM pg_constraint WHERE contype = 'c' "
					 "AND conrelid = $1::regclass AND pg_get_constraintdef(oid) LIKE $2",
					 2, checks[i]) >= 1,
			      "no CHECK %s on %s", checks[i][1], checks[i][0]);
	ck_assert_int_eq(query_long(conn,
				    "SELECT count(*) FROM pg_constraint WHERE contype = 'c' AND "
				    "conrelid = 'ledger_entries'::regclass AND "
				    "pg_get_constraintdef(oid) LIKE '%delta%'",
				    0, NULL),
			 0);

	/* No floating point or numeric for money, no timestamps without time zone, JSONB only. */
	ck_assert_int_eq(query_long(conn,
				    "SELECT count(*) FROM information_schema.columns "
				    "WHERE table_schema = 'public' AND data_type IN ('real', "
				    "'double precision', 'numeric', 'money', 'json', "
				    "'timestamp without time zone')",
				    0, NULL),
			 0);
	ck_assert_int_eq(query_long(conn,
				    "SELECT count(*) FROM information_schema.columns "
				    "WHERE table_schema = 'public' AND data_type = 'jsonb' AND "
				    "column_name IN ('content', 'lines', 'metadata_json', "
				    "'feature_toggles', 'metered_prices')",
				    0, NULL),
			 6);
	PQfinish(conn);
}
END_TEST

#define LEDGER_INSERT                                                                              \
	"INSERT INTO ledger_entries (tenant_id, seq, kind, cause_event_id, cause_type, "           \
	"cause_partition, cause_offset, allowance_delta, allowance_remaining, credits_remaining, " \
	"held, overage_tokens, ledger_time, prev_hash, hash, cause_digest) VALUES ($1, $2, "       \
	"'debit', '22222222-2222-4222-8222-222222222222', 'TokensDebited', 0, 7, $3, $4, 0, $5, 0, " \
	"'2025-01-01 00:00:00+00', decode(repeat('00', 32), 'hex'), "                               \
	"decode(repeat('ab', $6::int), 'hex'), decode(repeat('cd', 32), 'hex'))"

/* A fresh database whose schema is as it was before one migration, then brought to it. */
struct before {
	PGconn *conn;
	char *dir;                    /* a copy of the embedded set without m and every later one */
	const struct tly_embedded *m; /* the migration set aside */
};

/* The schema as it was before migration prefix ("0008_"): the ones before it applied. */
static void schema_before(struct before *b, const char *prefix)
{
	char errstr[512];
	int applied = -1;
	b->conn = connect_fresh();
	b->dir = make_dir_set();
	b->m = NULL;
	for (const struct tly_embedded *e = tly_embedded_migrations; e->name; e++) {
		if (strncmp(e->name, prefix, strlen(prefix)) == 0)
			b->m = e;
		if (strcmp(e->name, prefix) >= 0)
			remove_file(b->dir, e->name);
	}
	ck_assert_ptr_nonnull(b->m);
	struct tly_migrate_set *set = load_dir(b->dir);
	ck_assert_msg(up(b->conn, set, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	tly_migrate_free(set);
}

/* The migration set aside applied (it alone) over the rows stored meanwhile. */
static void apply_set_aside(struct before *b)
{
	char errstr[512];
	int applied = -1;
	write_file(b->dir, b->m->name, b->m->data, b->m->len);
	struct tly_migrate_set *set = load_dir(b->dir);
	ck_assert_msg(up(b->conn, set, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_int_eq(applied, 1);
	tly_migrate_free(set);
}

static void before_down(struct before *b)
{
	remove_dir(b->dir);
	PQfinish(b->conn);
}

/* 0008 marks the first entry of each input record of entries stored before it, and indexes those. */
START_TEST(test_cause_first_backfill)
{
	struct before b;
	schema_before(&b, "0008_");
	PGconn *conn = b.conn;
	const char *const tenants[] = {TENANT_ID, "33333333-3333-4333-8333-333333333333"};
	struct tly_pg_error err;
	/* tenant 1: two entries of the input at offset 7, one of offset 8; tenant 2: one of offset 7 */
	ck_assert_msg(tly_pg_exec(conn,
				  "INSERT INTO ledger_entries (tenant_id, seq, kind, cause_event_id, "
				  "cause_type, cause_partition, cause_offset, allowance_remaining, "
				  "credits_remaining, held, overage_tokens, ledger_time, prev_hash, hash, "
				  "cause_digest) SELECT v.t::uuid, v.s, 'debit', "
				  "'22222222-2222-4222-8222-222222222222', 'TokensDebited', 0, v.o, 0, 0, 0, 0, "
				  "'2025-01-01 00:00:00+00', decode(repeat('00', 32), 'hex'), "
				  "decode(repeat('ab', 32), 'hex'), decode(repeat('cd', 32), 'hex') "
				  "FROM (VALUES ($1, 1, 7), ($1, 2, 7), ($1, 3, 8), ($2, 1, 7)) v (t, s, o)",
				  2, tenants, &err) == 0,
		      "%s", err.message);
	apply_set_aside(&b);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM ledger_entries WHERE cause_first", 0, NULL), 3);
	ck_assert_int_eq(query_long(conn,
				    "SELECT count(*) FROM ledger_entries WHERE cause_first AND "
				    "((tenant_id = $1 AND seq IN (1, 3)) OR (tenant_id = $2 AND seq = 1))",
				    2, tenants),
			 3);
	ck_assert_int_eq(query_long(conn,
				    "SELECT count(*) FROM pg_indexes WHERE tablename = 'ledger_entries' "
				    "AND indexdef LIKE '%(tenant_id, cause_event_id) WHERE cause_first'",
				    0, NULL),
			 1);
	before_down(&b);
}
END_TEST

/*
 * 0010 packs the applied inputs stored before it into batches (ranges of 1,000 offsets of a
 * partition), and the view ledger_inputs gives back every record as it was.
 */
START_TEST(test_inputs_packed)
{
	struct before b;
	schema_before(&b, "0010_");
	PGconn *conn = b.conn;
	struct tly_pg_error err;
	static const char rows[] = "SELECT p, o, CASE WHEN o % 7 = 0 THEN NULL ELSE "
				   "md5(o::text)::uuid END, decode(md5(p || '/' || o), 'hex') "
				   "FROM generate_series(0, 2) p, generate_series(0, 2500) o "
				   "WHERE o % 11 <> 3";
	char sql[512];
	snprintf(sql, sizeof(sql), "INSERT INTO ledger_inputs (partition, \"offset\", tenant_id, value) %s", rows);
	ck_assert_msg(tly_pg_exec(conn, sql, 0, NULL, &err) == 0, "%s", err.message);
	apply_set_aside(&b);
	/* three partitions of offsets 0..2500: 3 ranges of 1,000 each */
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM ledger_input_batches", 0, NULL), 9);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM ledger_input_batches WHERE "
				    "first_offset <> offsets[1] OR last_offset <> offsets[cardinality(offsets)]",
				    0, NULL), 0);
	snprintf(sql, sizeof(sql), "SELECT count(*) FROM ((%s) EXCEPT ALL SELECT * FROM ledger_inputs) d",
		 rows);
	ck_assert_int_eq(query_long(conn, sql, 0, NULL), 0);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM ledger_inputs", 0, NULL), 3 * 2273);
	/* a batch whose arrays disagree is refused */
	expect_state(conn, "23514", "INSERT INTO ledger_input_batches VALUES (5, 1, 2, '{1,2}', "
		     "'{NULL}', ARRAY['\\x00', '\\x01']::bytea[])", 0, NULL);
	before_down(&b);
}
END_TEST

START_TEST(test_schema_rejects_bad_rows)
{
	PGconn *conn = connect_migrated();

	/* A good entry with a negative delta is accepted; a negative balance is not. */
	expect_state(conn, NULL, LEDGER_INSERT, 6,
		     (const char *const[]){TENANT_ID, "1", "-500", "999500", "0", "32"});
	expect_state(conn, "23514", LEDGER_INSERT, 6,
		     (const char *const[]){TENANT_ID, "2", "0", "0", "-1", "32"});
	expect_state(conn, "23514", LEDGER_INSERT, 6,
		     (const char *const[]){TENANT_ID, "2", "0", "-1", "0", "32"});
	expect_state(conn, "23514", LEDGER_INSERT, 6,
		     (const char *const[]){TENANT_ID, "0", "0", "0", "0", "32"});
	expect_state(conn, "23514", LEDGER_INSERT, 6,
		     (const char *const[]){TENANT_ID, "2", "0", "0", "0", "31"});
	expect_state(conn, "23505", LEDGER_INSERT, 6,
		     (const char *const[]){TENANT_ID, "1", "0", "0", "0", "32"});

	/* The class of a constraint violation is permanent (bad data), not retriable. */
	struct tly_pg_error err;
	ck_assert_int_eq(tly_pg_exec(conn, LEDGER_INSERT, 6,
				     (const char *const[]){TENANT_ID, "1", "0", "0", "0", "32"}, &err),
			 TLY_E_PG);
	ck_assert_int_eq(err.errclass, TLY_ERRCLASS_PERMANENT);
	ck_assert_msg(strstr(err.message, "(SQLSTATE 23505)") != NULL, "%s", err.message);

	expect_state(conn, NULL,
		     "INSERT INTO tenant_accounts (id, slug, name, created_at, updated_at) "
		     "VALUES ($1, 'acme', 'Acme', now(), now())",
		     1, (const char *const[]){TENANT_ID});
	expect_state(conn, "23514",
		     "INSERT INTO token_balances (tenant_id, tokens_remaining, updated_at) "
		     "VALUES ($1, $2, now())",
		     2, (const char *const[]){TENANT_ID, "-1"});
	expect_state(conn, NULL,
		     "INSERT INTO token_balances (tenant_id, tokens_remaining, updated_at) "
		     "VALUES ($1, $2, now())",
		     2, (const char *const[]){TENANT_ID, "10"});
	/* One wallet row per tenant and subscription, NULL subscription included. */
	expect_state(conn, "23505",
		     "INSERT INTO token_balances (tenant_id, tokens_remaining, updated_at) "
		     "VALUES ($1, $2, now())",
		     2, (const char *const[]){TENANT_ID, "10"});
	/* a message of a conversation that does not exist (the seeds' key) */
	expect_state(conn, "23503",
		     "INSERT INTO agent_messages (message_id, tenant_id, conversation_id, position, "
		     "role, content, content_checksum, created_at) VALUES "
		     "('33333333-3333-4333-8333-333333333333', $1, "
		     "'44444444-4444-4444-8444-444444444444', 1, 'user', '{\"text\": \"hi\"}', 'x', now())",
		     1, (const char *const[]){TENANT_ID});
	expect_state(conn, "23514",
		     "INSERT INTO agent_messages (message_id, tenant_id, conversation_id, position, "
		     "role, content, content_checksum, created_at) VALUES "
		     "('33333333-3333-4333-8333-333333333333', $1, "
		     "'44444444-4444-4444-8444-444444444444', -1, 'user', '{\"text\": \"hi\"}', 'x', now())",
		     1, (const char *const[]){TENANT_ID});
	expect_state(conn, "23503",
		     "INSERT INTO users (id, tenant_id, display_name, created_at, updated_at) VALUES "
		     "('55555555-5555-4555-8555-555555555555', "
		     "'66666666-6666-4666-8666-666666666666', 'Ann', now(), now())",
		     0, NULL);
	expect_state(conn, "23514",
		     "UPDATE billing_plans SET price_cents = $1 WHERE code = 'starter'", 1,
		     (const char *const[]){"-1"});
	expect_state(conn, "23514",
		     "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) "
		     "VALUES ('ledger', 'tally.events', 0, $1)",
		     1, (const char *const[]){"-1"});
	expect_state(conn, "23514",
		     "INSERT INTO api_usage (tenant_id, provider, model, usage_date, cost_micros, "
		     "updated_at) VALUES ($1, 'openai', 'gpt', '2025-01-01', $2, now())",
		     2, (const char *const[]){TENANT_ID, "-1"});
	expect_state(conn, "23503",
		     "INSERT INTO tenant_subscriptions (id, tenant_id, plan_id, plan_code, status, "
		     "starts_at, current_period_start, current_period_end, price_cents, currency, "
		     "tokens_per_period, created_at, updated_at) VALUES "
		     "('77777777-7777-4777-8777-777777777777', $1, "
		     "'88888888-8888-4888-8888-888888888888', 'x', 'active', now(), now(), "
		     "now() + interval '1 month', 0, 'USD', 0, now(), now())",
		     1, (const char *const[]){TENANT_ID});
	const char *const q[] = {"tally.events", "3", "42"};
	const char *qsql = "INSERT INTO quarantine (topic, partition, \"offset\", value, reason) "
			   "VALUES ($1, $2, $3, '\\x00', 'undecodable')";
	expect_state(conn, NULL, qsql, 3, q);
	expect_state(conn, "23505", qsql, 3, q);
	PQfinish(conn);
}
END_TEST

START_TEST(test_seeds)
{
	PGconn *conn = connect_migrated();
	const char *const starter[] = {STARTER_ID};
	const char *const pro[] = {PRO_ID};
	ck_assert_int_eq(query_long(conn,
				    "SELECT tokens_per_period FROM billing_plans WHERE id = $1 "
				    "AND code = 'starter' AND is_active AND currency = 'USD' "
				    "AND overage_price_micros_per_1k_tokens IS NULL",
				    1, starter),
			 1000000);
	ck_assert_int_eq(query_long(conn,
				    "SELECT tokens_per_period FROM billing_plans WHERE id = $1 "
				    "AND code = 'pro' AND is_active AND price_cents = 9900 "
				    "AND overage_price_micros_per_1k_tokens > 0",
				    1, pro),
			 10000000);
	ck_assert_int_ge(query_long(conn, "SELECT count(*) FROM plan_features WHERE plan_id = $1",
				    1, starter),
			 2);
	ck_assert_int_ge(query_long(conn, "SELECT count(*) FROM plan_features WHERE plan_id = $1",
				    1, pro),
			 2);
	PQfinish(conn);
}
END_TEST

/* ---- refusing a history that cannot continue -------------------------------------------- */

START_TEST(test_changed_and_missing_file_refused)
{
	char errstr[512];
	int applied = -1;
	PGconn *conn = connect_fresh();
	char *dir = make_dir_set();
	write_text(dir, "0902_extra.sql", "CREATE TABLE extra_t (id integer);\n");
	struct tly_migrate_set *set = load_dir(dir);
	ck_assert_msg(up(conn, set, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_int_eq(applied, (int)tly_migrate_count(set));
	tly_migrate_free(set);

	/* Edit the applied file: refused, naming it, and nothing is applied. */
	write_text(dir, "0902_extra.sql", "CREATE TABLE extra_t (id bigint);\n");
	write_text(dir, "0903_more.sql", "CREATE TABLE more_t (id integer);\n");
	set = load_dir(dir);
	ck_assert_int_eq(up(conn, set, &applied, errstr, sizeof(errstr)), TLY_E_MIGRATION);
	ck_assert_int_eq(applied, 0);
	ck_assert_msg(strstr(errstr, "\"0902_extra.sql\"") && strstr(errstr, "changed"), "%s", errstr);
	ck_assert_int_eq(tly_migrate_check_head(conn, set, errstr, sizeof(errstr)), TLY_E_MIGRATION);
	ck_assert_msg(strstr(errstr, "0902_extra.sql") != NULL, "%s", errstr);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM pg_catalog.pg_tables "
					  "WHERE tablename = 'more_t'", 0, NULL),
			 0);
	tly_migrate_free(set);

	/* Remove the applied file: refused, naming it. */
	remove_file(dir, "0902_extra.sql");
	remove_file(dir, "0903_more.sql");
	set = load_dir(dir);
	ck_assert_int_eq(up(conn, set, &applied, errstr, sizeof(errstr)), TLY_E_MIGRATION);
	ck_assert_msg(strstr(errstr, "\"0902_extra.sql\"") && strstr(errstr, "missing"), "%s", errstr);
	ck_assert_int_eq(tly_migrate_check_head(conn, set, errstr, sizeof(errstr)), TLY_E_MIGRATION);
	ck_assert_msg(strstr(errstr, "0902_extra.sql") != NULL, "%s", errstr);
	tly_migrate_free(set);

	set = load_dir(dir);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM schema_migrations", 0, NULL),
			 (long)tly_migrate_count(set) + 1);
	tly_migrate_free(set);
	remove_dir(dir);
	PQfinish(conn);
}
END_TEST

START_TEST(test_out_of_order_refused)
{
	char errstr[512];
	int applied = -1;
	PGconn *conn = connect_fresh();
	char *dir = make_dir_set();
	write_text(dir, "0903_third.sql", "CREATE TABLE third_t (id integer);\n");
	struct tly_migrate_set *set = load_dir(dir);
	ck_assert_msg(up(conn, set, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	tly_migrate_free(set);

	write_text(dir, "0902_late.sql", "CREATE TABLE late_t (id integer);\n");
	set = load_dir(dir);
	ck_assert_int_eq(up(conn, set, &applied, errstr, sizeof(errstr)), TLY_E_MIGRATION);
	ck_assert_msg(strstr(errstr, "\"0902_late.sql\"") && strstr(errstr, "forward only"), "%s",
		      errstr);
	tly_migrate_free(set);
	remove_dir(dir);
	PQfinish(conn);
}
END_TEST

START_TEST(test_failed_migration_rolls_back)
{
	char errstr[512];
	int applied = -1;
	PGconn *conn = connect_fresh();
	char *dir = make_dir_set();
	write_text(dir, "0902_bad.sql",
		   "CREATE TABLE half_t (id integer);\nSELECT * FROM no_such_table;\n");
	struct tly_migrate_set *set = load_dir(dir);
	ck_assert_int_eq(up(conn, set, &applied, errstr, sizeof(errstr)), TLY_E_PG);
	ck_assert_int_eq(applied, (int)tly_migrate_count(set) - 1);
	ck_assert_msg(strstr(errstr, "\"0902_bad.sql\"") && strstr(errstr, "no_such_table") &&
			      strstr(errstr, "SQLSTATE 42P01"),
		      "%s", errstr);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM pg_catalog.pg_tables "
					  "WHERE tablename = 'half_t'", 0, NULL),
			 0);
	/* Every embedded migration before the bad one stays applied. */
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM schema_migrations", 0, NULL),
			 (long)tly_migrate_count(set) - 1);
	/* The lock was released: another session can take it at once. */
	ck_assert_int_eq(query_long(conn, "SELECT pg_try_advisory_lock(6071217663471601991)::int",
				    0, NULL),
			 1);
	tly_migrate_free(set);
	remove_dir(dir);
	PQfinish(conn);
}
END_TEST

START_TEST(test_bad_sets_refused)
{
	char errstr[512];
	char *dir = make_dir_set();
	write_text(dir, "12_short.sql", "SELECT 1;\n");
	ck_assert_ptr_null(tly_migrate_load_dir(dir, errstr, sizeof(errstr)));
	ck_assert_msg(strstr(errstr, "\"12_short.sql\"") != NULL, "%s", errstr);
	remove_file(dir, "12_short.sql");

	write_text(dir, "0902_a.sql", "SELECT 1;\n");
	write_text(dir, "0902_b.sql", "SELECT 1;\n");
	ck_assert_ptr_null(tly_migrate_load_dir(dir, errstr, sizeof(errstr)));
	ck_assert_msg(strstr(errstr, "0902_a.sql") && strstr(errstr, "0902_b.sql"), "%s", errstr);
	remove_file(dir, "0902_b.sql");

	write_text(dir, "README.txt", "not a migration\n");
	struct tly_migrate_set *set = load_dir(dir);
	ck_assert_int_eq(tly_migrate_head(set), 902);
	tly_migrate_free(set);
	ck_assert_ptr_null(tly_migrate_load_dir("/nonexistent/dir", errstr, sizeof(errstr)));
	ck_assert_msg(strstr(errstr, "/nonexistent/dir") != NULL, "%s", errstr);
	remove_dir(dir);
}
END_TEST

/* ---- concurrency and status ------------------------------------------------------------- */

START_TEST(test_concurrent_up)
{
	char *conninfo = tly_test_pg_fresh_db();
	char *dir = make_dir_set();
	/* A slow second migration makes the two runs overlap. */
	write_text(dir, "0902_slow.sql", "SELECT pg_sleep(0.3);\nCREATE TABLE slow_t (id integer);\n");
	pid_t pids[2];
	for (int i = 0; i < 2; i++) {
		pids[i] = fork();
		ck_assert_int_ge(pids[i], 0);
		if (pids[i] == 0) {
			char errstr[512];
			int applied = -1;
			PGconn *conn = tly_pg_connect(conninfo, "check_migrate", errstr, sizeof(errstr));
			struct tly_migrate_set *set =
				conn ? tly_migrate_load_dir(dir, errstr, sizeof(errstr)) : NULL;
			int rc = set ? tly_migrate_up(conn, set, &applied, errstr, sizeof(errstr)) : -1;
			if (rc != 0)
				fprintf(stderr, "concurrent migrate up: %s\n", errstr);
			tly_migrate_free(set);
			PQfinish(conn);
			_exit(rc == 0 ? applied : 100);
		}
	}
	int total = 0;
	for (int i = 0; i < 2; i++) {
		int status = 0;
		ck_assert_int_eq(waitpid(pids[i], &status, 0), pids[i]);
		ck_assert(WIFEXITED(status));
		ck_assert_msg(WEXITSTATUS(status) < 100, "run %d failed", i);
		total += WEXITSTATUS(status);
	}
	struct tly_migrate_set *set = load_dir(dir);
	ck_assert_int_eq(total, (int)tly_migrate_count(set));
	char errstr[512];
	PGconn *conn = tly_pg_connect(conninfo, "check_migrate", errstr, sizeof(errstr));
	ck_assert_msg(conn != NULL, "%s", errstr);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM schema_migrations", 0, NULL),
			 (long)tly_migrate_count(set));
	ck_assert_msg(tly_migrate_check_head(conn, set, errstr, sizeof(errstr)) == 0, "%s", errstr);
	tly_migrate_free(set);
	PQfinish(conn);
	remove_dir(dir);
	free(conninfo);
}
END_TEST

static char *status_text(PGconn *conn, const struct tly_migrate_set *set)
{
	char errstr[512], *text = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);
	ck_assert_ptr_nonnull(f);
	ck_assert_msg(tly_migrate_status(conn, set, f, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_int_eq(fclose(f), 0);
	return text;
}

/* The status line of name in text ends with state (and a time when applied). */
static void assert_status(const char *text, const char *name, const char *state)
{
	const char *line = strstr(text, name);
	ck_assert_msg(line != NULL, "no line for %s in:\n%s", name, text);
	const char *eol = strchr(line, '\n');
	const char *at = strstr(line, state);
	ck_assert_msg(at && (!eol || at < eol), "%s is not %s in:\n%s", name, state, text);
}

START_TEST(test_status)
{
	char errstr[512];
	int applied = -1;
	PGconn *conn = connect_fresh();
	char *dir = make_dir_set();
	struct tly_migrate_set *base = load_dir(dir);
	const char *first = tly_embedded_migrations[0].name;

	char *text = status_text(conn, base);
	assert_status(text, first, "pending");
	ck_assert_ptr_null(strstr(text, "applied"));
	free(text);

	ck_assert_msg(up(conn, base, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	write_text(dir, "0902_next.sql", "CREATE TABLE next_t (id integer);\n");
	struct tly_migrate_set *next = load_dir(dir);
	text = status_text(conn, next);
	assert_status(text, first, "applied");
	assert_status(text, "0902_next.sql", "pending");
	free(text);
	ck_assert_int_eq(tly_migrate_check_head(conn, next, errstr, sizeof(errstr)), TLY_E_MIGRATION);
	ck_assert_msg(strstr(errstr, "1 pending") && strstr(errstr, "0902_next.sql"), "%s", errstr);

	ck_assert_msg(up(conn, next, &applied, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_int_eq(applied, 1);
	text = status_text(conn, base);
	assert_status(text, "0902_next.sql", "missing");
	free(text);
	write_text(dir, "0902_next.sql", "CREATE TABLE next_t (id bigint);\n");
	tly_migrate_free(next);
	next = load_dir(dir);
	text = status_text(conn, next);
	assert_status(text, "0902_next.sql", "changed");
	free(text);

	tly_migrate_free(base);
	tly_migrate_free(next);
	remove_dir(dir);
	PQfinish(conn);
}
END_TEST

/* ---- lib/pg --------------------------------------------------------------------------- */

START_TEST(test_pg_errclass)
{
	ck_assert_int_eq(tly_pg_sqlstate_errclass("40001"), TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("40P01"), TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("08006"), TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("57P01"), TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("53300"), TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_pg_sqlstate_errclass(NULL), TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("23505"), TLY_ERRCLASS_PERMANENT);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("22P02"), TLY_ERRCLASS_PERMANENT);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("TL001"), TLY_ERRCLASS_PERMANENT);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("42P01"), TLY_ERRCLASS_FATAL);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("28000"), TLY_ERRCLASS_FATAL);
	ck_assert_int_eq(tly_pg_sqlstate_errclass("XX000"), TLY_ERRCLASS_FATAL);
	ck_assert_int_eq(tly_pg_errclass(NULL), TLY_ERRCLASS_RETRIABLE);
}
END_TEST

START_TEST(test_pg_session)
{
	char errstr[512];
	struct tly_pg_error err;
	PGconn *conn = connect_fresh();

	char *v = query_text(conn, "SELECT current_setting('search_path') || ' ' || "
			     "current_setting('TimeZone') || ' ' || current_setting('application_name') "
			     "|| ' ' || current_setting('client_encoding')", 0, NULL);
	ck_assert_str_eq(v, "public UTC check_migrate UTF8");
	free(v);
	ck_assert_int_eq(tly_pg_ping(conn, &err), 0);

	/* A missing relation: fatal, in PostgreSQL's words with its SQLSTATE. */
	ck_assert_int_eq(tly_pg_exec(conn, "SELECT * FROM no_such_table", 0, NULL, &err), TLY_E_PG);
	ck_assert_int_eq(err.errclass, TLY_ERRCLASS_FATAL);
	ck_assert_str_eq(err.sqlstate, "42P01");
	ck_assert_str_eq(err.message, "relation \"no_such_table\" does not exist (SQLSTATE 42P01)");

	/* Parameters are values, never SQL. */
	v = query_text(conn, "SELECT $1::text", 1, (const char *const[]){"x'); DROP TABLE t; --"});
	ck_assert_str_eq(v, "x'); DROP TABLE t; --");
	free(v);

	/* Transactions: rollback undoes, a failed transaction cannot commit. */
	ck_assert_int_eq(tly_pg_exec(conn, "CREATE TABLE t (id integer PRIMARY KEY)", 0, NULL, &err), 0);
	ck_assert_int_eq(tly_pg_begin(conn, &err), 0);
	ck_assert_int_eq(tly_pg_exec(conn, "INSERT INTO t VALUES ($1)", 1,
				     (const char *const[]){"1"}, &err),
			 0);
	ck_assert_int_eq(tly_pg_rollback(conn, &err), 0);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM t", 0, NULL), 0);
	ck_assert_int_eq(tly_pg_begin(conn, &err), 0);
	ck_assert_int_eq(tly_pg_exec(conn, "INSERT INTO t VALUES ($1)", 1,
				     (const char *const[]){"1"}, &err),
			 0);
	ck_assert_int_eq(tly_pg_exec(conn, "INSERT INTO t VALUES ($1)", 1,
				     (const char *const[]){"1"}, &err),
			 TLY_E_PG);
	ck_assert_int_eq(tly_pg_commit(conn, &err), TLY_E_PG);
	ck_assert_str_eq(err.sqlstate, "25P02");
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM t", 0, NULL), 0);
	ck_assert_int_eq(tly_pg_begin(conn, &err), 0);
	ck_assert_int_eq(tly_pg_exec(conn, "INSERT INTO t VALUES ($1)", 1,
				     (const char *const[]){"2"}, &err),
			 0);
	ck_assert_int_eq(tly_pg_commit(conn, &err), 0);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM t", 0, NULL), 1);
	PQfinish(conn);

	/* Connection failures say so in one line. */
	ck_assert_ptr_null(tly_pg_connect("host=/nonexistent port=1 dbname=x", "t", errstr,
					  sizeof(errstr)));
	ck_assert_msg(strncmp(errstr, "could not connect to PostgreSQL: ", 33) == 0 &&
			      !strchr(errstr, '\n'),
		      "%s", errstr);
}
END_TEST

/* ---- lib/devpg: the cluster the harness and the dev stack use --------------------------- */

/* Started in the runner process (unchecked fixture), so it is stopped even when a test fails. */
static struct tly_devpg *devpg_fixture;

static void devpg_setup(void)
{
	char errstr[1024];
	devpg_fixture = tly_devpg_start(NULL, errstr, sizeof(errstr));
	ck_assert_msg(devpg_fixture != NULL, "%s", errstr);
}

static void devpg_teardown(void)
{
	tly_devpg_stop(devpg_fixture);
	devpg_fixture = NULL;
}

START_TEST(test_devpg_restart_and_crash)
{
	char errstr[1024];
	struct tly_pg_error err;
	struct tly_devpg *pg = devpg_fixture;
	ck_assert_ptr_nonnull(pg);
	ck_assert_int_gt(tly_devpg_port(pg), 0);
	ck_assert_ptr_nonnull(strstr(tly_devpg_conninfo(pg), tly_devpg_dir(pg)));

	PGconn *conn = tly_pg_connect(tly_devpg_conninfo(pg), "check_devpg", errstr, sizeof(errstr));
	ck_assert_msg(conn != NULL, "%s", errstr);
	ck_assert_int_eq(tly_pg_exec(conn, "CREATE TABLE kept (id integer)", 0, NULL, &err), 0);
	ck_assert_int_eq(tly_pg_exec(conn, "INSERT INTO kept VALUES ($1)", 1,
				     (const char *const[]){"1"}, &err),
			 0);
	/* No TCP listener: only the unix socket. */
	char *listen = query_text(conn, "SELECT current_setting('listen_addresses')", 0, NULL);
	ck_assert_str_eq(listen, "");
	free(listen);
	PQfinish(conn);

	ck_assert_msg(tly_devpg_restart(pg, errstr, sizeof(errstr)) == 0, "%s", errstr);
	conn = tly_pg_connect(tly_devpg_conninfo(pg), "check_devpg", errstr, sizeof(errstr));
	ck_assert_msg(conn != NULL, "%s", errstr);
	ck_assert_int_eq(tly_pg_exec(conn, "INSERT INTO kept VALUES ($1)", 1,
				     (const char *const[]){"2"}, &err),
			 0);

	/* A crash (immediate stop) keeps committed rows; the open connection sees the failure. */
	ck_assert_msg(tly_devpg_halt(pg, true, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_int_eq(tly_pg_exec(conn, "SELECT 1", 0, NULL, &err), TLY_E_PG);
	ck_assert_msg(err.errclass == TLY_ERRCLASS_RETRIABLE, "%s", err.message);
	PQfinish(conn);
	ck_assert_msg(tly_devpg_resume(pg, errstr, sizeof(errstr)) == 0, "%s", errstr);
	conn = tly_pg_connect(tly_devpg_conninfo(pg), "check_devpg", errstr, sizeof(errstr));
	ck_assert_msg(conn != NULL, "%s", errstr);
	ck_assert_int_eq(query_long(conn, "SELECT count(*) FROM kept", 0, NULL), 2);
	PQfinish(conn);
}
END_TEST

/* WAL segments ready ahead of the insert position of pg's cluster. */
static long future_wal_segments(PGconn *conn)
{
	return query_long(conn,
			  "SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$' "
			  "AND name > pg_walfile_name(pg_current_wal_insert_lsn())",
			  0, NULL);
}

START_TEST(test_devpg_durable_prealloc_wal)
{
	char errstr[1024];
	struct tly_devpg *pg = tly_devpg_start_durable(NULL, true, errstr, sizeof(errstr));
	ck_assert_msg(pg != NULL, "%s", errstr);
	PGconn *conn = tly_pg_connect(tly_devpg_conninfo(pg), "check_devpg", errstr, sizeof(errstr));
	ck_assert_msg(conn != NULL, "%s", errstr);
	char *fsync = query_text(conn, "SELECT current_setting('fsync') || ' ' || "
				 "current_setting('synchronous_commit')", 0, NULL);
	ck_assert_str_eq(fsync, "on on");
	free(fsync);
	ck_assert_int_lt(future_wal_segments(conn), 4); /* a fresh cluster zero-fills as it goes */
	ck_assert_msg(tly_devpg_prealloc_wal(pg, errstr, sizeof(errstr)) == 0, "%s", errstr);
	ck_assert_int_ge(future_wal_segments(conn), TLY_DEVPG_PREALLOC_WAL_MB / 16 - 2);
	PQfinish(conn);
	tly_devpg_stop(pg);
}
END_TEST

START_TEST(test_devpg_stop_removes_dir)
{
	char errstr[1024], dir[512];
	struct stat st;
	struct tly_devpg *pg = tly_devpg_start(NULL, errstr, sizeof(errstr));
	if (pg)
		snprintf(dir, sizeof(dir), "%s", tly_devpg_dir(pg));
	tly_devpg_stop(pg);
	ck_assert_msg(pg != NULL, "%s", errstr);
	ck_assert_int_ne(stat(dir, &st), 0);
	tly_devpg_stop(NULL);
}
END_TEST

/* What a child that started a cluster tells its parent. */
struct devpg_child {
	pid_t pid;        /* the child */
	pid_t postmaster; /* its cluster's */
	char dir[128];
	char conninfo[384];
};

/* A child process that starts a cluster under parent and waits until it is killed. */
static void devpg_child_start(const char *parent, struct devpg_child *c)
{
	int fds[2];
	ck_assert_int_eq(pipe(fds), 0);
	memset(c, 0, sizeof(*c));
	c->pid = fork();
	ck_assert_int_ge(c->pid, 0);
	if (c->pid == 0) {
		char errstr[1024];
		struct devpg_child me = {0};
		close(fds[0]);
		(void)prctl(PR_SET_PDEATHSIG, SIGKILL); /* killed with the test if it fails */
		struct tly_devpg *pg = tly_devpg_start(parent, errstr, sizeof(errstr));
		if (pg) {
			me.postmaster = tly_devpg_pid(pg);
			snprintf(me.dir, sizeof(me.dir), "%s", tly_devpg_dir(pg));
			snprintf(me.conninfo, sizeof(me.conninfo), "%s", tly_devpg_conninfo(pg));
		} else
			fprintf(stderr, "child: %s\n", errstr);
		if (write(fds[1], &me, sizeof(me)) != (ssize_t)sizeof(me))
			_exit(1);
		for (;;)
			pause();
	}
	close(fds[1]);
	pid_t pid = c->pid;
	ck_assert_int_eq(read(fds[0], c, sizeof(*c)), (ssize_t)sizeof(*c));
	close(fds[0]);
	c->pid = pid;
	ck_assert_msg(c->postmaster > 0 && c->dir[0], "the child could not start a cluster");
}

static void devpg_child_kill(const struct devpg_child *c)
{
	int status;
	ck_assert_int_eq(kill(c->pid, SIGKILL), 0);
	ck_assert_int_eq(waitpid(c->pid, &status, 0), c->pid);
}

/* Whether pid is a running process (a zombie, its exit not yet reaped, is not). */
static bool process_runs(pid_t pid)
{
	char path[64], state = 'X';
	snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return false;
	if (fscanf(f, "%*d (%*[^)]) %c", &state) != 1)
		state = 'X';
	fclose(f);
	return state != 'Z' && state != 'X';
}

/*
 * A cluster whose creator was killed with SIGKILL (no tly_devpg_stop ran) is stopped and removed
 * by the next start under the same parent dir; one whose creator lives, and a directory without
 * a creator's lock file (being created, or made by an older build), are left alone.
 */
START_TEST(test_devpg_orphans_removed)
{
	char errstr[1024], parent[] = "/tmp/tally-orphans-XXXXXX", legacy[128];
	struct stat st;
	ck_assert_ptr_nonnull(mkdtemp(parent));
	ck_assert_int_eq(chmod(parent, 0755), 0); /* the postgres user, when we are root, enters it */
	snprintf(legacy, sizeof(legacy), "%s/tally-pg-legacy", parent);
	ck_assert_int_eq(mkdir(legacy, 0700), 0);
	struct devpg_child killed, alive;
	devpg_child_start(parent, &killed);
	devpg_child_start(parent, &alive);
	ck_assert(process_runs(killed.postmaster) && process_runs(alive.postmaster));
	devpg_child_kill(&killed);
	ck_assert(process_runs(killed.postmaster)); /* SIGKILL left it behind */
	ck_assert_int_eq(stat(killed.dir, &st), 0);

	struct tly_devpg *pg = tly_devpg_start(parent, errstr, sizeof(errstr));
	ck_assert_msg(pg != NULL, "%s", errstr);
	ck_assert_int_ne(stat(killed.dir, &st), 0);
	/* pg_ctl stop waited for the postmaster's exit; init reaps it (bounded wait) */
	for (int i = 0; i < 200 && process_runs(killed.postmaster); i++)
		usleep(50000);
	ck_assert(!process_runs(killed.postmaster));
	ck_assert_int_eq(stat(alive.dir, &st), 0);
	ck_assert(process_runs(alive.postmaster));
	ck_assert_int_eq(PQping(alive.conninfo), PQPING_OK);
	ck_assert_int_eq(stat(legacy, &st), 0);
	tly_devpg_stop(pg);

	/* the other creator killed too: the next start removes its cluster as well */
	devpg_child_kill(&alive);
	ck_assert_ptr_nonnull(pg = tly_devpg_start(parent, errstr, sizeof(errstr)));
	ck_assert_int_ne(stat(alive.dir, &st), 0);
	tly_devpg_stop(pg);
	for (int i = 0; i < 200 && process_runs(alive.postmaster); i++)
		usleep(50000);
	ck_assert(!process_runs(alive.postmaster));
	ck_assert_int_eq(rmdir(legacy), 0);
	ck_assert_int_eq(rmdir(parent), 0);
}
END_TEST

START_TEST(test_devpg_bad_bindir)
{
	char errstr[1024];
	setenv("TALLY_PG_BINDIR", "/nonexistent/bin", 1);
	struct tly_devpg *pg = tly_devpg_start(NULL, errstr, sizeof(errstr));
	unsetenv("TALLY_PG_BINDIR");
	ck_assert_ptr_null(pg);
	ck_assert_msg(strncmp(errstr, "could not run initdb: ", 22) == 0 && !strchr(errstr, '\n'),
		      "%s", errstr);
}
END_TEST

Suite *migrate_suite(void)
{
	Suite *s = suite_create("migrate");
	TCase *tc = tcase_create("migrate");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_up_empty_db_twice);
	tcase_add_test(tc, test_schema_catalog);
	tcase_add_test(tc, test_schema_rejects_bad_rows);
	tcase_add_test(tc, test_cause_first_backfill);
	tcase_add_test(tc, test_inputs_packed);
	tcase_add_test(tc, test_seeds);
	tcase_add_test(tc, test_changed_and_missing_file_refused);
	tcase_add_test(tc, test_out_of_order_refused);
	tcase_add_test(tc, test_failed_migration_rolls_back);
	tcase_add_test(tc, test_bad_sets_refused);
	tcase_add_test(tc, test_concurrent_up);
	tcase_add_test(tc, test_status);
	suite_add_tcase(s, tc);

	TCase *pg = tcase_create("pg");
	tcase_set_timeout(pg, 30);
	tcase_add_test(pg, test_pg_errclass);
	tcase_add_test(pg, test_pg_session);
	suite_add_tcase(s, pg);

	TCase *devpg = tcase_create("devpg");
	tcase_set_timeout(devpg, 120);
	tcase_add_unchecked_fixture(devpg, devpg_setup, devpg_teardown);
	tcase_add_test(devpg, test_devpg_restart_and_crash);
	tcase_add_test(devpg, test_devpg_stop_removes_dir);
	tcase_add_test(devpg, test_devpg_durable_prealloc_wal);
	tcase_add_test(devpg, test_devpg_bad_bindir);
	tcase_add_test(devpg, test_devpg_orphans_removed);
	suite_add_tcase(s, devpg);
	return s;
}
