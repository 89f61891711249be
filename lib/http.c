/* The HTTP endpoint: listener, connections, request parsing and the three routes, on its own thread. */
#include "http.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ev.h>
#include <http_parser.h>

#include "health.h"
#include "log.h"
#include "metrics.h"

#define DEFAULT_TIMEOUT_MS 5000
#define DEFAULT_MAX_REQUEST 8192
#define DEFAULT_MAX_CONNECTIONS 64
#define DEFAULT_ALIVE_MS 30000
#define LINGER_S 1.0         /* after the response: drain what the client still sends, then close */
#define ACCEPT_PAUSE_S 0.1   /* out of file descriptors: stop accepting for this long */
#define URL_MAX 1024
#define READ_CHUNK 4096      /* bytes read from a connection at a time */

enum conn_state { READING, WRITING, LINGERING, DROPPED /* no response could be built: close */ };

struct conn {
	ev_io io;                  /* read, then write, then drain; data points to the conn */
	ev_timer timer;            /* the connection's deadline */
	struct tly_http *srv;
	int fd;
	enum conn_state state;
	http_parser parser;
	size_t received;           /* bytes read while READING */
	char url[URL_MAX];
	size_t url_len;
	bool url_too_long;
	bool complete;             /* a whole request was parsed */
	char *out;                 /* the response (owned) */
	size_t out_len, out_off;
	struct conn *prev, *next;  /* the server's open connections */
};

struct tly_http {
	struct ev_loop *loop;      /* owned; run only by the thread */
	ev_io accept_io;
	ev_timer accept_pause;
	ev_async wake;             /* tly_http_stop: break the loop */
	pthread_t thread;
	bool thread_started;
	int fd;                    /* the listener */
	struct tly_http_options opts;
	struct tly_metrics *metrics; /* borrowed */
	struct tly_health *health;   /* borrowed */
	http_parser_settings settings;
	struct conn *conns;
	int n_conns;
	char address[128];
};

/* ---- connections -------------------------------------------------------------------------- */

static void conn_close(struct conn *c)
{
	struct tly_http *srv = c->srv;
	ev_io_stop(srv->loop, &c->io);
	ev_timer_stop(srv->loop, &c->timer);
	if (close(c->fd) != 0)
		tly_debug("could not close HTTP connection", "reason=\"%s\"", strerror(errno));
	if (c->prev)
		c->prev->next = c->next;
	else
		srv->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	srv->n_conns--;
	free(c->out);
	free(c);
}

static const char *status_text(int status)
{
	switch (status) {
	case 200: return "OK";
	case 400: return "Bad Request";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 413: return "Payload Too Large";
	case 500: return "Internal Server Error";
	case 503: return "Service Unavailable";
	default: return "Error";
	}
}

/* Queue the response (body is copied): state WRITING, or DROPPED when out of memory. */
static void respond(struct conn *c, int status, const char *content_type, const char *body,
		    size_t body_len)
{
	char head[256];
	int n = snprintf(head, sizeof(head),
			 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
			 "Connection: close\r\n\r\n",
			 status, status_text(status), content_type, body_len,
			 status == 405 ? "Allow: GET\r\n" : "");
	if (n < 0 || (size_t)n >= sizeof(head) || !(c->out = malloc((size_t)n + body_len))) {
		c->state = DROPPED;
		return;
	}
	memcpy(c->out, head, (size_t)n);
	memcpy(c->out + n, body, body_len);
	c->out_len = (size_t)n + body_len;
	c->out_off = 0;
	c->state = WRITING;
}

static void respond_text(struct conn *c, int status, const char *text)
{
	char body[512];
	int n = snprintf(body, sizeof(body), "%s\n", text);
	respond(c, status, "text/plain; charset=utf-8", body,
		n < 0 ? 0 : (size_t)n >= sizeof(body) ? sizeof(body) - 1 : (size_t)n);
}

/* The routes: a whole request has been parsed. */
static void route(struct conn *c)
{
	struct tly_http *srv = c->srv;
	struct http_parser_url u;
	char reason[256];
	http_parser_url_init(&u);
	if (c->url_too_long || http_parser_parse_url(c->url, c->url_len, 0, &u) != 0 ||
	    !(u.field_set & (1 << UF_PATH))) {
		respond_text(c, 400, "bad request: malformed target");
		return;
	}
	const char *path = c->url + u.field_data[UF_PATH].off;
	size_t plen = u.field_data[UF_PATH].len;
#define IS(p) (plen == sizeof(p) - 1 && memcmp(path, p, plen) == 0)
	bool known = IS("/healthz") || IS("/readyz") || IS("/metrics");
	if (!known) {
		respond_text(c, 404, "not found");
	} else if (c->parser.method != HTTP_GET) {
		respond_text(c, 405, "method not allowed");
	} else if (IS("/healthz")) {
		bool ok = tly_health_alive(srv->health, srv->opts.alive_ms, reason, sizeof(reason));
		respond_text(c, ok ? 200 : 503, reason);
	} else if (IS("/readyz")) {
		bool ok = tly_health_ready(srv->health, reason, sizeof(reason));
		respond_text(c, ok ? 200 : 503, reason);
	} else {
		char *text = NULL;
		size_t len = 0;
		if (tly_metrics_render(srv->metrics, &text, &len) != 0) {
			respond_text(c, 500, "could not render metrics: out of memory");
			return;
		}
		respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
		free(text);
	}
#undef IS
}

static int on_url(http_parser *p, const char *at, size_t len)
{
	struct conn *c = p->data;
	if (c->url_len + len >= sizeof(c->url)) {
		c->url_too_long = true;
		return 0;
	}
	memcpy(c->url + c->url_len, at, len);
	c->url_len += len;
	return 0;
}

static int on_message_complete(http_parser *p)
{
	struct conn *c = p->data;
	c->complete = true;
	http_parser_pause(p, 1); /* one request per connection: ignore what follows */
	return 0;
}

/* Bytes received while READING: parse them; a whole or a bad request gets its response queued. */
static void conn_input(struct conn *c, const char *buf, size_t n)
{
	c->received += n;
	if (c->received > c->srv->opts.max_request) {
		respond_text(c, 413, "request too large");
		return;
	}
	size_t parsed = http_parser_execute(&c->parser, &c->srv->settings, buf, n);
	if (c->complete) {
		route(c); /* bytes after the request (parsed < n, parser paused) are ignored */
		return;
	}
	enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
	if (e != HPE_OK || parsed != n) {
		char text[200];
		snprintf(text, sizeof(text), "bad request: %s", http_errno_description(e));
		respond_text(c, 400, text);
	}
}

static void on_read(struct conn *c)
{
	char buf[READ_CHUNK];
	ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return;
	if (n <= 0) {
		conn_close(c); /* the client went away (or drained to EOF while lingering) */
		return;
	}
	if (c->state == LINGERING)
		return;
	conn_input(c, buf, (size_t)n);
	if (c->state == DROPPED) {
		conn_close(c);
	} else if (c->state == WRITING) {
		ev_io_stop(c->srv->loop, &c->io);
		ev_io_set(&c->io, c->fd, EV_WRITE);
		ev_io_start(c->srv->loop, &c->io);
	}
}

static void on_write(struct conn *c)
{
	ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return;
	if (n < 0) {
		conn_close(c);
		return;
	}
	c->out_off += (size_t)n;
	if (c->out_off < c->out_len)
		return;
	/*
	 * Closing with unread input would reset the connection and could destroy the response
	 * before the client reads it: half-close, then drain until EOF or a short deadline.
	 */
	if (shutdown(c->fd, SHUT_WR) != 0) {
		conn_close(c);
		return;
	}
	c->state = LINGERING;
	ev_io_stop(c->srv->loop, &c->io);
	ev_io_set(&c->io, c->fd, EV_READ);
	ev_io_start(c->srv->loop, &c->io);
	ev_timer_stop(c->srv->loop, &c->timer);
	ev_timer_set(&c->timer, LINGER_S, 0.);
	ev_timer_start(c->srv->loop, &c->timer);
}

static void conn_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	struct conn *c = w->data;
	if (revents & EV_WRITE)
		on_write(c);
	else if (revents & EV_READ)
		on_read(c);
}

static void conn_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	struct conn *c = w->data;
	if (c->state == READING)
		tly_debug("closing HTTP connection: no whole request before the timeout",
			  "received=%zu timeout_ms=%d", c->received, c->srv->opts.timeout_ms);
	conn_close(c);
}

/* ---- the listener ------------------------------------------------------------------------- */

static void conn_init(struct conn *c, struct tly_http *srv, int fd)
{
	c->srv = srv;
	c->fd = fd;
	c->state = READING;
	http_parser_init(&c->parser, HTTP_REQUEST);
	c->parser.data = c;
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)revents;
	struct tly_http *srv = w->data;
	for (;;) {
		int fd = accept4(srv->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				tly_warn("could not accept HTTP connection, pausing", "reason=\"%s\"",
					 strerror(errno));
				ev_io_stop(loop, &srv->accept_io);
				ev_timer_start(loop, &srv->accept_pause);
			}
			return; /* EAGAIN: none left; other errors concern one connection only */
		}
		struct conn *c = srv->n_conns < srv->opts.max_connections ? calloc(1, sizeof(*c)) : NULL;
		if (!c) {
			if (close(fd) != 0)
				tly_debug("could not close HTTP connection", "reason=\"%s\"",
					  strerror(errno));
			continue;
		}
		conn_init(c, srv, fd);
		ev_io_init(&c->io, conn_io_cb, fd, EV_READ);
		c->io.data = c;
		ev_timer_init(&c->timer, conn_timer_cb, srv->opts.timeout_ms / 1000.0, 0.);
		c->timer.data = c;
		c->next = srv->conns;
		if (srv->conns)
			srv->conns->prev = c;
		srv->conns = c;
		srv->n_conns++;
		ev_io_start(loop, &c->io);
		ev_timer_start(loop, &c->timer);
	}
}

static void accept_pause_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)revents;
	struct tly_http *srv = w->data;
	ev_io_start(loop, &srv->accept_io);
}

static void wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	(void)w;
	(void)revents;
	ev_break(loop, EVBREAK_ALL);
}

static void *serve(void *arg)
{
	struct tly_http *srv = arg;
	ev_run(srv->loop, 0);
	return NULL;
}

/* Split "host:port" ("[v6]:port"); an empty host listens on every address. 0 or -1. */
static int split_listen(const char *listen_on, char *host, size_t hostlen, char *port,
			size_t portlen)
{
	const char *colon = strrchr(listen_on, ':');
	if (!colon || !colon[1] || strlen(colon + 1) >= portlen)
		return -1;
	const char *h = listen_on;
	size_t hl = (size_t)(colon - listen_on);
	if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
		h++;
		hl -= 2;
	}
	if (hl >= hostlen)
		return -1;
	memcpy(host, h, hl);
	host[hl] = '\0';
	strcpy(port, colon + 1);
	return 0;
}

/* Bind and listen on the first address that works: the socket, or -1 with errstr filled. */
static int bind_listener(const char *listen_on, char *address, size_t addrlen, char *errstr,
			 size_t errlen)
{
	char host[256], port[16], h[NI_MAXHOST], s[NI_MAXSERV];
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
	struct addrinfo *res = NULL;
	int fd = -1, one = 1, rc;
	if (split_listen(listen_on, host, sizeof(host), port, sizeof(port)) != 0) {
		snprintf(errstr, errlen, "invalid listen address \"%s\": expected host:port", listen_on);
		return -1;
	}
	if ((rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &res)) != 0) {
		snprintf(errstr, errlen, "could not resolve listen address \"%s\": %s", listen_on,
			 gai_strerror(rc));
		return -1;
	}
	snprintf(errstr, errlen, "could not listen on \"%s\": no usable address", listen_on);
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
			    ai->ai_protocol);
		if (fd < 0)
			continue;
		if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0 &&
		    bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0)
			break;
		snprintf(errstr, errlen, "could not listen on \"%s\": %s", listen_on, strerror(errno));
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		return -1;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0 ||
	    getnameinfo((struct sockaddr *)&ss, sl, h, sizeof(h), s, sizeof(s),
			NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
		snprintf(errstr, errlen, "could not read the bound address of \"%s\": %s", listen_on,
			 strerror(errno));
		close(fd);
		return -1;
	}
	snprintf(address, addrlen, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", h, s);
	return fd;
}

/* Options with their defaults, the borrowed handles and the parser callbacks; no socket, no loop. */
static void server_init(struct tly_http *srv, struct tly_metrics *metrics, struct tly_health *health,
			const struct tly_http_options *opts)
{
	srv->fd = -1;
	if (opts)
		srv->opts = *opts;
	if (srv->opts.timeout_ms <= 0)
		srv->opts.timeout_ms = DEFAULT_TIMEOUT_MS;
	if (srv->opts.max_request == 0)
		srv->opts.max_request = DEFAULT_MAX_REQUEST;
	if (srv->opts.max_connections <= 0)
		srv->opts.max_connections = DEFAULT_MAX_CONNECTIONS;
	if (srv->opts.alive_ms <= 0)
		srv->opts.alive_ms = DEFAULT_ALIVE_MS;
	srv->metrics = metrics;
	srv->health = health;
	http_parser_settings_init(&srv->settings);
	srv->settings.on_url = on_url;
	srv->settings.on_message_complete = on_message_complete;
}

char *tly_http_serve_bytes(struct tly_metrics *metrics, struct tly_health *health,
			   const struct tly_http_options *opts, const void *req, size_t len,
			   size_t chunk, size_t *out_len)
{
	struct tly_http srv = {0};
	struct conn c = {0};
	server_init(&srv, metrics, health, opts);
	conn_init(&c, &srv, -1);
	if (chunk == 0)
		chunk = READ_CHUNK;
	for (size_t off = 0; off < len && c.state == READING; off += chunk)
		conn_input(&c, (const char *)req + off, len - off < chunk ? len - off : chunk);
	*out_len = c.state == WRITING ? c.out_len : 0;
	return c.state == WRITING ? c.out : NULL;
}

struct tly_http *tly_http_start(const char *listen_on, struct tly_metrics *metrics,
				struct tly_health *health, const struct tly_http_options *opts,
				char *errstr, size_t errlen)
{
	sigset_t all, old;
	struct tly_http *srv = calloc(1, sizeof(*srv));
	if (!srv) {
		snprintf(errstr, errlen, "out of memory");
		return NULL;
	}
	server_init(srv, metrics, health, opts);
	if ((srv->fd = bind_listener(listen_on, srv->address, sizeof(srv->address), errstr,
				     errlen)) < 0)
		goto fail;
	if (!(srv->loop = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK))) {
		snprintf(errstr, errlen, "could not create the HTTP event loop");
		goto fail;
	}
	ev_io_init(&srv->accept_io, accept_cb, srv->fd, EV_READ);
	srv->accept_io.data = srv;
	ev_timer_init(&srv->accept_pause, accept_pause_cb, ACCEPT_PAUSE_S, 0.);
	srv->accept_pause.data = srv;
	ev_async_init(&srv->wake, wake_cb);
	ev_io_start(srv->loop, &srv->accept_io);
	ev_async_start(srv->loop, &srv->wake);
	/* Signals stay with the program's threads: the server thread blocks them all. */
	sigfillset(&all);
	if (pthread_sigmask(SIG_SETMASK, &all, &old) != 0) {
		snprintf(errstr, errlen, "could not block signals for the HTTP thread");
		goto fail;
	}
	int rc = pthread_create(&srv->thread, NULL, serve, srv);
	if (pthread_sigmask(SIG_SETMASK, &old, NULL) != 0)
		tly_warn("could not restore the signal mask after starting the HTTP thread", NULL);
	if (rc != 0) {
		snprintf(errstr, errlen, "could not start the HTTP thread: %s", strerror(rc));
		goto fail;
	}
	srv->thread_started = true;
	tly_info("http listening", "address=%s", srv->address);
	return srv;
fail:
	tly_http_stop(srv);
	return NULL;
}

const char *tly_http_address(const struct tly_http *h)
{
	return h->address;
}

void tly_http_stop(struct tly_http *h)
{
	if (!h)
		return;
	if (h->thread_started) {
		ev_async_send(h->loop, &h->wake);
		int rc = pthread_join(h->thread, NULL);
		if (rc != 0)
			tly_warn("could not join the HTTP thread", "reason=\"%s\"", strerror(rc));
	}
	while (h->conns)
		conn_close(h->conns);
	if (h->loop) {
		ev_io_stop(h->loop, &h->accept_io);
		ev_timer_stop(h->loop, &h->accept_pause);
		ev_async_stop(h->loop, &h->wake);
		ev_loop_destroy(h->loop);
	}
	if (h->fd >= 0 && close(h->fd) != 0)
		tly_warn("could not close the HTTP listener", "reason=\"%s\"", strerror(errno));
	free(h);
}
