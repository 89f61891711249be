/*
 * tally-soak (make soak DURATION=…): steady loadgen traffic at a fixed rate through tally-ledger
 * and tally-projector for a long time. Every interval it prints each daemon's resident memory
 * (VmRSS from /proc/PID/status) and throughput (records it committed per second, from its stored
 * offsets); at the end the RSS after warm-up against the RSS at the end, the growth rate fitted
 * over the steady part, and a verdict on whether memory is flat. Printed, never asserted.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "clock.h"
#include "devstack.h"
#include "log.h"
#include "pg.h"
#include "proc.h"

#define PROG "tally-soak"
#define PARTITIONS 12
#define MAX_SAMPLES 100000
/* Flat: the fitted growth after warm-up stays under both bounds over the steady part. */
#define FLAT_PCT 5.0
#define FLAT_KIB 4096.0

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig)
{
	(void)sig;
	stop_requested = 1;
}

/* "600", "600s", "30m", "2h": seconds, or -1. */
static long parse_duration(const char *s)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || v <= 0 || end == s)
		return -1;
	if (*end == '\0' || strcmp(end, "s") == 0)
		return v;
	if (strcmp(end, "m") == 0)
		return v * 60;
	if (strcmp(end, "h") == 0)
		return v * 3600;
	return -1;
}

/* VmRSS of pid in KiB, or -1 when it is gone. */
static long rss_kib(pid_t pid)
{
	char path[64], line[256];
	long kib = -1;
	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

/* Records a consumer has committed (sum of its stored offsets), or -1. */
static int64_t committed(PGconn *conn, const char *consumer)
{
	struct tly_pg_error pe;
	const char *const v[] = {consumer};
	PGresult *r = tly_pg_query(conn, "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
				   "WHERE consumer = $1", 1, v, &pe);
	if (!r) {
		fprintf(stderr, PROG ": could not read stored offsets: %s\n", pe.message);
		return -1;
	}
	int64_t n = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
	PQclear(r);
	return n;
}

struct sample {
	double t;
	long rss[2];
};

/* Least-squares slope of rss[d] over t for samples [from, n), in KiB per second. */
static double slope(const struct sample *s, size_t from, size_t n, int d)
{
	double mt = 0, mr = 0, num = 0, den = 0;
	size_t k = n - from;
	if (k < 2)
		return 0;
	for (size_t i = from; i < n; i++) {
		mt += s[i].t;
		mr += (double)s[i].rss[d];
	}
	mt /= (double)k;
	mr /= (double)k;
	for (size_t i = from; i < n; i++) {
		num += (s[i].t - mt) * ((double)s[i].rss[d] - mr);
		den += (s[i].t - mt) * (s[i].t - mt);
	}
	return den > 0 ? num / den : 0;
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: " PROG " [OPTIONS]\n"
		"\n"
		"Steady loadgen traffic through tally-ledger and tally-projector; RSS and throughput of\n"
		"each daemon per interval, then start against end RSS and a verdict on whether memory is\n"
		"flat after warm-up.\n"
		"\n"
		"  --duration D   how long: seconds, or with s, m, h (default $DURATION, else 600)\n"
		"  --rate R       events per second (default 200)\n"
		"  --tenants N    tenants (default 200)\n"
		"  --interval S   seconds between samples (default 30, fewer for short runs)\n"
		"  --seed N       loadgen seed (default 1)\n"
		"  -h, --help     this help\n");
}

int main(int argc, char **argv)
{
	long duration = 600, rate = 200, tenants = 200, interval = 0, seed = 1;
	const char *env = getenv("DURATION");
	if (env && (duration = parse_duration(env)) < 0) {
		fprintf(stderr, PROG ": invalid DURATION \"%s\": seconds, or e.g. 30m, 2h\n", env);
		return 2;
	}
	static const struct option opts[] = {
		{"duration", required_argument, NULL, 'D'}, {"rate", required_argument, NULL, 'R'},
		{"tenants", required_argument, NULL, 'N'},  {"interval", required_argument, NULL, 'I'},
		{"seed", required_argument, NULL, 'S'},     {"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0}};
	int opt;
	while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		long *target = opt == 'R' ? &rate : opt == 'N' ? &tenants : opt == 'I' ? &interval :
			       opt == 'S' ? &seed : NULL;
		if (opt == 'h') {
			usage(stdout);
			return 0;
		}
		if (opt == 'D') {
			if ((duration = parse_duration(optarg)) < 0) {
				fprintf(stderr, PROG ": invalid --duration \"%s\"\n", optarg);
				return 2;
			}
			continue;
		}
		char *end;
		if (!target || (*target = strtol(optarg, &end, 10)) < (opt == 'S' ? 0 : 1) || *end) {
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		usage(stderr);
		return 2;
	}
	if (interval == 0)
		interval = duration >= 600 ? 30 : duration >= 60 ? duration / 20 : 3;
	tly_log_init(PROG, TLY_LOG_WARN);
	if (tly_proc_on_signals(on_stop, NULL) != 0) {
		fprintf(stderr, PROG ": could not install the signal handlers: %s\n", strerror(errno));
		return 1;
	}

	char err[1024], parts[32], seedarg[32], ratearg[32], tenantarg[32], durarg[32];
	struct tly_devstack stack;
	printf(PROG ": %ld s at %ld events/s, %ld tenants, samples every %ld s (dev broker, %d "
	       "partitions; PostgreSQL without fsync)\n", duration, rate, tenants, interval, PARTITIONS);
	if (tly_devstack_start(&stack, "soak", 1, PARTITIONS, false, err, sizeof(err)) != 0) {
		fprintf(stderr, PROG ": %s\n", err);
		return 1;
	}
	printf("logs in %s\n\n", stack.dir);
	snprintf(parts, sizeof(parts), "topics.partitions=%d", PARTITIONS);
	snprintf(seedarg, sizeof(seedarg), "%ld", seed);
	snprintf(ratearg, sizeof(ratearg), "%ld", rate);
	snprintf(tenantarg, sizeof(tenantarg), "%ld", tenants);
	snprintf(durarg, sizeof(durarg), "%ld", duration);
	const char *const daemon_args[] = {"-s", parts, "-s", "kafka.fetch.wait.max.ms=10", NULL};
	const char *const loadgen_args[] = {"--seed", seedarg, "--tenants", tenantarg, "--rate", ratearg,
					    "--duration", durarg, "--duplicates", "2", "--bad", "1",
					    "--step-ms", "60000", NULL};
	static const char *const names[2] = {"tally-ledger", "tally-projector"};
	pid_t pids[2], loadgen = -1;
	int rc = 1;
	PGconn *conn = NULL;
	struct sample *samples = calloc(MAX_SAMPLES, sizeof(*samples));
	size_t n = 0;
	pids[0] = tly_devstack_spawn(&stack, names[0], stack.db, daemon_args, "ledger.log", err, sizeof(err));
	pids[1] = pids[0] < 0 ? -1 : tly_devstack_spawn(&stack, names[1], stack.db, daemon_args,
							"projector.log", err, sizeof(err));
	if (pids[1] >= 0)
		loadgen = tly_devstack_spawn(&stack, "tally-loadgen", stack.db, loadgen_args, "loadgen.log",
					     err, sizeof(err));
	if (loadgen < 0 || !samples || !(conn = tly_pg_connect(stack.db, PROG, err, sizeof(err)))) {
		fprintf(stderr, PROG ": %s\n", samples ? err : "out of memory");
		goto out;
	}

	printf("%8s  %12s %12s  %12s %12s\n", "time s", "ledger MiB", "ledger rec/s", "proj. MiB",
	       "proj. rec/s");
	double t0 = tly_clock_s(), prev_t = t0;
	int64_t prev[2] = {0, 0}, total[2] = {0, 0};
	bool died = false;
	while (!stop_requested && !died) {
		double next = prev_t + (double)interval;
		while (tly_clock_s() < next && !stop_requested)
			usleep(100000);
		double t = tly_clock_s();
		struct sample *s = &samples[n < MAX_SAMPLES ? n++ : MAX_SAMPLES - 1];
		s->t = t - t0;
		printf("%8.0f ", s->t);
		for (int d = 0; d < 2; d++) {
			s->rss[d] = rss_kib(pids[d]);
			int64_t c = committed(conn, d == 0 ? "tally-ledger" : "tally-projector");
			double per_s = c >= 0 ? (double)(c - prev[d]) / (t - prev_t) : 0;
			if (c >= 0)
				prev[d] = total[d] = c;
			died |= s->rss[d] < 0;
			printf(" %12.1f %12.0f ", (double)s->rss[d] / 1024.0, per_s);
		}
		putchar('\n');
		fflush(stdout);
		prev_t = t;
		int status;
		if (tly_proc_wait(loadgen, 0, &status) == 0) {
			loadgen = -1;
			break;
		}
	}
	if (died) {
		printf("a daemon is gone (see its log in %s)\n", stack.dir);
		goto out;
	}
	/* warm-up: the first quarter of the run (at least one sample); steady: the rest */
	size_t warm = n / 4 > 0 ? n / 4 : 1;
	if (n < warm + 2) {
		printf("too few samples for a verdict (%zu)\n", n);
		goto out;
	}
	double secs = samples[n - 1].t;
	printf("\n%-16s %14s %14s %14s %16s  %s\n", "daemon", "RSS warm MiB", "RSS end MiB",
	       "RSS max MiB", "growth MiB/h", "verdict");
	bool flat_all = true;
	for (int d = 0; d < 2; d++) {
		long max = 0;
		for (size_t i = warm; i < n; i++)
			max = samples[i].rss[d] > max ? samples[i].rss[d] : max;
		double kib_s = slope(samples, warm, n, d);
		double over = kib_s * (samples[n - 1].t - samples[warm].t);
		bool flat = over < FLAT_KIB && over < (double)samples[warm].rss[d] * FLAT_PCT / 100.0;
		flat_all &= flat;
		printf("%-16s %14.1f %14.1f %14.1f %16.2f  %s\n", names[d], samples[warm].rss[d] / 1024.0,
		       samples[n - 1].rss[d] / 1024.0, max / 1024.0, kib_s * 3600.0 / 1024.0,
		       flat ? "flat" : "GROWING");
	}
	printf("\nthroughput over %.0f s: tally-ledger %.0f records/s (%" PRId64 "), tally-projector "
	       "%.0f records/s (%" PRId64 ", three topics)\n", secs, (double)total[0] / secs, total[0],
	       (double)total[1] / secs, total[1]);
	printf("verdict: memory %s after warm-up (the fitted growth over the steady %.0f s under %.0f%% "
	       "of the warm RSS and under %.0f MiB)\n", flat_all ? "is flat" : "is NOT flat",
	       samples[n - 1].t - samples[warm].t, FLAT_PCT, FLAT_KIB / 1024.0);
	rc = 0;
out:
	if (loadgen > 0)
		(void)tly_proc_stop(loadgen, 5000);
	for (int d = 0; d < 2; d++)
		if (pids[d] > 0)
			(void)tly_proc_stop(pids[d], 20000);
	PQfinish(conn);
	free(samples);
	tly_devstack_stop(&stack, rc != 0);
	return rc;
}
