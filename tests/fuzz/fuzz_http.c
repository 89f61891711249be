/*
 * libFuzzer harness: the HTTP endpoint's request handling (tly_http_serve_bytes: http-parser,
 * the request cap, the routes) on arbitrary bytes, fed whole and in small pieces. A response is
 * always a closing HTTP/1.1 response, and the same for both feeds.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "health.h"
#include "http.h"
#include "metrics.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_response(const char *resp, size_t len)
{
	if (len < 12 || memcmp(resp, "HTTP/1.1 ", 9) != 0 ||
	    !memmem(resp, len, "\r\nConnection: close\r\n", 21)) {
		fprintf(stderr, "not a closing HTTP/1.1 response: %.*s\n", (int)(len < 200 ? len : 200),
			resp);
		abort();
	}
}

static struct tly_metrics *m;
static struct tly_health *h;

/* Release what the runs share, so the leak check at exit sees only what an input leaked. */
static void release(void)
{
	tly_metrics_free(m);
	tly_health_free(h);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!m) {
		m = tly_metrics_new();
		h = tly_health_new(1);
		if (!m || !h || !tly_metrics_counter(m, "tally_things_total", "Things", NULL))
			abort();
		atexit(release);
	}
	/* the first byte picks the piece size of the second feed (1..16) */
	size_t chunk = size ? 1 + data[0] % 16 : 1;
	size_t whole_len = 0, pieces_len = 0;
	char *whole = tly_http_serve_bytes(m, h, NULL, data, size, 0, &whole_len);
	char *pieces = tly_http_serve_bytes(m, h, NULL, data, size, chunk, &pieces_len);
	if (whole)
		check_response(whole, whole_len);
	if (pieces)
		check_response(pieces, pieces_len);
	if (!whole != !pieces || (whole && memcmp(whole, pieces, 12) != 0)) {
		fprintf(stderr, "fed whole: %.12s; in pieces of %zu: %.12s\n", whole ? whole : "(none)",
			chunk, pieces ? pieces : "(none)");
		abort();
	}
	free(whole);
	free(pieces);
	return 0;
}
