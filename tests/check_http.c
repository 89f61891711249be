/*
 * Suite "http": the HTTP endpoint in-process over real TCP sockets (exact metrics text, 400, 404,
 * 405, 413, a slow client that neither blocks another nor stays open, /healthz and /readyz
 * conditions), then the real tally-ledger and tally-projector scraped before and after traffic.
 */
#include <check.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"
#include "corpus.h"
#include "fixtures.h"
#include "harness.h"
#include "health.h"
#include "http.h"
#include "metrics.h"
#include "pg.h"
#include "proc.h"
#include "producer.h"
#include "suites.h"

#define PARTITIONS 4
#define T0 1767225600000000LL /* 2026-01-01 */
#define HOUR 3600000000LL

/* A connected socket to "host:port", with a 10 s receive timeout. */
static int dial(const char *address)
{
	char host[128], port[16];
	const char *colon = strrchr(address, ':');
	ck_assert_ptr_nonnull(colon);
	snprintf(host, sizeof(host), "%.*s", (int)(colon - address), address);
	snprintf(port, sizeof(port), "%s", colon + 1);
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
	ck_assert_int_eq(getaddrinfo(host, port, &hints, &res), 0);
	int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
	ck_assert_int_ge(fd, 0);
	ck_assert_msg(connect(fd, res->ai_addr, res->ai_addrlen) == 0, "could not connect to %s", address);
	freeaddrinfo(res);
	struct timeval tv = {10, 0};
	ck_assert_int_eq(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
	return fd;
}

static void send_all(int fd, const char *data, size_t len)
{
	while (len) {
		ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
		ck_assert_msg(n > 0, "could not send the request");
		data += n;
		len -= (size_t)n;
	}
}

/* Everything the server sends until it closes (malloc'd, NUL-terminated). */
static char *read_all(int fd)
{
	size_t cap = 1 << 16, len = 0;
	char *buf = malloc(cap);
	ck_assert_ptr_nonnull(buf);
	for (;;) {
		if (len + 4096 + 1 > cap)
			ck_assert_ptr_nonnull(buf = realloc(buf, cap *= 2));
		ssize_t n = recv(fd, buf + len, 4096, 0);
		ck_assert_msg(n >= 0, "the server neither answered nor closed within 10 s");
		if (n == 0)
			break;
		len += (size_t)n;
	}
	buf[len] = '\0';
	close(fd);
	return buf;
}

/* Send a raw request, return the whole response. */
static char *exchange(const char *address, const char *request, size_t len)
{
	int fd = dial(address);
	send_all(fd, request, len);
	return read_all(fd);
}

static char *get(const char *address, const char *path)
{
	char req[512];
	int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path);
	return exchange(address, req, (size_t)n);
}

static int status_of(const char *response)
{
	int status = 0;
	ck_assert_msg(sscanf(response, "HTTP/1.1 %d ", &status) == 1, "not an HTTP response: %.80s",
		      response);
	return status;
}

static const char *body_of(const char *response)
{
	const char *b = strstr(response, "\r\n\r\n");
	ck_assert_ptr_nonnull(b);
	return b + 4;
}

/* The value of one series line ("name" or "name{labels}") in a scrape; fails when absent. */
static long long metric(const char *body, const char *series)
{
	char needle[300];
	snprintf(needle, sizeof(needle), "\n%s ", series);
	const char *at = strstr(body, needle);
	ck_assert_msg(at != NULL, "no series %s in:\n%s", series, body);
	return atoll(at + strlen(needle));
}

/* The sum of every series of a family (lines starting with name{ or "name "). */
static long long metric_sum(const char *body, const char *name)
{
	long long sum = 0;
	size_t nl = strlen(name);
	for (const char *line = body; line && *line; line = strchr(line, '\n'), line = line ? line + 1 : NULL) {
		if (strncmp(line, name, nl) == 0 && (line[nl] == '{' || line[nl] == ' ')) {
			const char *sp = strchr(line, ' ');
			sum += atoll(sp + 1);
		}
	}
	return sum;
}

/* ---- in-process ---------------------------------------------------------------------------- */

struct server {
	struct tly_metrics *m;
	struct tly_health *h;
	struct tly_http *http;
};

static void server_up(struct server *s, const struct tly_http_options *opts)
{
	char errstr[256];
	ck_assert_ptr_nonnull(s->m = tly_metrics_new());
	ck_assert_ptr_nonnull(s->h = tly_health_new(10));
	s->http = tly_http_start("127.0.0.1:0", s->m, s->h, opts, errstr, sizeof(errstr));
	ck_assert_msg(s->http != NULL, "%s", errstr);
	ck_assert_msg(strncmp(tly_http_address(s->http), "127.0.0.1:", 10) == 0 &&
			      strcmp(tly_http_address(s->http), "127.0.0.1:0") != 0,
		      "bound address %s", tly_http_address(s->http));
}

static void server_down(struct server *s)
{
	tly_http_stop(s->http);
	tly_metrics_free(s->m);
	tly_health_free(s->h);
}

START_TEST(test_metrics_text)
{
	static const char *const partition[] = {"partition", NULL};
	static const char *const two[] = {"topic", "reason", NULL};
	static const double bounds[] = {1, 5, 10};
	struct server s = {0};
	server_up(&s, NULL);
	struct tly_series *c = tly_metrics_series(
		tly_metrics_counter(s.m, "tally_things_total", "Things counted", NULL), NULL);
	struct tly_metric *g = tly_metrics_gauge(s.m, "tally_lag", "Lag per partition", partition);
	struct tly_metric *r = tly_metrics_counter(s.m, "tally_odd_total", "Odd labels", two);
	struct tly_series *hist = tly_metrics_series(
		tly_metrics_histogram(s.m, "tally_batch", "Batch sizes", NULL, bounds, 3), NULL);
	ck_assert_ptr_null(tly_metrics_counter(s.m, "not_tally", "bad prefix", NULL));
	tly_metrics_add(c, 41);
	tly_metrics_add(c, 1);
	const char *const p0[] = {"0"}, *const p1[] = {"1"}, *const p2[] = {"2"};
	tly_metrics_set(tly_metrics_series(g, p0), 7);
	tly_metrics_set(tly_metrics_series(g, p1), 0);
	tly_metrics_set(tly_metrics_series(g, p2), 3);
	tly_metrics_unset(tly_metrics_series(g, p2)); /* hidden: not rendered */
	ck_assert_ptr_eq(tly_metrics_series(g, p0), tly_metrics_series(g, p0));
	const char *const odd[] = {"a\"b", "x\\y\nz"};
	tly_metrics_add(tly_metrics_series(r, odd), 2);
	tly_metrics_observe(hist, 1);
	tly_metrics_observe(hist, 3);
	tly_metrics_observe(hist, 50);
	tly_metrics_observe(hist, 0.5);

	char *resp = get(tly_http_address(s.http), "/metrics");
	const char *want =
		"# HELP tally_things_total Things counted\n"
		"# TYPE tally_things_total counter\n"
		"tally_things_total 42\n"
		"# HELP tally_lag Lag per partition\n"
		"# TYPE tally_lag gauge\n"
		"tally_lag{partition=\"0\"} 7\n"
		"tally_lag{partition=\"1\"} 0\n"
		"# HELP tally_odd_total Odd labels\n"
		"# TYPE tally_odd_total counter\n"
		"tally_odd_total{topic=\"a\\\"b\",reason=\"x\\\\y\\nz\"} 2\n"
		"# HELP tally_batch Batch sizes\n"
		"# TYPE tally_batch histogram\n"
		"tally_batch_bucket{le=\"1\"} 2\n"
		"tally_batch_bucket{le=\"5\"} 3\n"
		"tally_batch_bucket{le=\"10\"} 3\n"
		"tally_batch_bucket{le=\"+Inf\"} 4\n"
		"tally_batch_sum 54.5\n"
		"tally_batch_count 4\n";
	char head[200];
	snprintf(head, sizeof(head),
		 "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
		 "Content-Length: %zu\r\nConnection: close\r\n\r\n", strlen(want));
	ck_assert_msg(strncmp(resp, head, strlen(head)) == 0, "head:\n%s", resp);
	ck_assert_str_eq(body_of(resp), want);
	free(resp);
	server_down(&s);
}
END_TEST

START_TEST(test_bad_requests)
{
	struct server s = {0};
	server_up(&s, NULL);
	const char *addr = tly_http_address(s.http);
	char *r;

	r = exchange(addr, "NONSENSE\r\n\r\n", 12);
	ck_assert_int_eq(status_of(r), 400);
	free(r);
	r = exchange(addr, "GET /metrics HTTP/1.1\r\nHost\r\n\r\n", 31);
	ck_assert_int_eq(status_of(r), 400);
	free(r);
	r = get(addr, "/nothing-here");
	ck_assert_int_eq(status_of(r), 404);
	free(r);
	r = get(addr, "/metrics?x=1"); /* the query does not change the route */
	ck_assert_int_eq(status_of(r), 200);
	free(r);
	const char post[] = "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi";
	r = exchange(addr, post, sizeof(post) - 1);
	ck_assert_int_eq(status_of(r), 405);
	ck_assert_ptr_nonnull(strstr(r, "Allow: GET\r\n"));
	free(r);

	/* 20 KiB of headers, over the 8 KiB cap */
	size_t big = 20 * 1024;
	char *req = malloc(big + 64);
	ck_assert_ptr_nonnull(req);
	int n = snprintf(req, 64, "GET /metrics HTTP/1.1\r\nX-Pad: ");
	memset(req + n, 'a', big);
	memcpy(req + n + big, "\r\n\r\n", 4);
	int fd = dial(addr);
	send_all(fd, req, (size_t)n + big + 4);
	r = read_all(fd);
	ck_assert_int_eq(status_of(r), 413);
	free(r);
	free(req);

	/* the server still serves */
	r = get(addr, "/metrics");
	ck_assert_int_eq(status_of(r), 200);
	free(r);
	server_down(&s);
}
END_TEST

START_TEST(test_slow_client)
{
	/*
	 * The slow client's deadline is the server's default: longer than any stall of the test
	 * between its request and the /healthz answer, so that the answer coming first shows the
	 * server was not held up (not the time it took, which a loaded machine stretches).
	 */
	struct tly_http_options opts = {.timeout_ms = 5000};
	struct server s = {0};
	server_up(&s, &opts);
	const char *addr = tly_http_address(s.http);
	int64_t t0 = tly_clock_ms(); /* before the server could accept it, so before its deadline began */
	int slow = dial(addr);
	send_all(slow, "GET /metr", 9);
	char *r = get(addr, "/healthz");
	ck_assert_int_eq(status_of(r), 503);
	free(r);
	/* not held up by the slow one: answered while the slow one is still open, unanswered */
	struct pollfd pfd = {.fd = slow, .events = POLLIN};
	ck_assert_msg(poll(&pfd, 1, 0) == 0, "the slow connection was answered or closed before /healthz");
	/* the slow one is closed at its deadline, never before, without a response */
	r = read_all(slow);
	int64_t waited = tly_clock_ms() - t0;
	ck_assert_str_eq(r, "");
	ck_assert_msg(waited >= opts.timeout_ms - 50, "closed after %lld ms", (long long)waited);
	free(r);
	server_down(&s);
}
END_TEST

START_TEST(test_health_and_ready)
{
	struct server s = {0};
	server_up(&s, NULL);
	const char *addr = tly_http_address(s.http);
	char *r;
#define EXPECT(path, status, text)                                                        \
	do {                                                                              \
		r = get(addr, path);                                                      \
		ck_assert_int_eq(status_of(r), status);                                   \
		ck_assert_msg(strstr(body_of(r), text) != NULL, "%s: %s", path, r);      \
		free(r);                                                                  \
	} while (0)
	EXPECT("/healthz", 503, "has not started");
	tly_health_beat(s.h);
	EXPECT("/healthz", 200, "ok");
	EXPECT("/readyz", 503, "schema is not at head");
	tly_health_set_schema(s.h, true);
	EXPECT("/readyz", 503, "PostgreSQL was unreachable");
	tly_health_set_pg(s.h, true);
	EXPECT("/readyz", 503, "no partition is assigned");
	tly_health_set_assigned(s.h, 2);
	EXPECT("/readyz", 503, "lag is not known");
	tly_health_set_lag(s.h, 11);
	EXPECT("/readyz", 503, "the lag is 11 records, above readyz.max.lag 10");
	tly_health_set_lag(s.h, 10);
	EXPECT("/readyz", 200, "ok");
	tly_health_set_pg(s.h, false);
	EXPECT("/readyz", 503, "PostgreSQL was unreachable");
#undef EXPECT
	server_down(&s);
}
END_TEST

/* ---- the real daemons ---------------------------------------------------------------------- */

struct env {
	struct tly_test_broker b;
	struct tly_test_db d;
	struct tly_producer *prod;
	char log[400], plog[400];
};

static void env_up(struct env *e)
{
	char errstr[512];
	memset(e, 0, sizeof(*e));
	tly_test_broker_start(&e->b, 1, PARTITIONS);
	tly_test_db_up(&e->d, "check_http");
	snprintf(e->log, sizeof(e->log), "%s/ledger.log", e->b.dir);
	snprintf(e->plog, sizeof(e->plog), "%s/projector.log", e->b.dir);
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert(tly_config_set(cfg, "kafka.bootstrap.servers", e->b.bootstraps, errstr,
				 sizeof(errstr)) == 0);
	e->prod = tly_producer_new(cfg, NULL, NULL, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(e->prod != NULL, "%s", errstr);
}

static void env_down(struct env *e)
{
	tly_producer_free(e->prod, 5000);
	tly_test_db_down(&e->d);
	tly_test_broker_stop(&e->b);
}

/* The address a daemon logged in its "http listening" line (waits for it). */
static void listening_address(const char *log, char *out, size_t len)
{
	char line[4096];
	int64_t deadline = tly_clock_ms() + 20000;
	while (tly_clock_ms() < deadline) {
		FILE *f = fopen(log, "r");
		while (f && fgets(line, sizeof(line), f)) {
			const char *a;
			if (strstr(line, "msg=\"http listening\"") && (a = strstr(line, "address="))) {
				a += strlen("address=");
				snprintf(out, len, "%.*s", (int)strcspn(a, " \n"), a);
				fclose(f);
				return;
			}
		}
		if (f)
			fclose(f);
		usleep(100000);
	}
	ck_abort_msg("no \"http listening\" line in %s", log);
}

static long q_long(PGconn *conn, const char *sql)
{
	struct tly_pg_error err;
	PGresult *res = tly_pg_query(conn, sql, 0, NULL, &err);
	ck_assert_msg(res != NULL, "%s: %s", sql, err.message);
	long x = PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ? atol(PQgetvalue(res, 0, 0)) : -1;
	PQclear(res);
	return x;
}

static void publish(struct env *e, const struct tly_event *ev)
{
	char errstr[512];
	ck_assert_msg(tly_producer_publish(e->prod, ev, NULL, errstr, sizeof(errstr)) == 0, "%s", errstr);
}

/*
 * Traffic of n_tenants tenants: a subscription of 100 tokens each, then three reservations of
 * 40 (the third does not fit: rejected insufficient_tokens) and the same first reservation
 * again (a duplicate). Returns the number of events published.
 */
static long traffic(struct env *e, int n_tenants)
{
	long n = 0;
	for (int t = 0; t < n_tenants; t++) {
		struct tly_event ev, first;
		tly_fixture_event(&ev, TLY_EV_TENANT_CREATED, 2000 + (unsigned)t);
		tly_uuid tenant = ev.tenant_id;
		tly_fixture_event(&ev, TLY_EV_SUBSCRIPTION_STARTED, 7);
		tly_uuid_generate(&ev.event_id);
		ev.tenant_id = tenant;
		ev.occurred_at = T0;
		ev.u.subscription_started.period_start = T0;
		ev.u.subscription_started.period_end = T0 + 720 * HOUR;
		ev.u.subscription_started.trial_ends_at.set = false;
		ev.u.subscription_started.terms.tokens_per_period = 100;
		ev.u.subscription_started.terms.rollover_cap_tokens = 0;
		ev.u.subscription_started.terms.overage_price_micros_per_1k_tokens.set = false;
		publish(e, &ev);
		n++;
		for (int k = 0; k < 3; k++) {
			tly_fixture_event(&ev, TLY_EV_TOKENS_RESERVED, 9);
			tly_uuid_generate(&ev.event_id);
			tly_uuid_generate(&ev.u.tokens_reserved.reservation_id);
			ev.tenant_id = tenant;
			ev.occurred_at = T0 + HOUR + k;
			ev.u.tokens_reserved.tokens = 40;
			ev.u.tokens_reserved.expires_at = T0 + 700 * HOUR;
			publish(e, &ev);
			n++;
			if (k == 0)
				first = ev;
		}
		publish(e, &first);
		n++;
	}
	ck_assert_msg(tly_producer_flush(e->prod, 15000) == 0, "events not delivered");
	return n;
}

/* Scrape until pred holds for the body, or fail after timeout_ms with the last scrape. */
static char *scrape_until(const char *addr, const char *path, int status,
			  bool (*pred)(const char *body, const void *ud), const void *ud,
			  int timeout_ms)
{
	int64_t deadline = tly_clock_ms() + timeout_ms;
	for (;;) {
		char *r = get(addr, path);
		if (status_of(r) == status && (!pred || pred(body_of(r), ud)))
			return r;
		if (tly_clock_ms() > deadline)
			ck_abort_msg("%s did not reach %d within %d ms:\n%s", path, status, timeout_ms, r);
		free(r);
		usleep(100000);
	}
}

static bool consumed_at_least(const char *body, const void *ud)
{
	return metric(body, "tally_records_consumed_total") >= *(const long *)ud;
}

static bool lag_zero(const char *body, const void *ud)
{
	(void)ud;
	char series[64];
	for (int p = 0; p < PARTITIONS; p++) {
		snprintf(series, sizeof(series), "\ntally_consumer_lag{partition=\"%d\"} ", p);
		const char *at = strstr(body, series);
		if (!at || atoll(at + strlen(series)) != 0)
			return false;
	}
	return true;
}

static bool lag_zero_events(const char *body, const void *ud)
{
	(void)ud;
	char series[96];
	for (int p = 0; p < PARTITIONS; p++) {
		snprintf(series, sizeof(series),
			 "\ntally_consumer_lag{topic=\"tally.events\",partition=\"%d\"} ", p);
		const char *at = strstr(body, series);
		if (!at || atoll(at + strlen(series)) != 0)
			return false;
	}
	return true;
}

struct committed {
	const struct env *e;
	long published;
};

/* Every published record's offset committed, and the entries counted are the ones stored. */
static bool entries_committed(const char *body, const void *ud)
{
	const struct committed *c = ud;
	long offsets = q_long(c->e->d.conn, "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
					   "WHERE consumer = 'tally-ledger'");
	long stored = q_long(c->e->d.conn, "SELECT count(*) FROM ledger_entries");
	return lag_zero(body, NULL) && offsets == c->published &&
	       metric_sum(body, "tally_ledger_entries_total") == stored;
}

START_TEST(test_ledger_scrape)
{
	struct env e;
	char addr[128];
	env_up(&e);
	pid_t pid = tly_test_ledger_spawn(e.b.bootstraps, e.d.conninfo, "http-test", PARTITIONS, e.log);
	listening_address(e.log, addr, sizeof(addr));

	/* Before traffic: alive, ready once assigned and caught up, every counter at 0. */
	char *r = scrape_until(addr, "/healthz", 200, NULL, NULL, 20000);
	free(r);
	r = scrape_until(addr, "/readyz", 200, NULL, NULL, 30000);
	free(r);
	r = scrape_until(addr, "/metrics", 200, lag_zero, NULL, 10000);
	const char *body = body_of(r);
	ck_assert_int_eq(metric(body, "tally_records_consumed_total"), 0);
	ck_assert_int_eq(metric_sum(body, "tally_ledger_entries_total"), 0);
	ck_assert_int_eq(metric(body, "tally_ledger_duplicates_total"), 0);
	ck_assert_int_eq(metric(body, "tally_partitions_assigned"), PARTITIONS);
	ck_assert_int_eq(metric(body, "tally_batch_records_count"), 0);
	free(r);

	const int tenants = 6;
	long published = traffic(&e, tenants);
	r = scrape_until(addr, "/metrics", 200, consumed_at_least, &published, 30000);
	free(r);
	/* consumed and lag count buffered records: wait for the commit of what they count */
	struct committed committed = {&e, published};
	r = scrape_until(addr, "/metrics", 200, entries_committed, &committed, 30000);
	body = body_of(r);
	ck_assert_int_eq(metric(body, "tally_records_consumed_total"), published);
	long entries = q_long(e.d.conn, "SELECT count(*) FROM ledger_entries");
	ck_assert_int_gt(entries, 0);
	ck_assert_int_eq(metric_sum(body, "tally_ledger_entries_total"), entries);
	ck_assert_int_eq(metric(body, "tally_ledger_entries_total{kind=\"hold_placed\"}"), 2 * tenants);
	ck_assert_int_eq(metric(body, "tally_ledger_entries_total{kind=\"rejected\"}"), tenants);
	ck_assert_int_eq(metric(body, "tally_ledger_rejected_total{reason=\"insufficient_tokens\"}"),
			 tenants);
	ck_assert_int_eq(metric(body, "tally_ledger_duplicates_total"), tenants);
	ck_assert_int_eq(metric(body, "tally_ledger_quarantined_total"), 0);
	ck_assert_int_eq(metric_sum(body, "tally_ledger_open_holds"), 2 * tenants);
	long batches = (long)metric(body, "tally_batch_records_count");
	ck_assert_int_gt(batches, 0);
	ck_assert_int_eq(metric(body, "tally_batch_records_bucket{le=\"+Inf\"}"), batches);
	ck_assert_int_eq(metric(body, "tally_commit_duration_seconds_count"), batches);
	ck_assert_int_eq(q_long(e.d.conn, "SELECT count(*) FROM ledger_entries WHERE kind = 'rejected' "
					  "AND reason = 'insufficient_tokens'"), tenants);
	free(r);
	r = get(addr, "/readyz");
	ck_assert_int_eq(status_of(r), 200);
	free(r);

	/*
	 * Malformed and stalled clients do not disturb the consumer: the bad-bytes corpus
	 * (tests/corpus/http), each answered as its sidecar says; the incomplete ones stay open.
	 */
	int slow = dial(addr);
	send_all(slow, "GET /metrics HTTP/1.1\r\nHo", 25);
	r = exchange(addr, "\x01\x02garbage\r\n\r\n", 13);
	ck_assert_int_eq(status_of(r), 400);
	free(r);
	struct tly_corpus_case *cases;
	size_t n = tly_test_corpus_load("http", &cases);
	int stalled[64], n_stalled = 0;
	for (size_t i = 0; i < n; i++) {
		if (strcmp(cases[i].error, "none") == 0) {
			ck_assert_int_lt(n_stalled, 64);
			stalled[n_stalled] = dial(addr);
			send_all(stalled[n_stalled++], (const char *)cases[i].data, cases[i].len);
			continue;
		}
		r = exchange(addr, (const char *)cases[i].data, cases[i].len);
		int got = status_of(r), want = atoi(cases[i].error);
		/* /healthz and /readyz: 503 in the corpus's server (nothing beats), 200 here */
		ck_assert_msg(got == want || (want == 503 && got == 200),
			      "corpus case %s: status %d, expected %d", cases[i].name, got, want);
		free(r);
	}
	tly_test_corpus_free(cases, n);
	published += traffic(&e, 2);
	r = scrape_until(addr, "/metrics", 200, consumed_at_least, &published, 30000);
	ck_assert_int_eq(metric(body_of(r), "tally_records_consumed_total"), published);
	free(r);
	r = get(addr, "/healthz");
	ck_assert_int_eq(status_of(r), 200);
	free(r);
	close(slow);
	for (int i = 0; i < n_stalled; i++)
		close(stalled[i]);

	tly_test_ledger_stop(pid, e.log);
	env_down(&e);
}
END_TEST

static bool projected(const char *body, const void *ud)
{
	return metric(body, "tally_records_consumed_total{topic=\"tally.events\"}") >= *(const long *)ud &&
	       metric(body, "tally_projector_records_applied_total") >= *(const long *)ud;
}

START_TEST(test_projector_scrape)
{
	struct env e;
	char addr[128];
	env_up(&e);
	pid_t pid = tly_test_projector_spawn(e.b.bootstraps, e.d.conninfo, e.plog); /* free port */
	listening_address(e.plog, addr, sizeof(addr));

	char *r = scrape_until(addr, "/healthz", 200, NULL, NULL, 20000);
	free(r);
	r = scrape_until(addr, "/readyz", 200, NULL, NULL, 30000);
	free(r);
	r = get(addr, "/metrics");
	ck_assert_int_eq(status_of(r), 200);
	ck_assert_int_eq(metric(body_of(r), "tally_records_consumed_total{topic=\"tally.events\"}"), 0);
	ck_assert_int_eq(metric(body_of(r), "tally_projector_records_applied_total"), 0);
	ck_assert_int_ge(metric(body_of(r), "tally_partitions_assigned"), PARTITIONS);
	free(r);

	long published = traffic(&e, 3);
	r = scrape_until(addr, "/metrics", 200, projected, &published, 30000);
	free(r);
	r = scrape_until(addr, "/metrics", 200, lag_zero_events, NULL, 10000);
	const char *body = body_of(r);
	ck_assert_int_eq(metric(body, "tally_records_consumed_total{topic=\"tally.events\"}"), published);
	ck_assert_int_eq(metric(body, "tally_projector_records_applied_total"), published);
	ck_assert_int_eq(metric(body, "tally_projector_undecodable_total"), 0);
	ck_assert_int_gt(metric(body, "tally_batch_records_count"), 0);
	free(r);
	r = get(addr, "/readyz");
	ck_assert_int_eq(status_of(r), 200);
	free(r);

	tly_test_projector_stop(pid, e.plog);
	env_down(&e);
}
END_TEST

Suite *http_suite(void)
{
	Suite *s = suite_create("http");
	TCase *tc = tcase_create("server");
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_metrics_text);
	tcase_add_test(tc, test_bad_requests);
	tcase_add_test(tc, test_slow_client);
	tcase_add_test(tc, test_health_and_ready);
	suite_add_tcase(s, tc);
	tc = tcase_create("daemons");
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_ledger_scrape);
	tcase_add_test(tc, test_projector_scrape);
	suite_add_tcase(s, tc);
	return s;
}
