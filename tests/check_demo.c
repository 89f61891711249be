/* The real "tallyctl demo", run non-interactively for a few seconds: its report, demo stop, and nothing left running. */
#include <check.h>
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "proc.h"
#include "suites.h"

#define MAX_PIDS 16

struct started {
	char name[64];
	pid_t pid;
};

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

/* The number after label on the report line that starts with "  label", or -1. */
static long report_value(const char *report, const char *label)
{
	char key[128];
	snprintf(key, sizeof(key), "\n  %s ", label);
	const char *at = strstr(report, key);
	return at ? strtol(at + strlen(key), NULL, 10) : -1;
}

static int read_pids(const char *path, struct started *out)
{
	int n = 0;
	FILE *f = fopen(path, "r");
	ck_assert_msg(f != NULL, "no pids file at %s", path);
	while (n < MAX_PIDS && fscanf(f, "%63s %d", out[n].name, &out[n].pid) == 2)
		n++;
	fclose(f);
	return n;
}

static bool has(const struct started *s, int n, const char *name)
{
	for (int i = 0; i < n; i++)
		if (strcmp(s[i].name, name) == 0)
			return true;
	return false;
}

START_TEST(test_demo_report_stop)
{
	char dir[] = "/tmp/tally-demo-test-XXXXXX", state[128], out[160], pids[160], errstr[512];
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(state, sizeof(state), "%s/state", dir);
	snprintf(out, sizeof(out), "%s/demo.out", dir);
	snprintf(pids, sizeof(pids), "%s/pids", state);
	const char *ctl = tly_test_bin("tallyctl");
	char *const argv[] = {(char *)ctl, "demo", "--seconds", "4", "--rate", "300", "--tenants", "10",
			      "--state-dir", state, NULL};
	pid_t demo = tly_proc_spawn(argv, out, errstr, sizeof(errstr));
	ck_assert_msg(demo > 0, "%s", errstr);

	/* the report, then the stack stays up */
	char *text = NULL;
	for (int waited = 0;; waited += 250) {
		free(text);
		text = tly_test_read_file(out);
		if (strstr(text, "make demo-stop"))
			break;
		int status;
		ck_assert_msg(tly_proc_wait(demo, 0, &status) != 0, "the demo exited early:\n%s", text);
		ck_assert_msg(waited < 150000, "no report after 150 s:\n%s", text);
		sleep_ms(250);
	}
	ck_assert_msg(report_value(text, "accepted") > 0, "no accepted decision:\n%s", text);
	ck_assert_msg(report_value(text, "ledger entries") > 0, "%s", text);
	ck_assert_msg(strstr(text, "tally-ledger     tally.events                  0\n"),
		      "the ledger did not catch up:\n%s", text);
	ck_assert_msg(strstr(text, "\naudit: passed"), "the audit did not pass:\n%s", text);
	ck_assert_msg(strstr(text, "/metrics"), "%s", text);

	struct started s[MAX_PIDS];
	int n = read_pids(pids, s);
	ck_assert_msg(has(s, n, "tally-ledger") && has(s, n, "tally-projector") &&
		      has(s, n, "tally-devbroker") && has(s, n, "postgres") && has(s, n, "tallyctl"),
		      "pids file lacks a process (%d listed)", n);
	for (int i = 0; i < n; i++)
		ck_assert_msg(tly_proc_alive(s[i].pid), "%s (pid %d) is not running while the demo is up",
			      s[i].name, (int)s[i].pid);

	/* a second demo on the same state dir is refused while this one runs */
	char *const again[] = {(char *)ctl, "demo", "--state-dir", state, NULL};
	char msg[2048];
	ck_assert_int_eq(tly_proc_run(again, msg, sizeof(msg)), 1);
	ck_assert_msg(strstr(msg, "a demo is already running"), "%s", msg);

	/* demo stop: the demo stops everything it started and exits 0 */
	char *const stop[] = {(char *)ctl, "demo", "stop", "--state-dir", state, NULL};
	ck_assert_int_eq(tly_proc_run(stop, msg, sizeof(msg)), 0);
	ck_assert_msg(strstr(msg, "demo stopped"), "%s", msg);
	int status;
	ck_assert_msg(tly_proc_wait(demo, 60000, &status) == 0, "the demo did not exit");
	free(text);
	text = tly_test_read_file(out);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "demo exit status %d:\n%s",
		      status, text);
	ck_assert_msg(strstr(text, "tally-ledger     stopped (exit 0)") &&
		      strstr(text, "tally-projector  stopped (exit 0)"), "%s", text);
	for (int i = 0; i < n; i++)
		for (int waited = 0; tly_proc_alive(s[i].pid); waited += 100) {
			ck_assert_msg(waited < 10000, "%s (pid %d) still runs after demo stop",
				      s[i].name, (int)s[i].pid);
			sleep_ms(100);
		}
	ck_assert_msg(access(pids, F_OK) != 0, "the pids file stayed behind");

	/* nothing left to stop */
	ck_assert_int_eq(tly_proc_run(stop, msg, sizeof(msg)), 0);
	ck_assert_msg(strstr(msg, "no demo is running"), "%s", msg);
	free(text);
	char *const rm[] = {"rm", "-rf", dir, NULL};
	ck_assert_int_eq(tly_proc_run(rm, NULL, 0), 0);
}
END_TEST

Suite *demo_suite(void)
{
	Suite *s = suite_create("demo");
	TCase *tc = tcase_create("demo");
	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, test_demo_report_stop);
	suite_add_tcase(s, tc);
	return s;
}
