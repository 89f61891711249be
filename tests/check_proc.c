/* lib/proc: scheduler time of a process, its threads and its children. */
#include <check.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "proc.h"
#include "suites.h"

/* Keep a CPU busy for ms of this thread's own CPU time. */
static void spin_ms(int ms)
{
	struct timespec t0, t;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
	do
		clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
	while ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 < ms);
}

START_TEST(test_cpu_of_self_and_children)
{
	struct tly_proc_cpu a = {0}, b = {0}, with = {0}, without = {0};
	ck_assert_int_eq(tly_proc_cpu_add(getpid(), false, &a), 0);
	spin_ms(30);
	ck_assert_int_eq(tly_proc_cpu_add(getpid(), false, &b), 0);
	ck_assert_int_ge(b.on_cpu_us - a.on_cpu_us, 25000);

	int ready[2];
	ck_assert_int_eq(pipe(ready), 0);
	pid_t child = fork();
	ck_assert_int_ge(child, 0);
	if (child == 0) {
		spin_ms(60);
		(void)!write(ready[1], "x", 1);
		pause();
		_exit(0);
	}
	char c;
	ck_assert_int_eq(read(ready[0], &c, 1), 1);
	ck_assert_int_eq(tly_proc_cpu_add(getpid(), true, &with), 0);
	ck_assert_int_eq(tly_proc_cpu_add(getpid(), false, &without), 0);
	ck_assert_int_ge(with.on_cpu_us - without.on_cpu_us, 50000);
	kill(child, SIGKILL);
	ck_assert_int_eq(waitpid(child, NULL, 0), child);
	close(ready[0]);
	close(ready[1]);
	struct tly_proc_cpu gone = {0};
	ck_assert_int_eq(tly_proc_cpu_add(child, false, &gone), -1); /* reaped: no such process */
	ck_assert_int_eq(gone.on_cpu_us, 0);
}
END_TEST

/* The parent from /proc/PID/stat; CPU seconds of self, and of a child once reaped. */
START_TEST(test_parent_and_stat_cpu)
{
	ck_assert_int_eq(tly_proc_parent(getpid()), getppid());
	ck_assert_int_eq(tly_proc_parent(-1), -1);
	double before = tly_proc_cpu_s(getpid(), true);
	ck_assert(before >= 0);
	pid_t child = fork();
	ck_assert_int_ge(child, 0);
	if (child == 0) {
		spin_ms(200);
		_exit(0);
	}
	ck_assert_int_eq(tly_proc_parent(child), getpid());
	ck_assert_int_eq(waitpid(child, NULL, 0), child);
	/* 200 ms of the child's CPU, counted in clock ticks (10 ms): at least 0.15 s */
	ck_assert(tly_proc_cpu_s(getpid(), true) - before >= 0.15);
	ck_assert(tly_proc_cpu_s(child, false) < 0); /* reaped: no such process */
}
END_TEST

static volatile sig_atomic_t got_stop, got_reload;

static void note_stop(int sig)
{
	got_stop = sig;
}

static void note_reload(int sig)
{
	got_reload = sig;
}

/* SIGINT and SIGTERM reach stop, SIGHUP reload; without reload, SIGHUP keeps what it had. */
START_TEST(test_on_signals)
{
	struct sigaction ignore = {.sa_handler = SIG_IGN}, was;
	ck_assert_int_eq(sigemptyset(&ignore.sa_mask), 0);
	ck_assert_int_eq(sigaction(SIGHUP, &ignore, NULL), 0);
	ck_assert_int_eq(tly_proc_on_signals(note_stop, NULL), 0);
	ck_assert_int_eq(raise(SIGTERM), 0);
	ck_assert_int_eq(got_stop, SIGTERM);
	ck_assert_int_eq(raise(SIGINT), 0);
	ck_assert_int_eq(got_stop, SIGINT);
	ck_assert_int_eq(sigaction(SIGHUP, NULL, &was), 0);
	ck_assert(was.sa_handler == SIG_IGN);
	ck_assert_int_eq(tly_proc_on_signals(note_stop, note_reload), 0);
	ck_assert_int_eq(raise(SIGHUP), 0);
	ck_assert_int_eq(got_reload, SIGHUP);
	struct sigaction dfl = {.sa_handler = SIG_DFL};
	ck_assert_int_eq(sigemptyset(&dfl.sa_mask), 0);
	ck_assert_int_eq(sigaction(SIGINT, &dfl, NULL), 0);
	ck_assert_int_eq(sigaction(SIGTERM, &dfl, NULL), 0);
	ck_assert_int_eq(sigaction(SIGHUP, &dfl, NULL), 0);
}
END_TEST

Suite *proc_suite(void)
{
	Suite *s = suite_create("proc");
	TCase *tc = tcase_create("proc");
	tcase_add_test(tc, test_cpu_of_self_and_children);
	tcase_add_test(tc, test_parent_and_stat_cpu);
	tcase_add_test(tc, test_on_signals);
	suite_add_tcase(s, tc);
	return s;
}
