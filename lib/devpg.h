/* A throw-away PostgreSQL cluster in a temp dir, for the tests and the dev stack. */
#ifndef TLY_DEVPG_H
#define TLY_DEVPG_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "err.h"

struct tly_devpg;

/*
 * Create a temp dir under parent_dir (NULL: /tmp), initdb a cluster into DIR/data (trust auth,
 * superuser "postgres", UTF8, locale C, no fsync), and start it listening only on a unix socket in
 * DIR, with a free port number naming the socket; the server logs to DIR/postgres.log. As root the
 * server binaries run as the "postgres" system user (which then owns DIR). Binaries come from
 * $TALLY_PG_BINDIR, else the highest /usr/lib/postgresql/N/bin. Returns the running cluster (caller
 * owns it: tly_devpg_stop) or NULL with errstr filled; nothing is left behind on failure.
 */
struct tly_devpg *tly_devpg_start(const char *parent_dir, char *errstr, size_t errlen);

/* The same, with durable true giving fsync, full_page_writes and synchronous_commit on (benchmarks). */
struct tly_devpg *tly_devpg_start_durable(const char *parent_dir, bool durable, char *errstr,
					  size_t errlen);

/* WAL a durable cluster keeps as zero-filled future segments (its min_wal_size), in MB. */
#define TLY_DEVPG_PREALLOC_WAL_MB 512

/*
 * Leave TLY_DEVPG_PREALLOC_WAL_MB of WAL segments ready ahead of the insert position of a durable
 * cluster, so that commits do not wait while the server zero-fills a new 16 MB segment (a fresh
 * cluster does that every 1-2 s under load): switches through that many segments, then a
 * CHECKPOINT recycles them as future ones. Ends with a checkpoint done. 0, or TLY_E_PG with errstr.
 */
int tly_devpg_prealloc_wal(struct tly_devpg *pg, char *errstr, size_t errlen) TLY_MUST_CHECK;

/* Stop the server (fast, then immediate, then SIGKILL) and remove its dir. Accepts NULL. */
void tly_devpg_stop(struct tly_devpg *pg);

/*
 * Stop the server but keep its data: a clean shutdown ("fast"), or, with immediate, the shutdown
 * that needs crash recovery on the next start (for crash tests). 0, or TLY_E_IO with errstr.
 */
int tly_devpg_halt(struct tly_devpg *pg, bool immediate, char *errstr, size_t errlen) TLY_MUST_CHECK;

/* Start a halted server again on the same dir and port; returns once it accepts connections. */
int tly_devpg_resume(struct tly_devpg *pg, char *errstr, size_t errlen) TLY_MUST_CHECK;

/* tly_devpg_halt (fast) then tly_devpg_resume: connections are dropped, data is kept. */
int tly_devpg_restart(struct tly_devpg *pg, char *errstr, size_t errlen) TLY_MUST_CHECK;

/* "host=DIR port=N user=postgres dbname=postgres" (owned by pg). */
const char *tly_devpg_conninfo(const struct tly_devpg *pg);
/* The temp dir holding data/, the socket and postgres.log (owned by pg). */
const char *tly_devpg_dir(const struct tly_devpg *pg);
int tly_devpg_port(const struct tly_devpg *pg);
/* The postmaster's pid (from its postmaster.pid), or -1 when it is not running. */
pid_t tly_devpg_pid(const struct tly_devpg *pg);

#endif
