/* The embedded dev stack of tallyctl dev and tallyctl demo: a dev broker and a throw-away PostgreSQL, migrated. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "migrate.h"
#include "pg.h"
#include "proc.h"
#include "tallyctl.h"

/* Start tally-devbroker with its files in ds->dir and read its bootstrap servers. 0 or -1. */
static int broker_up(struct devstack *ds, int partitions)
{
	char err[1024], exe[PATH_MAX], bootfile[PATH_MAX + 16], parts[16];
	tly_proc_sibling("tally-devbroker", exe, sizeof(exe));
	snprintf(bootfile, sizeof(bootfile), "%s/bootstrap", ds->dir);
	snprintf(ds->ctl, sizeof(ds->ctl), "%s/broker.sock", ds->dir);
	snprintf(ds->broker_log, sizeof(ds->broker_log), "%s/devbroker.log", ds->dir);
	snprintf(parts, sizeof(parts), "%d", partitions);
	if (unlink(bootfile) != 0 && errno != ENOENT) {
		fprintf(stderr, "tallyctl: could not remove \"%s\": %s\n", bootfile, strerror(errno));
		return -1;
	}
	char *bargv[] = {exe, "--partitions", parts, "--bootstrap-file", bootfile, "--control", ds->ctl,
			 NULL};
	if ((ds->broker = tly_proc_spawn(bargv, ds->broker_log, err, sizeof(err))) < 0) {
		fprintf(stderr, "tallyctl: could not start tally-devbroker: %s\n", err);
		return -1;
	}
	if (tly_proc_wait_file(bootfile, 10000) != 0) {
		fprintf(stderr, "tallyctl: tally-devbroker did not start (see %s)\n", ds->broker_log);
		return -1;
	}
	FILE *bf = fopen(bootfile, "r");
	if (!bf || !fgets(ds->bootstraps, sizeof(ds->bootstraps), bf)) {
		fprintf(stderr, "tallyctl: could not read \"%s\"\n", bootfile);
		if (bf)
			fclose(bf);
		return -1;
	}
	fclose(bf);
	ds->bootstraps[strcspn(ds->bootstraps, "\r\n")] = '\0';
	return 0;
}

/* Apply every migration to the stack's database. 0 or -1. */
static int migrate(struct app *app, struct devstack *ds)
{
	char err[1024];
	int rc = -1;
	PGconn *conn = NULL;
	struct tly_migrate_set *set = tallyctl_load_migrations(app, err, sizeof(err));
	if (!set || !(conn = tly_pg_connect(tly_devpg_conninfo(ds->pg), "tallyctl", err, sizeof(err))) ||
	    tly_migrate_up(conn, set, &ds->applied, err, sizeof(err)) != 0)
		fprintf(stderr, "tallyctl: %s\n", err);
	else
		rc = 0;
	if (conn)
		PQfinish(conn);
	tly_migrate_free(set);
	return rc;
}

int tallyctl_devstack_up(struct app *app, const char *dir, int partitions, struct devstack *ds)
{
	char err[1024], parts[16];
	memset(ds, 0, sizeof(*ds));
	ds->broker = -1;
	snprintf(ds->dir, sizeof(ds->dir), "%s", dir);
	if (!(ds->pg = tly_devpg_start(NULL, err, sizeof(err)))) {
		fprintf(stderr, "tallyctl: could not start PostgreSQL: %s\n", err);
		goto fail;
	}
	if (broker_up(ds, partitions) != 0 || migrate(app, ds) != 0)
		goto fail;
	snprintf(parts, sizeof(parts), "%d", partitions);
	if (tly_config_set(app->cfg, "database.url", tly_devpg_conninfo(ds->pg), err, sizeof(err)) != 0 ||
	    tly_config_set(app->cfg, "kafka.bootstrap.servers", ds->bootstraps, err, sizeof(err)) != 0 ||
	    tly_config_set(app->cfg, "topics.partitions", parts, err, sizeof(err)) != 0) {
		fprintf(stderr, "tallyctl: %s\n", err);
		goto fail;
	}
	snprintf(ds->envfile, sizeof(ds->envfile), "%s/env", ds->dir);
	FILE *ef = fopen(ds->envfile, "w");
	if (!ef) {
		fprintf(stderr, "tallyctl: could not write \"%s\": %s\n", ds->envfile, strerror(errno));
		goto fail;
	}
	fprintf(ef, "export TALLY_DATABASE_URL='%s'\nexport TALLY_KAFKA_BOOTSTRAP_SERVERS='%s'\n",
		tly_devpg_conninfo(ds->pg), ds->bootstraps);
	if (fclose(ef) != 0) {
		fprintf(stderr, "tallyctl: could not write \"%s\": %s\n", ds->envfile, strerror(errno));
		goto fail;
	}
	return 0;
fail:
	tallyctl_devstack_down(ds);
	return -1;
}

void tallyctl_devstack_down(struct devstack *ds)
{
	if (ds->broker > 0)
		tly_proc_stop(ds->broker, 5000);
	ds->broker = -1;
	tly_devpg_stop(ds->pg);
	ds->pg = NULL;
}
