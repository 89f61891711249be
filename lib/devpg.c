/* A throw-away PostgreSQL cluster: initdb into a temp dir, pg_ctl start/stop, remove. */
#include "devpg.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <glob.h>
#include <limits.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "log.h"
#include "proc.h"

#define INITDB_TIMEOUT_MS 120000
#define PG_CTL_TIMEOUT_S "60"
#define PG_CTL_WAIT_MS 90000
#define READY_TIMEOUT_MS 30000
/* DIR/.s.PGSQL.NNNNN must fit in a unix socket address (108 bytes on Linux). */
#define SOCKET_SUFFIX "/.s.PGSQL.65535"
#define DIR_MAX (sizeof(((struct sockaddr_un *)0)->sun_path) - sizeof(SOCKET_SUFFIX) + 1)
/*
 * DIR/creator.lock: flock()ed by the process that created the cluster for as long as it lives
 * (the kernel releases it however that process ends), so the next start tells a cluster whose
 * creator was killed from one in use. Made under another name and renamed once locked: a lock
 * file under this name is never one its creator has not locked yet.
 */
#define CREATOR_LOCK "creator.lock"
#define CREATOR_LOCK_NEW "creator.lock.new"

struct tly_devpg {
	char dir[DIR_MAX];           /* temp dir: data/, the socket, the logs */
	char datadir[DIR_MAX + 8];   /* DIR/data */
	char bindir[PATH_MAX];       /* where initdb and pg_ctl are */
	char conninfo[2 * DIR_MAX + 64];
	int port;                /* names the socket DIR/.s.PGSQL.port; no TCP listener */
	bool as_postgres;        /* we are root: run the server binaries as the postgres user */
	bool running;            /* started and not halted */
	bool durable;            /* fsync and full_page_writes on (benchmarks) */
	int lock_fd;             /* DIR/creator.lock, locked; -1: none */
};

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* The highest /usr/lib/postgresql/N/bin with an initdb, or $TALLY_PG_BINDIR. */
static int find_bindir(char *out, size_t outlen, char *errstr, size_t errlen)
{
	const char *env = getenv("TALLY_PG_BINDIR");
	if (env && *env) {
		snprintf(out, outlen, "%s", env);
		return 0;
	}
	glob_t g;
	int best = -1;
	if (glob("/usr/lib/postgresql/*/bin/initdb", 0, NULL, &g) == 0) {
		for (size_t i = 0; i < g.gl_pathc; i++) {
			int v = atoi(g.gl_pathv[i] + strlen("/usr/lib/postgresql/"));
			if (v > best) {
				best = v;
				snprintf(out, outlen, "/usr/lib/postgresql/%d/bin", v);
			}
		}
		globfree(&g);
	}
	if (best < 0) {
		snprintf(errstr, errlen,
			 "could not find PostgreSQL server binaries: no /usr/lib/postgresql/*/bin/initdb "
			 "and TALLY_PG_BINDIR is not set");
		return TLY_E_NOT_FOUND;
	}
	return 0;
}

/* A port number nobody listens on right now (it only names our socket, but keep it distinct). */
static int free_port(char *errstr, size_t errlen)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
	socklen_t salen = sizeof(sa);
	int port = -1;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(errstr, errlen, "could not create socket: %s", strerror(errno));
		return -1;
	}
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
	    getsockname(fd, (struct sockaddr *)&sa, &salen) != 0) {
		snprintf(errstr, errlen, "could not find a free port: %s", strerror(errno));
		goto done;
	}
	port = ntohs(sa.sin_port);
done:
	close(fd);
	return port;
}

/* The last few non-empty lines of a file, joined with "; " (for one-line errors). */
static void file_tail(const char *path, char *out, size_t outlen)
{
	char buf[8192];
	size_t n = 0;
	FILE *f = fopen(path, "r");
	out[0] = '\0';
	if (!f) {
		snprintf(out, outlen, "(no output in \"%s\")", path);
		return;
	}
	if (fseek(f, 0, SEEK_END) == 0) {
		long size = ftell(f);
		long from = size > (long)sizeof(buf) - 1 ? size - (long)sizeof(buf) + 1 : 0;
		if (fseek(f, from, SEEK_SET) == 0)
			n = fread(buf, 1, sizeof(buf) - 1, f);
	}
	fclose(f);
	buf[n] = '\0';

	/* Walk back over up to three non-empty lines. */
	char *lines[3];
	int count = 0;
	char *end = buf + n;
	while (end > buf && count < 3) {
		while (end > buf && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' '))
			*--end = '\0';
		if (end == buf)
			break;
		char *start = end;
		while (start > buf && start[-1] != '\n')
			start--;
		lines[count++] = start;
		end = start;
	}
	size_t used = 0;
	for (int i = count - 1; i >= 0 && used + 1 < outlen; i--) {
		int w = snprintf(out + used, outlen - used, "%s%s", used ? "; " : "", lines[i]);
		if (w < 0)
			break;
		used += (size_t)w;
	}
	if (count == 0)
		snprintf(out, outlen, "(no output in \"%s\")", path);
}

/*
 * Run bindir/tool with args (NULL-terminated), as the postgres user when we are root, with its
 * output in DIR/logname; wait up to timeout_ms. Returns 0, or TLY_E_IO with the output's last
 * lines (or those of tail_path when given) in errstr.
 */
static int run_tool(const struct tly_devpg *pg, const char *tool, const char *const *args,
		    const char *logname, const char *tail_path, int timeout_ms, char *errstr,
		    size_t errlen)
{
	char exe[PATH_MAX + 32], logpath[PATH_MAX + 32], tail[1024];
	char *argv[32];
	int argc = 0, status = 0;

	snprintf(exe, sizeof(exe), "%s/%s", pg->bindir, tool);
	snprintf(logpath, sizeof(logpath), "%s/%s", pg->dir, logname);
	if (pg->as_postgres) {
		argv[argc++] = (char *)(access("/usr/sbin/runuser", X_OK) == 0 ? "/usr/sbin/runuser"
									      : "runuser");
		argv[argc++] = (char *)"-u";
		argv[argc++] = (char *)"postgres";
		argv[argc++] = (char *)"--";
		/* Start in DIR: the postgres user may not be able to enter our working directory. */
		argv[argc++] = (char *)(access("/usr/bin/env", X_OK) == 0 ? "/usr/bin/env" : "env");
		argv[argc++] = (char *)"-C";
		argv[argc++] = (char *)pg->dir;
	}
	argv[argc++] = exe;
	for (; *args && argc < 31; args++)
		argv[argc++] = (char *)*args;
	argv[argc] = NULL;

	pid_t pid = tly_proc_spawn(argv, logpath, errstr, errlen);
	if (pid < 0)
		return TLY_E_IO;
	if (tly_proc_wait(pid, timeout_ms, &status) != 0) {
		tly_proc_stop(pid, 1000);
		snprintf(errstr, errlen, "could not run %s: no exit after %d ms", tool, timeout_ms);
		return TLY_E_TIMEOUT;
	}
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return 0;
	file_tail(tail_path ? tail_path : logpath, tail, sizeof(tail));
	snprintf(errstr, errlen, "could not run %s: %s", tool, tail);
	return TLY_E_IO;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	if (remove(path) != 0 && errno != ENOENT)
		tly_warn("could not remove file", "path=\"%s\" reason=\"%s\"", path, strerror(errno));
	return 0;
}

static void remove_tree(const char *dir)
{
	if (dir[0])
		nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* A conninfo value: bare when safe, else single-quoted with \ and ' escaped. */
static void conninfo_value(char *out, size_t outlen, const char *v)
{
	if (strpbrk(v, " '\\\t") == NULL && *v) {
		snprintf(out, outlen, "%s", v);
		return;
	}
	size_t n = 0;
	if (outlen < 3)
		return;
	out[n++] = '\'';
	for (; *v && n + 3 < outlen; v++) {
		if (*v == '\'' || *v == '\\')
			out[n++] = '\\';
		out[n++] = *v;
	}
	out[n++] = '\'';
	out[n] = '\0';
}

/* Append our settings to postgresql.conf: socket only, our port, no durability (throw-away). */
static int write_config(const struct tly_devpg *pg, char *errstr, size_t errlen)
{
	char path[PATH_MAX + 32];
	snprintf(path, sizeof(path), "%s/postgresql.conf", pg->datadir);
	FILE *f = fopen(path, "a");
	if (!f) {
		snprintf(errstr, errlen, "could not open file \"%s\": %s", path, strerror(errno));
		return TLY_E_IO;
	}
	fprintf(f, "\n# tally devpg: throw-away cluster\n");
	fprintf(f, "listen_addresses = ''\n");
	fprintf(f, "port = %d\n", pg->port);
	fprintf(f, "unix_socket_directories = '");
	for (const char *p = pg->dir; *p; p++) {
		if (*p == '\'')
			fputc('\'', f);
		fputc(*p, f);
	}
	fprintf(f, "'\n");
	/* No fsync (the OS does not crash in a test), but commits still reach the kernel before
	 * returning, so a crashed server (tly_devpg_halt immediate) keeps every committed row.
	 * Benchmarks ask for production durability instead. */
	if (pg->durable) {
		fprintf(f, "fsync = on\nfull_page_writes = on\nsynchronous_commit = on\n");
		/* WAL buffers as a production server sizes them (the default, 1/32 of our small
		 * shared_buffers, is 1 MB), and checkpoints keep min_wal_size of used segments as
		 * future ones (tly_devpg_prealloc_wal) instead of zero-filling new ones. */
		fprintf(f, "wal_buffers = 16MB\nmin_wal_size = %dMB\n", TLY_DEVPG_PREALLOC_WAL_MB);
	} else
		fprintf(f, "fsync = off\nfull_page_writes = off\n");
	fprintf(f, "shared_buffers = 32MB\nmax_connections = 200\n");
	fprintf(f, "log_min_messages = warning\nlog_line_prefix = '%%m [%%p] %%d '\n");
	if (fclose(f) != 0) {
		snprintf(errstr, errlen, "could not write file \"%s\": %s", path, strerror(errno));
		return TLY_E_IO;
	}
	return 0;
}

/* Wait until the server answers on its socket. */
static int wait_ready(const struct tly_devpg *pg, char *errstr, size_t errlen)
{
	for (int waited = 0;; waited += 50) {
		if (PQping(pg->conninfo) == PQPING_OK)
			return 0;
		if (waited >= READY_TIMEOUT_MS) {
			char logpath[PATH_MAX + 32], tail[1024];
			snprintf(logpath, sizeof(logpath), "%s/postgres.log", pg->dir);
			file_tail(logpath, tail, sizeof(tail));
			snprintf(errstr, errlen,
				 "could not connect to PostgreSQL in \"%s\" after %d ms: %s", pg->dir,
				 READY_TIMEOUT_MS, tail);
			return TLY_E_TIMEOUT;
		}
		sleep_ms(50);
	}
}

int tly_devpg_resume(struct tly_devpg *pg, char *errstr, size_t errlen)
{
	char logpath[PATH_MAX + 32];
	snprintf(logpath, sizeof(logpath), "%s/postgres.log", pg->dir);
	const char *const args[] = {"-D", pg->datadir, "-l", logpath, "-w", "-t", PG_CTL_TIMEOUT_S,
				    "-s", "start", NULL};
	int rc = run_tool(pg, "pg_ctl", args, "pg_ctl.log", logpath, PG_CTL_WAIT_MS, errstr, errlen);
	if (rc != 0)
		return rc;
	pg->running = true;
	return wait_ready(pg, errstr, errlen);
}

/* The postmaster's pid from DIR/data/postmaster.pid, or -1. */
static pid_t postmaster_pid(const struct tly_devpg *pg)
{
	char path[PATH_MAX + 32];
	snprintf(path, sizeof(path), "%s/postmaster.pid", pg->datadir);
	return tly_proc_read_pid(path);
}

int tly_devpg_halt(struct tly_devpg *pg, bool immediate, char *errstr, size_t errlen)
{
	if (!pg->running && postmaster_pid(pg) <= 0)
		return 0;
	const char *const fast[] = {"-D", pg->datadir, "-m", "fast", "-w", "-t", "30", "-s", "stop", NULL};
	const char *const now[] = {"-D", pg->datadir, "-m", "immediate", "-w", "-t", "30", "-s",
				   "stop", NULL};
	int rc = TLY_E_IO;
	if (!immediate)
		rc = run_tool(pg, "pg_ctl", fast, "pg_ctl.log", NULL, 40000, errstr, errlen);
	if (rc != 0) {
		if (!immediate)
			tly_warn("could not stop PostgreSQL cleanly, stopping it immediately",
				 "dir=\"%s\" reason=\"%s\"", pg->dir, errstr);
		rc = run_tool(pg, "pg_ctl", now, "pg_ctl.log", NULL, 40000, errstr, errlen);
	}
	if (rc != 0) {
		/* Last resort: the postmaster's children exit when it dies. */
		pid_t pid = postmaster_pid(pg);
		if (pid > 0 && kill(pid, SIGKILL) == 0) {
			for (int i = 0; i < 200 && kill(pid, 0) == 0; i++)
				sleep_ms(25);
			rc = 0;
		}
	}
	if (rc == 0)
		pg->running = false;
	return rc;
}

int tly_devpg_restart(struct tly_devpg *pg, char *errstr, size_t errlen)
{
	int rc = tly_devpg_halt(pg, false, errstr, errlen);
	if (rc != 0)
		return rc;
	return tly_devpg_resume(pg, errstr, errlen);
}

int tly_devpg_prealloc_wal(struct tly_devpg *pg, char *errstr, size_t errlen)
{
	static const char sql[] = "SELECT pg_logical_emit_message(false, 'tally-devpg', 'wal'), pg_switch_wal()";
	PGconn *conn = PQconnectdb(pg->conninfo);
	int rc = TLY_E_PG;
	if (PQstatus(conn) != CONNECTION_OK) {
		snprintf(errstr, errlen, "could not connect to PostgreSQL: %s", PQerrorMessage(conn));
		goto out;
	}
	/* each round moves to the next segment: zero-filled once, a recycled one after that */
	for (int i = 0; i <= TLY_DEVPG_PREALLOC_WAL_MB / 16; i++) {
		PGresult *res = PQexec(conn, i < TLY_DEVPG_PREALLOC_WAL_MB / 16 ? sql : "CHECKPOINT");
		bool ok = PQresultStatus(res) == PGRES_TUPLES_OK || PQresultStatus(res) == PGRES_COMMAND_OK;
		if (!ok)
			snprintf(errstr, errlen, "could not pre-allocate WAL segments: %s",
				 PQresultErrorMessage(res));
		PQclear(res);
		if (!ok)
			goto out;
	}
	rc = 0;
out:
	PQfinish(conn);
	return rc;
}

/* DIR/creator.lock made and locked (see CREATOR_LOCK); its descriptor is not inherited by exec. */
static int lock_creator(struct tly_devpg *pg, char *errstr, size_t errlen)
{
	char tmp[DIR_MAX + 32], path[DIR_MAX + 32];
	snprintf(tmp, sizeof(tmp), "%s/" CREATOR_LOCK_NEW, pg->dir);
	snprintf(path, sizeof(path), "%s/" CREATOR_LOCK, pg->dir);
	pg->lock_fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (pg->lock_fd < 0 || flock(pg->lock_fd, LOCK_EX | LOCK_NB) != 0 || rename(tmp, path) != 0) {
		snprintf(errstr, errlen, "could not lock file \"%s\": %s", tmp, strerror(errno));
		return TLY_E_IO;
	}
	return 0;
}

/* Whether pid is the postmaster of datadir (not a process that reused a dead one's pid). */
static bool is_postmaster_of(pid_t pid, const char *datadir)
{
	char path[64], args[4096];
	snprintf(path, sizeof(path), "/proc/%ld/cmdline", (long)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return false;
	size_t n = fread(args, 1, sizeof(args) - 1, f);
	fclose(f);
	args[n] = '\0';
	for (size_t i = 0; i < n; i += strlen(args + i) + 1)
		if (strcmp(args + i, datadir) == 0)
			return true;
	return false;
}

/*
 * Stop and remove the clusters under parent whose creator died (its creator.lock is not locked
 * any more: SIGKILL, a crash), as the creator's tly_devpg_stop would have. A cluster whose lock
 * is held, or that has no lock file (being created, or made by an older build), is left alone.
 * The lock is held while the cluster is removed, so two starts never remove the same one.
 */
static void sweep_orphans(const char *parent, const char *bindir)
{
	char pattern[PATH_MAX];
	glob_t g;
	snprintf(pattern, sizeof(pattern), "%s/tally-pg-*/" CREATOR_LOCK, parent);
	if (glob(pattern, GLOB_NOSORT, NULL, &g) != 0)
		return;
	for (size_t i = 0; i < g.gl_pathc; i++) {
		size_t dirlen = strlen(g.gl_pathv[i]) - strlen("/" CREATOR_LOCK);
		struct stat st;
		int fd = open(g.gl_pathv[i], O_RDWR | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0)
			continue; /* removed meanwhile, or not ours to touch */
		/* made by this user (as root: not another user's directory made to look like one) */
		if (dirlen >= DIR_MAX || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
		    st.st_uid != geteuid() || flock(fd, LOCK_EX | LOCK_NB) != 0) {
			close(fd); /* its creator lives, or it is not ours */
			continue;
		}
		struct tly_devpg *pg = calloc(1, sizeof(*pg));
		if (!pg) {
			close(fd);
			break;
		}
		memcpy(pg->dir, g.gl_pathv[i], dirlen);
		snprintf(pg->datadir, sizeof(pg->datadir), "%s/data", pg->dir);
		snprintf(pg->bindir, sizeof(pg->bindir), "%s", bindir);
		pg->as_postgres = geteuid() == 0;
		pg->lock_fd = fd;
		pid_t pid = postmaster_pid(pg);
		bool ours = pid > 0 && is_postmaster_of(pid, pg->datadir);
		tly_info("removing a throw-away PostgreSQL cluster whose creator is gone",
			 "dir=\"%s\" postmaster_pid=%ld", pg->dir, ours ? (long)pid : -1L);
		if (!ours) {
			/* no server, or a stale pid file: nothing to stop (never signal that pid) */
			remove_tree(pg->dir);
			close(fd);
			free(pg);
			continue;
		}
		pg->running = true;
		tly_devpg_stop(pg);
	}
	globfree(&g);
}

struct tly_devpg *tly_devpg_start(const char *parent_dir, char *errstr, size_t errlen)
{
	return tly_devpg_start_durable(parent_dir, false, errstr, errlen);
}

struct tly_devpg *tly_devpg_start_durable(const char *parent_dir, bool durable, char *errstr,
					  size_t errlen)
{
	struct tly_devpg *pg = calloc(1, sizeof(*pg));
	char host[2 * DIR_MAX + 4];
	const char *parent = parent_dir ? parent_dir : "/tmp";
	if (!pg) {
		snprintf(errstr, errlen, "could not start PostgreSQL: out of memory");
		return NULL;
	}
	pg->durable = durable;
	pg->lock_fd = -1;
	if (find_bindir(pg->bindir, sizeof(pg->bindir), errstr, errlen) != 0)
		goto fail;
	sweep_orphans(parent, pg->bindir);
	pg->port = free_port(errstr, errlen);
	if (pg->port < 0)
		goto fail;

	if (strlen(parent) + strlen("/tally-pg-XXXXXX") >= sizeof(pg->dir)) {
		snprintf(errstr, errlen,
			 "could not create a PostgreSQL directory under \"%s\": path too long for a "
			 "unix socket (at most %zu bytes)",
			 parent, sizeof(pg->dir) - strlen("/tally-pg-XXXXXX") - 1);
		goto fail;
	}
	snprintf(pg->dir, sizeof(pg->dir), "%s/tally-pg-XXXXXX", parent);
	if (!mkdtemp(pg->dir)) {
		snprintf(errstr, errlen, "could not create directory \"%s\": %s", pg->dir,
			 strerror(errno));
		pg->dir[0] = '\0';
		goto fail;
	}
	snprintf(pg->datadir, sizeof(pg->datadir), "%s/data", pg->dir);
	if (lock_creator(pg, errstr, errlen) != 0)
		goto fail;

	if (geteuid() == 0) {
		struct passwd *pw = getpwnam("postgres");
		if (!pw) {
			snprintf(errstr, errlen,
				 "could not start PostgreSQL as root: there is no \"postgres\" user to run it as");
			goto fail;
		}
		if (chown(pg->dir, pw->pw_uid, pw->pw_gid) != 0) {
			snprintf(errstr, errlen, "could not change owner of directory \"%s\": %s",
				 pg->dir, strerror(errno));
			goto fail;
		}
		pg->as_postgres = true;
	}

	conninfo_value(host, sizeof(host), pg->dir);
	snprintf(pg->conninfo, sizeof(pg->conninfo), "host=%s port=%d user=postgres dbname=postgres",
		 host, pg->port);

	const char *const initdb_args[] = {"--no-sync", "--auth=trust", "-U", "postgres", "-E", "UTF8",
					   "--locale=C", "-D", pg->datadir, NULL};
	if (run_tool(pg, "initdb", initdb_args, "initdb.log", NULL, INITDB_TIMEOUT_MS, errstr,
		     errlen) != 0)
		goto fail;
	if (write_config(pg, errstr, errlen) != 0)
		goto fail;
	if (tly_devpg_resume(pg, errstr, errlen) != 0)
		goto fail;
	tly_debug("started PostgreSQL", "dir=\"%s\" port=%d", pg->dir, pg->port);
	return pg;
fail:
	tly_devpg_stop(pg);
	return NULL;
}

void tly_devpg_stop(struct tly_devpg *pg)
{
	char errstr[512];
	if (!pg)
		return;
	if (pg->datadir[0] && tly_devpg_halt(pg, false, errstr, sizeof(errstr)) != 0)
		tly_warn("could not stop PostgreSQL", "dir=\"%s\" reason=\"%s\"", pg->dir, errstr);
	remove_tree(pg->dir);
	if (pg->lock_fd >= 0)
		close(pg->lock_fd); /* after the removal: until then no other start takes the dir */
	free(pg);
}

const char *tly_devpg_conninfo(const struct tly_devpg *pg)
{
	return pg->conninfo;
}

const char *tly_devpg_dir(const struct tly_devpg *pg)
{
	return pg->dir;
}

int tly_devpg_port(const struct tly_devpg *pg)
{
	return pg->port;
}

pid_t tly_devpg_pid(const struct tly_devpg *pg)
{
	return pg ? postmaster_pid(pg) : -1;
}
