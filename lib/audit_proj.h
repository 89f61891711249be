/*
 * The audit's projection check: where tally-projector has applied a tenant's whole ledger, its
 * token balances and invoices must be what the ledger's entries say (the fold's rules in
 * projections/fold.c: the wallet after the last entry per subscription; one invoice row per
 * invoice entry). Set-based SQL in the caller's transaction (the audit's snapshot).
 */
#ifndef TLY_AUDIT_PROJ_H
#define TLY_AUDIT_PROJ_H

#include <libpq-fe.h>

#include "audit.h"
#include "err.h"
#include "event.h"
#include "pg.h"

/*
 * Compare, for every tenant (or only tenant) whose projection is caught up with the ledger;
 * each difference goes to opts->on_failure (check "projection", with tenant and seq). Adds to
 * counts: checks, failures, projected (tenants compared), behind (tenants not caught up). A
 * database without projections (no applied ledger) compares nothing. 0 or TLY_E_PG (err).
 */
int tly_audit_projections(PGconn *conn, const tly_uuid *tenant, const struct tly_audit_opts *opts,
			  struct tly_audit_counts *counts, struct tly_pg_error *err) TLY_MUST_CHECK;

#endif
