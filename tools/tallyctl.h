/* tallyctl's shared pieces: the application struct owned by main, and the commands kept in their own files. */
#ifndef TALLYCTL_H
#define TALLYCTL_H

#include <limits.h>
#include <sys/types.h>
#include <stdint.h>

#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>

#include "config.h"
#include "devpg.h"
#include "lag.h"
#include "migrate.h"

struct app {
	struct tly_config *cfg;     /* owned by main */
	const char *migrations_dir; /* NULL: the migrations compiled in */
};

/* A connection to database.url, or NULL after printing why (tallyctl.c). */
PGconn *tallyctl_connect_db(struct app *app);

/* The migrations of --migrations DIR, else the compiled-in set; NULL with err filled (tallyctl.c). */
struct tly_migrate_set *tallyctl_load_migrations(struct app *app, char *err, size_t errlen);

/* A client for metadata and watermark queries, or NULL after printing why (tallyctl_status.c). */
rd_kafka_t *tallyctl_kafka_client(struct app *app);

/* Every Tally consumer's lag per topic and partition (tly_lag_collect; tallyctl_status.c). */
int tallyctl_lag_collect(struct app *app, PGconn *conn, rd_kafka_t *rk, int timeout_ms,
			 struct tly_lag_report *report, char *err, size_t errlen) TLY_MUST_CHECK;

/* The embedded dev stack of `tallyctl dev` and `tallyctl demo` (tallyctl_devstack.c). */
struct devstack {
	struct tly_devpg *pg;     /* owned; the throw-away PostgreSQL */
	pid_t broker;             /* tally-devbroker, -1 when not running */
	char dir[1024];           /* holds the broker's files and the env file (the caller's) */
	char bootstraps[512];     /* the broker's bootstrap servers */
	char ctl[PATH_MAX];       /* the broker's control socket */
	char broker_log[PATH_MAX];
	char envfile[PATH_MAX];   /* TALLY_DATABASE_URL and TALLY_KAFKA_BOOTSTRAP_SERVERS, for a shell */
	int applied;              /* migrations applied */
};

/*
 * Start a throw-away PostgreSQL and a tally-devbroker with partitions partitions per topic (its
 * files in dir, which must exist), migrate the database, write dir/env, and point app's
 * database.url and kafka.bootstrap.servers at them. 0, or -1 after printing why (nothing left
 * running; ds is then down).
 */
int tallyctl_devstack_up(struct app *app, const char *dir, int partitions, struct devstack *ds);
/* Stop the broker and PostgreSQL (removing its data); dir itself stays. Accepts a stack half up. */
void tallyctl_devstack_down(struct devstack *ds);

typedef int (*command_fn)(struct app *app, int argc, char **argv);

int cmd_publish(struct app *app, int argc, char **argv); /* tallyctl_publish.c */
int cmd_tail(struct app *app, int argc, char **argv);    /* tallyctl_tail.c */
int cmd_quarantine(struct app *app, int argc, char **argv); /* tallyctl_quarantine.c */
int cmd_reserve(struct app *app, int argc, char **argv);    /* tallyctl_reserve.c */
int cmd_status(struct app *app, int argc, char **argv);     /* tallyctl_status.c */
int cmd_rebuild(struct app *app, int argc, char **argv);    /* tallyctl_rebuild.c */
int cmd_demo(struct app *app, int argc, char **argv);       /* tallyctl_demo.c */
int cmd_audit(struct app *app, int argc, char **argv);      /* tallyctl_audit.c */
int cmd_balance(struct app *app, int argc, char **argv);    /* tallyctl_balance.c */
int cmd_statement(struct app *app, int argc, char **argv);  /* tallyctl_statement.c */

/* µs since the epoch of text read as a PostgreSQL timestamptz; -1 after printing why (tallyctl_audit.c). */
int tallyctl_time_us(PGconn *conn, const char *text, int64_t *out);
/* µs since the epoch as "2026-11-01T00:00:00.000000Z" (tallyctl_audit.c). */
void tallyctl_format_time(int64_t us, char out[32]);

#endif
