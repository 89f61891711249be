/*
 * tallyctl reserve: publish a TokensReserved and, with --wait, print the ledger's decision as one
 * JSON line. Exit codes: 0 accepted (or published, without --wait), 3 rejected, duplicate or
 * conflict, 4 no decision within --timeout-ms, 1 not published or not delivered, 2 usage.
 *
 * A timed-out reservation can be waited on again without publishing anything:
 *   tallyctl reserve --tenant T --event-id E --reservation-id R --partition P --from-offset O --wait
 * with the fields of the timeout line.
 */
#include <inttypes.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "decision.h"
#include "event_json.h"
#include "tallyctl.h"

#define DEFAULT_TIMEOUT_MS 10000
#define DEFAULT_EXPIRES_IN_S 600
#define EXIT_REJECTED 3
#define EXIT_TIMEOUT 4

static void reserve_usage(void)
{
	fprintf(stderr,
		"tallyctl: usage: tallyctl reserve --tenant T --tokens N [--reservation-id R] "
		"[--expires-in S] [--model M] [--wait [--timeout-ms T]]\n"
		"                 tallyctl reserve --tenant T --event-id E --reservation-id R "
		"--partition P --from-offset O --wait [--timeout-ms T]\n");
}

static int64_t wall_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int parse_i64(const char *s, int64_t min, int64_t *out)
{
	char *end;
	long long v = strtoll(s, &end, 10);
	if (!*s || *end || v < min)
		return -1;
	*out = v;
	return 0;
}

static json_t *ticket_json(const struct tly_decision_ticket *t)
{
	char tenant[37], event[37], rid[37];
	tly_uuid_format(&t->tenant_id, tenant);
	tly_uuid_format(&t->event_id, event);
	tly_uuid_format(&t->reservation_id, rid);
	return json_pack("{s:s, s:s, s:s, s:i, s:I}", "tenant_id", tenant, "event_id", event,
			 "reservation_id", rid, "partition", (int)t->partition, "from_offset",
			 (json_int_t)t->from_offset);
}

/* Print obj as one line and release it; 0 or 1 (out of memory). */
static int print_line(json_t *obj)
{
	char *text = obj ? json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
	json_decref(obj);
	if (!text) {
		fprintf(stderr, "tallyctl: out of memory\n");
		return 1;
	}
	printf("%s\n", text);
	fflush(stdout);
	free(text);
	return 0;
}

int cmd_reserve(struct app *app, int argc, char **argv)
{
	char err[1024];
	const char *tenant = NULL, *rid_text = NULL, *model = "unspecified", *event_text = NULL;
	int64_t tokens = -1, expires_in = DEFAULT_EXPIRES_IN_S, timeout_ms = DEFAULT_TIMEOUT_MS;
	int64_t partition = -1, from_offset = -1;
	bool wait = false;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		int bad = 0;
		if (strcmp(a, "--wait") == 0) {
			wait = true;
			continue;
		}
		if (!v) {
			reserve_usage();
			return 2;
		}
		if (strcmp(a, "--tenant") == 0)
			tenant = v;
		else if (strcmp(a, "--tokens") == 0)
			bad = parse_i64(v, 1, &tokens);
		else if (strcmp(a, "--reservation-id") == 0)
			rid_text = v;
		else if (strcmp(a, "--expires-in") == 0)
			bad = parse_i64(v, 1, &expires_in);
		else if (strcmp(a, "--model") == 0)
			model = v;
		else if (strcmp(a, "--timeout-ms") == 0)
			bad = parse_i64(v, 0, &timeout_ms) || timeout_ms > INT32_MAX;
		else if (strcmp(a, "--event-id") == 0)
			event_text = v;
		else if (strcmp(a, "--partition") == 0)
			bad = parse_i64(v, 0, &partition) || partition > INT32_MAX;
		else if (strcmp(a, "--from-offset") == 0)
			bad = parse_i64(v, 0, &from_offset);
		else
			bad = 1;
		if (bad) {
			reserve_usage();
			return 2;
		}
		i++;
	}
	bool existing = event_text != NULL;
	if (!tenant || (existing ? !wait || !rid_text || partition < 0 || from_offset < 0 || tokens >= 0
				 : tokens < 1)) {
		reserve_usage();
		return 2;
	}
	if (!tly_config_str(app->cfg, "kafka.bootstrap.servers")) {
		fprintf(stderr, "tallyctl: kafka.bootstrap.servers is not set (use -s "
				"kafka.bootstrap.servers=… or TALLY_KAFKA_BOOTSTRAP_SERVERS)\n");
		return 1;
	}
	struct tly_decision_ticket ticket = {.partition = (int32_t)partition, .from_offset = from_offset};
	struct tly_event ev = {0};
	tly_event_init(&ev, TLY_EV_TOKENS_RESERVED);
	if (tly_uuid_parse(tenant, &ev.tenant_id) != 0 ||
	    (rid_text && tly_uuid_parse(rid_text, &ev.u.tokens_reserved.reservation_id) != 0) ||
	    (event_text && tly_uuid_parse(event_text, &ev.event_id) != 0)) {
		fprintf(stderr, "tallyctl: --tenant, --reservation-id and --event-id take UUIDs\n");
		return 2;
	}
	if (!rid_text)
		tly_uuid_generate(&ev.u.tokens_reserved.reservation_id);
	if (!event_text)
		tly_uuid_generate(&ev.event_id);
	ev.occurred_at = wall_us();
	ev.u.tokens_reserved.tokens = tokens;
	ev.u.tokens_reserved.expires_at = ev.occurred_at + expires_in * 1000000;
	ev.u.tokens_reserved.model = model;

	int rc = 1;
	struct tly_decision_waiter *w = tly_decision_waiter_new(app->cfg, err, sizeof(err));
	if (!w) {
		fprintf(stderr, "tallyctl: %s\n", err);
		return 1;
	}
	if (existing) {
		ticket.tenant_id = ev.tenant_id;
		ticket.event_id = ev.event_id;
		ticket.reservation_id = ev.u.tokens_reserved.reservation_id;
	} else if (tly_decision_reserve(w, &ev, &ticket, err, sizeof(err)) != 0) {
		fprintf(stderr, "tallyctl: could not publish the reservation: %s\n", err);
		goto out;
	}
	if (!wait) {
		json_t *obj = ticket_json(&ticket);
		if (obj)
			json_object_set_new(obj, "outcome", json_string("published"));
		rc = print_line(obj);
		goto out;
	}
	struct tly_decision d;
	int wrc = tly_decision_wait(w, &ticket, (int)timeout_ms, &d);
	json_t *obj = ticket_json(&ticket);
	if (!obj) {
		fprintf(stderr, "tallyctl: out of memory\n");
		goto out;
	}
	if (wrc == 0) {
		json_object_set_new(obj, "outcome", json_string(tly_decision_outcome_name(d.outcome)));
		json_object_set_new(obj, "kind", json_string(d.kind));
		if (d.reason[0])
			json_object_set_new(obj, "reason", json_string(d.reason));
		json_object_set_new(obj, "seq", json_integer(d.seq));
		json_object_set_new(obj, "allowance_remaining", json_integer(d.allowance_remaining));
		json_object_set_new(obj, "credits_remaining", json_integer(d.credits_remaining));
		json_object_set_new(obj, "held", json_integer(d.held));
		json_object_set_new(obj, "available", json_integer(d.available));
		char when[40];
		tly_time_format_rfc3339(d.ledger_time, when);
		json_object_set_new(obj, "ledger_time", json_string(when));
		json_object_set_new(obj, "ledger_offset", json_integer(d.offset));
		rc = d.outcome == TLY_DECISION_ACCEPTED ? 0 : EXIT_REJECTED;
	} else if (wrc == TLY_E_TIMEOUT) {
		json_object_set_new(obj, "outcome", json_string("timeout"));
		json_object_set_new(obj, "timeout_ms", json_integer(timeout_ms));
		rc = EXIT_TIMEOUT;
	} else {
		json_object_set_new(obj, "outcome", json_string("failed"));
		json_object_set_new(obj, "error", json_string(d.reason[0] ? d.reason : tly_err_name(wrc)));
		rc = 1;
	}
	if (print_line(obj) != 0)
		rc = 1;
out:
	tly_decision_waiter_free(w);
	tly_event_free(&ev);
	return rc;
}
