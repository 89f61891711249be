/*
 * The ledger streamed out of PostgreSQL into audits (lib/audit.h). Partitions are independent
 * (a tenant lives in one), so workers take them one at a time, each with its own connection
 * and verifier, all reading one snapshot (exported by the first transaction): per partition,
 * its applied inputs and stored entries streamed by two binary COPYs on two connections (the
 * server produces while the verifier works) merged in offset order, its stored offset and
 * quarantined offsets. Works as any role that may read the ledger (tally_auditor).
 */
#ifndef TLY_AUDIT_PG_H
#define TLY_AUDIT_PG_H

#include "audit.h"
#include "err.h"
#include "event.h"
#include "pg.h"

struct tly_audit_pg_opts {
	const char *conninfo;      /* the ledger's database */
	const char *events_topic;  /* the ledger's input topic (consumer_offsets, quarantine) */
	const tly_uuid *tenant;    /* only this tenant (its partition's ticks with it); NULL: all */
	int jobs;                  /* workers (connections); < 1: 1. One tenant: always 1 */
	int progress_rows;         /* entries between progress calls; 0: 20000 */
	/*
	 * Called every progress_rows entries with the counts so far, summed over the workers (a terminal's
	 * progress line); may be NULL. Calls are serialised, as are the audit's on_failure calls.
	 */
	void (*progress)(const struct tly_audit_counts *counts, void *ud);
	void *ud;
};

/*
 * Audit the whole ledger (or one tenant's) with the verifier options aopts; counts summed over
 * the workers. 0, TLY_E_PG (err filled: connection, query or a row that does not read back as
 * an entry), TLY_E_NOMEM. Failures of the ledger itself go to aopts->on_failure.
 */
int tly_audit_pg_run(const struct tly_audit_opts *aopts, const struct tly_audit_pg_opts *opts,
		     struct tly_audit_counts *counts, struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
