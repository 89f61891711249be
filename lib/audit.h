/*
 * The auditor's verifier: given the ledger's applied input records and its stored entries, in
 * (partition, offset) order, it re-executes the decision core and proves the ledger: hash chain
 * recomputed from canonical bytes, gap-free seq, every stored entry equal (field by field, so
 * byte for byte) to what re-execution yields, balance identities, no event id applied twice,
 * every hold ended at most once, every consumed offset with its outcome. No I/O: lib/audit_pg
 * streams PostgreSQL into it. Single-threaded.
 */
#ifndef TLY_AUDIT_H
#define TLY_AUDIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "event.h"

struct tly_audit;

/* One failed check, borrowed for the callback only. */
struct tly_audit_failure {
	const char *check;   /* chain, seq, reexec, identity, idempotency, hold, input, offsets */
	tly_uuid tenant;     /* nil: a partition's failure */
	int64_t seq;         /* the entry it stands on; 0: none */
	int32_t partition;   /* -1: none */
	int64_t offset;      /* input offset; -1: none */
	const char *message; /* one line: what is wrong and what was expected */
};

struct tly_audit_opts {
	int64_t overdraft_limit; /* the ledger's (tokens available may go this far below zero) */
	/* Entries reported and counted (re-execution always starts at seq 1): 0 / INT64_MAX for all. */
	int64_t from_seq, to_seq;
	int64_t from_time, to_time; /* ledger time, µs */
	void (*on_failure)(const struct tly_audit_failure *f, void *ud);
	void *ud;
};

struct tly_audit_counts {
	int64_t tenants;      /* with at least one entry in range */
	int64_t entries;      /* stored entries in range */
	int64_t inputs;       /* applied input records re-executed */
	int64_t reexecuted;   /* entries proved equal to their re-execution */
	int64_t rehashed;     /* entries whose hash was recomputed from the stored row alone */
	int64_t checks;
	int64_t failures;
	int64_t projected;    /* tenants whose projections were compared with the ledger */
	int64_t behind;       /* tenants whose projections are behind the ledger: not compared */
};

/* NULL with errstr on failure (the codec could not be built, out of memory). */
struct tly_audit *tly_audit_new(const struct tly_audit_opts *opts, char *errstr, size_t errlen);
void tly_audit_free(struct tly_audit *a); /* accepts NULL */

/*
 * Announce a partition before its inputs: the ledger's stored next offset (-1: none stored) and
 * the offsets it quarantined (sorted ascending, borrowed for the call). Without this call the
 * partition's offsets are not checked (an audit of one tenant).
 */
int tly_audit_partition(struct tly_audit *a, int32_t partition, int64_t next_offset,
			const int64_t *quarantined, size_t n_quarantined) TLY_MUST_CHECK;

/*
 * One applied input record (tenant NULL for a ClockTick; value borrowed for the call), in
 * (partition, offset) order. Re-executes it; its stored entries follow with tly_audit_entry.
 * 0 or TLY_E_NOMEM; everything wrong with the data is a failure reported through on_failure.
 */
int tly_audit_input(struct tly_audit *a, int32_t partition, int64_t offset, const tly_uuid *tenant,
		    const void *value, size_t len) TLY_MUST_CHECK;

/*
 * The stored entries (borrowed for the call) of the input that the next tly_audit_input calls
 * will reach: their UUIDs are offered to the decoding of that input (tly_codec_uuid_hint), which
 * then takes a text equal to one of them without parsing it, and the map slots the checks will
 * look them up in are loaded into the CPU's caches meanwhile. Only a hint, never trusted: it
 * changes the time an audit takes, never what it finds.
 */
void tly_audit_expect(struct tly_audit *a, const struct tly_event *entries, size_t n);

/* One stored entry (borrowed), in (cause_partition, cause_offset, tenant, seq) order. */
int tly_audit_entry(struct tly_audit *a, const struct tly_event *entry) TLY_MUST_CHECK;

/* End of both streams: the last checks. 0 or TLY_E_NOMEM. */
int tly_audit_finish(struct tly_audit *a) TLY_MUST_CHECK;

void tly_audit_get_counts(const struct tly_audit *a, struct tly_audit_counts *out);

#endif
