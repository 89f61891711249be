/* tally-loadgen: synthetic, seeded traffic published to Kafka (or written as NDJSON with --dry-run). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "event_json.h"
#include "log.h"
#include "loadgen.h"
#include "proc.h"
#include "producer.h"

extern char **environ;

#define PROG "tally-loadgen"
#define FLUSH_TIMEOUT_MS 30000

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: " PROG " [OPTIONS]\n"
		"\n"
		"Synthetic Tally traffic, deterministic from --seed: tenants with Zipf-distributed activity,\n"
		"users, subscriptions on the Starter and Pro plans, conversations and messages, reservations\n"
		"settled or released, direct debits, credit grants, usage reports, and a ClockTick every\n"
		"simulated hour (to every partition). Event times are simulated, so the same seed gives the\n"
		"same events at any rate.\n"
		"\n"
		"  --seed N             PRNG seed (default 1)\n"
		"  --tenants N          tenants (default 100)\n"
		"  --events N           stop after N messages (default 10000 unless --duration is given)\n"
		"  --duration S         stop after S seconds of wall-clock time\n"
		"  --rate R             messages per second (default 0: as fast as possible)\n"
		"  --duplicates PCT     share of messages that repeat an earlier event exactly (default 0)\n"
		"  --bad PCT            share of deliberately bad messages: invalid values, garbage bytes,\n"
		"                       truncated messages, unknown schema fingerprints (default 0)\n"
		"  --start TIME         simulated time of the first event (default 2026-01-01T00:00:00Z)\n"
		"  --step-ms MS         mean simulated time between events (default 60000; a month of\n"
		"                       simulated time, and so a period close, takes about 45,000 events;\n"
		"                       raise it to close periods in shorter runs)\n"
		"  --dry-run            write NDJSON to stdout instead of publishing (the tallyctl publish\n"
		"                       format; bad messages as equally bad lines)\n"
		"  -c, --config FILE    settings file; -s, --set KEY=VALUE one setting (kafka.* as librdkafka)\n"
		"  -h, --help           this help\n");
}

static int parse_num(const char *opt, const char *s, long long lo, long long hi, long long *out)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno || *end || v < lo || v > hi) {
		fprintf(stderr, PROG ": invalid %s \"%s\": expected %lld..%lld\n", opt, s, lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

struct run {
	uint64_t by_type[TLY_EV__COUNT + 1];
	uint64_t duplicates, bad, sent, delivered, failed;
};

static void on_delivery(const struct tly_delivery *d, void *ud)
{
	struct run *run = ud;
	if (d->err == 0) {
		run->delivered++;
		return;
	}
	run->failed++;
	if (run->failed <= 10)
		fprintf(stderr, PROG ": could not deliver %s: %s\n",
			d->type < TLY_EV__COUNT ? tly_event_desc(d->type)->name : "message", d->reason);
}

static int64_t mono_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int main(int argc, char **argv)
{
	char err[1024];
	struct loadgen_opts o = {.seed = 1, .tenants = 100, .start_us = 1767225600000000LL,
				 .step_us = 60000000};
	long long events = -1, duration_s = -1, rate = 0, v;
	bool dry_run = false;
	const char *config_file = NULL;
	char *sets[64];
	int n_sets = 0;
	int rc = 2;
	struct tly_config *cfg = NULL;
	struct loadgen *lg = NULL;
	struct tly_producer *producer = NULL;
	struct run run = {0};

	tly_log_init(PROG, TLY_LOG_WARN);
	static const struct option opts[] = {
		{"seed", required_argument, NULL, 'S'},     {"tenants", required_argument, NULL, 'T'},
		{"events", required_argument, NULL, 'E'},   {"duration", required_argument, NULL, 'D'},
		{"rate", required_argument, NULL, 'R'},     {"duplicates", required_argument, NULL, 'U'},
		{"bad", required_argument, NULL, 'B'},      {"start", required_argument, NULL, 'A'},
		{"step-ms", required_argument, NULL, 'M'},  {"dry-run", no_argument, NULL, 'n'},
		{"config", required_argument, NULL, 'c'},   {"set", required_argument, NULL, 's'},
		{"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0}};
	int opt;
	while ((opt = getopt_long(argc, argv, "c:s:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'S':
			if (parse_num("--seed", optarg, 0, INT64_MAX, &v))
				goto out;
			o.seed = (uint64_t)v;
			break;
		case 'T':
			if (parse_num("--tenants", optarg, 1, 1000000, &v))
				goto out;
			o.tenants = (int)v;
			break;
		case 'E':
			if (parse_num("--events", optarg, 0, INT64_MAX, &events))
				goto out;
			break;
		case 'D':
			if (parse_num("--duration", optarg, 0, INT32_MAX, &duration_s))
				goto out;
			break;
		case 'R':
			if (parse_num("--rate", optarg, 0, 10000000, &rate))
				goto out;
			break;
		case 'U':
			if (parse_num("--duplicates", optarg, 0, 100, &v))
				goto out;
			o.duplicate_pct = (int)v;
			break;
		case 'B':
			if (parse_num("--bad", optarg, 0, 100, &v))
				goto out;
			o.bad_pct = (int)v;
			break;
		case 'A':
			if (tly_time_parse_rfc3339(optarg, &o.start_us) != 0) {
				fprintf(stderr, PROG ": invalid --start \"%s\": expected RFC 3339\n", optarg);
				goto out;
			}
			break;
		case 'M':
			if (parse_num("--step-ms", optarg, 1, 86400000, &v))
				goto out;
			o.step_us = v * 1000;
			break;
		case 'n': dry_run = true; break;
		case 'c': config_file = optarg; break;
		case 's':
			if (n_sets < 64)
				sets[n_sets++] = optarg;
			break;
		case 'h': usage(stdout); rc = 0; goto out;
		default: usage(stderr); goto out;
		}
	}
	if (optind < argc) {
		usage(stderr);
		goto out;
	}
	if (events < 0 && duration_s < 0)
		events = 10000;
	rc = 1;

	if (!dry_run) {
		/* Precedence as every program: defaults < file < TALLY_* environment < --set. */
		if (!(cfg = tly_config_new())) {
			fprintf(stderr, PROG ": out of memory\n");
			goto out;
		}
		if ((config_file && tly_config_load_file(cfg, config_file, err, sizeof(err)) != 0) ||
		    tly_config_load_env(cfg, environ, err, sizeof(err)) != 0) {
			fprintf(stderr, PROG ": %s\n", err);
			goto out;
		}
		for (int i = 0; i < n_sets; i++) {
			char *eq = strchr(sets[i], '=');
			if (!eq) {
				fprintf(stderr, PROG ": --set expects KEY=VALUE, got \"%s\"\n", sets[i]);
				goto out;
			}
			*eq = '\0';
			if (tly_config_set(cfg, sets[i], eq + 1, err, sizeof(err)) != 0) {
				fprintf(stderr, PROG ": %s\n", err);
				goto out;
			}
		}
		if (!tly_config_str(cfg, "kafka.bootstrap.servers")) {
			fprintf(stderr, PROG ": kafka.bootstrap.servers is not set (-s or "
					     "TALLY_KAFKA_BOOTSTRAP_SERVERS), or use --dry-run\n");
			goto out;
		}
		if (!(producer = tly_producer_new(cfg, on_delivery, &run, err, sizeof(err)))) {
			fprintf(stderr, PROG ": %s\n", err);
			goto out;
		}
	}
	if (!(lg = loadgen_new(&o, err, sizeof(err)))) {
		fprintf(stderr, PROG ": %s\n", err);
		goto out;
	}

	if (tly_proc_on_signals(on_stop, NULL) != 0) {
		fprintf(stderr, PROG ": could not install the signal handlers: %s\n", strerror(errno));
		goto out;
	}
	int64_t start = mono_us();
	const char *events_topic = producer ? tly_producer_topic(producer, TLY_EV_TENANT_CREATED) : NULL;
	for (uint64_t i = 0; !stop_requested && (events < 0 || i < (uint64_t)events); i++) {
		int64_t now = mono_us();
		if (duration_s >= 0 && now - start >= duration_s * 1000000)
			break;
		if (rate > 0) {
			int64_t due = start + (int64_t)(i * 1000000 / (uint64_t)rate);
			if (due > now) {
				if (producer)
					tly_producer_poll(producer, (int)((due - now) / 1000));
				else
					usleep((useconds_t)(due - now));
			}
		}
		struct loadgen_item item;
		if (loadgen_next(lg, &item, err, sizeof(err)) != 0) {
			fprintf(stderr, PROG ": could not generate an event: %s\n", err);
			goto out;
		}
		int prc = 0;
		if (dry_run) {
			if (printf("%s\n", item.json) < 0) {
				fprintf(stderr, PROG ": could not write to stdout: %s\n", strerror(errno));
				goto out;
			}
		} else if (item.kind == LOADGEN_EVENT) {
			prc = tly_producer_publish(producer, item.ev, NULL, err, sizeof(err));
		} else {
			prc = tly_producer_publish_raw(producer, events_topic, item.key, strlen(item.key),
						       -1, item.bytes, item.len, NULL, err, sizeof(err));
		}
		if (prc != 0) {
			fprintf(stderr, PROG ": could not publish %s: %s\n", item.label, err);
			goto out;
		}
		run.sent++;
		if (item.kind == LOADGEN_EVENT)
			run.by_type[item.ev->type]++;
		else if (item.kind == LOADGEN_DUPLICATE)
			run.duplicates++;
		else
			run.bad++;
	}
	if (producer && tly_producer_flush(producer, FLUSH_TIMEOUT_MS) != 0)
		fprintf(stderr, PROG ": %zu message(s) undelivered after %d ms\n",
			tly_producer_in_flight(producer), FLUSH_TIMEOUT_MS);
	tly_producer_free(producer, 0);
	producer = NULL;

	/* What was sent: on stdout, or on stderr when stdout carries the NDJSON. */
	FILE *report = dry_run ? stderr : stdout;
	double secs = (double)(mono_us() - start) / 1e6;
	fprintf(report, "%s %" PRIu64 " messages in %.1f s (seed %" PRIu64 ", %d tenants)\n",
		dry_run ? "wrote" : "sent", run.sent, secs, o.seed, o.tenants);
	for (int t = 0; t < TLY_EV__COUNT; t++) {
		if (run.by_type[t])
			fprintf(report, "  %-22s %" PRIu64 "\n", tly_event_desc((enum tly_event_type)t)->name,
				run.by_type[t]);
	}
	fprintf(report, "  %-22s %" PRIu64 "\n  %-22s %" PRIu64 "\n", "duplicates", run.duplicates,
		"bad", run.bad);
	if (!dry_run)
		fprintf(report, "delivered %" PRIu64 ", failed %" PRIu64 "\n", run.delivered, run.failed);
	rc = run.failed ? 1 : 0;
out:
	tly_producer_free(producer, 0);
	loadgen_free(lg);
	tly_config_free(cfg);
	if (fflush(stdout) != 0 && rc == 0)
		rc = 1;
	return rc;
}
