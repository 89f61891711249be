/* Streams the ledger's inputs, entries and offsets out of PostgreSQL into an audit. */
#include "audit_pg.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>

#include "entries.h"

#define DEFAULT_FETCH 20000

struct run {
	PGconn *conn;
	struct tly_audit *a;
	const struct tly_audit_pg_opts *opts;
	struct tly_pg_error *err;
	int fetch_rows;
	PGresult *in; /* the inputs fetched last (binary) */
	int in_row;
	bool in_done;
};

static int64_t be64(const char *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | (unsigned char)p[i];
	return (int64_t)v;
}

static int32_t be32(const char *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return (int32_t)ntohl(v);
}

/* FETCH the next rows of cursor (a name written in this file) in format (0 text, 1 binary). */
static PGresult *fetch(struct run *r, const char *cursor, int format)
{
	char sql[64];
	snprintf(sql, sizeof(sql), "FETCH %d FROM %s", r->fetch_rows, cursor);
	return tly_pg_query_params(r->conn, sql, 0, NULL, NULL, NULL, format, r->err);
}

/* The next input row, fetching when needed: 1 with r->in_row on it, 0 at the end, or an error. */
static int input_row(struct run *r)
{
	if (r->in && r->in_row < PQntuples(r->in))
		return 1;
	if (r->in_done)
		return 0;
	PQclear(r->in);
	r->in_row = 0;
	if (!(r->in = fetch(r, "tly_audit_inputs", 1)))
		return TLY_E_PG;
	if (PQntuples(r->in) == 0)
		r->in_done = true;
	return PQntuples(r->in) > 0;
}

/* Feed the inputs up to (partition, offset) inclusive; all of them with all. */
static int feed_inputs(struct run *r, int32_t partition, int64_t offset, bool all)
{
	int have;
	while ((have = input_row(r)) == 1) {
		const PGresult *in = r->in;
		int row = r->in_row;
		int32_t p = be32(PQgetvalue(in, row, 0));
		int64_t o = be64(PQgetvalue(in, row, 1));
		if (!all && (p > partition || (p == partition && o > offset)))
			return 0;
		tly_uuid tenant;
		bool tick = PQgetisnull(in, row, 2);
		if (!tick)
			memcpy(tenant.b, PQgetvalue(in, row, 2), 16);
		int rc = tly_audit_input(r->a, p, o, tick ? NULL : &tenant, PQgetvalue(in, row, 3),
					 (size_t)PQgetlength(in, row, 3));
		if (rc != 0)
			return rc;
		r->in_row++;
	}
	return have;
}

static int on_entry(const struct tly_event *entry, void *ud)
{
	struct run *r = ud;
	const struct tly_ledger_entry *e = &entry->u.ledger_entry;
	int rc = feed_inputs(r, e->cause_partition, e->cause_offset, false);
	return rc ? rc : tly_audit_entry(r->a, entry);
}

/* Announce every partition the ledger stored an offset for, with its quarantined offsets. */
static int announce_partitions(struct run *r)
{
	const char *topic[] = {r->opts->events_topic};
	PGresult *offs = tly_pg_query(r->conn,
				      "SELECT partition, next_offset FROM consumer_offsets "
				      "WHERE consumer = 'tally-ledger' AND topic = $1 ORDER BY partition",
				      1, topic, r->err);
	PGresult *quar = offs ? tly_pg_query(r->conn,
					     "SELECT partition, \"offset\" FROM quarantine "
					     "WHERE topic = $1 ORDER BY partition, \"offset\"",
					     1, topic, r->err)
			      : NULL;
	int64_t *qoff = quar ? calloc((size_t)PQntuples(quar) + 1, sizeof(*qoff)) : NULL;
	int rc = offs && quar ? TLY_E_NOMEM : TLY_E_PG;
	if (!qoff)
		goto out;
	int q = 0;
	for (int i = 0; i < PQntuples(offs); i++) {
		int32_t p = (int32_t)strtol(PQgetvalue(offs, i, 0), NULL, 10);
		int64_t next = strtoll(PQgetvalue(offs, i, 1), NULL, 10);
		size_t n = 0;
		while (q < PQntuples(quar) && strtol(PQgetvalue(quar, q, 0), NULL, 10) < p)
			q++;
		while (q < PQntuples(quar) && strtol(PQgetvalue(quar, q, 0), NULL, 10) == p)
			qoff[n++] = strtoll(PQgetvalue(quar, q++, 1), NULL, 10);
		if ((rc = tly_audit_partition(r->a, p, next, qoff, n)) != 0)
			goto out;
	}
	rc = 0;
out:
	free(qoff);
	PQclear(offs);
	PQclear(quar);
	return rc;
}

static int declare(struct run *r)
{
	char tenant[37];
	const char *v[] = {tenant};
	int n = 0;
	PGresult *res;
	if (r->opts->tenant) {
		tly_uuid_format(r->opts->tenant, tenant);
		n = 1;
		res = tly_pg_query(r->conn,
				   "DECLARE tly_audit_inputs NO SCROLL CURSOR FOR "
				   "SELECT partition, \"offset\", tenant_id, value FROM ledger_inputs "
				   "WHERE (tenant_id = $1 OR tenant_id IS NULL) AND partition IN "
				   "(SELECT partition FROM ledger_inputs WHERE tenant_id = $1 LIMIT 1) "
				   "ORDER BY partition, \"offset\"",
				   1, v, r->err);
	} else {
		res = tly_pg_query(r->conn,
				   "DECLARE tly_audit_inputs NO SCROLL CURSOR FOR "
				   "SELECT partition, \"offset\", tenant_id, value FROM ledger_inputs "
				   "ORDER BY partition, \"offset\"",
				   0, NULL, r->err);
	}
	if (!res)
		return TLY_E_PG;
	PQclear(res);
	res = tly_pg_query(r->conn,
			   n ? "DECLARE tly_audit_entries NO SCROLL CURSOR FOR SELECT " TLY_ENTRIES_SELECT
			       " FROM ledger_entries e WHERE e.tenant_id = $1 "
			       "ORDER BY e.cause_partition, e.cause_offset, e.tenant_id, e.seq"
			     : "DECLARE tly_audit_entries NO SCROLL CURSOR FOR SELECT " TLY_ENTRIES_SELECT
			       " FROM ledger_entries e "
			       "ORDER BY e.cause_partition, e.cause_offset, e.tenant_id, e.seq",
			   n, n ? v : NULL, r->err);
	if (!res)
		return TLY_E_PG;
	PQclear(res);
	return 0;
}

int tly_audit_pg_run(PGconn *conn, struct tly_audit *a, const struct tly_audit_pg_opts *opts,
		     struct tly_pg_error *err)
{
	struct run r = {conn, a, opts, err, opts->fetch_rows > 0 ? opts->fetch_rows : DEFAULT_FETCH,
			NULL, 0, false};
	struct tly_pg_error rberr;
	PGresult *res = tly_pg_query(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0,
				     NULL, err);
	if (!res)
		return TLY_E_PG;
	PQclear(res);
	int rc = opts->tenant ? 0 : announce_partitions(&r);
	if (rc == 0)
		rc = declare(&r);
	while (rc == 0) {
		PGresult *ents = fetch(&r, "tly_audit_entries", 0);
		if (!ents) {
			rc = TLY_E_PG;
			break;
		}
		int n = PQntuples(ents);
		rc = n ? tly_entries_each(ents, on_entry, &r) : 0;
		PQclear(ents);
		if (rc == TLY_E_CORRUPT)
			snprintf(err->message, sizeof(err->message),
				 "could not read a ledger entry row: it does not read back as an entry");
		if (rc == 0 && opts->progress) {
			struct tly_audit_counts c;
			tly_audit_get_counts(a, &c);
			opts->progress(&c, opts->ud);
		}
		if (n == 0)
			break;
	}
	if (rc == 0)
		rc = feed_inputs(&r, 0, 0, true);
	if (rc == 0)
		rc = tly_audit_finish(a);
	PQclear(r.in);
	if (rc == TLY_E_NOMEM)
		snprintf(err->message, sizeof(err->message), "out of memory");
	if (PQstatus(conn) == CONNECTION_OK && tly_pg_rollback(conn, &rberr) != 0 && rc == 0) {
		*err = rberr;
		rc = TLY_E_PG;
	}
	return rc;
}
