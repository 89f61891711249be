/*
 * The ledger streamed out of PostgreSQL into an audit (lib/audit.h): applied inputs and stored
 * entries through two cursors of one read-only, repeatable-read transaction, merged in
 * (partition, offset) order, plus the stored offsets and quarantined offsets of each partition.
 * Works as any role that may read the ledger (tally_auditor).
 */
#ifndef TLY_AUDIT_PG_H
#define TLY_AUDIT_PG_H

#include <libpq-fe.h>

#include "audit.h"
#include "err.h"
#include "event.h"
#include "pg.h"

struct tly_audit_pg_opts {
	const char *events_topic;  /* the ledger's input topic (consumer_offsets, quarantine) */
	const tly_uuid *tenant;    /* only this tenant (its partition's ticks with it); NULL: all */
	int fetch_rows;            /* rows per FETCH; 0: 20000 */
	/* Called every fetch with the counts so far (a terminal's progress line); may be NULL. */
	void (*progress)(const struct tly_audit_counts *counts, void *ud);
	void *ud;
};

/* Feed the whole ledger (or one tenant's) to a and finish it. 0, TLY_E_PG (err), TLY_E_NOMEM. */
int tly_audit_pg_run(PGconn *conn, struct tly_audit *a, const struct tly_audit_pg_opts *opts,
		     struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
