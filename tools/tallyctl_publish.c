/* tallyctl publish: NDJSON events (one object per line, docs/events.md) validated and published. */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "codec.h"
#include "event_json.h"
#include "log.h"
#include "producer.h"
#include "tallyctl.h"

#define DEFAULT_FLUSH_TIMEOUT_MS 30000
#define PROGRESS_EVERY_MS 500

struct publish_run {
	uint64_t lines, valid, rejected, delivered, failed;
	bool progress; /* stdout is a terminal */
	int64_t last_progress_ms;
};

static void on_delivery(const struct tly_delivery *d, void *ud)
{
	struct publish_run *run = ud;
	if (d->err == 0) {
		run->delivered++;
		return;
	}
	run->failed++;
	fprintf(stderr, "tallyctl: line %" PRIuPTR ": could not deliver %s %s: %s\n",
		(uintptr_t)d->opaque, tly_event_desc(d->type) ? tly_event_desc(d->type)->name : "event",
		d->event_id_text, d->reason);
}

static void progress(struct publish_run *run, bool last)
{
	if (!run->progress)
		return;
	int64_t now = tly_clock_ms();
	if (!last && now - run->last_progress_ms < PROGRESS_EVERY_MS)
		return;
	run->last_progress_ms = now;
	printf("\r%" PRIu64 " lines: %" PRIu64 " valid, %" PRIu64 " rejected, %" PRIu64 " delivered%s",
	       run->lines, run->valid, run->rejected, run->delivered, last ? "\n" : "");
	fflush(stdout);
}

static void publish_usage(void)
{
	fprintf(stderr, "tallyctl: usage: tallyctl publish [FILE|-] [--dry-run] [--timeout-ms T]\n");
}

int cmd_publish(struct app *app, int argc, char **argv)
{
	char err[1024];
	const char *path = "-";
	bool dry_run = false, have_path = false;
	long flush_ms = DEFAULT_FLUSH_TIMEOUT_MS;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--dry-run") == 0) {
			dry_run = true;
		} else if (strcmp(argv[i], "--timeout-ms") == 0 && i + 1 < argc) {
			char *end;
			flush_ms = strtol(argv[++i], &end, 10);
			if (*end || flush_ms < 0 || flush_ms > INT32_MAX) {
				publish_usage();
				return 2;
			}
		} else if (!have_path && (argv[i][0] != '-' || strcmp(argv[i], "-") == 0)) {
			path = argv[i];
			have_path = true;
		} else {
			publish_usage();
			return 2;
		}
	}

	int rc = 1;
	struct publish_run run = {.progress = isatty(STDOUT_FILENO) == 1};
	struct tly_codec *codec = NULL;
	struct tly_producer *producer = NULL;
	struct tly_event ev = {0};
	struct tly_buf buf = {0};
	char *line = NULL;
	size_t cap = 0;
	FILE *in = strcmp(path, "-") == 0 ? stdin : fopen(path, "r");
	if (!in) {
		fprintf(stderr, "tallyctl: could not open \"%s\": %s\n", path, strerror(errno));
		goto out;
	}
	if (dry_run) {
		if (!(codec = tly_codec_new(err, sizeof(err)))) {
			fprintf(stderr, "tallyctl: %s\n", err);
			goto out;
		}
	} else {
		if (!tly_config_str(app->cfg, "kafka.bootstrap.servers")) {
			fprintf(stderr, "tallyctl: kafka.bootstrap.servers is not set (use -s "
					"kafka.bootstrap.servers=… or TALLY_KAFKA_BOOTSTRAP_SERVERS)\n");
			goto out;
		}
		if (!(producer = tly_producer_new(app->cfg, on_delivery, &run, err, sizeof(err)))) {
			fprintf(stderr, "tallyctl: %s\n", err);
			goto out;
		}
	}

	ssize_t n;
	while ((n = getline(&line, &cap, in)) >= 0) {
		run.lines++;
		while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
			line[--n] = '\0';
		if (strspn(line, " \t") == (size_t)n)
			continue; /* blank lines are allowed */
		int erc = tly_event_from_json_text(line, (size_t)n, TLY_EVJ_FILL_ID | TLY_EVJ_FILL_TIME,
						   &ev, err, sizeof(err));
		if (erc == 0 && dry_run) {
			if (ev.type == TLY_EV_LEDGER_ENTRY) {
				snprintf(err, sizeof(err), "LedgerEntry: only tally-ledger writes the ledger topic");
				erc = TLY_E_INVALID;
			} else {
				erc = tly_codec_encode(codec, &ev, &buf, err, sizeof(err));
			}
		} else if (erc == 0) {
			erc = tly_producer_publish(producer, &ev, (void *)(uintptr_t)run.lines, err,
						   sizeof(err));
		}
		if (erc != 0) {
			run.rejected++;
			fprintf(stderr, "tallyctl: line %" PRIu64 ": %s\n", run.lines, err);
		} else {
			run.valid++;
		}
		progress(&run, false);
	}
	if (ferror(in)) {
		fprintf(stderr, "tallyctl: could not read \"%s\": %s\n", path, strerror(errno));
		goto out;
	}
	if (producer && tly_producer_flush(producer, (int)flush_ms) != 0)
		fprintf(stderr, "tallyctl: %zu event(s) still undelivered after %ld ms\n",
			tly_producer_in_flight(producer), flush_ms);
	tly_producer_free(producer, 0); /* reports what is left as failed */
	producer = NULL;
	progress(&run, true);
	if (dry_run)
		printf("dry run: %" PRIu64 " valid, %" PRIu64 " rejected, nothing sent\n", run.valid,
		       run.rejected);
	else
		printf("sent %" PRIu64 ", rejected %" PRIu64 ", delivered %" PRIu64 ", failed %" PRIu64 "\n",
		       run.valid, run.rejected, run.delivered, run.failed);
	rc = run.rejected || run.failed || run.delivered != (dry_run ? 0 : run.valid) ? 1 : 0;
out:
	tly_producer_free(producer, 0);
	tly_codec_free(codec);
	tly_buf_free(&buf);
	tly_event_free(&ev);
	free(line);
	if (in && in != stdin)
		fclose(in);
	return rc;
}
