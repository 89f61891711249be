/* The migration runner: sets of NNNN_name.sql files checked against schema_migrations and applied. */
#include "migrate.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "embedded.h"
#include "log.h"
#include "pg.h"

/* pg_advisory_lock key of "migrate up": the bytes "TALLYMIG" as a bigint. */
#define MIGRATE_LOCK_KEY "6071217663471601991"

#define CHECKSUM_HEX_LEN 64

struct migration {
	int version;                       /* NNNN of the file name */
	char *name;                        /* file basename, "0001_baseline.sql" */
	char *sql;                         /* file contents, NUL-terminated */
	size_t len;                        /* bytes of sql, without the NUL */
	char checksum[CHECKSUM_HEX_LEN + 1]; /* sha256 of the bytes, lower-case hex */
};

struct tly_migrate_set {
	struct migration *items; /* sorted by version */
	size_t count;
};

/* One row of schema_migrations. */
struct applied {
	int version;
	char name[256];
	char checksum[CHECKSUM_HEX_LEN + 1];
	char applied_at[64];
};

static const char create_table_sql[] =
	"CREATE TABLE IF NOT EXISTS schema_migrations (\n"
	"    version integer PRIMARY KEY CHECK (version > 0),\n"
	"    name text NOT NULL,\n"
	"    checksum text NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),\n"
	"    applied_at timestamptz NOT NULL DEFAULT now()\n"
	")";

/* Version of a well-formed name (NNNN_name.sql, at least four digits), else -1. */
static int parse_name(const char *name)
{
	size_t digits = 0, len = strlen(name);
	long v = 0;
	while (isdigit((unsigned char)name[digits])) {
		v = v * 10 + (name[digits] - '0');
		if (v > INT_MAX)
			return -1;
		digits++;
	}
	if (digits < 4 || name[digits] != '_' || len < digits + 1 + 1 + 4 ||
	    strcmp(name + len - 4, ".sql") != 0 || v <= 0)
		return -1;
	for (size_t i = digits + 1; i < len - 4; i++) {
		unsigned char c = (unsigned char)name[i];
		if (!isalnum(c) && c != '_' && c != '-')
			return -1;
	}
	return (int)v;
}

static int sha256_hex(const char *data, size_t len, char out[CHECKSUM_HEX_LEN + 1])
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != 32)
		return TLY_E_IO;
	for (unsigned int i = 0; i < mdlen; i++)
		snprintf(out + 2 * i, 3, "%02x", md[i]);
	return 0;
}

void tly_migrate_free(struct tly_migrate_set *set)
{
	if (!set)
		return;
	for (size_t i = 0; i < set->count; i++) {
		free(set->items[i].name);
		free(set->items[i].sql);
	}
	free(set->items);
	free(set);
}

/* Append a migration (copies name and data) to set. */
static int set_add(struct tly_migrate_set *set, const char *name, const char *data, size_t len,
		   char *errstr, size_t errlen)
{
	int version = parse_name(name);
	if (version < 0) {
		snprintf(errstr, errlen,
			 "invalid migration file name \"%s\": expected NNNN_name.sql (four or more digits)",
			 name);
		return TLY_E_MIGRATION;
	}
	struct migration *grown = realloc(set->items, (set->count + 1) * sizeof(*grown));
	if (!grown)
		goto nomem;
	set->items = grown;
	struct migration *m = &set->items[set->count];
	memset(m, 0, sizeof(*m));
	m->version = version;
	m->len = len;
	m->name = strdup(name);
	m->sql = malloc(len + 1);
	if (!m->name || !m->sql) {
		free(m->name);
		free(m->sql);
		goto nomem;
	}
	memcpy(m->sql, data, len);
	m->sql[len] = '\0';
	if (sha256_hex(data, len, m->checksum) != 0) {
		free(m->name);
		free(m->sql);
		snprintf(errstr, errlen, "could not compute checksum of migration \"%s\"", name);
		return TLY_E_IO;
	}
	set->count++;
	return 0;
nomem:
	snprintf(errstr, errlen, "could not load migration \"%s\": out of memory", name);
	return TLY_E_NOMEM;
}

static int cmp_migration(const void *a, const void *b)
{
	const struct migration *x = a, *y = b;
	return (x->version > y->version) - (x->version < y->version);
}

/* Sort set by version and refuse two files with the same version. */
static int set_finish(struct tly_migrate_set *set, char *errstr, size_t errlen)
{
	if (set->count > 1)
		qsort(set->items, set->count, sizeof(set->items[0]), cmp_migration);
	for (size_t i = 1; i < set->count; i++) {
		if (set->items[i].version == set->items[i - 1].version) {
			snprintf(errstr, errlen, "migrations \"%s\" and \"%s\" have the same version %d",
				 set->items[i - 1].name, set->items[i].name, set->items[i].version);
			return TLY_E_MIGRATION;
		}
	}
	return 0;
}

struct tly_migrate_set *tly_migrate_load_embedded(char *errstr, size_t errlen)
{
	struct tly_migrate_set *set = calloc(1, sizeof(*set));
	if (!set) {
		snprintf(errstr, errlen, "could not load migrations: out of memory");
		return NULL;
	}
	for (const struct tly_embedded *e = tly_embedded_migrations; e->name; e++) {
		if (set_add(set, e->name, e->data, e->len, errstr, errlen) != 0)
			goto fail;
	}
	if (set_finish(set, errstr, errlen) != 0)
		goto fail;
	return set;
fail:
	tly_migrate_free(set);
	return NULL;
}

/* Read a whole file into a malloc'd buffer. */
static char *read_file(const char *path, size_t *len, char *errstr, size_t errlen)
{
	char *buf = NULL;
	size_t cap = 0, used = 0;
	FILE *f = fopen(path, "rb");
	if (!f) {
		snprintf(errstr, errlen, "could not open file \"%s\": %s", path, strerror(errno));
		return NULL;
	}
	for (;;) {
		if (used == cap) {
			size_t ncap = cap ? cap * 2 : 16384;
			char *grown = realloc(buf, ncap);
			if (!grown) {
				snprintf(errstr, errlen, "could not read file \"%s\": out of memory", path);
				goto fail;
			}
			buf = grown;
			cap = ncap;
		}
		size_t n = fread(buf + used, 1, cap - used, f);
		used += n;
		if (n == 0)
			break;
	}
	if (ferror(f)) {
		snprintf(errstr, errlen, "could not read file \"%s\": %s", path, strerror(errno));
		goto fail;
	}
	fclose(f);
	*len = used;
	return buf;
fail:
	free(buf);
	fclose(f);
	return NULL;
}

struct tly_migrate_set *tly_migrate_load_dir(const char *dir, char *errstr, size_t errlen)
{
	struct tly_migrate_set *set = calloc(1, sizeof(*set));
	char *data = NULL;
	DIR *d = NULL;
	if (!set) {
		snprintf(errstr, errlen, "could not load migrations: out of memory");
		return NULL;
	}
	d = opendir(dir);
	if (!d) {
		snprintf(errstr, errlen, "could not open directory \"%s\": %s", dir, strerror(errno));
		goto fail;
	}
	for (struct dirent *de; (de = readdir(d)) != NULL;) {
		size_t nlen = strlen(de->d_name);
		if (nlen < 4 || strcmp(de->d_name + nlen - 4, ".sql") != 0)
			continue;
		char path[PATH_MAX];
		size_t len = 0;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		data = read_file(path, &len, errstr, errlen);
		if (!data)
			goto fail;
		if (set_add(set, de->d_name, data, len, errstr, errlen) != 0)
			goto fail;
		free(data);
		data = NULL;
	}
	closedir(d);
	d = NULL;
	if (set_finish(set, errstr, errlen) != 0)
		goto fail;
	return set;
fail:
	free(data);
	if (d)
		closedir(d);
	tly_migrate_free(set);
	return NULL;
}

size_t tly_migrate_count(const struct tly_migrate_set *set)
{
	return set->count;
}

int tly_migrate_head(const struct tly_migrate_set *set)
{
	return set->count ? set->items[set->count - 1].version : 0;
}

static const struct migration *find_version(const struct tly_migrate_set *set, int version)
{
	for (size_t i = 0; i < set->count; i++) {
		if (set->items[i].version == version)
			return &set->items[i];
	}
	return NULL;
}

static const struct applied *find_applied(const struct applied *rows, size_t nrows, int version)
{
	for (size_t i = 0; i < nrows; i++) {
		if (rows[i].version == version)
			return &rows[i];
	}
	return NULL;
}

/*
 * Read schema_migrations (ordered by version) into *rows (malloc'd; NULL and 0 rows when the
 * table does not exist yet, with *exists false).
 */
static int read_applied(PGconn *conn, struct applied **rows, size_t *nrows, bool *exists,
			char *errstr, size_t errlen)
{
	struct tly_pg_error err;
	PGresult *res = NULL;
	int rc = 0;
	*rows = NULL;
	*nrows = 0;
	*exists = false;

	res = tly_pg_query(conn, "SELECT pg_catalog.to_regclass('schema_migrations') IS NOT NULL", 0,
			   NULL, &err);
	if (!res)
		goto fail_pg;
	*exists = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
	PQclear(res);
	res = NULL;
	if (!*exists)
		goto done;

	res = tly_pg_query(conn,
			   "SELECT version, name, checksum, applied_at::text FROM schema_migrations "
			   "ORDER BY version",
			   0, NULL, &err);
	if (!res)
		goto fail_pg;
	size_t n = (size_t)PQntuples(res);
	if (n > 0 && !(*rows = calloc(n, sizeof(**rows)))) {
		snprintf(errstr, errlen, "could not read schema_migrations: out of memory");
		rc = TLY_E_NOMEM;
		goto done;
	}
	for (size_t i = 0; i < n; i++) {
		struct applied *a = &(*rows)[i];
		a->version = atoi(PQgetvalue(res, (int)i, 0));
		snprintf(a->name, sizeof(a->name), "%s", PQgetvalue(res, (int)i, 1));
		snprintf(a->checksum, sizeof(a->checksum), "%s", PQgetvalue(res, (int)i, 2));
		snprintf(a->applied_at, sizeof(a->applied_at), "%s", PQgetvalue(res, (int)i, 3));
	}
	*nrows = n;
	goto done;
fail_pg:
	snprintf(errstr, errlen, "could not read schema_migrations: %s", err.message);
	rc = TLY_E_PG;
done:
	PQclear(res);
	return rc;
}

/*
 * Refuse a database whose history set cannot continue: an applied migration changed or missing,
 * or a pending migration older than the newest applied one (forward only).
 */
static int verify_history(const struct tly_migrate_set *set, const struct applied *rows,
			  size_t nrows, char *errstr, size_t errlen)
{
	int newest = 0;
	const char *newest_name = "";
	for (size_t i = 0; i < nrows; i++) {
		const struct migration *m = find_version(set, rows[i].version);
		if (!m) {
			snprintf(errstr, errlen,
				 "applied migration \"%s\" (version %d) is missing from the migration set: "
				 "this build is older than the database or the file was removed",
				 rows[i].name, rows[i].version);
			return TLY_E_MIGRATION;
		}
		if (strcmp(m->checksum, rows[i].checksum) != 0) {
			snprintf(errstr, errlen,
				 "migration file \"%s\" has changed since it was applied as \"%s\" "
				 "(checksum %.12s applied, %.12s now): applied migrations must never change, "
				 "add a new one",
				 m->name, rows[i].name, rows[i].checksum, m->checksum);
			return TLY_E_MIGRATION;
		}
		if (rows[i].version > newest) {
			newest = rows[i].version;
			newest_name = rows[i].name;
		}
	}
	for (size_t i = 0; i < set->count; i++) {
		const struct migration *m = &set->items[i];
		if (m->version < newest && !find_applied(rows, nrows, m->version)) {
			snprintf(errstr, errlen,
				 "pending migration \"%s\" is older than the applied migration \"%s\": "
				 "migrations are forward only, renumber it after the head",
				 m->name, newest_name);
			return TLY_E_MIGRATION;
		}
	}
	return 0;
}

int tly_migrate_status(PGconn *conn, const struct tly_migrate_set *set, FILE *out, char *errstr,
		       size_t errlen)
{
	struct applied *rows = NULL;
	size_t nrows = 0;
	bool exists = false;
	int rc = read_applied(conn, &rows, &nrows, &exists, errstr, errlen);
	if (rc != 0)
		return rc;
	for (size_t i = 0; i < set->count; i++) {
		const struct migration *m = &set->items[i];
		const struct applied *a = find_applied(rows, nrows, m->version);
		const char *state = !a ? "pending" : strcmp(a->checksum, m->checksum) ? "changed" : "applied";
		fprintf(out, "%-40s %-8s %s\n", m->name, state, a ? a->applied_at : "");
	}
	for (size_t i = 0; i < nrows; i++) {
		if (!find_version(set, rows[i].version))
			fprintf(out, "%-40s %-8s %s\n", rows[i].name, "missing", rows[i].applied_at);
	}
	free(rows);
	return 0;
}

int tly_migrate_check_head(PGconn *conn, const struct tly_migrate_set *set, char *errstr,
			   size_t errlen)
{
	struct applied *rows = NULL;
	size_t nrows = 0, pending = 0;
	bool exists = false;
	const char *first = NULL;
	int rc = read_applied(conn, &rows, &nrows, &exists, errstr, errlen);
	if (rc != 0)
		goto done;
	if (!exists) {
		snprintf(errstr, errlen,
			 "database has no schema_migrations table: run \"tallyctl migrate up\"");
		rc = TLY_E_MIGRATION;
		goto done;
	}
	rc = verify_history(set, rows, nrows, errstr, errlen);
	if (rc != 0)
		goto done;
	for (size_t i = 0; i < set->count; i++) {
		if (!find_applied(rows, nrows, set->items[i].version)) {
			if (!first)
				first = set->items[i].name;
			pending++;
		}
	}
	if (pending > 0) {
		snprintf(errstr, errlen,
			 "database is not at the schema head: %zu pending migration%s, the first "
			 "\"%s\": run \"tallyctl migrate up\"",
			 pending, pending == 1 ? "" : "s", first);
		rc = TLY_E_MIGRATION;
	}
done:
	free(rows);
	return rc;
}

/* Apply one migration and record it, in one transaction. */
static int apply_one(PGconn *conn, const struct migration *m, char *errstr, size_t errlen)
{
	struct tly_pg_error err;
	char version[16];
	bool in_tx = false;
	snprintf(version, sizeof(version), "%d", m->version);
	const char *const params[] = {version, m->name, m->checksum};

	if (tly_pg_begin(conn, &err) != 0)
		goto fail;
	in_tx = true;
	if (tly_pg_exec_script(conn, m->sql, &err) != 0)
		goto fail;
	if (tly_pg_exec(conn,
			"INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
			3, params, &err) != 0)
		goto fail;
	in_tx = false; /* COMMIT ends the transaction whether it succeeds or not */
	if (tly_pg_commit(conn, &err) != 0)
		goto fail;
	tly_info("applied migration", "migration=\"%s\" version=%d checksum=%s", m->name, m->version,
		 m->checksum);
	return 0;
fail:
	snprintf(errstr, errlen, "could not apply migration \"%s\": %s", m->name, err.message);
	if (in_tx && tly_pg_rollback(conn, &err) != 0)
		tly_warn("could not roll back migration", "migration=\"%s\" reason=\"%s\"", m->name,
			 err.message);
	return TLY_E_PG;
}

int tly_migrate_up(PGconn *conn, const struct tly_migrate_set *set, int *applied, char *errstr,
		   size_t errlen)
{
	const char *const key[] = {MIGRATE_LOCK_KEY};
	struct tly_pg_error err;
	struct applied *rows = NULL;
	size_t nrows = 0;
	bool exists = false, locked = false;
	int rc = 0, count = 0;

	if (tly_pg_exec(conn, "SELECT pg_catalog.pg_advisory_lock($1::bigint)", 1, key, &err) != 0) {
		snprintf(errstr, errlen, "could not take the migration lock: %s", err.message);
		rc = TLY_E_PG;
		goto done;
	}
	locked = true;
	if (tly_pg_exec_script(conn, create_table_sql, &err) != 0) {
		snprintf(errstr, errlen, "could not create table \"schema_migrations\": %s",
			 err.message);
		rc = TLY_E_PG;
		goto done;
	}
	rc = read_applied(conn, &rows, &nrows, &exists, errstr, errlen);
	if (rc != 0)
		goto done;
	rc = verify_history(set, rows, nrows, errstr, errlen);
	if (rc != 0)
		goto done;
	for (size_t i = 0; i < set->count; i++) {
		if (find_applied(rows, nrows, set->items[i].version))
			continue;
		rc = apply_one(conn, &set->items[i], errstr, errlen);
		if (rc != 0)
			goto done;
		count++;
	}
	if (count == 0)
		tly_debug("database is at the schema head", "version=%d", tly_migrate_head(set));
done:
	if (locked && tly_pg_exec(conn, "SELECT pg_catalog.pg_advisory_unlock($1::bigint)", 1, key,
				  &err) != 0)
		tly_warn("could not release the migration lock", "reason=\"%s\"", err.message);
	free(rows);
	if (applied)
		*applied = count;
	return rc;
}
