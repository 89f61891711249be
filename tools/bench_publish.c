/*
 * tally-bench-publish (make bench): events per second into one dev broker through `tallyctl
 * publish` (an NDJSON file, the real binary spawned and timed to its exit) and through the
 * producer API (build, validate, encode, publish, every delivery report), next to librdkafka
 * producing the same pre-encoded bytes in a loop with the same producer settings (idempotent,
 * murmur2_random), for ~1 KB and ~200 B MessageAppended events. Every rate counts delivered
 * events (the clock stops after the flush). Figures are printed, never asserted.
 */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#include "clock.h"
#include "cli.h"
#include "codec.h"
#include "config.h"
#include "event.h"
#include "event_json.h"
#include "kafka.h"
#include "log.h"
#include "proc.h"
#include "producer.h"

#define PARTITIONS 12
#define TENANTS 256
#define FLUSH_MS 120000

struct workload {
	const char *name;
	size_t target;  /* encoded bytes per event */
	long events;
};

struct rates {
	double raw, api, cli; /* events/s */
};

/* What the bench started, for die() to stop: the dev broker (-1: none) and its directory. */
static pid_t running_broker = -1;
static char *running_dir;

static void die(const char *what, const char *why)
{
	tly_proc_stop(running_broker, 5000);
	if (running_dir) {
		char *rm[] = {"rm", "-rf", running_dir, NULL};
		(void)tly_proc_run(rm, NULL, 0);
	}
	/* last: librdkafka's threads may log about the stopped broker meanwhile */
	fprintf(stderr, "tally-bench-publish: %s: %s\n", what, why);
	exit(1);
}

static void uuid_n(tly_uuid *u, uint64_t a, uint64_t b)
{
	for (int i = 0; i < 8; i++) {
		u->b[i] = (unsigned char)(a >> (8 * i));
		u->b[8 + i] = (unsigned char)(b >> (8 * i));
	}
	u->b[6] = (unsigned char)((u->b[6] & 0x0f) | 0x40); /* version 4 */
	u->b[8] = (unsigned char)((u->b[8] & 0x3f) | 0x80); /* RFC 4122 variant */
}

/* The i-th event of a workload: a MessageAppended whose content pads it to about target bytes. */
static void make_event(struct tly_event *ev, long i, const char *content)
{
	tly_event_init(ev, TLY_EV_MESSAGE_APPENDED);
	uuid_n(&ev->event_id, 0xe1e1e1e1e1e1e1e1ULL, (uint64_t)i);
	uuid_n(&ev->tenant_id, 0x7e7e7e7e7e7e7e7eULL, (uint64_t)(i % TENANTS));
	ev->occurred_at = 1767225600000000LL + i;
	struct tly_ev_message_appended *m = &ev->u.message_appended;
	uuid_n(&m->conversation_id, 0xc0c0c0c0c0c0c0c0ULL, (uint64_t)(i / 8));
	uuid_n(&m->message_id, 0x3e3e3e3e3e3e3e3eULL, (uint64_t)i);
	m->role = "assistant";
	m->agent_type = "chat";
	m->content = content;
	m->provider = "openai";
	m->model = "gpt-4o";
	m->prompt_tokens = 812;
	m->completion_tokens = 143;
	m->latency_ms = 930;
	m->cost_micros = 4210;
}

/* Content JSON text that brings the encoded event to target bytes (or as close as it gets). */
static char *content_for(struct tly_codec *codec, size_t target)
{
	char err[512];
	struct tly_event ev = {0};
	struct tly_buf buf = {0};
	make_event(&ev, 0, "{\"text\":\"\"}");
	if (tly_codec_encode(codec, &ev, &buf, err, sizeof(err)) != 0)
		die("encode", err);
	size_t pad = target > buf.len + 2 ? target - buf.len - 2 : 0; /* varint length may grow by one */
	char *content = malloc(pad + 16);
	if (!content)
		die("content", "out of memory");
	int n = sprintf(content, "{\"text\":\"");
	for (size_t k = 0; k < pad; k++)
		content[n + (int)k] = (char)('a' + k % 26);
	strcpy(content + n + pad, "\"}");
	tly_buf_free(&buf);
	tly_event_free(&ev);
	return content;
}

/* ---- librdkafka alone: the same bytes, pre-encoded ----------------------------------------- */

static long raw_delivered;

static void raw_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	(void)rk;
	(void)opaque;
	if (!m->err)
		raw_delivered++;
}

static double run_raw(const struct tly_config *cfg, struct tly_buf *msgs, char (*keys)[37],
		      long n, size_t *bytes)
{
	char err[512];
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, err, sizeof(err));
	if (!conf)
		die("kafka config", err);
	rd_kafka_conf_set_dr_msg_cb(conf, raw_dr);
	rd_kafka_t *rk = tly_kafka_producer_new(conf, err, sizeof(err));
	if (!rk)
		die("kafka producer", err);
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, "tally.events", NULL);
	if (!rkt)
		die("kafka topic", rd_kafka_err2str(rd_kafka_last_error()));
	raw_delivered = 0;
	*bytes = 0;
	double t0 = tly_clock_s();
	for (long i = 0; i < n; i++) {
		while (rd_kafka_produce(rkt, RD_KAFKA_PARTITION_UA, RD_KAFKA_MSG_F_COPY, msgs[i].data,
					msgs[i].len, keys[i % TENANTS], 36, NULL) != 0) {
			if (rd_kafka_last_error() != RD_KAFKA_RESP_ERR__QUEUE_FULL)
				die("rd_kafka_produce", rd_kafka_err2str(rd_kafka_last_error()));
			rd_kafka_poll(rk, 10);
		}
		*bytes += msgs[i].len;
		rd_kafka_poll(rk, 0);
	}
	if (rd_kafka_flush(rk, FLUSH_MS) != RD_KAFKA_RESP_ERR_NO_ERROR)
		die("raw flush", "timed out");
	double dt = tly_clock_s() - t0;
	if (raw_delivered != n)
		die("raw", "not every message was delivered");
	rd_kafka_topic_destroy(rkt);
	rd_kafka_destroy(rk);
	return (double)n / dt;
}

/* ---- the producer API ---------------------------------------------------------------------- */

static long api_delivered, api_failed;

static void api_dr(const struct tly_delivery *d, void *ud)
{
	(void)ud;
	if (d->err == 0)
		api_delivered++;
	else
		api_failed++;
}

static double run_api(const struct tly_config *cfg, const char *content, long n)
{
	char err[512];
	struct tly_producer *p = tly_producer_new(cfg, api_dr, NULL, err, sizeof(err));
	if (!p)
		die("producer", err);
	struct tly_event ev = {0};
	api_delivered = api_failed = 0;
	double t0 = tly_clock_s();
	for (long i = 0; i < n; i++) {
		make_event(&ev, i, content);
		if (tly_producer_publish(p, &ev, NULL, err, sizeof(err)) != 0)
			die("publish", err);
	}
	if (tly_producer_flush(p, FLUSH_MS) != 0)
		die("api flush", "timed out");
	double dt = tly_clock_s() - t0;
	tly_producer_free(p, 0);
	tly_event_free(&ev);
	if (api_delivered != n || api_failed)
		die("api", "not every event was delivered");
	return (double)n / dt;
}

/* ---- tallyctl publish ----------------------------------------------------------------------- */

static double run_cli(const char *bootstraps, const char *dir, const char *content, long n)
{
	char path[PATH_MAX], exe[PATH_MAX], kset[600], out[4096], want[64];
	snprintf(path, sizeof(path), "%s/events-%ld.ndjson", dir, n);
	FILE *f = fopen(path, "w");
	if (!f)
		die(path, strerror(errno));
	struct tly_event ev = {0};
	for (long i = 0; i < n; i++) {
		make_event(&ev, i, content);
		char *line = tly_event_to_json_text(&ev);
		if (!line || fprintf(f, "%s\n", line) < 0)
			die(path, "could not write");
		free(line);
	}
	if (fclose(f) != 0)
		die(path, strerror(errno));
	tly_event_free(&ev);
	tly_proc_sibling("tallyctl", exe, sizeof(exe));
	snprintf(kset, sizeof(kset), "kafka.bootstrap.servers=%s", bootstraps);
	char *argv[] = {exe, "-s", kset, "publish", path, NULL};
	double t0 = tly_clock_s();
	int rc = tly_proc_run(argv, out, sizeof(out));
	double dt = tly_clock_s() - t0;
	snprintf(want, sizeof(want), "delivered %ld, failed 0", n);
	if (rc != 0 || !strstr(out, want))
		die("tallyctl publish", out);
	return (double)n / dt;
}

static const char help[] =
	"Usage: tally-bench-publish\n"
	"\n"
	"make bench: events per second into a dev broker through `tallyctl publish` (NDJSON) and the\n"
	"producer API (validate, encode, publish, every delivery report), next to librdkafka producing\n"
	"the same pre-encoded bytes. Starts its own dev broker; prints the figures, asserts nothing.\n";

int main(int argc, char **argv)
{
	int only = tly_cli_help_only(argc, argv, help);
	if (only != 0)
		return only > 0 ? 0 : 2;
	char err[512], dir[] = "/tmp/tally-bench-publish-XXXXXX", exe[PATH_MAX], boot[PATH_MAX],
	     log[PATH_MAX], parts[8], bootstraps[512];
	tly_log_init("tally-bench-publish", TLY_LOG_WARN);
	if (!mkdtemp(dir))
		die("mkdtemp", strerror(errno));
	running_dir = dir;
	tly_proc_sibling("tally-devbroker", exe, sizeof(exe));
	snprintf(boot, sizeof(boot), "%s/bootstrap", dir);
	snprintf(log, sizeof(log), "%s/broker.log", dir);
	snprintf(parts, sizeof(parts), "%d", PARTITIONS);
	char *bargv[] = {exe, "--partitions", parts, "--bootstrap-file", boot, NULL};
	pid_t broker = tly_proc_spawn(bargv, log, err, sizeof(err));
	if (broker < 0)
		die("tally-devbroker", err);
	running_broker = broker;
	if (tly_proc_wait_file(boot, 10000) != 0)
		die("tally-devbroker", "did not start");
	FILE *bf = fopen(boot, "r");
	if (!bf || !fgets(bootstraps, sizeof(bootstraps), bf))
		die("bootstrap file", "unreadable");
	fclose(bf);
	bootstraps[strcspn(bootstraps, "\r\n")] = '\0';
	struct tly_config *cfg = tly_config_new();
	if (!cfg || tly_config_set(cfg, "kafka.bootstrap.servers", bootstraps, err, sizeof(err)) != 0)
		die("config", cfg ? err : "out of memory");
	struct tly_codec *codec = tly_codec_new(err, sizeof(err));
	if (!codec)
		die("codec", err);

	static const struct workload loads[] = {{"~1 KB", 1024, 40000}, {"~200 B", 200, 100000}};
	struct rates r[2];
	size_t avg[2];
	char keys[TENANTS][37];
	for (int t = 0; t < TENANTS; t++) {
		tly_uuid u;
		uuid_n(&u, 0x7e7e7e7e7e7e7e7eULL, (uint64_t)t);
		tly_uuid_format(&u, keys[t]);
	}
	printf("tally-bench-publish: one dev broker (librdkafka %s mock cluster, %d partitions), "
	       "MessageAppended to %d tenants,\nidempotent producer, murmur2_random, default "
	       "librdkafka settings otherwise; rates count delivered events\n\n",
	       rd_kafka_version_str(), PARTITIONS, TENANTS);
	for (int w = 0; w < 2; w++) {
		const struct workload *wl = &loads[w];
		char *content = content_for(codec, wl->target);
		struct tly_buf *msgs = calloc((size_t)wl->events, sizeof(*msgs));
		if (!msgs)
			die("messages", "out of memory");
		struct tly_event ev = {0};
		for (long i = 0; i < wl->events; i++) {
			make_event(&ev, i, content);
			if (tly_codec_encode(codec, &ev, &msgs[i], err, sizeof(err)) != 0)
				die("encode", err);
		}
		tly_event_free(&ev);
		size_t bytes;
		r[w].raw = run_raw(cfg, msgs, keys, wl->events, &bytes);
		avg[w] = bytes / (size_t)wl->events;
		r[w].api = run_api(cfg, content, wl->events);
		r[w].cli = run_cli(bootstraps, dir, content, wl->events);
		for (long i = 0; i < wl->events; i++)
			tly_buf_free(&msgs[i]);
		free(msgs);
		free(content);
	}
	printf("%-8s %8s %9s  %14s  %14s %7s  %14s %7s\n", "event", "bytes", "events", "librdkafka ev/s",
	       "API ev/s", "API/raw", "tallyctl ev/s", "cli/raw");
	for (int w = 0; w < 2; w++)
		printf("%-8s %8zu %9ld  %14.0f  %14.0f %6.0f%%  %14.0f %6.0f%%\n", loads[w].name, avg[w],
		       loads[w].events, r[w].raw, r[w].api, 100.0 * r[w].api / r[w].raw, r[w].cli,
		       100.0 * r[w].cli / r[w].raw);
	printf("\nlibrdkafka: rd_kafka_produce of the pre-encoded bytes in a loop. API: "
	       "tly_producer_publish builds,\nvalidates and encodes each event. tallyctl: `tallyctl "
	       "publish FILE` of the same events as NDJSON,\ntimed from spawn to exit (parse, "
	       "validate, encode, publish, flush).\n");
	tly_codec_free(codec);
	tly_config_free(cfg);
	tly_proc_stop(broker, 5000);
	char *rm[] = {"rm", "-rf", dir, NULL};
	if (tly_proc_run(rm, NULL, 0) != 0)
		fprintf(stderr, "tally-bench-publish: could not remove \"%s\"\n", dir);
	return 0;
}
