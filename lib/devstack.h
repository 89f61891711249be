/*
 * The dev stack of the programs that drive the real daemons (tally-chaos, tally-soak): a
 * throw-away PostgreSQL cluster with a migrated database, a tally-devbroker child with its control
 * socket, and a temp dir holding the broker's files and the logs of the programs spawned on it.
 * Programs are the ones built beside the running one (tly_proc_sibling).
 */
#ifndef TLY_DEVSTACK_H
#define TLY_DEVSTACK_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "err.h"

struct tly_devpg;

struct tly_devstack {
	struct tly_devpg *pg;  /* owned: the cluster */
	pid_t broker;          /* the tally-devbroker child */
	char dir[64];          /* temp dir: bootstrap, ctl.sock, *.log */
	char bootstraps[512];  /* "127.0.0.1:port,…" */
	char ctl_path[128];    /* the broker's control socket (lib/devbroker_ctl.h) */
	char db[1024];         /* conninfo of the stack's migrated database */
};

/*
 * Start PostgreSQL (durable: fsync and synchronous commit on), create and migrate database
 * dbname (a plain identifier), start a tally-devbroker with brokers brokers and partitions
 * partitions per topic. 0, or TLY_E_IO / TLY_E_PG with errstr filled (nothing left running).
 */
int tly_devstack_start(struct tly_devstack *s, const char *dbname, int brokers, int partitions,
		       bool durable, char *errstr, size_t errlen) TLY_MUST_CHECK;

/* Another migrated database dbname on the stack's cluster; its conninfo into out. */
int tly_devstack_new_db(struct tly_devstack *s, const char *dbname, char *out, size_t outlen,
			char *errstr, size_t errlen) TLY_MUST_CHECK;

/*
 * Spawn program (built beside this one) on db and the stack's broker, its HTTP endpoint on a free
 * port, with the extra arguments (NULL-terminated; NULL for none) after the stack's settings,
 * appending its output to DIR/log_name. The pid, or -1 with errstr filled.
 */
pid_t tly_devstack_spawn(const struct tly_devstack *s, const char *program, const char *db,
			 const char *const *extra, const char *log_name, char *errstr, size_t errlen);

/* Stop the broker and the cluster; remove the temp dir unless keep_dir. Accepts a stopped stack. */
void tly_devstack_stop(struct tly_devstack *s, bool keep_dir);

#endif
