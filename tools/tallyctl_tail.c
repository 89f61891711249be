/* tallyctl tail: every partition of a topic, decoded, printed as JSON lines (events or ledger entries). */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "codec.h"
#include "event_json.h"
#include "kafka.h"
#include "log.h"
#include "proc.h"
#include "tallyctl.h"

#define METADATA_TIMEOUT_MS 10000

static volatile sig_atomic_t tail_stop;

static void on_signal(int sig)
{
	(void)sig;
	tail_stop = 1;
}

static void tail_usage(void)
{
	fprintf(stderr, "tallyctl: usage: tallyctl tail TOPIC [--from-beginning] [--max N] "
			"[--timeout-ms T]\n");
}

/* Assign every partition of topic, starting at offset. */
static int assign_all(rd_kafka_t *rk, const char *topic, int64_t offset)
{
	int rc = 1;
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_topic_partition_list_t *list = NULL;
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
	if (!rkt) {
		fprintf(stderr, "tallyctl: could not open topic \"%s\"\n", topic);
		return 1;
	}
	rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, &md, METADATA_TIMEOUT_MS);
	if (err || md->topic_cnt != 1 || md->topics[0].err || md->topics[0].partition_cnt < 1) {
		fprintf(stderr, "tallyctl: could not read the partitions of \"%s\": %s\n", topic,
			err ? rd_kafka_err2str(err)
			    : md->topic_cnt == 1 && md->topics[0].err ? rd_kafka_err2str(md->topics[0].err)
								      : "no such topic");
		goto out;
	}
	list = rd_kafka_topic_partition_list_new(md->topics[0].partition_cnt);
	for (int i = 0; list && i < md->topics[0].partition_cnt; i++)
		rd_kafka_topic_partition_list_add(list, topic, md->topics[0].partitions[i].id)->offset = offset;
	if (!list || (err = rd_kafka_assign(rk, list)) != 0) {
		fprintf(stderr, "tallyctl: could not assign the partitions of \"%s\": %s\n", topic,
			list ? rd_kafka_err2str(err) : "out of memory");
		goto out;
	}
	rc = 0;
out:
	if (list)
		rd_kafka_topic_partition_list_destroy(list);
	if (md)
		rd_kafka_metadata_destroy(md);
	rd_kafka_topic_destroy(rkt);
	return rc;
}

int cmd_tail(struct app *app, int argc, char **argv)
{
	char err[1024];
	const char *topic = NULL;
	bool from_beginning = false;
	long long max = -1, timeout_ms = -1;
	for (int i = 1; i < argc; i++) {
		char *end = NULL;
		if (strcmp(argv[i], "--from-beginning") == 0) {
			from_beginning = true;
		} else if (strcmp(argv[i], "--max") == 0 && i + 1 < argc) {
			max = strtoll(argv[++i], &end, 10);
			if (*end || max < 0) {
				tail_usage();
				return 2;
			}
		} else if (strcmp(argv[i], "--timeout-ms") == 0 && i + 1 < argc) {
			timeout_ms = strtoll(argv[++i], &end, 10);
			if (*end || timeout_ms < 0) {
				tail_usage();
				return 2;
			}
		} else if (!topic && argv[i][0] != '-') {
			topic = argv[i];
		} else {
			tail_usage();
			return 2;
		}
	}
	if (!topic) {
		tail_usage();
		return 2;
	}
	if (!tly_config_str(app->cfg, "kafka.bootstrap.servers")) {
		fprintf(stderr, "tallyctl: kafka.bootstrap.servers is not set (use -s "
				"kafka.bootstrap.servers=… or TALLY_KAFKA_BOOTSTRAP_SERVERS)\n");
		return 1;
	}

	int rc = 1;
	rd_kafka_t *rk = NULL;
	struct tly_event ev = {0};
	struct tly_codec *codec = tly_codec_new(err, sizeof(err));
	if (!codec) {
		fprintf(stderr, "tallyctl: %s\n", err);
		return 1;
	}
	rd_kafka_conf_t *conf = tly_kafka_conf_new(app->cfg, err, sizeof(err));
	if (!conf) {
		fprintf(stderr, "tallyctl: %s\n", err);
		goto out;
	}
	/* Partitions are assigned, not subscribed: the group id is never joined or committed to. */
	char group[64];
	snprintf(group, sizeof(group), "tallyctl-tail-%ld", (long)getpid());
	if (!(rk = tly_kafka_consumer_new(conf, group, err, sizeof(err)))) {
		fprintf(stderr, "tallyctl: %s\n", err);
		goto out;
	}
	if (assign_all(rk, topic, from_beginning ? RD_KAFKA_OFFSET_BEGINNING : RD_KAFKA_OFFSET_END) != 0)
		goto out;

	if (tly_proc_on_signals(on_signal, NULL) != 0) {
		fprintf(stderr, "tallyctl: could not install the signal handlers: %s\n", strerror(errno));
		goto out;
	}
	long long printed = 0;
	int64_t last = tly_clock_ms();
	rc = 0;
	while (!tail_stop && (max < 0 || printed < max)) {
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
		if (!m) {
			if (timeout_ms >= 0 && tly_clock_ms() - last >= timeout_ms)
				break;
			continue;
		}
		last = tly_clock_ms();
		if (m->err) {
			if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
				fprintf(stderr, "tallyctl: consumer error: %s\n", rd_kafka_message_errstr(m));
			rd_kafka_message_destroy(m);
			continue;
		}
		int drc = tly_codec_decode(codec, m->payload, m->len, &ev, err, sizeof(err));
		char *text = drc == 0 ? tly_event_to_json_text(&ev) : NULL;
		if (text) {
			printf("%s\n", text);
			fflush(stdout);
			printed++;
		} else {
			fprintf(stderr, "tallyctl: %s partition %d offset %" PRId64 ": could not decode: %s\n",
				topic, (int)m->partition, m->offset,
				drc == 0 ? "out of memory" : err);
		}
		free(text);
		tly_event_reset(&ev);
		rd_kafka_message_destroy(m);
	}
out:
	tly_kafka_consumer_destroy(rk);
	tly_event_free(&ev);
	tly_codec_free(codec);
	return rc;
}
