/*
 * The daemons' HTTP endpoint: GET /healthz, /readyz and /metrics over HTTP/1.1 (libev loop and
 * http-parser), on a thread of its own so it never waits on the consumer loop and the consumer
 * loop never waits on it. One request per connection (answered with Connection: close); a
 * connection that has not sent a whole request within the timeout, sends more than the request
 * cap, or comes beyond the connection cap is closed without disturbing the others.
 */
#ifndef TLY_HTTP_H
#define TLY_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

struct tly_metrics;
struct tly_health;
struct tly_http;

struct tly_http_options {
	int timeout_ms;        /* a connection's whole life, accept to response; 0: 5000 */
	size_t max_request;    /* bytes of request line and headers (and body); 0: 8192 */
	int max_connections;   /* open at once; beyond, new ones are closed at once; 0: 64 */
	int64_t alive_ms;      /* /healthz fails when the loop has not beat for this long; 0: 30000 */
};

/*
 * Listen on listen ("host:port"; port 0 picks a free one) and serve from a new thread. metrics
 * and health are borrowed until tly_http_stop returns; opts may be NULL (defaults). Logs
 * msg="http listening" address=HOST:PORT. NULL with errstr filled when the address cannot be
 * parsed or bound, or the thread cannot start.
 */
struct tly_http *tly_http_start(const char *listen, struct tly_metrics *metrics,
				struct tly_health *health, const struct tly_http_options *opts,
				char *errstr, size_t errlen);

/* The bound address, "127.0.0.1:40123" ("[::1]:40123" for IPv6). */
const char *tly_http_address(const struct tly_http *h);

/* Stop the thread, close every connection and the listener, free h. Accepts NULL. */
void tly_http_stop(struct tly_http *h);

/*
 * One connection's request served from memory, as the server would serve it but with no socket,
 * thread or deadline (for the tests and the fuzzer): req is fed in pieces of chunk bytes (0: the
 * server's read size). Returns the whole response (malloc'd, *out_len bytes, caller frees), or
 * NULL when the connection would still be waiting for more of the request (the server closes it
 * at its deadline without answering) or no response could be built (out of memory).
 */
char *tly_http_serve_bytes(struct tly_metrics *metrics, struct tly_health *health,
			   const struct tly_http_options *opts, const void *req, size_t len,
			   size_t chunk, size_t *out_len);

#endif
