/* The per-test dev broker: a tally-devbroker process in a temp dir, started and stopped by the harness. */
#include "harness.h"

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "devbroker_ctl.h"
#include "proc.h"

#define START_TIMEOUT_MS 15000
#define STOP_TIMEOUT_MS 10000
#define DIR_PARENT "/tmp"
#define DIR_PREFIX "tally-devbroker-"
#define STALE_AFTER_S 60

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

static void rm_tree(const char *dir)
{
	if (dir[0] && nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS) != 0 && errno != ENOENT)
		fprintf(stderr, "could not remove test directory \"%s\": %s\n", dir, strerror(errno));
}

/*
 * Brokers this process started and has not stopped. Under CK_FORK=no a failed assertion jumps out
 * of the test, so an atexit handler stops what is left at the end of the run. (Under CK_FORK, Check
 * kills the failed test's process group, broker included; see sweep_stale_dirs for its dir.)
 */
#define MAX_LIVE 8
static struct tly_test_broker *live[MAX_LIVE];

static void stop_leftovers(void)
{
	for (int i = 0; i < MAX_LIVE; i++) {
		struct tly_test_broker *b = live[i];
		if (!b)
			continue;
		live[i] = NULL;
		if (b->pid > 0)
			(void)tly_proc_stop(b->pid, 2000);
		b->pid = 0;
		rm_tree(b->dir);
	}
}

static void track(struct tly_test_broker *b, bool add)
{
	static bool registered;
	if (add && !registered)
		registered = atexit(stop_leftovers) == 0;
	for (int i = 0; i < MAX_LIVE; i++) {
		if (add ? live[i] == NULL : live[i] == b) {
			live[i] = add ? b : NULL;
			return;
		}
	}
}

/* The last bytes of the broker's log, for failure messages (the dir is removed afterwards). */
static const char *log_tail(const struct tly_test_broker *b, char *buf, size_t len)
{
	buf[0] = '\0';
	FILE *f = fopen(b->log_path, "r");
	if (!f)
		return buf;
	if (fseek(f, 0, SEEK_END) == 0) {
		long size = ftell(f);
		long from = size > (long)len - 1 ? size - ((long)len - 1) : 0;
		if (fseek(f, from, SEEK_SET) == 0) {
			size_t n = fread(buf, 1, len - 1, f);
			buf[n] = '\0';
		}
	}
	fclose(f);
	return buf;
}

/*
 * Check kills a failed test's process group (the broker with it) without running any cleanup, so
 * its dir stays behind for a post-mortem. Each start removes such dirs once they are a minute old
 * and no broker answers on their control socket (concurrent runs keep theirs).
 */
static void sweep_stale_dirs(void)
{
	DIR *tmp = opendir(DIR_PARENT);
	struct dirent *e;
	if (!tmp)
		return;
	while ((e = readdir(tmp)) != NULL) {
		char path[512], sock[600], reply[64];
		struct stat st;
		if (strncmp(e->d_name, DIR_PREFIX, strlen(DIR_PREFIX)) != 0 ||
		    strlen(e->d_name) != strlen(DIR_PREFIX) + 6)
			continue;
		snprintf(path, sizeof(path), DIR_PARENT "/%s", e->d_name);
		if (lstat(path, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid() ||
		    time(NULL) - st.st_mtime < STALE_AFTER_S)
			continue;
		snprintf(sock, sizeof(sock), "%s/ctl.sock", path);
		if (tly_devbroker_ctl(sock, "ping", reply, sizeof(reply)) == TLY_E_IO)
			rm_tree(path);
	}
	closedir(tmp);
}

void tly_test_broker_start(struct tly_test_broker *b, int brokers, int partitions)
{
	char nbrokers[16], nparts[16], errstr[512], reply[TLY_DEVBROKER_LINE_MAX + 1];
	char tail[1500];
	memset(b, 0, sizeof(*b));
	sweep_stale_dirs();
	snprintf(b->dir, sizeof(b->dir), DIR_PARENT "/" DIR_PREFIX "XXXXXX");
	ck_assert_msg(mkdtemp(b->dir) != NULL, "could not create temp dir: %s", strerror(errno));
	track(b, true);
	snprintf(b->bootstrap_file, sizeof(b->bootstrap_file), "%s/bootstrap", b->dir);
	snprintf(b->ctl_path, sizeof(b->ctl_path), "%s/ctl.sock", b->dir);
	snprintf(b->log_path, sizeof(b->log_path), "%s/devbroker.log", b->dir);
	snprintf(nbrokers, sizeof(nbrokers), "%d", brokers);
	snprintf(nparts, sizeof(nparts), "%d", partitions);

	char *const argv[] = {(char *)tly_test_bin("tally-devbroker"),
			      "--brokers", nbrokers,
			      "--partitions", nparts,
			      "--bootstrap-file", b->bootstrap_file,
			      "--control", b->ctl_path,
			      NULL};
	b->pid = tly_proc_spawn(argv, b->log_path, errstr, sizeof(errstr));
	ck_assert_msg(b->pid > 0, "could not start tally-devbroker: %s", errstr);

	if (tly_proc_wait_file(b->bootstrap_file, START_TIMEOUT_MS) != 0) {
		int status = 0;
		bool exited = tly_proc_wait(b->pid, 0, &status) == 0;
		if (exited)
			b->pid = 0;
		ck_abort_msg("tally-devbroker did not write \"%s\" within %d ms (%s); its log:\n%s",
			     b->bootstrap_file, START_TIMEOUT_MS,
			     exited ? "it exited" : "still running", log_tail(b, tail, sizeof(tail)));
	}
	FILE *f = fopen(b->bootstrap_file, "r");
	ck_assert_msg(f != NULL, "could not open \"%s\": %s", b->bootstrap_file, strerror(errno));
	bool got = fgets(b->bootstraps, sizeof(b->bootstraps), f) != NULL;
	fclose(f);
	ck_assert_msg(got, "could not read \"%s\"", b->bootstrap_file);
	b->bootstraps[strcspn(b->bootstraps, "\r\n")] = '\0';
	ck_assert_msg(b->bootstraps[0] != '\0', "bootstrap file \"%s\" is empty", b->bootstrap_file);

	/* The socket listens before the file is written; still, allow for a slow start. */
	int rc = TLY_E_IO;
	for (int waited = 0; waited < START_TIMEOUT_MS; waited += 20) {
		rc = tly_devbroker_ctl(b->ctl_path, "ping", reply, sizeof(reply));
		if (rc == 0)
			break;
		struct timespec ts = {0, 20 * 1000000L};
		nanosleep(&ts, NULL);
	}
	ck_assert_msg(rc == 0, "tally-devbroker does not answer ping on \"%s\": %s; its log:\n%s",
		      b->ctl_path, reply, log_tail(b, tail, sizeof(tail)));
}

void tly_test_broker_stop(struct tly_test_broker *b)
{
	char tail[1500] = "";
	int status = 0;
	track(b, false);
	if (b->pid > 0) {
		status = tly_proc_stop(b->pid, STOP_TIMEOUT_MS);
		b->pid = 0;
		if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
			log_tail(b, tail, sizeof(tail));
		else
			status = 0;
	}
	rm_tree(b->dir);
	b->dir[0] = '\0';
	ck_assert_msg(status == 0, "tally-devbroker did not exit with status 0 on SIGTERM (wait status %d); its log:\n%s",
		      status, tail);
}
