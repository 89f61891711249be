/* Forward-only schema migrations: load a set, show its status, apply what is pending, check head. */
#ifndef TLY_MIGRATE_H
#define TLY_MIGRATE_H

#include <stddef.h>
#include <stdio.h>

#include <libpq-fe.h>

#include "err.h"

/*
 * A sorted set of migration files named NNNN_name.sql (version NNNN > 0, unique). Each file runs in
 * one transaction together with its schema_migrations row, so it must not contain BEGIN/COMMIT
 * or statements that cannot run in a transaction block (CREATE INDEX CONCURRENTLY…).
 */
struct tly_migrate_set;

/* The migrations compiled into the library (tly_embedded_migrations); NULL with errstr on error. */
struct tly_migrate_set *tly_migrate_load_embedded(char *errstr, size_t errlen);

/* Every *.sql file of dir (other files are ignored); NULL with errstr on a bad name or read error. */
struct tly_migrate_set *tly_migrate_load_dir(const char *dir, char *errstr, size_t errlen);

/* Accepts NULL. */
void tly_migrate_free(struct tly_migrate_set *set);

/* Number of migrations in set, and the highest version (0 when empty). */
size_t tly_migrate_count(const struct tly_migrate_set *set);
int tly_migrate_head(const struct tly_migrate_set *set);

/*
 * Print one line per migration of set, and per applied version missing from set:
 * "0001_baseline.sql  applied  2025-01-01 10:00:00+00", "… pending", "… changed" (applied, but the
 * file's checksum differs) or "… missing" (applied, not in set). Reads only; 0 or TLY_E_PG.
 */
int tly_migrate_status(PGconn *conn, const struct tly_migrate_set *set, FILE *out, char *errstr,
		       size_t errlen) TLY_MUST_CHECK;

/*
 * Bring the database to set's head. Holds a session advisory lock meanwhile, so concurrent runs
 * are safe (the second waits, then finds nothing to do); creates schema_migrations if absent.
 * Refuses with TLY_E_MIGRATION, naming the file, when an applied migration's checksum changed, an
 * applied version is missing from set, or a pending version is older than the newest applied one.
 * Applies each pending file in its own transaction with its schema_migrations row. *applied (may
 * be NULL) gets how many were applied, also on failure. 0, TLY_E_MIGRATION or TLY_E_PG.
 * Call it outside a transaction; migrations run on conn's search_path (public by tly_pg_connect).
 */
int tly_migrate_up(PGconn *conn, const struct tly_migrate_set *set, int *applied, char *errstr,
		   size_t errlen) TLY_MUST_CHECK;

/*
 * 0 when the database is exactly at set's head (every migration applied with its checksum, none
 * unknown); else TLY_E_MIGRATION saying what differs (daemons fail fast on it), or TLY_E_PG.
 */
int tly_migrate_check_head(PGconn *conn, const struct tly_migrate_set *set, char *errstr,
			   size_t errlen) TLY_MUST_CHECK;

#endif
