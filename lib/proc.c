/* Child processes: fork/exec with optional log redirection, bounded waits, escalating stop. */
#include "proc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

pid_t tly_proc_spawn(char *const argv[], const char *log_path, char *errstr, size_t errlen)
{
	int fd = -1;
	if (log_path) {
		fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		if (fd < 0) {
			snprintf(errstr, errlen, "could not open log file \"%s\": %s", log_path,
				 strerror(errno));
			return -1;
		}
	}
	pid_t pid = fork();
	if (pid < 0) {
		snprintf(errstr, errlen, "could not fork: %s", strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	if (pid == 0) {
		if (fd >= 0) {
			dup2(fd, STDOUT_FILENO);
			dup2(fd, STDERR_FILENO);
		}
		signal(SIGPIPE, SIG_DFL);
		execvp(argv[0], argv);
		fprintf(stderr, "could not execute \"%s\": %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	if (fd >= 0)
		close(fd);
	return pid;
}

int tly_proc_wait(pid_t pid, int timeout_ms, int *status)
{
	for (int waited = 0;; waited += 10) {
		pid_t r = waitpid(pid, status, WNOHANG);
		if (r == pid)
			return 0;
		if (r < 0 && errno != EINTR)
			return TLY_E_NOT_FOUND;
		if (waited >= timeout_ms)
			return TLY_E_TIMEOUT;
		sleep_ms(10);
	}
}

int tly_proc_stop(pid_t pid, int timeout_ms)
{
	int status = 0;
	if (pid <= 0)
		return -1;
	if (kill(pid, SIGTERM) != 0 && errno == ESRCH) {
		/* Already gone: reap it if it is ours. */
		return waitpid(pid, &status, WNOHANG) == pid ? status : -1;
	}
	int rc = tly_proc_wait(pid, timeout_ms, &status);
	if (rc == TLY_E_NOT_FOUND)
		return -1;
	if (rc == TLY_E_TIMEOUT) {
		kill(pid, SIGKILL);
		if (waitpid(pid, &status, 0) != pid)
			return -1;
	}
	return status;
}

int tly_proc_run(char *const argv[], char *out, size_t outlen)
{
	int pfd[2];
	if (pipe2(pfd, O_CLOEXEC) != 0)
		return -1;
	pid_t pid = fork();
	if (pid < 0) {
		close(pfd[0]);
		close(pfd[1]);
		return -1;
	}
	if (pid == 0) {
		dup2(pfd[1], STDOUT_FILENO);
		dup2(pfd[1], STDERR_FILENO);
		execvp(argv[0], argv);
		fprintf(stderr, "could not execute \"%s\": %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	close(pfd[1]);
	size_t used = 0;
	char sink[4096];
	for (;;) {
		char *dst = sink;
		size_t room = sizeof(sink);
		if (out && outlen > 1 && used < outlen - 1) {
			dst = out + used;
			room = outlen - 1 - used;
		}
		ssize_t n = read(pfd[0], dst, room);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		if (dst != sink)
			used += (size_t)n;
	}
	close(pfd[0]);
	if (out && outlen > 0)
		out[used] = '\0';
	int status;
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR)
			return -1;
	}
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int tly_proc_wait_file(const char *path, int timeout_ms)
{
	for (int waited = 0;; waited += 10) {
		struct stat st;
		if (stat(path, &st) == 0 && st.st_size > 0)
			return 0;
		if (waited >= timeout_ms)
			return TLY_E_TIMEOUT;
		sleep_ms(10);
	}
}

bool tly_proc_alive(pid_t pid)
{
	char path[64], stat[512];
	if (pid <= 0 || (kill(pid, 0) != 0 && errno == ESRCH))
		return false;
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return errno != ENOENT; /* no /proc: trust kill */
	size_t n = fread(stat, 1, sizeof(stat) - 1, f);
	fclose(f);
	stat[n] = '\0';
	const char *state = strrchr(stat, ')'); /* "pid (comm) S ...": comm may hold anything */
	return !(state && state[1] == ' ' && state[2] == 'Z');
}

pid_t tly_proc_read_pid(const char *path)
{
	long pid = -1;
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	if (fscanf(f, "%ld", &pid) != 1 || pid <= 0)
		pid = -1;
	fclose(f);
	return (pid_t)pid;
}

void tly_proc_sibling(const char *program, char *out, size_t outlen)
{
	char self[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n <= 0) {
		snprintf(out, outlen, "%s", program);
		return;
	}
	self[n] = '\0';
	snprintf(out, outlen, "%s/%s", dirname(self), program);
}

/* The threads of one process. */
static int add_tasks(pid_t pid, struct tly_proc_cpu *cpu)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
	DIR *d = opendir(path);
	if (!d)
		return -1;
	struct dirent *e;
	while ((e = readdir(d))) {
		long long on = 0, wait = 0;
		char stat[64];
		if (e->d_name[0] < '0' || e->d_name[0] > '9')
			continue;
		snprintf(stat, sizeof(stat), "/proc/%d/task/%d/schedstat", (int)pid, atoi(e->d_name));
		FILE *f = fopen(stat, "r");
		if (!f)
			continue; /* the thread ended */
		if (fscanf(f, "%lld %lld", &on, &wait) == 2) {
			cpu->on_cpu_us += on / 1000;
			cpu->waiting_us += wait / 1000;
		}
		fclose(f);
	}
	closedir(d);
	return 0;
}

/*
 * The fields of /proc/PID/stat after the command name ("pid (comm) S ppid ..."; the name may
 * hold spaces and parentheses), into buf. A pointer to them, or NULL when pid cannot be read.
 */
static const char *stat_fields(pid_t pid, char *buf, size_t len)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	FILE *f = pid > 0 ? fopen(path, "r") : NULL;
	if (!f)
		return NULL;
	size_t n = fread(buf, 1, len - 1, f);
	fclose(f);
	buf[n] = '\0';
	const char *rest = strrchr(buf, ')');
	return rest ? rest + 1 : NULL;
}

pid_t tly_proc_parent(pid_t pid)
{
	char buf[1024];
	const char *rest = stat_fields(pid, buf, sizeof(buf));
	int ppid = -1;
	if (!rest || sscanf(rest, " %*c %d", &ppid) != 1)
		return -1;
	return (pid_t)ppid;
}

double tly_proc_cpu_s(pid_t pid, bool reaped_children)
{
	char buf[1024];
	const char *rest = stat_fields(pid, buf, sizeof(buf));
	unsigned long long ut, st;
	long long cut, cst;
	if (!rest || sscanf(rest, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %lld %lld",
			    &ut, &st, &cut, &cst) != 4)
		return -1;
	double tick = (double)sysconf(_SC_CLK_TCK);
	return reaped_children ? (double)(cut + cst) / tick : (double)(ut + st) / tick;
}

int tly_proc_cpu_add(pid_t pid, bool children, struct tly_proc_cpu *cpu)
{
	if (add_tasks(pid, cpu) != 0)
		return -1;
	if (!children)
		return 0;
	DIR *d = opendir("/proc");
	if (!d)
		return -1;
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] >= '1' && e->d_name[0] <= '9' && tly_proc_parent((pid_t)atoi(e->d_name)) == pid)
			(void)add_tasks((pid_t)atoi(e->d_name), cpu); /* a child may end meanwhile */
	closedir(d);
	return 0;
}

int tly_proc_on_signals(void (*stop)(int), void (*reload)(int))
{
	struct sigaction sa = {.sa_handler = stop}, hup = {.sa_handler = reload};
	if (sigemptyset(&sa.sa_mask) != 0 || sigemptyset(&hup.sa_mask) != 0 ||
	    sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0)
		return -1;
	return reload && sigaction(SIGHUP, &hup, NULL) != 0 ? -1 : 0;
}
