/*
 * Suite "badbytes": every case of the hostile-input corpus (tests/corpus/, see corpus.h) through
 * the real entry point — Avro bodies through the codec, NDJSON lines through what `tallyctl
 * publish` runs (JSON parse, then validate and encode), HTTP requests through the server's request
 * handling, config files through the loader — each answering the error its sidecar names, with
 * the text it names, and no crash (the sanitizer build runs this suite too). Suite
 * "badbytes-programs": the config files given to the real programs. The other inputs in running
 * processes: check_ledger.c (quarantine), check_producer.c (publish), check_http.c.
 */
#include <check.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "codec.h"
#include "config.h"
#include "corpus.h"
#include "event_json.h"
#include "harness.h"
#include "health.h"
#include "http.h"
#include "metrics.h"
#include "proc.h"
#include "suites.h"

/* Mismatches of one test, all listed when it fails (one line each). */
static char mismatches[8192];

/* One answer checked against its case: the error name (or status) and the text in it. */
static void expect(const struct tly_corpus_case *c, const char *got, const char *message)
{
	size_t used = strlen(mismatches);
	if (strcmp(c->error, got) == 0 && strstr(message, c->text))
		return;
	snprintf(mismatches + used, sizeof(mismatches) - used, "\n  %s: expected %s \"%s\", got %s \"%.200s\"",
		 c->name, c->error, c->text, got, message);
	for (char *p = mismatches + used + 1; *p; p++)
		if (*p == '\r' || *p == '\n')
			*p = ' ';
}

static void setup(void)
{
	mismatches[0] = '\0';
}

static void no_mismatch(void)
{
	ck_assert_msg(mismatches[0] == '\0', "corpus cases answered otherwise:%s", mismatches);
}

START_TEST(test_avro_corpus)
{
	char err[1024];
	struct tly_corpus_case *cases;
	size_t n = tly_test_corpus_load("avro", &cases);
	struct tly_codec *codec = tly_codec_new(err, sizeof(err));
	ck_assert_msg(codec != NULL, "%s", err);
	struct tly_event ev = {0};
	for (size_t i = 0; i < n; i++) {
		err[0] = '\0';
		int rc = tly_codec_decode(codec, cases[i].data, cases[i].len, &ev, err, sizeof(err));
		expect(&cases[i], tly_err_name(rc), err);
	}
	/* larger than any message: refused before a byte of it is read */
	unsigned char *big = calloc(1, TLY_CODEC_MAX_BYTES + 1);
	ck_assert_ptr_nonnull(big);
	ck_assert_int_eq(tly_codec_decode(codec, big, TLY_CODEC_MAX_BYTES + 1, &ev, err, sizeof(err)),
			 TLY_E_TOO_LARGE);
	ck_assert_msg(strstr(err, "larger than the"), "%s", err);
	free(big);
	tly_event_free(&ev);
	tly_codec_free(codec);
	tly_test_corpus_free(cases, n);
	no_mismatch();
}
END_TEST

START_TEST(test_ndjson_corpus)
{
	char err[1024];
	struct tly_corpus_case *cases;
	size_t n = tly_test_corpus_load("ndjson", &cases);
	struct tly_codec *codec = tly_codec_new(err, sizeof(err));
	ck_assert_msg(codec != NULL, "%s", err);
	struct tly_event ev = {0};
	struct tly_buf buf = {0};
	for (size_t i = 0; i < n; i++) {
		const struct tly_corpus_case *c = &cases[i];
		size_t len = c->len;
		while (len > 0 && c->data[len - 1] == '\n') /* the line, as tallyctl publish reads it */
			len--;
		err[0] = '\0';
		int rc = tly_event_from_json_text((const char *)c->data, len,
						  TLY_EVJ_FILL_ID | TLY_EVJ_FILL_TIME, &ev, err, sizeof(err));
		if (rc == 0)
			rc = tly_codec_encode(codec, &ev, &buf, err, sizeof(err));
		expect(c, tly_err_name(rc), err);
	}
	tly_buf_free(&buf);
	tly_event_free(&ev);
	tly_codec_free(codec);
	tly_test_corpus_free(cases, n);
	no_mismatch();
}
END_TEST

START_TEST(test_http_corpus)
{
	struct tly_corpus_case *cases;
	size_t n = tly_test_corpus_load("http", &cases);
	struct tly_metrics *m = tly_metrics_new();
	struct tly_health *h = tly_health_new(1);
	ck_assert(m && h);
	ck_assert_ptr_nonnull(tly_metrics_counter(m, "tally_things_total", "Things", NULL));
	/* whole, then a byte at a time (a slow client): the same answer */
	static const size_t chunks[] = {0, 1};
	for (size_t i = 0; i < n; i++) {
		for (size_t k = 0; k < sizeof(chunks) / sizeof(chunks[0]); k++) {
			size_t len = 0;
			char *resp = tly_http_serve_bytes(m, h, NULL, cases[i].data, cases[i].len,
							  chunks[k], &len);
			char status[16] = "none";
			if (resp) {
				ck_assert_msg(len > 12 && memcmp(resp, "HTTP/1.1 ", 9) == 0 &&
						      memmem(resp, len, "\r\nConnection: close\r\n", 21),
					      "%s: not a closing HTTP/1.1 response", cases[i].name);
				snprintf(status, sizeof(status), "%.3s", resp + 9);
				char *text = malloc(len + 1); /* the response as a string (it has no NUL) */
				ck_assert_ptr_nonnull(text);
				memcpy(text, resp, len);
				text[len] = '\0';
				expect(&cases[i], status, text);
				free(text);
			} else {
				expect(&cases[i], status, "");
			}
			free(resp);
		}
	}
	tly_metrics_free(m);
	tly_health_free(h);
	tly_test_corpus_free(cases, n);
	no_mismatch();
}
END_TEST

START_TEST(test_config_corpus)
{
	char err[1024], path[600];
	struct tly_corpus_case *cases;
	size_t n = tly_test_corpus_load("config", &cases);
	const char *root = getenv("TALLY_CORPUS") ? getenv("TALLY_CORPUS") : "tests/corpus";
	for (size_t i = 0; i < n; i++) {
		struct tly_config *cfg = tly_config_new();
		ck_assert_ptr_nonnull(cfg);
		snprintf(path, sizeof(path), "%s/config/%s.conf", root, cases[i].name);
		err[0] = '\0';
		int rc = tly_config_load_file(cfg, path, err, sizeof(err));
		expect(&cases[i], tly_err_name(rc), err);
		if (rc != 0)
			ck_assert_msg(strncmp(err, path, strlen(path)) == 0, "%s: error does not name the file: %s",
				      cases[i].name, err);
		tly_config_free(cfg);
	}
	tly_test_corpus_free(cases, n);
	no_mismatch();
}
END_TEST

/* The config corpus given to the real programs: a clear message and exit status 2, no crash. */
START_TEST(test_config_corpus_programs)
{
	static char out[8192];
	char path[600];
	struct tly_corpus_case *cases;
	size_t n = tly_test_corpus_load("config", &cases);
	const char *root = getenv("TALLY_CORPUS") ? getenv("TALLY_CORPUS") : "tests/corpus";
	static const char *const programs[] = {"tally-ledger", "tally-projector", "tallyctl"};
	for (size_t i = 0; i < n; i++) {
		snprintf(path, sizeof(path), "%s/config/%s.conf", root, cases[i].name);
		for (size_t k = 0; k < sizeof(programs) / sizeof(programs[0]); k++) {
			bool ok = strcmp(cases[i].error, "ok") == 0;
			if (ok && k < 2)
				continue; /* a daemon with a good file goes on to connect: not this test's business */
			char *const argv[] = {(char *)tly_test_bin(programs[k]), "-c", path,
					      k == 2 ? "config" : NULL, NULL};
			int rc = tly_proc_run(argv, out, sizeof(out));
			if (ok) {
				ck_assert_msg(rc == 0, "%s -c %s: exit %d: %s", programs[k], cases[i].name, rc, out);
				continue;
			}
			ck_assert_msg(rc == 2 || rc == 1, "%s -c %s: exit %d (a crash is -1): %s", programs[k],
				      cases[i].name, rc, out);
			ck_assert_msg(strstr(out, path) && strstr(out, cases[i].text),
				      "%s -c %s: expected \"%s\" in: %s", programs[k], cases[i].name,
				      cases[i].text, out);
		}
	}
	tly_test_corpus_free(cases, n);
}
END_TEST

Suite *badbytes_programs_suite(void)
{
	Suite *s = suite_create("badbytes-programs");
	TCase *tc = tcase_create("config");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_config_corpus_programs);
	suite_add_tcase(s, tc);
	return s;
}

Suite *badbytes_suite(void)
{
	Suite *s = suite_create("badbytes");
	TCase *tc = tcase_create("corpus");
	tcase_set_timeout(tc, 60);
	tcase_add_checked_fixture(tc, setup, NULL);
	tcase_add_test(tc, test_avro_corpus);
	tcase_add_test(tc, test_ndjson_corpus);
	tcase_add_test(tc, test_http_corpus);
	tcase_add_test(tc, test_config_corpus);
	suite_add_tcase(s, tc);
	return s;
}
