/* Child processes for the dev stack and the tests: spawn, wait, stop, run-and-capture. */
#ifndef TLY_PROC_H
#define TLY_PROC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "err.h"

/*
 * Start argv[0] (searched in PATH) with argv. stdout and stderr go to log_path (appended) when it
 * is not NULL, else are inherited. Returns the pid, or -1 with errstr filled.
 */
pid_t tly_proc_spawn(char *const argv[], const char *log_path, char *errstr, size_t errlen);

/*
 * stop(sig) for SIGINT and SIGTERM, and reload(sig) for SIGHUP unless reload is NULL (no
 * SA_RESTART: a blocking call returns early, EINTR). 0, or -1 with errno set.
 */
int tly_proc_on_signals(void (*stop)(int), void (*reload)(int)) TLY_MUST_CHECK;

/*
 * Stop pid: SIGTERM, wait up to timeout_ms, then SIGKILL. Returns the exit status as waitpid gives
 * it, or -1 if the process was not our child.
 */
int tly_proc_stop(pid_t pid, int timeout_ms);

/* Wait up to timeout_ms for pid to exit; 0 and *status filled, or TLY_E_TIMEOUT. */
int tly_proc_wait(pid_t pid, int timeout_ms, int *status) TLY_MUST_CHECK;

/*
 * Run argv to completion, capturing stdout+stderr (truncated to outlen-1, NUL-terminated) into out
 * (may be NULL). Returns the exit code (0..255), or -1 on spawn failure / signal death.
 */
int tly_proc_run(char *const argv[], char *out, size_t outlen);

/*
 * Whether pid is a live process: it exists and is not a zombie (one that exited and waits for its
 * parent to reap it, which a parent that is gone may never do). Any process, not only a child.
 */
bool tly_proc_alive(pid_t pid);

/* The pid on the first line of the file at path (a pid file), or -1 when it cannot be read. */
pid_t tly_proc_read_pid(const char *path);

/*
 * Path of a program built beside the running one (DIR_OF(/proc/self/exe)/program) into out; just
 * program (searched in PATH) when the running program's path cannot be read.
 */
void tly_proc_sibling(const char *program, char *out, size_t outlen);

/* Scheduler time of a process's threads, from /proc/PID/task/TID/schedstat (microseconds). */
struct tly_proc_cpu {
	int64_t on_cpu_us;   /* running */
	int64_t waiting_us;  /* runnable, waiting for a CPU */
};

/*
 * Add the scheduler time of every thread of pid, and with children that of its child processes
 * (a postmaster's backends), to *cpu. 0, or -1 when pid's threads cannot be read.
 */
int tly_proc_cpu_add(pid_t pid, bool children, struct tly_proc_cpu *cpu);

/* The parent of a process (a backend's: its postmaster), or -1 when pid cannot be read. */
pid_t tly_proc_parent(pid_t pid);

/*
 * CPU seconds (user + system) of a process from /proc/PID/stat, or with reaped_children those of
 * its children that ended and were waited for (a postmaster's: the backends of closed
 * connections). -1 when pid cannot be read.
 */
double tly_proc_cpu_s(pid_t pid, bool reaped_children);

/* Wait until path exists and is non-empty, up to timeout_ms. 0 or TLY_E_TIMEOUT. */
int tly_proc_wait_file(const char *path, int timeout_ms) TLY_MUST_CHECK;

#endif
