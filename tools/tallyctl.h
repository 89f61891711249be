/* tallyctl's shared pieces: the application struct owned by main, and the commands kept in their own files. */
#ifndef TALLYCTL_H
#define TALLYCTL_H

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

#endif
