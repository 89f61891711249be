-- Roles and tenant isolation (DESIGN.md "Roles"). Runs in one transaction (the migration runner's),
-- as a superuser or a member of tally_owner that owns the tables.
--
--   tally_owner      NOLOGIN; owns every table, sequence and function; nobody logs in as it.
--   tally_ledger     the system of record: appends ledger_entries, writes its consumer_offsets rows,
--                    quarantine, topic_partitions, ledger_wallets, ledger_published. No projections.
--   tally_projector  writes the projection tables and its own consumer_offsets rows (any consumer
--                    but 'tally-ledger'); reads ledger_entries (rebuilds fold them). Cannot write
--                    ledger_entries, ledger_wallets or quarantine.
--   tally_analyst    reads the projection tables only, one tenant at a time: rows whose tenant is
--                    current_setting('app.tenant_id'); no setting, no rows. No ledger tables, no
--                    quarantine (raw bytes), no consumer_offsets.
--   tally_auditor    reads everything (ledger, offsets, quarantine, and every projection row of
--                    every tenant, to cross-check projections against the ledger); writes nothing.
--
-- Roles are cluster-wide and created only when missing (many databases share a cluster), NOLOGIN:
-- a deployment gives logins with "ALTER ROLE tally_ledger LOGIN PASSWORD '…'" or, better, creates
-- login users that are members ("CREATE ROLE ledger_1 LOGIN PASSWORD '…' IN ROLE tally_ledger").
--
-- Writers see all rows through row-level security policies (TO tally_projector USING (true)), not
-- through BYPASSRLS: role attributes are not inherited by members, policies are, so a login user
-- that is a member of a service role works without SET ROLE; and BYPASSRLS would lift every policy
-- of every table, where a policy opens exactly one table to one role. Superusers bypass RLS
-- altogether (the dev stack and the tests connect as one; that keeps working).
--
-- Row-level security is ENABLEd and FORCEd on every projection table, so the owner is subject
-- to it too: a view owned by tally_owner filters by the reader's app.tenant_id instead of leaking.
-- app.tenant_id is a session setting: it isolates tenants when a trusted gateway sets it for the
-- analyst's session; a user with free SQL can SET it to any tenant.
--
-- Tables added by later migrations (or shadow tables of a rebuild) get the same treatment with
--   SELECT tally_secure_projection('new_table', 'tenant_id', true);  -- tenant-scoped projection
--   SELECT tally_secure_projection('new_table', NULL, true);         -- shared by all tenants
--   SELECT tally_secure_projection('projector_x', 'tenant_id', false); -- projector's own state
-- run by the migration that creates them; the roles suite fails while a projection table lacks
-- FORCEd row-level security.

-- ---------------------------------------------------------------------------------------------
-- The roles (cluster-wide, created once).
-- ---------------------------------------------------------------------------------------------

DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['tally_owner', 'tally_ledger', 'tally_projector', 'tally_analyst',
                             'tally_auditor']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL; -- created meanwhile by a migration of another database of the cluster
            END;
        END IF;
    END LOOP;
END
$roles$;

-- ---------------------------------------------------------------------------------------------
-- Nobody but the owner changes the schema.
-- ---------------------------------------------------------------------------------------------

REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO tally_ledger, tally_projector, tally_analyst, tally_auditor;
GRANT USAGE, CREATE ON SCHEMA public TO tally_owner;

DO $db$
BEGIN
    EXECUTE format('REVOKE CREATE ON DATABASE %I FROM PUBLIC', pg_catalog.current_database());
END
$db$;

-- ---------------------------------------------------------------------------------------------
-- The helper for projection tables: owner, grants, FORCEd row-level security, policies.
-- Idempotent; SECURITY INVOKER (the default): it can only do what its caller may already do.
--
--   tenant_column   the uuid column naming the row's tenant (tenant_id; id for tenant_accounts);
--                   NULL: the table holds no tenant's data
--   analyst_read    analysts may read it: their tenant's rows, or with tenant_column NULL every
--                   row (the plan catalog); false for the projector's own state (projector_*)
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION tally_secure_projection(tbl regclass, tenant_column name, analyst_read boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $fn$
DECLARE
    coltype regtype;
    seq regclass;
    pol text;
BEGIN
    IF tenant_column IS NOT NULL THEN
        SELECT a.atttypid::regtype INTO coltype
          FROM pg_attribute a
         WHERE a.attrelid = tbl AND a.attname = tenant_column AND a.attnum > 0
           AND NOT a.attisdropped;
        IF coltype IS NULL THEN
            RAISE EXCEPTION 'column "%" of relation % does not exist', tenant_column, tbl
                USING ERRCODE = 'undefined_column';
        END IF;
        IF coltype <> 'uuid'::regtype THEN
            RAISE EXCEPTION 'tenant column "%" of relation % is of type %, not uuid',
                tenant_column, tbl, coltype USING ERRCODE = 'datatype_mismatch';
        END IF;
    END IF;

    EXECUTE format('ALTER TABLE %s OWNER TO tally_owner', tbl);
    EXECUTE format('REVOKE ALL ON %s FROM PUBLIC, tally_ledger, tally_projector, tally_analyst, '
                   'tally_auditor', tbl);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO tally_projector', tbl);
    EXECUTE format('GRANT SELECT ON %s TO tally_auditor', tbl);
    IF analyst_read THEN
        EXECUTE format('GRANT SELECT ON %s TO tally_analyst', tbl);
    END IF;

    -- Sequences of serial / identity columns: owned with the table, used by the projector.
    FOR seq IN
        SELECT d.objid::regclass
          FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
         WHERE d.refobjid = tbl AND d.classid = 'pg_class'::regclass AND c.relkind = 'S'
           AND d.deptype IN ('a', 'i')
    LOOP
        EXECUTE format('ALTER SEQUENCE %s OWNER TO tally_owner', seq);
        EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC', seq);
        EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO tally_projector', seq);
    END LOOP;

    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);
    FOR pol IN SELECT p.polname FROM pg_policy p WHERE p.polrelid = tbl LOOP
        EXECUTE format('DROP POLICY %I ON %s', pol, tbl);
    END LOOP;
    -- TO PUBLIC: whoever reads (an analyst, or the owner through its views) sees one tenant.
    IF tenant_column IS NOT NULL THEN
        EXECUTE format('CREATE POLICY tally_tenant_read ON %s FOR SELECT TO PUBLIC USING '
                       '(%I = nullif(pg_catalog.current_setting(''app.tenant_id'', '
                       'true), '''')::uuid)', tbl, tenant_column);
    ELSIF analyst_read THEN
        EXECUTE format('CREATE POLICY tally_shared_read ON %s FOR SELECT TO tally_analyst '
                       'USING (true)', tbl);
    END IF;
    EXECUTE format('CREATE POLICY tally_projector_write ON %s FOR ALL TO tally_projector '
                   'USING (true) WITH CHECK (true)', tbl);
    EXECUTE format('CREATE POLICY tally_auditor_read ON %s FOR SELECT TO tally_auditor '
                   'USING (true)', tbl);
END
$fn$;

ALTER FUNCTION tally_secure_projection(regclass, name, boolean) OWNER TO tally_owner;
REVOKE ALL ON FUNCTION tally_secure_projection(regclass, name, boolean) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- The system of record, table by table (few and deliberate).
-- ---------------------------------------------------------------------------------------------

ALTER TABLE ledger_entries OWNER TO tally_owner;
ALTER TABLE consumer_offsets OWNER TO tally_owner;
ALTER TABLE topic_partitions OWNER TO tally_owner;
ALTER TABLE quarantine OWNER TO tally_owner;
ALTER TABLE ledger_wallets OWNER TO tally_owner;
ALTER TABLE ledger_published OWNER TO tally_owner;
ALTER TABLE schema_migrations OWNER TO tally_owner;
ALTER SEQUENCE quarantine_id_seq OWNER TO tally_owner;

REVOKE ALL ON ledger_entries, consumer_offsets, topic_partitions, quarantine, ledger_wallets,
              ledger_published, schema_migrations FROM PUBLIC;
REVOKE ALL ON SEQUENCE quarantine_id_seq FROM PUBLIC;

-- Entries are append-only, for everyone.
GRANT SELECT, INSERT ON ledger_entries TO tally_ledger;
GRANT SELECT, INSERT, UPDATE ON consumer_offsets TO tally_ledger;
GRANT SELECT, INSERT ON topic_partitions TO tally_ledger;
GRANT SELECT, INSERT, UPDATE ON quarantine TO tally_ledger; -- UPDATE: replayed_at on replay
GRANT USAGE, SELECT ON SEQUENCE quarantine_id_seq TO tally_ledger;
GRANT SELECT, INSERT, UPDATE ON ledger_wallets TO tally_ledger;
GRANT SELECT, INSERT, UPDATE ON ledger_published TO tally_ledger;

GRANT SELECT ON ledger_entries TO tally_projector;
GRANT SELECT, INSERT, UPDATE, DELETE ON consumer_offsets TO tally_projector;
GRANT SELECT ON topic_partitions TO tally_projector;

GRANT SELECT ON ledger_entries, consumer_offsets, topic_partitions, quarantine, ledger_wallets,
                ledger_published TO tally_auditor;

-- Start-up checks read the schema version.
GRANT SELECT ON schema_migrations TO tally_ledger, tally_projector, tally_auditor;

-- ledger_entries and ledger_wallets hold tenant data but no row-level security: nobody reads them
-- one tenant at a time (the analyst has no access at all), and PostgreSQL refuses COPY FROM into a
-- table with row-level security (0A000) to any role but a superuser or BYPASSRLS, while the
-- ledger writes its entries by COPY. The same holds for the projection tables: tally_projector
-- stages a COPY in a temporary table and inserts from there.

-- Each writer moves only its own offsets: the ledger's rows are 'tally-ledger', every other
-- consumer name belongs to the projector; both (and the auditor) read all rows for status.
ALTER TABLE consumer_offsets ENABLE ROW LEVEL SECURITY;
ALTER TABLE consumer_offsets FORCE ROW LEVEL SECURITY;
CREATE POLICY tally_readers ON consumer_offsets FOR SELECT
    TO tally_ledger, tally_projector, tally_auditor USING (true);
CREATE POLICY tally_ledger_own ON consumer_offsets FOR ALL TO tally_ledger
    USING (consumer = 'tally-ledger') WITH CHECK (consumer = 'tally-ledger');
CREATE POLICY tally_projector_own ON consumer_offsets FOR ALL TO tally_projector
    USING (consumer <> 'tally-ledger') WITH CHECK (consumer <> 'tally-ledger');

-- ---------------------------------------------------------------------------------------------
-- Every other table of the schema is a projection (written by tally-projector): the baseline's,
-- and any an earlier migration added (0003_projector.sql), found in the catalog. Tables named
-- projector_* are the projector's own bookkeeping (seen events, applied seqs): not for analysts.
-- ---------------------------------------------------------------------------------------------

DO $projections$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT c.oid::regclass AS tbl, c.relname,
               EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND a.attnum > 0
                          AND NOT a.attisdropped) AS has_tenant_id
          FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                              AND d.deptype = 'e')
           AND c.relname NOT IN ('ledger_entries', 'consumer_offsets', 'topic_partitions',
                                 'quarantine', 'ledger_wallets', 'ledger_published',
                                 'schema_migrations')
         ORDER BY c.relname
    LOOP
        PERFORM tally_secure_projection(
            t.tbl,
            CASE WHEN t.has_tenant_id THEN 'tenant_id'
                 WHEN t.relname = 'tenant_accounts' THEN 'id' END,
            t.relname NOT LIKE 'projector\_%'
                AND (t.has_tenant_id OR t.relname IN ('tenant_accounts', 'billing_plans',
                                                      'plan_features')));
    END LOOP;
END
$projections$;

-- Any function an earlier migration created belongs to the owner too.
DO $functions$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
              WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p')
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                   AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO tally_owner', f);
    END LOOP;
END
$functions$;
