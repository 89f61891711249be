/* tallyctl's shared pieces: the application struct owned by main, and the commands kept in their own files. */
#ifndef TALLYCTL_H
#define TALLYCTL_H

#include <stdint.h>

#include <libpq-fe.h>

#include "config.h"

struct app {
	struct tly_config *cfg;     /* owned by main */
	const char *migrations_dir; /* NULL: the migrations compiled in */
};

/* A connection to database.url, or NULL after printing why (tallyctl.c). */
PGconn *tallyctl_connect_db(struct app *app);

typedef int (*command_fn)(struct app *app, int argc, char **argv);

int cmd_publish(struct app *app, int argc, char **argv); /* tallyctl_publish.c */
int cmd_tail(struct app *app, int argc, char **argv);    /* tallyctl_tail.c */
int cmd_quarantine(struct app *app, int argc, char **argv); /* tallyctl_quarantine.c */
int cmd_reserve(struct app *app, int argc, char **argv);    /* tallyctl_reserve.c */
int cmd_status(struct app *app, int argc, char **argv);     /* tallyctl_status.c */
int cmd_rebuild(struct app *app, int argc, char **argv);    /* tallyctl_rebuild.c */
int cmd_audit(struct app *app, int argc, char **argv);      /* tallyctl_audit.c */
int cmd_balance(struct app *app, int argc, char **argv);    /* tallyctl_balance.c */
int cmd_statement(struct app *app, int argc, char **argv);  /* tallyctl_statement.c */

/* µs since the epoch of text read as a PostgreSQL timestamptz; -1 after printing why (tallyctl_audit.c). */
int tallyctl_time_us(PGconn *conn, const char *text, int64_t *out);
/* µs since the epoch as "2026-11-01T00:00:00.000000Z" (tallyctl_audit.c). */
void tallyctl_format_time(int64_t us, char out[32]);

#endif
