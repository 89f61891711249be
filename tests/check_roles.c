/* Roles and tenant isolation (migrations/0004_roles.sql): log in as each role and show what it cannot do. */
#include <check.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "pg.h"
#include "suites.h"

#define TENANT_A "aaaaaaaa-0000-4000-8000-00000000000a"
#define TENANT_B "bbbbbbbb-0000-4000-8000-00000000000b"
#define STARTER_ID "3fa09318-72db-4d77-8517-623d07bcd2c4"
#define DENIED "42501" /* insufficient_privilege, also a row-level security violation */

/* The system of record; every other table of the schema is a projection. */
static const char *const ledger_tables[] = {"ledger_entries",   "consumer_offsets", "topic_partitions",
					    "quarantine",       "ledger_wallets",   "ledger_published",
					    "ledger_holds",     "ledger_input_batches", "schema_migrations"};

/* Login roles for the tests, one member of each service role (cluster-wide, created once). */
static const char create_logins_sql[] =
	"DO $$ DECLARE r text; BEGIN "
	"FOREACH r IN ARRAY ARRAY['analyst', 'projector', 'ledger', 'auditor'] LOOP "
	"  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tly_test_' || r) THEN "
	"    BEGIN "
	"      EXECUTE format('CREATE ROLE %I LOGIN IN ROLE %I', 'tly_test_' || r, 'tally_' || r); "
	"    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; "
	"    END; "
	"  END IF; "
	"END LOOP; END $$";

/* Two tenants' rows in every tenant-scoped projection table ($1 tenant, $2 slug). */
static const char *const fixture_sql[] = {
	"INSERT INTO tenant_accounts (id, slug, name, created_at, updated_at) "
	"VALUES ($1, $2, $2, now(), now())",
	"INSERT INTO users (id, tenant_id, display_name, created_at, updated_at) "
	"SELECT gen_random_uuid(), $1, $2, now(), now() FROM generate_series(1, 2)",
	"INSERT INTO agent_conversations (id, tenant_id, user_id, agent_entrypoint, status, "
	"created_at, updated_at) SELECT gen_random_uuid(), $1, u.id, $2, 'active', now(), now() "
	"FROM users u WHERE u.tenant_id = $1",
	"INSERT INTO agent_messages (message_id, tenant_id, conversation_id, position, role, content, "
	"content_checksum, created_at) SELECT gen_random_uuid(), $1, c.id, 0, 'user', "
	"jsonb_build_object('text', $2::text), md5($2), now() FROM agent_conversations c "
	"WHERE c.tenant_id = $1",
	"INSERT INTO tenant_subscriptions (id, tenant_id, plan_id, plan_code, status, billing_email, starts_at, "
	"current_period_start, current_period_end, price_cents, currency, tokens_per_period, "
	"created_at, updated_at) VALUES (gen_random_uuid(), $1, '" STARTER_ID "', 'starter', "
	"'active', $2, now(), now(), now() + interval '1 month', 1900, 'USD', 1000000, now(), now())",
	"INSERT INTO subscription_invoices (id, tenant_id, subscription_id, ledger_seq, period_start, "
	"period_end, amount_cents, currency, status, created_at, updated_at) SELECT gen_random_uuid(), "
	"$1, s.id, 1, s.current_period_start, s.current_period_end, 1900, 'USD', 'issued', now(), "
	"now() FROM tenant_subscriptions s WHERE s.tenant_id = $1",
	"INSERT INTO subscription_usage (id, tenant_id, subscription_id, feature_key, unit, quantity, "
	"reported_at, external_event_id) SELECT gen_random_uuid(), $1, s.id, 'api_calls', 'call', 3, "
	"now(), $2 FROM tenant_subscriptions s WHERE s.tenant_id = $1",
	"INSERT INTO token_balances (tenant_id, subscription_id, tokens_limit, tokens_remaining, "
	"updated_at) SELECT $1, s.id, 1000000, 1000000, now() FROM tenant_subscriptions s "
	"WHERE s.tenant_id = $1",
	"INSERT INTO api_usage (tenant_id, provider, model, usage_date, total_tokens, updated_at) "
	"VALUES ($1, 'openai', $2, current_date, 10, now())",
};

/* A table of the schema as the catalog shows it. */
struct table {
	char name[64];
	char tenant_col[64]; /* "" when the table holds no tenant's data */
	bool ledger;         /* one of ledger_tables */
	bool force_rls;      /* relrowsecurity and relforcerowsecurity */
	bool analyst_read;   /* tally_analyst may SELECT it */
};

struct env {
	struct tly_test_db db;
	struct table tables[64];
	int ntables;
	PGconn *analyst, *projector, *ledger, *auditor;
};

/* ---- helpers ---------------------------------------------------------------------------- */

static PGconn *connect_as(const struct env *e, const char *user)
{
	char conninfo[2048], errstr[512];
	/* In a key=value string the last user= wins (the harness writes key='value' strings). */
	snprintf(conninfo, sizeof(conninfo), "%s user='%s'", e->db.conninfo, user);
	PGconn *conn = tly_pg_connect(conninfo, "check_roles", errstr, sizeof(errstr));
	ck_assert_msg(conn != NULL, "could not connect as \"%s\": %s", user, errstr);
	return conn;
}

/* Run sql; sqlstate NULL: it must succeed, else it must fail with that SQLSTATE. */
static void expect_state(PGconn *conn, const char *who, const char *sqlstate, const char *sql,
			 int n, const char *const *vals)
{
	struct tly_pg_error err;
	int rc = tly_pg_exec(conn, sql, n, vals, &err);
	if (!sqlstate) {
		ck_assert_msg(rc == 0, "%s: %s: %s", who, sql, err.message);
		return;
	}
	ck_assert_msg(rc == TLY_E_PG, "%s: %s: succeeded, expected SQLSTATE %s", who, sql, sqlstate);
	ck_assert_msg(strcmp(err.sqlstate, sqlstate) == 0, "%s: %s: got %s, expected SQLSTATE %s", who,
		      sql, err.message, sqlstate);
}

static long query_long(PGconn *conn, const char *who, const char *sql, int n,
		       const char *const *vals)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, n, vals, &err);
	ck_assert_msg(res != NULL, "%s: %s: %s", who, sql, err.message);
	ck_assert_int_eq(PQntuples(res), 1);
	long v = atol(PQgetvalue(res, 0, 0));
	PQclear(res);
	return v;
}

/* "SELECT count(*) FROM t [WHERE col = $1 | WHERE col IS DISTINCT FROM $1]" into sql. */
static void count_sql(PGconn *conn, const struct table *t, const char *where, char *sql, size_t len)
{
	char *tbl = PQescapeIdentifier(conn, t->name, strlen(t->name));
	char *col = PQescapeIdentifier(conn, t->tenant_col, strlen(t->tenant_col));
	ck_assert_ptr_nonnull(tbl);
	ck_assert_ptr_nonnull(col);
	if (!where)
		snprintf(sql, len, "SELECT count(*) FROM %s", tbl);
	else
		snprintf(sql, len, "SELECT count(*) FROM %s WHERE %s %s $1::uuid", tbl, col, where);
	PQfreemem(tbl);
	PQfreemem(col);
}

/* Statement text with the table's quoted name in place of %s. */
static void table_sql(PGconn *conn, const struct table *t, const char *fmt, char *sql, size_t len)
{
	char *tbl = PQescapeIdentifier(conn, t->name, strlen(t->name));
	ck_assert_ptr_nonnull(tbl);
	snprintf(sql, len, fmt, tbl, tbl);
	PQfreemem(tbl);
}

static bool is_ledger_table(const char *name)
{
	for (size_t i = 0; i < sizeof(ledger_tables) / sizeof(ledger_tables[0]); i++) {
		if (strcmp(ledger_tables[i], name) == 0)
			return true;
	}
	return false;
}

/* Every table of the public schema, from the catalog (a new table cannot be forgotten). */
static void load_tables(struct env *e)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(
		e->db.conn,
		"SELECT c.relname, "
		"       CASE WHEN EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid "
		"                         AND a.attname = 'tenant_id' AND a.attnum > 0 "
		"                         AND NOT a.attisdropped) THEN 'tenant_id' "
		"            WHEN c.relname = 'tenant_accounts' THEN 'id' ELSE '' END, "
		"       c.relrowsecurity AND c.relforcerowsecurity, "
		"       has_table_privilege('tally_analyst', c.oid, 'SELECT') "
		"FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace "
		"AND c.relkind IN ('r', 'p') ORDER BY c.relname",
		0, NULL, &err);
	ck_assert_msg(res != NULL, "%s", err.message);
	e->ntables = PQntuples(res);
	ck_assert_int_le(e->ntables, 64);
	for (int i = 0; i < e->ntables; i++) {
		struct table *t = &e->tables[i];
		snprintf(t->name, sizeof(t->name), "%s", PQgetvalue(res, i, 0));
		snprintf(t->tenant_col, sizeof(t->tenant_col), "%s", PQgetvalue(res, i, 1));
		t->force_rls = strcmp(PQgetvalue(res, i, 2), "t") == 0;
		t->analyst_read = strcmp(PQgetvalue(res, i, 3), "t") == 0;
		t->ledger = is_ledger_table(t->name);
	}
	PQclear(res);
}

static void set_tenant(PGconn *conn, const char *tenant)
{
	const char *const v[] = {tenant};
	expect_state(conn, "set tenant", NULL, "SELECT set_config('app.tenant_id', $1, false)", 1, v);
}

static void env_up(struct env *e)
{
	memset(e, 0, sizeof(*e));
	tly_test_db_up(&e->db, "check_roles");
	expect_state(e->db.conn, "superuser", NULL, create_logins_sql, 0, NULL);
	static const char *const tenants[][2] = {{TENANT_A, "a"}, {TENANT_B, "b"}};
	for (size_t t = 0; t < 2; t++) {
		for (size_t i = 0; i < sizeof(fixture_sql) / sizeof(fixture_sql[0]); i++)
			expect_state(e->db.conn, "fixture", NULL, fixture_sql[i],
				     strstr(fixture_sql[i], "$2") ? 2 : 1, tenants[t]);
	}
	load_tables(e);
	ck_assert_int_ge(e->ntables, 17);
	e->analyst = connect_as(e, "tly_test_analyst");
	e->projector = connect_as(e, "tly_test_projector");
	e->ledger = connect_as(e, "tly_test_ledger");
	e->auditor = connect_as(e, "tly_test_auditor");
}

static void env_down(struct env *e)
{
	PQfinish(e->analyst);
	PQfinish(e->projector);
	PQfinish(e->ledger);
	PQfinish(e->auditor);
	tly_test_db_down(&e->db);
}

/* INSERT, UPDATE, DELETE and TRUNCATE of t as conn all fail with insufficient_privilege. */
static void expect_no_write(PGconn *conn, const char *who, const struct table *t)
{
	char sql[512];
	table_sql(conn, t, "INSERT INTO %s DEFAULT VALUES", sql, sizeof(sql));
	expect_state(conn, who, DENIED, sql, 0, NULL);
	/* SET of a column the table surely has: the first one. */
	char *tbl = PQescapeIdentifier(conn, t->name, strlen(t->name));
	ck_assert_ptr_nonnull(tbl);
	const char *const v[] = {t->name};
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, "SELECT attname FROM pg_attribute WHERE attrelid = "
				     "('public.' || quote_ident($1))::regclass AND attnum = 1",
				     1, v, &err);
	ck_assert_msg(res != NULL && PQntuples(res) == 1, "%s: %s", t->name, res ? "" : err.message);
	const char *c0 = PQgetvalue(res, 0, 0);
	char *col = PQescapeIdentifier(conn, c0, strlen(c0));
	ck_assert_ptr_nonnull(col);
	snprintf(sql, sizeof(sql), "UPDATE %s SET %s = %s", tbl, col, col);
	PQfreemem(col);
	PQfreemem(tbl);
	PQclear(res);
	expect_state(conn, who, DENIED, sql, 0, NULL);
	table_sql(conn, t, "DELETE FROM %s", sql, sizeof(sql));
	expect_state(conn, who, DENIED, sql, 0, NULL);
	table_sql(conn, t, "TRUNCATE %s", sql, sizeof(sql));
	expect_state(conn, who, DENIED, sql, 0, NULL);
}

/* ---- the catalog ------------------------------------------------------------------------- */

START_TEST(test_every_tenant_table_forces_rls)
{
	struct env e;
	env_up(&e);
	int projections = 0, tenant_tables = 0;
	for (int i = 0; i < e.ntables; i++) {
		const struct table *t = &e.tables[i];
		const char *const v[] = {t->name};
		ck_assert_msg(query_long(e.db.conn, "catalog",
					 "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
					 "AND tablename = $1 AND tableowner = 'tally_owner'",
					 1, v) == 1,
			      "table \"%s\" is not owned by tally_owner", t->name);
		if (t->tenant_col[0] && !t->ledger) {
			tenant_tables++;
			ck_assert_msg(t->force_rls,
				      "table \"%s\" holds tenant data but row-level security is not "
				      "ENABLEd and FORCEd: call tally_secure_projection() on it",
				      t->name);
		}
		if (!t->ledger) {
			projections++;
			ck_assert_msg(t->force_rls,
				      "projection table \"%s\" lacks FORCEd row-level security: call "
				      "tally_secure_projection() on it", t->name);
		}
	}
	ck_assert_int_ge(projections, 11);
	ck_assert_int_ge(tenant_tables, 9);
	/* Every sequence and function of the schema is the owner's too. */
	ck_assert_int_eq(query_long(e.db.conn, "catalog",
				    "SELECT count(*) FROM pg_class WHERE relnamespace = "
				    "'public'::regnamespace AND relkind = 'S' AND "
				    "relowner <> 'tally_owner'::regrole", 0, NULL), 0);
	ck_assert_int_eq(query_long(e.db.conn, "catalog",
				    "SELECT count(*) FROM pg_proc WHERE pronamespace = "
				    "'public'::regnamespace AND proowner <> 'tally_owner'::regrole",
				    0, NULL), 0);

	/* The check is not vacuous: a table created without the helper is caught, then fixed. */
	expect_state(e.db.conn, "superuser", NULL,
		     "CREATE TABLE late_projection (tenant_id uuid NOT NULL, n bigint NOT NULL)", 0,
		     NULL);
	load_tables(&e);
	bool caught = false;
	for (int i = 0; i < e.ntables; i++) {
		if (strcmp(e.tables[i].name, "late_projection") == 0)
			caught = !e.tables[i].force_rls;
	}
	ck_assert(caught);
	expect_state(e.db.conn, "superuser", NULL,
		     "SELECT tally_secure_projection('late_projection', 'tenant_id', true)", 0, NULL);
	const char *const rows[] = {TENANT_A, TENANT_B};
	expect_state(e.db.conn, "superuser", NULL,
		     "INSERT INTO late_projection VALUES ($1, 1), ($2, 2), ($2, 3)", 2, rows);
	load_tables(&e);
	for (int i = 0; i < e.ntables; i++) {
		if (strcmp(e.tables[i].name, "late_projection") == 0)
			ck_assert(e.tables[i].force_rls);
	}
	set_tenant(e.analyst, TENANT_A);
	ck_assert_int_eq(query_long(e.analyst, "analyst", "SELECT count(*) FROM late_projection",
				    0, NULL), 1);
	/* The helper refuses a tenant column that is not there. */
	expect_state(e.db.conn, "superuser", "42703",
		     "SELECT tally_secure_projection('late_projection', 'no_such_column', true)", 0, NULL);
	env_down(&e);
}
END_TEST

/* ---- the analyst ------------------------------------------------------------------------- */

START_TEST(test_analyst_sees_one_tenant)
{
	struct env e;
	env_up(&e);
	const char *const a[] = {TENANT_A};
	char sql[512];
	int checked = 0;

	/* No tenant set: no rows in any tenant table (and none with an empty setting). */
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 1)
			set_tenant(e.analyst, "");
		for (int i = 0; i < e.ntables; i++) {
			const struct table *t = &e.tables[i];
			if (t->ledger || !t->tenant_col[0] || !t->analyst_read)
				continue;
			count_sql(e.analyst, t, NULL, sql, sizeof(sql));
			ck_assert_msg(query_long(e.analyst, "analyst", sql, 0, NULL) == 0,
				      "analyst without app.tenant_id reads rows of \"%s\"", t->name);
		}
	}

	set_tenant(e.analyst, TENANT_A);
	for (int i = 0; i < e.ntables; i++) {
		const struct table *t = &e.tables[i];
		if (t->ledger)
			continue;
		expect_no_write(e.analyst, "analyst", t);
		if (!t->analyst_read) {
			/* The projector's own state (projector_*): no access at all. */
			count_sql(e.analyst, t, NULL, sql, sizeof(sql));
			expect_state(e.analyst, "analyst", DENIED, sql, 0, NULL);
			continue;
		}
		if (!t->tenant_col[0]) {
			/* Shared by every tenant (the plan catalog): every row. */
			count_sql(e.db.conn, t, NULL, sql, sizeof(sql));
			ck_assert_int_eq(query_long(e.analyst, "analyst", sql, 0, NULL),
					 query_long(e.db.conn, "superuser", sql, 0, NULL));
			continue;
		}
		count_sql(e.db.conn, t, "=", sql, sizeof(sql));
		long mine = query_long(e.db.conn, "superuser", sql, 1, a);
		count_sql(e.db.conn, t, "IS DISTINCT FROM", sql, sizeof(sql));
		long others = query_long(e.db.conn, "superuser", sql, 1, a);
		ck_assert_msg(strncmp(t->name, "projector_", 10) != 0,
			      "\"%s\" is the projector's own state but analysts may read it", t->name);
		ck_assert_msg(mine > 0 && others > 0,
			      "projection table \"%s\" has no rows of both tenants (A %ld, others %ld): "
			      "add them to fixture_sql in tests/check_roles.c", t->name, mine, others);
		count_sql(e.analyst, t, NULL, sql, sizeof(sql));
		ck_assert_msg(query_long(e.analyst, "analyst", sql, 0, NULL) == mine,
			      "analyst of tenant A does not read exactly A's %ld rows of \"%s\"", mine,
			      t->name);
		count_sql(e.analyst, t, "IS DISTINCT FROM", sql, sizeof(sql));
		ck_assert_msg(query_long(e.analyst, "analyst", sql, 1, a) == 0,
			      "analyst of tenant A reads another tenant's rows of \"%s\"", t->name);
		checked++;
	}
	ck_assert_int_ge(checked, 9);

	/* Tenant B's analyst: B's rows only, in one table as a spot check of the setting. */
	set_tenant(e.analyst, TENANT_B);
	ck_assert_int_eq(query_long(e.analyst, "analyst", "SELECT count(*) FROM users", 0, NULL), 2);
	ck_assert_int_eq(query_long(e.analyst, "analyst",
				    "SELECT count(*) FROM users WHERE tenant_id = $1", 1, a), 0);

	/* Nothing of the ledger, the offsets or quarantined bytes. */
	static const char *const hidden[] = {
		"SELECT count(*) FROM ledger_entries", "SELECT count(*) FROM quarantine",
		"SELECT count(*) FROM consumer_offsets", "SELECT count(*) FROM ledger_wallets",
		"SELECT count(*) FROM ledger_published", "SELECT count(*) FROM topic_partitions",
		"SELECT count(*) FROM ledger_holds", "SELECT count(*) FROM ledger_input_batches",
		"SELECT count(*) FROM ledger_inputs"};
	for (size_t i = 0; i < sizeof(hidden) / sizeof(hidden[0]); i++)
		expect_state(e.analyst, "analyst", DENIED, hidden[i], 0, NULL);
	env_down(&e);
}
END_TEST

/* FORCE: a view the owner makes reads as the owner, and the owner too is filtered by tenant. */
START_TEST(test_owner_view_does_not_leak)
{
	struct env e;
	env_up(&e);
	expect_state(e.db.conn, "owner", NULL, "SET ROLE tally_owner", 0, NULL);
	expect_state(e.db.conn, "owner", NULL,
		     "CREATE VIEW all_users AS SELECT id, tenant_id FROM users", 0, NULL);
	expect_state(e.db.conn, "owner", NULL, "GRANT SELECT ON all_users TO tally_analyst", 0, NULL);
	/* The owner itself, without a tenant: nothing. */
	ck_assert_int_eq(query_long(e.db.conn, "owner", "SELECT count(*) FROM users", 0, NULL), 0);
	expect_state(e.db.conn, "owner", NULL, "RESET ROLE", 0, NULL);

	ck_assert_int_eq(query_long(e.analyst, "analyst", "SELECT count(*) FROM all_users", 0, NULL), 0);
	set_tenant(e.analyst, TENANT_A);
	const char *const a[] = {TENANT_A};
	ck_assert_int_eq(query_long(e.analyst, "analyst", "SELECT count(*) FROM all_users", 0, NULL), 2);
	ck_assert_int_eq(query_long(e.analyst, "analyst",
				    "SELECT count(*) FROM all_users WHERE tenant_id <> $1", 1, a), 0);
	env_down(&e);
}
END_TEST

/* ---- the writers and the auditor ---------------------------------------------------------- */

START_TEST(test_projector)
{
	struct env e;
	env_up(&e);
	char sql[512];
	/* Reads and writes every projection row, whatever app.tenant_id says. */
	for (int i = 0; i < e.ntables; i++) {
		const struct table *t = &e.tables[i];
		if (t->ledger)
			continue;
		count_sql(e.db.conn, t, NULL, sql, sizeof(sql));
		ck_assert_int_eq(query_long(e.projector, "projector", sql, 0, NULL),
				 query_long(e.db.conn, "superuser", sql, 0, NULL));
	}
	expect_state(e.projector, "projector", NULL,
		     "INSERT INTO api_usage (tenant_id, provider, model, usage_date, updated_at) "
		     "VALUES ($1, 'anthropic', 'claude', current_date, now())", 1,
		     (const char *const[]){TENANT_B});
	expect_state(e.projector, "projector", NULL,
		     "UPDATE token_balances SET tokens_used = tokens_used + 1", 0, NULL);
	ck_assert_int_eq(query_long(e.projector, "projector",
				    "WITH d AS (DELETE FROM subscription_usage RETURNING 1) "
				    "SELECT count(*) FROM d", 0, NULL), 2);
	expect_state(e.projector, "projector", NULL,
		     "INSERT INTO plan_features (plan_id, feature_key, display_name, created_at) "
		     "VALUES ('" STARTER_ID "', 'extra', 'Extra', now())", 0, NULL);
	/* Reads the ledger (rebuilds fold it), never writes it. */
	expect_state(e.projector, "projector", NULL, "SELECT count(*) FROM ledger_entries", 0, NULL);
	for (int i = 0; i < e.ntables; i++) {
		const struct table *t = &e.tables[i];
		if (strcmp(t->name, "ledger_entries") == 0 || strcmp(t->name, "ledger_wallets") == 0 ||
		    strcmp(t->name, "quarantine") == 0 || strcmp(t->name, "ledger_published") == 0 ||
		    strcmp(t->name, "ledger_holds") == 0 || strcmp(t->name, "ledger_input_batches") == 0 ||
		    strcmp(t->name, "topic_partitions") == 0 || strcmp(t->name, "schema_migrations") == 0)
			expect_no_write(e.projector, "projector", t);
	}
	expect_state(e.projector, "projector", DENIED, "SELECT count(*) FROM quarantine", 0, NULL);
	/* The applied inputs (migration 0010: packed, and the per-record view over them). */
	expect_state(e.projector, "projector", DENIED, "SELECT count(*) FROM ledger_input_batches",
		     0, NULL);
	expect_state(e.projector, "projector", DENIED, "SELECT count(*) FROM ledger_inputs", 0, NULL);
	/* Its own offsets, not the ledger's. */
	expect_state(e.projector, "projector", NULL,
		     "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) "
		     "VALUES ('tally-projector', 'tally.events', 0, 5)", 0, NULL);
	expect_state(e.projector, "projector", DENIED,
		     "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) "
		     "VALUES ('tally-ledger', 'tally.events', 0, 5)", 0, NULL);
	expect_state(e.db.conn, "superuser", NULL,
		     "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) "
		     "VALUES ('tally-ledger', 'tally.events', 1, 7)", 0, NULL);
	ck_assert_int_eq(query_long(e.projector, "projector",
				    "WITH u AS (UPDATE consumer_offsets SET next_offset = 0 "
				    "WHERE consumer = 'tally-ledger' RETURNING 1) SELECT count(*) FROM u",
				    0, NULL), 0);
	expect_state(e.projector, "projector", DENIED,
		     "UPDATE consumer_offsets SET consumer = 'tally-ledger' "
		     "WHERE consumer = 'tally-projector'", 0, NULL);
	ck_assert_int_eq(query_long(e.projector, "projector", "SELECT count(*) FROM consumer_offsets",
				    0, NULL), 2);
	env_down(&e);
}
END_TEST

START_TEST(test_ledger)
{
	struct env e;
	env_up(&e);
	/* No projection: neither written nor read. */
	for (int i = 0; i < e.ntables; i++) {
		const struct table *t = &e.tables[i];
		if (t->ledger)
			continue;
		char sql[512];
		count_sql(e.ledger, t, NULL, sql, sizeof(sql));
		expect_state(e.ledger, "ledger", DENIED, sql, 0, NULL);
		expect_no_write(e.ledger, "ledger", t);
	}
	/* Its own tables; entries are append-only. */
	expect_state(e.ledger, "ledger", NULL, "SELECT count(*) FROM ledger_entries", 0, NULL);
	/* Entries go in by COPY, which PostgreSQL refuses on a table with row-level security. */
	PGresult *res = PQexec(e.ledger, "COPY ledger_entries (tenant_id) FROM STDIN");
	ck_assert_msg(PQresultStatus(res) == PGRES_COPY_IN, "ledger: COPY ledger_entries: %s",
		      PQresultErrorMessage(res));
	PQclear(res);
	ck_assert_int_eq(PQputCopyEnd(e.ledger, NULL), 1);
	res = PQgetResult(e.ledger);
	ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK, "ledger: COPY ledger_entries: %s",
		      PQresultErrorMessage(res));
	PQclear(res);
	while ((res = PQgetResult(e.ledger)) != NULL)
		PQclear(res);
	expect_state(e.ledger, "ledger", DENIED, "UPDATE ledger_entries SET reason = 'x'", 0, NULL);
	expect_state(e.ledger, "ledger", DENIED, "DELETE FROM ledger_entries", 0, NULL);
	expect_state(e.ledger, "ledger", DENIED, "TRUNCATE ledger_entries", 0, NULL);
	expect_state(e.ledger, "ledger", NULL,
		     "INSERT INTO quarantine (topic, partition, \"offset\", value, reason) "
		     "VALUES ('tally.events', 0, 1, '\\x00'::bytea, 'bad_magic')", 0, NULL);
	expect_state(e.ledger, "ledger", NULL,
		     "INSERT INTO topic_partitions (topic, partition_count) VALUES ('tally.events', 4)",
		     0, NULL);
	expect_state(e.ledger, "ledger", NULL,
		     "INSERT INTO ledger_published (topic, partition, next_offset) "
		     "VALUES ('tally.ledger', 0, 0)", 0, NULL);
	expect_state(e.ledger, "ledger", NULL,
		     "INSERT INTO ledger_wallets (tenant_id, partition, seq, state) "
		     "VALUES ($1, 0, 0, '{}')", 1, (const char *const[]){TENANT_A});
	expect_state(e.ledger, "ledger", NULL,
		     "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) "
		     "VALUES ('tally-ledger', 'tally.events', 0, 5)", 0, NULL);
	expect_state(e.ledger, "ledger", DENIED,
		     "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) "
		     "VALUES ('tally-projector', 'tally.events', 0, 5)", 0, NULL);
	/* Applied inputs: appended packed, read back through the view; never changed. */
	expect_state(e.ledger, "ledger", NULL,
		     "INSERT INTO ledger_input_batches (partition, first_offset, last_offset, offsets, "
		     "tenant_ids, record_values) VALUES (0, 3, 4, '{3,4}', ARRAY[$1::uuid, NULL], "
		     "ARRAY['\\x00', '\\x01']::bytea[])", 1, (const char *const[]){TENANT_A});
	ck_assert_int_eq(query_long(e.ledger, "ledger",
				    "SELECT count(*) FROM ledger_inputs WHERE tenant_id IS NULL "
				    "AND \"offset\" = 4 AND value = '\\x01'", 0, NULL), 1);
	expect_state(e.ledger, "ledger", DENIED, "UPDATE ledger_input_batches SET last_offset = 3",
		     0, NULL);
	expect_state(e.ledger, "ledger", DENIED, "DELETE FROM ledger_input_batches", 0, NULL);
	env_down(&e);
}
END_TEST

START_TEST(test_auditor)
{
	struct env e;
	env_up(&e);
	char sql[512];
	for (int i = 0; i < e.ntables; i++) {
		const struct table *t = &e.tables[i];
		/* Every row of every table, no tenant filter (cross-checks against the ledger). */
		count_sql(e.auditor, t, NULL, sql, sizeof(sql));
		ck_assert_int_eq(query_long(e.auditor, "auditor", sql, 0, NULL),
				 query_long(e.db.conn, "superuser", sql, 0, NULL));
		expect_no_write(e.auditor, "auditor", t);
	}
	/* The applied inputs record by record, through the view of migration 0010. */
	expect_state(e.db.conn, "superuser", NULL,
		     "INSERT INTO ledger_input_batches (partition, first_offset, last_offset, offsets, "
		     "tenant_ids, record_values) VALUES (1, 0, 2, '{0,2}', '{NULL,NULL}', "
		     "ARRAY['\\x00', '\\x01']::bytea[])",
		     0, NULL);
	ck_assert_int_eq(query_long(e.auditor, "auditor", "SELECT sum(\"offset\") FROM ledger_inputs",
				    0, NULL), 2);
	env_down(&e);
}
END_TEST

/* ---- the schema ---------------------------------------------------------------------------- */

START_TEST(test_only_owner_changes_schema)
{
	struct env e;
	env_up(&e);
	PGconn *const conns[] = {e.analyst, e.projector, e.ledger, e.auditor};
	static const char *const names[] = {"analyst", "projector", "ledger", "auditor"};
	static const char *const ddl[] = {
		"CREATE TABLE intruder (i int)",
		"CREATE SCHEMA intruder",
		"CREATE VIEW intruder AS SELECT 1",
		"CREATE FUNCTION intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
		"ALTER TABLE users ADD COLUMN intruder int",
		"ALTER TABLE users DISABLE ROW LEVEL SECURITY",
		"ALTER TABLE users NO FORCE ROW LEVEL SECURITY",
		"DROP POLICY tally_tenant_read ON users",
		"CREATE POLICY intruder ON users USING (true)",
		"ALTER TABLE ledger_entries ADD COLUMN intruder int",
		"CREATE INDEX intruder ON ledger_entries (reason)",
		"DROP TABLE users",
		"DROP TABLE ledger_entries",
		"TRUNCATE users",
		"TRUNCATE ledger_entries",
		"TRUNCATE consumer_offsets",
		"GRANT SELECT ON users TO PUBLIC",
		"SELECT tally_secure_projection('users', NULL, true)",
	};
	for (size_t r = 0; r < sizeof(conns) / sizeof(conns[0]); r++) {
		for (size_t i = 0; i < sizeof(ddl) / sizeof(ddl[0]); i++) {
			/*
			 * GRANT by a role holding the privilege without GRANT OPTION is only a warning
			 * ("no privileges were granted"): either way PUBLIC must not gain it.
			 */
			if (strncmp(ddl[i], "GRANT", 5) == 0) {
				struct tly_pg_error err;
				if (tly_pg_exec(conns[r], ddl[i], 0, NULL, &err) != 0)
					ck_assert_msg(strcmp(err.sqlstate, DENIED) == 0, "%s: %s: %s",
						      names[r], ddl[i], err.message);
				ck_assert_int_eq(query_long(e.db.conn, "catalog",
							    "SELECT has_table_privilege('public', "
							    "'users', 'SELECT')::int", 0, NULL), 0);
				continue;
			}
			expect_state(conns[r], names[r], DENIED, ddl[i], 0, NULL);
		}
	}
	/* The owner can. */
	expect_state(e.db.conn, "owner", NULL, "SET ROLE tally_owner", 0, NULL);
	expect_state(e.db.conn, "owner", NULL, "CREATE TABLE owner_table (i int)", 0, NULL);
	expect_state(e.db.conn, "owner", NULL, "ALTER TABLE owner_table ADD COLUMN j int", 0, NULL);
	expect_state(e.db.conn, "owner", NULL, "TRUNCATE owner_table", 0, NULL);
	expect_state(e.db.conn, "owner", NULL, "DROP TABLE owner_table", 0, NULL);
	expect_state(e.db.conn, "owner", NULL, "RESET ROLE", 0, NULL);
	env_down(&e);
}
END_TEST

Suite *roles_suite(void)
{
	Suite *s = suite_create("roles");
	TCase *tc = tcase_create("roles");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_every_tenant_table_forces_rls);
	tcase_add_test(tc, test_analyst_sees_one_tenant);
	tcase_add_test(tc, test_owner_view_does_not_leak);
	tcase_add_test(tc, test_projector);
	tcase_add_test(tc, test_ledger);
	tcase_add_test(tc, test_auditor);
	tcase_add_test(tc, test_only_owner_changes_schema);
	suite_add_tcase(s, tc);
	return s;
}
