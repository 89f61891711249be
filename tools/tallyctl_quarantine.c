/* tallyctl quarantine: list the input records tally-ledger kept aside, and replay them to their topic. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "pg.h"
#include "producer.h"
#include "tallyctl.h"

static int quarantine_list(PGconn *conn)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn,
				     "SELECT id, topic, partition, \"offset\", reason, "
				     "to_char(quarantined_at, 'YYYY-MM-DD HH24:MI:SS'), "
				     "coalesce(to_char(replayed_at, 'YYYY-MM-DD HH24:MI:SS'), '-') "
				     "FROM quarantine ORDER BY id",
				     0, NULL, &err);
	if (!res) {
		fprintf(stderr, "tallyctl: could not list the quarantine: %s\n", err.message);
		return 1;
	}
	printf("%-8s %-18s %9s %12s %-22s %-19s %s\n", "id", "topic", "partition", "offset", "reason",
	       "quarantined_at", "replayed_at");
	for (int i = 0; i < PQntuples(res); i++)
		printf("%-8s %-18s %9s %12s %-22s %-19s %s\n", PQgetvalue(res, i, 0),
		       PQgetvalue(res, i, 1), PQgetvalue(res, i, 2), PQgetvalue(res, i, 3),
		       PQgetvalue(res, i, 4), PQgetvalue(res, i, 5), PQgetvalue(res, i, 6));
	printf("(%d row%s)\n", PQntuples(res), PQntuples(res) == 1 ? "" : "s");
	PQclear(res);
	return 0;
}

/* Re-produce one row's raw value with the tenant key: the event's tenant when it decodes, else the stored key. */
static int replay_row(struct tly_producer *prod, struct tly_codec *codec, PGresult *res, int i)
{
	char errstr[512], tenant[37];
	size_t klen = 0, vlen = 0;
	unsigned char *key = PQgetisnull(res, i, 2)
				     ? NULL
				     : PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 2), &klen);
	unsigned char *value = PQgetisnull(res, i, 3)
				       ? NULL
				       : PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 3), &vlen);
	struct tly_event ev = {0};
	const void *k = key;
	int rc = 1;
	if (!value) {
		fprintf(stderr, "tallyctl: quarantine row %s has no value to replay\n", PQgetvalue(res, i, 0));
		goto out;
	}
	if (tly_codec_decode(codec, value, vlen, &ev, errstr, sizeof(errstr)) == 0 &&
	    !tly_uuid_is_nil(&ev.tenant_id)) {
		tly_uuid_format(&ev.tenant_id, tenant);
		k = tenant;
		klen = 36;
	}
	if (!k) {
		fprintf(stderr, "tallyctl: quarantine row %s has no tenant key (it does not decode: %s)\n",
			PQgetvalue(res, i, 0), errstr);
		goto out;
	}
	if (tly_producer_publish_raw(prod, PQgetvalue(res, i, 1), k, klen, -1, value, vlen, NULL,
				     errstr, sizeof(errstr)) != 0) {
		fprintf(stderr, "tallyctl: could not replay quarantine row %s: %s\n",
			PQgetvalue(res, i, 0), errstr);
		goto out;
	}
	rc = 0;
out:
	tly_event_free(&ev);
	PQfreemem(key);
	PQfreemem(value);
	return rc;
}

static int quarantine_replay(struct app *app, PGconn *conn, const char *which)
{
	char errstr[512];
	struct tly_pg_error err;
	int rc = 1, failed = 0;
	bool all = strcmp(which, "--all") == 0;
	const char *const v[] = {which};
	struct tly_codec *codec = NULL;
	struct tly_producer *prod = NULL;
	PGresult *res = tly_pg_query(conn,
				     all ? "SELECT id, topic, key, value FROM quarantine "
					   "WHERE replayed_at IS NULL ORDER BY id"
					 : "SELECT id, topic, key, value FROM quarantine WHERE id = $1::bigint",
				     all ? 0 : 1, all ? NULL : v, &err);
	if (!res) {
		fprintf(stderr, "tallyctl: could not read the quarantine: %s\n", err.message);
		goto out;
	}
	if (!all && PQntuples(res) == 0) {
		fprintf(stderr, "tallyctl: no quarantine row %s\n", which);
		goto out;
	}
	if (!(codec = tly_codec_new(errstr, sizeof(errstr))) ||
	    !(prod = tly_producer_new(app->cfg, NULL, NULL, errstr, sizeof(errstr)))) {
		fprintf(stderr, "tallyctl: %s\n", errstr);
		goto out;
	}
	for (int i = 0; i < PQntuples(res); i++)
		failed += replay_row(prod, codec, res, i);
	if (tly_producer_flush(prod, 30000) != 0) {
		fprintf(stderr, "tallyctl: replayed records were not all delivered; nothing marked\n");
		goto out;
	}
	for (int i = 0; i < PQntuples(res); i++) {
		const char *const id[] = {PQgetvalue(res, i, 0)};
		if (tly_pg_exec(conn, "UPDATE quarantine SET replayed_at = now() WHERE id = $1::bigint", 1,
				id, &err) != 0) {
			fprintf(stderr, "tallyctl: could not mark row %s replayed: %s\n", id[0], err.message);
			goto out;
		}
	}
	printf("replayed %d record(s)%s\n", PQntuples(res) - failed, failed ? ", some failed" : "");
	rc = failed ? 1 : 0;
out:
	tly_producer_free(prod, 5000);
	tly_codec_free(codec);
	PQclear(res);
	return rc;
}

int cmd_quarantine(struct app *app, int argc, char **argv)
{
	if (argc < 2 || (strcmp(argv[1], "list") == 0 && argc != 2) ||
	    (strcmp(argv[1], "replay") == 0 && argc != 3) ||
	    (strcmp(argv[1], "list") != 0 && strcmp(argv[1], "replay") != 0)) {
		fprintf(stderr, "tallyctl: usage: tallyctl quarantine list | quarantine replay ID|--all\n");
		return 2;
	}
	PGconn *conn = tallyctl_connect_db(app);
	if (!conn)
		return 1;
	int rc = strcmp(argv[1], "list") == 0 ? quarantine_list(conn)
					       : quarantine_replay(app, conn, argv[2]);
	PQfinish(conn);
	return rc;
}
