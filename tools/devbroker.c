/* tally-devbroker: librdkafka's mock cluster in its own process, with Tally's topics and a fault-injection control socket. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <ev.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "devbroker_ctl.h"
#include "kafka.h"
#include "log.h"

#define PROG "tally-devbroker"
#define MAX_BROKERS 32
#define MAX_PARTITIONS 1000
#define MAX_ERRORS 10000 /* per errors command */
#define MAX_RTT_MS 600000
#define MAX_ARGS 64
#define N_API_KEYS 59 /* Kafka request types librdkafka 2.0.2 knows (RD_KAFKAP__NUM) */

static const char *const topics[] = {"tally.events", "tally.ledger", "tally.catalog",
				     "tally.deadletter"};
#define N_TOPICS (sizeof(topics) / sizeof(topics[0]))

/* Request names by API key, as the Kafka protocol names them. */
static const char *const api_names[N_API_KEYS] = {
	"Produce", "Fetch", "ListOffsets", "Metadata", "LeaderAndIsr", "StopReplica",
	"UpdateMetadata", "ControlledShutdown", "OffsetCommit", "OffsetFetch", "FindCoordinator",
	"JoinGroup", "Heartbeat", "LeaveGroup", "SyncGroup", "DescribeGroups", "ListGroups",
	"SaslHandshake", "ApiVersions", "CreateTopics", "DeleteTopics", "DeleteRecords",
	"InitProducerId", "OffsetForLeaderEpoch", "AddPartitionsToTxn", "AddOffsetsToTxn", "EndTxn",
	"WriteTxnMarkers", "TxnOffsetCommit", "DescribeAcls", "CreateAcls", "DeleteAcls",
	"DescribeConfigs", "AlterConfigs", "AlterReplicaLogDirs", "DescribeLogDirs",
	"SaslAuthenticate", "CreatePartitions", "CreateDelegationToken", "RenewDelegationToken",
	"ExpireDelegationToken", "DescribeDelegationToken", "DeleteGroups", "ElectLeaders",
	"IncrementalAlterConfigs", "AlterPartitionReassignments", "ListPartitionReassignments",
	"OffsetDelete", "DescribeClientQuotas", "AlterClientQuotas", "DescribeUserScramCredentials",
	"AlterUserScramCredentials", "Vote", "BeginQuorumEpoch", "EndQuorumEpoch", "DescribeQuorum",
	"AlterIsr", "UpdateFeatures", "Envelope",
};

static const char usage_text[] =
	"Usage: " PROG " [OPTIONS]\n"
	"\n"
	"The embedded Kafka broker for development and tests: librdkafka's mock cluster in its own\n"
	"process, with the topics tally.events, tally.ledger, tally.catalog and tally.deadletter.\n"
	"Prints the bootstrap servers on stdout; stops on SIGTERM or SIGINT.\n"
	"\n"
	"Options:\n"
	"  --brokers N           number of brokers (1..32, default 3)\n"
	"  --partitions P        partitions of every topic (1..1000, default 12)\n"
	"  --bootstrap-file PATH write the bootstrap servers to PATH (atomically)\n"
	"  --control PATH        serve the fault-injection control socket at PATH\n"
	"  --help                show this help and exit\n"
	"\n"
	"Control socket (unix stream, one command per line, reply \"ok\" or \"error: <reason>\"):\n"
	"  ping                              check that the broker answers\n"
	"  broker-down ID | broker-up ID     take a broker off the network or bring it back\n"
	"  rtt ID MS                         delay every response of a broker by MS milliseconds\n"
	"  errors API COUNT ERR...           fail the next COUNT requests of type API (any broker)\n"
	"  broker-errors ID API COUNT ERR... the same, for requests to one broker\n"
	"  error-count ID API                errors still pushed for one broker (\"ok N\")\n"
	"  clear-errors API                  drop the errors pushed with \"errors\"\n"
	"  leader TOPIC PARTITION ID         move a partition's leadership (ID -1: no leader)\n"
	"  help                              list the commands\n"
	"  API is a request name (Produce, Fetch, Metadata, FindCoordinator, JoinGroup, OffsetCommit…)\n"
	"  or its key; ERR a librdkafka error name without prefix (NOT_LEADER_FOR_PARTITION,\n"
	"  REQUEST_TIMED_OUT, _TRANSPORT closes the connection…) or its code. A single ERR with\n"
	"  COUNT > 1 is repeated COUNT times. A broker that ever had broker-errors for an API no\n"
	"  longer sees the cluster-wide errors for it (librdkafka checks its own stack first).\n"
	"\n"
	"Known limits of the mock cluster (librdkafka 2.0.2):\n"
	"  - memory only: everything is lost when the process stops\n"
	"  - each partition keeps about 5 MiB or 100k batches; older data is dropped\n"
	"  - a fetch returns at most one batch per partition, found by walking the partition's\n"
	"    batches from the oldest: many small producer batches cost consumers a fetch each and\n"
	"    the broker a longer walk each (Apache Kafka returns every batch up to the fetch size)\n"
	"  - transactions are accepted but not implemented (no markers, no fencing)\n"
	"  - no admin API (topics are created here, at start-up)\n"
	"  - fixed ports only by interposing bind(); the ports change on every start\n"
	"  - with session.timeout.ms <= 3000 a consumer group never forms\n";

struct devbroker;

/* One control connection; freed when the peer closes it or breaks the protocol. */
struct conn {
	ev_io w;                              /* readable; w.data is the conn */
	struct devbroker *db;                 /* borrowed */
	struct conn *next;
	size_t len;                           /* bytes in buf */
	char buf[TLY_DEVBROKER_LINE_MAX + 2]; /* a partial line, its newline and a NUL */
};

/* The application, owned by main. */
struct devbroker {
	struct ev_loop *loop;
	ev_signal sigterm, sigint;
	ev_io accept_w;
	int listen_fd;                     /* -1: no control socket */
	const char *ctl_path;              /* borrowed from argv */
	bool ctl_created;                  /* we own the file at ctl_path */
	struct conn *conns;                /* open control connections */
	rd_kafka_t *rk;                    /* the handle the mock cluster lives in */
	rd_kafka_mock_cluster_t *mcluster;
	int brokers, partitions;
};

static bool parse_long(const char *s, long min, long max, long *out)
{
	char *end;
	if (!s || !*s)
		return false;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < min || v > max)
		return false;
	*out = v;
	return true;
}

/* ---- control commands -------------------------------------------------------------------- */

typedef void (*cmd_fn)(struct devbroker *db, int argc, char **argv, char *reply, size_t len);

static bool arg_broker(struct devbroker *db, const char *s, bool allow_none, int32_t *id,
		       char *reply, size_t len)
{
	long v;
	if ((allow_none && s && strcmp(s, "-1") == 0) || parse_long(s, 1, db->brokers, &v)) {
		*id = (allow_none && strcmp(s, "-1") == 0) ? -1 : (int32_t)v;
		return true;
	}
	snprintf(reply, len, "error: invalid broker id \"%s\": expected 1..%d%s", s, db->brokers,
		 allow_none ? " or -1" : "");
	return false;
}

static bool arg_api(const char *s, int16_t *key, char *reply, size_t len)
{
	long v;
	for (int i = 0; i < N_API_KEYS; i++) {
		if (strcasecmp(s, api_names[i]) == 0) {
			*key = (int16_t)i;
			return true;
		}
	}
	if (parse_long(s, 0, N_API_KEYS - 1, &v)) {
		*key = (int16_t)v;
		return true;
	}
	snprintf(reply, len, "error: unknown Kafka request type \"%s\": expected a name such as Produce or a key 0..%d",
		 s, N_API_KEYS - 1);
	return false;
}

static bool arg_error(const char *s, rd_kafka_resp_err_t *err, char *reply, size_t len)
{
	const struct rd_kafka_err_desc *descs;
	size_t n;
	long v;
	bool numeric = parse_long(s, INT16_MIN, INT16_MAX, &v);
	const char *name = s;
	if (strncasecmp(name, "RD_KAFKA_RESP_ERR_", 18) == 0)
		name += 18;
	rd_kafka_get_err_descs(&descs, &n);
	for (size_t i = 0; i < n; i++) {
		if (!descs[i].name)
			continue;
		if (numeric ? (long)descs[i].code == v : strcasecmp(descs[i].name, name) == 0) {
			*err = descs[i].code;
			return true;
		}
	}
	snprintf(reply, len, "error: unknown Kafka error \"%s\": expected a librdkafka error name such as NOT_LEADER_FOR_PARTITION or its code",
		 s);
	return false;
}

static bool arg_topic(const char *s, const char **topic, char *reply, size_t len)
{
	for (size_t i = 0; i < N_TOPICS; i++) {
		if (strcmp(s, topics[i]) == 0) {
			*topic = topics[i];
			return true;
		}
	}
	snprintf(reply, len, "error: unknown topic \"%s\": expected one of %s, %s, %s, %s", s,
		 topics[0], topics[1], topics[2], topics[3]);
	return false;
}

static void mock_reply(rd_kafka_resp_err_t err, const char *what, char *reply, size_t len)
{
	if (err)
		snprintf(reply, len, "error: could not %s: %s", what, rd_kafka_err2str(err));
	else
		snprintf(reply, len, "ok");
}

static void cmd_ping(struct devbroker *db, int argc, char **argv, char *reply, size_t len)
{
	(void)db, (void)argc, (void)argv;
	snprintf(reply, len, "ok");
}

static void cmd_help(struct devbroker *db, int argc, char **argv, char *reply, size_t len)
{
	(void)db, (void)argc, (void)argv;
	snprintf(reply, len, "ok ping | broker-down ID | broker-up ID | rtt ID MS | errors API COUNT ERR... | "
		 "broker-errors ID API COUNT ERR... | error-count ID API | clear-errors API | "
		 "leader TOPIC PARTITION ID | help");
}

static void cmd_broker_updown(struct devbroker *db, int argc, char **argv, char *reply, size_t len)
{
	int32_t id;
	bool down = strcmp(argv[0], "broker-down") == 0;
	(void)argc;
	if (!arg_broker(db, argv[1], false, &id, reply, len))
		return;
	rd_kafka_resp_err_t err = down ? rd_kafka_mock_broker_set_down(db->mcluster, id)
				       : rd_kafka_mock_broker_set_up(db->mcluster, id);
	mock_reply(err, down ? "take broker down" : "bring broker up", reply, len);
	if (!err)
		tly_info(down ? "broker down" : "broker up", "broker=%d", (int)id);
}

static void cmd_rtt(struct devbroker *db, int argc, char **argv, char *reply, size_t len)
{
	int32_t id;
	long ms;
	(void)argc;
	if (!arg_broker(db, argv[1], false, &id, reply, len))
		return;
	if (!parse_long(argv[2], 0, MAX_RTT_MS, &ms)) {
		snprintf(reply, len, "error: invalid round-trip time \"%s\": expected 0..%d milliseconds",
			 argv[2], MAX_RTT_MS);
		return;
	}
	mock_reply(rd_kafka_mock_broker_set_rtt(db->mcluster, id, (int)ms), "set round-trip time",
		   reply, len);
}

/*
 * Parse "COUNT ERR..." into a malloc'd array of count errors (one ERR is repeated). NULL with the
 * reply filled on a bad argument or OOM.
 */
static rd_kafka_resp_err_t *arg_error_list(int argc, char **argv, size_t *count, char *reply,
					   size_t len)
{
	long cnt;
	if (argc < 2) {
		snprintf(reply, len, "error: missing arguments: expected COUNT ERR...");
		return NULL;
	}
	if (!parse_long(argv[0], 1, MAX_ERRORS, &cnt)) {
		snprintf(reply, len, "error: invalid error count \"%s\": expected 1..%d", argv[0],
			 MAX_ERRORS);
		return NULL;
	}
	int nerr = argc - 1;
	if (nerr != 1 && nerr != cnt) {
		snprintf(reply, len, "error: error count %ld does not match the %d errors given", cnt,
			 nerr);
		return NULL;
	}
	rd_kafka_resp_err_t *errs = calloc((size_t)cnt, sizeof(*errs));
	if (!errs) {
		snprintf(reply, len, "error: out of memory");
		return NULL;
	}
	for (long i = 0; i < cnt; i++) {
		if (i < nerr && !arg_error(argv[1 + i], &errs[i], reply, len)) {
			free(errs);
			return NULL;
		}
		if (i >= nerr)
			errs[i] = errs[0];
	}
	*count = (size_t)cnt;
	return errs;
}

static void cmd_errors(struct devbroker *db, int argc, char **argv, char *reply, size_t len)
{
	int16_t api;
	size_t cnt;
	if (!arg_api(argv[1], &api, reply, len))
		return;
	rd_kafka_resp_err_t *errs = arg_error_list(argc - 2, argv + 2, &cnt, reply, len);
	if (!errs)
		return;
	rd_kafka_mock_push_request_errors_array(db->mcluster, api, cnt, errs);
	tly_info("request errors pushed", "api=%s count=%zu first=%s", api_names[api], cnt,
		 rd_kafka_err2name(errs[0]));
	free(errs);
	snprintf(reply, len, "ok");
}

static void cmd_broker_errors(struct devbroker *db, int argc, char **argv, char *reply, size_t len)
{
	int32_t id;
	int16_t api;
	size_t cnt;
	if (!arg_broker(db, argv[1], false, &id, reply, len) || !arg_api(argv[2], &api, reply, len))
		return;
	rd_kafka_resp_err_t *errs = arg_error_list(argc - 3, argv + 3, &cnt, reply, len);
	if (!errs)
		return;
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
	for (size_t i = 0; i < cnt && !err; i++)
		err = rd_kafka_mock_broker_push_request_error_rtts(db->mcluster, id, api, 1, errs[i], 0);
	mock_reply(err, "push broker request errors", reply, len);
	if (!err)
		tly_info("broker request errors pushed", "broker=%d api=%s count=%zu first=%s", (int)id,
			 api_names[api], cnt, rd_kafka_err2name(errs[0]));
	free(errs);
}

static void cmd_error_count(struct devbroker *db, int argc, char **argv, char *reply, size_t len)
{
	int32_t id;
	int16_t api;
	size_t cnt = 0;
	(void)argc;
	if (!arg_broker(db, argv[1], false, &id, reply, len) || !arg_api(argv[2], &api, reply, len))
		return;
	rd_kafka_resp_err_t err = rd_kafka_mock_broker_error_stack_cnt(db->mcluster, id, api, &cnt);
	if (err)
		mock_reply(err, "count broker request errors", reply, len);
	else
		snprintf(reply, len, "ok %zu", cnt);
}

static void cmd_clear_errors(struct devbroker *db, int argc, char **argv, char *reply, size_t len)
{
	int16_t api;
	(void)argc;
	if (!arg_api(argv[1], &api, reply, len))
		return;
	rd_kafka_mock_clear_request_errors(db->mcluster, api);
	snprintf(reply, len, "ok");
}

static void cmd_leader(struct devbroker *db, int argc, char **argv, char *reply, size_t len)
{
	const char *topic;
	long partition;
	int32_t id;
	(void)argc;
	if (!arg_topic(argv[1], &topic, reply, len))
		return;
	if (!parse_long(argv[2], 0, db->partitions - 1, &partition)) {
		snprintf(reply, len, "error: invalid partition \"%s\" of topic \"%s\": expected 0..%d",
			 argv[2], topic, db->partitions - 1);
		return;
	}
	if (!arg_broker(db, argv[3], true, &id, reply, len))
		return;
	rd_kafka_resp_err_t err =
		rd_kafka_mock_partition_set_leader(db->mcluster, topic, (int32_t)partition, id);
	mock_reply(err, "move partition leader", reply, len);
	if (!err)
		tly_info("partition leader moved", "topic=%s partition=%ld broker=%d", topic, partition,
			 (int)id);
}

static const struct {
	const char *name;
	int min_args, max_args; /* after the command name */
	const char *usage;
	cmd_fn fn;
} commands[] = {
	{"ping", 0, 0, "ping", cmd_ping},
	{"help", 0, 0, "help", cmd_help},
	{"broker-down", 1, 1, "broker-down ID", cmd_broker_updown},
	{"broker-up", 1, 1, "broker-up ID", cmd_broker_updown},
	{"rtt", 2, 2, "rtt ID MS", cmd_rtt},
	{"errors", 3, MAX_ARGS, "errors API COUNT ERR...", cmd_errors},
	{"broker-errors", 4, MAX_ARGS, "broker-errors ID API COUNT ERR...", cmd_broker_errors},
	{"error-count", 2, 2, "error-count ID API", cmd_error_count},
	{"clear-errors", 1, 1, "clear-errors API", cmd_clear_errors},
	{"leader", 3, 3, "leader TOPIC PARTITION ID", cmd_leader},
};

/* Run one command line of linelen bytes (modified in place); fill reply with "ok…" or "error: …". */
static void run_command(struct devbroker *db, char *line, size_t linelen, char *reply, size_t len)
{
	char *argv[MAX_ARGS + 2];
	int argc = 0;
	char *save = NULL;
	for (size_t i = 0; i < linelen; i++) {
		unsigned char ch = (unsigned char)line[i];
		if ((ch < 0x20 && ch != '\t' && ch != '\r') || ch == 0x7f) {
			snprintf(reply, len, "error: command contains a control character at byte %zu", i);
			return;
		}
	}
	for (char *tok = strtok_r(line, " \t\r", &save); tok; tok = strtok_r(NULL, " \t\r", &save)) {
		if (argc == MAX_ARGS + 1) {
			snprintf(reply, len, "error: too many arguments (at most %d)", MAX_ARGS);
			return;
		}
		argv[argc++] = tok;
	}
	if (argc == 0) {
		snprintf(reply, len, "error: empty command (try \"help\")");
		return;
	}
	argv[argc] = NULL;
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(argv[0], commands[i].name) != 0)
			continue;
		if (argc - 1 < commands[i].min_args || argc - 1 > commands[i].max_args) {
			snprintf(reply, len, "error: wrong number of arguments for \"%s\": usage: %s",
				 argv[0], commands[i].usage);
			return;
		}
		commands[i].fn(db, argc, argv, reply, len);
		return;
	}
	snprintf(reply, len, "error: unknown command \"%.64s\" (try \"help\")", argv[0]);
}

/* ---- control socket ---------------------------------------------------------------------- */

static void conn_close(struct conn *c)
{
	struct devbroker *db = c->db;
	for (struct conn **pp = &db->conns; *pp; pp = &(*pp)->next) {
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	}
	ev_io_stop(db->loop, &c->w);
	close(c->w.fd);
	free(c);
}

/*
 * Replies are short and the socket is non-blocking: a client that does not read its replies and
 * fills the socket buffer is disconnected rather than waited for.
 */
static int conn_send(struct conn *c, const char *reply)
{
	char line[TLY_DEVBROKER_LINE_MAX + 2];
	int n = snprintf(line, sizeof(line), "%s\n", reply);
	size_t len = n < 0 ? 0 : ((size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
	if (len > 0 && line[len - 1] != '\n')
		line[len - 1] = '\n';
	size_t off = 0;
	while (off < len) {
		ssize_t w = send(c->w.fd, line + off, len - off, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return TLY_E_IO;
		off += (size_t)w;
	}
	return 0;
}

static void log_refused(const char *reason)
{
	char msg[TLY_DEVBROKER_LINE_MAX + 64];
	snprintf(msg, sizeof(msg), "refused control command: %s", reason);
	tly_info(msg, NULL);
}

static void on_conn_readable(struct ev_loop *loop, ev_io *w, int revents)
{
	struct conn *c = w->data;
	char reply[TLY_DEVBROKER_LINE_MAX];
	(void)loop, (void)revents;

	ssize_t n = recv(w->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len, 0);
	if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
		return;
	if (n <= 0) {
		conn_close(c);
		return;
	}
	c->len += (size_t)n;
	char *start = c->buf;
	char *nl;
	while ((nl = memchr(start, '\n', c->len - (size_t)(start - c->buf))) != NULL) {
		*nl = '\0';
		run_command(c->db, start, (size_t)(nl - start), reply, sizeof(reply));
		if (strncmp(reply, "error: ", 7) == 0)
			log_refused(reply + 7);
		if (conn_send(c, reply) != 0) {
			conn_close(c);
			return;
		}
		start = nl + 1;
	}
	c->len -= (size_t)(start - c->buf);
	memmove(c->buf, start, c->len);
	if (c->len == sizeof(c->buf) - 1) {
		/* A line longer than the protocol allows: answer once and hang up. */
		snprintf(reply, sizeof(reply), "error: command too long (at most %d bytes)",
			 TLY_DEVBROKER_LINE_MAX);
		log_refused("command too long");
		if (conn_send(c, reply) != 0)
			tly_debug("could not send reply to control client", NULL);
		conn_close(c);
	}
}

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
	struct devbroker *db = w->data;
	(void)revents;
	int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
			tly_warn("could not accept control connection", "reason=\"%s\"", strerror(errno));
		return;
	}
	struct conn *c = calloc(1, sizeof(*c));
	if (!c) {
		tly_warn("could not accept control connection", "reason=\"out of memory\"");
		close(fd);
		return;
	}
	c->db = db;
	ev_io_init(&c->w, on_conn_readable, fd, EV_READ);
	c->w.data = c;
	c->next = db->conns;
	db->conns = c;
	ev_io_start(loop, &c->w);
}

/* Bind the control socket, replacing a stale socket file but never a live broker's. */
static int ctl_open(struct devbroker *db, char *errstr, size_t errlen)
{
	struct sockaddr_un sun = {.sun_family = AF_UNIX};
	const char *path = db->ctl_path;
	struct stat st;
	if (strlen(path) >= sizeof(sun.sun_path)) {
		snprintf(errstr, errlen, "control socket path \"%s\" is too long (at most %zu bytes)",
			 path, sizeof(sun.sun_path) - 1);
		return TLY_E_CONFIG;
	}
	memcpy(sun.sun_path, path, strlen(path) + 1);
	if (lstat(path, &st) == 0) {
		char reply[64];
		if (!S_ISSOCK(st.st_mode)) {
			snprintf(errstr, errlen, "could not create control socket \"%s\": a file that is not a socket exists there",
				 path);
			return TLY_E_IO;
		}
		if (tly_devbroker_ctl(path, "ping", reply, sizeof(reply)) != TLY_E_IO) {
			snprintf(errstr, errlen, "could not create control socket \"%s\": another broker answers on it",
				 path);
			return TLY_E_IO;
		}
		if (unlink(path) != 0) {
			snprintf(errstr, errlen, "could not remove stale control socket \"%s\": %s", path,
				 strerror(errno));
			return TLY_E_IO;
		}
	}
	db->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (db->listen_fd < 0) {
		snprintf(errstr, errlen, "could not create control socket: %s", strerror(errno));
		return TLY_E_IO;
	}
	if (bind(db->listen_fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
		snprintf(errstr, errlen, "could not bind control socket \"%s\": %s", path,
			 strerror(errno));
		return TLY_E_IO;
	}
	db->ctl_created = true;
	if (listen(db->listen_fd, 16) != 0) {
		snprintf(errstr, errlen, "could not listen on control socket \"%s\": %s", path,
			 strerror(errno));
		return TLY_E_IO;
	}
	ev_io_init(&db->accept_w, on_accept, db->listen_fd, EV_READ);
	db->accept_w.data = db;
	ev_io_start(db->loop, &db->accept_w);
	return 0;
}

/* ---- start-up and shutdown --------------------------------------------------------------- */

/* Write text to path atomically: a temp file in the same directory, fsync, rename, fsync the dir. */
static int write_file_atomic(const char *path, const char *text, char *errstr, size_t errlen)
{
	char tmp[PATH_MAX];
	char dir[PATH_MAX];
	int fd = -1;
	int rc = TLY_E_IO;
	size_t len = strlen(text);

	if ((size_t)snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path) >= sizeof(tmp)) {
		snprintf(errstr, errlen, "bootstrap file path \"%s\" is too long", path);
		return TLY_E_CONFIG;
	}
	fd = mkstemp(tmp);
	if (fd < 0) {
		snprintf(errstr, errlen, "could not create temporary file \"%s\": %s", tmp,
			 strerror(errno));
		return TLY_E_IO;
	}
	for (size_t off = 0; off < len;) {
		ssize_t w = write(fd, text + off, len - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			snprintf(errstr, errlen, "could not write file \"%s\": %s", tmp,
				 w < 0 ? strerror(errno) : "short write");
			goto fail;
		}
		off += (size_t)w;
	}
	if (fchmod(fd, 0644) != 0 || fsync(fd) != 0) {
		snprintf(errstr, errlen, "could not sync file \"%s\": %s", tmp, strerror(errno));
		goto fail;
	}
	if (close(fd) != 0) {
		fd = -1;
		snprintf(errstr, errlen, "could not close file \"%s\": %s", tmp, strerror(errno));
		goto fail;
	}
	fd = -1;
	if (rename(tmp, path) != 0) {
		snprintf(errstr, errlen, "could not rename file \"%s\" to \"%s\": %s", tmp, path,
			 strerror(errno));
		goto fail;
	}
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if (slash == dir)
		dir[1] = '\0';
	else
		*slash = '\0';
	int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0 || fsync(dfd) != 0) {
		snprintf(errstr, errlen, "could not sync directory \"%s\": %s", dir, strerror(errno));
		if (dfd >= 0)
			close(dfd);
		return TLY_E_IO;
	}
	close(dfd);
	return 0;
fail:
	if (fd >= 0)
		close(fd);
	unlink(tmp);
	return rc;
}

/* The bootstrap servers as one line, the same line as on stdout. */
static int write_bootstrap_file(const char *path, const char *bootstraps, char *errstr, size_t errlen)
{
	char line[1024];
	if ((size_t)snprintf(line, sizeof(line), "%s\n", bootstraps) >= sizeof(line)) {
		snprintf(errstr, errlen, "bootstrap server list is too long (%zu bytes)", strlen(bootstraps));
		return TLY_E_TOO_LARGE;
	}
	return write_file_atomic(path, line, errstr, errlen);
}

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
	(void)revents;
	tly_info("stopping on signal", "signal=%s", strsignal(w->signum));
	ev_break(loop, EVBREAK_ALL);
}

static int cluster_start(struct devbroker *db, char *errstr, size_t errlen)
{
	char rderr[512];
	/* No test.mock.num.brokers: this handle only hosts the cluster created below. */
	rd_kafka_conf_t *conf = tly_kafka_conf_new(NULL, errstr, errlen);
	if (!conf)
		return TLY_E_KAFKA;
	/* log_level 4: warnings and up, so no notice that this handle has no bootstrap.servers. */
	if (tly_kafka_conf_set(conf, "client.id", PROG, errstr, errlen) != 0 ||
	    tly_kafka_conf_set(conf, "log_level", "4", errstr, errlen) != 0) {
		rd_kafka_conf_destroy(conf);
		return TLY_E_CONFIG;
	}
	db->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, rderr, sizeof(rderr));
	if (!db->rk) {
		rd_kafka_conf_destroy(conf);
		snprintf(errstr, errlen, "could not create Kafka handle for the mock cluster: %s", rderr);
		return TLY_E_KAFKA;
	}
	db->mcluster = rd_kafka_mock_cluster_new(db->rk, db->brokers);
	if (!db->mcluster) {
		snprintf(errstr, errlen, "could not create mock cluster with %d brokers", db->brokers);
		return TLY_E_KAFKA;
	}
	int rf = db->brokers < 3 ? db->brokers : 3;
	for (size_t i = 0; i < N_TOPICS; i++) {
		rd_kafka_resp_err_t err =
			rd_kafka_mock_topic_create(db->mcluster, topics[i], db->partitions, rf);
		if (err) {
			snprintf(errstr, errlen, "could not create topic \"%s\": %s", topics[i],
				 rd_kafka_err2str(err));
			return TLY_E_KAFKA;
		}
	}
	return 0;
}

/*
 * TCP_NODELAY on the mock brokers' listening sockets, so that every connection they accept has it
 * (Linux copies the option to an accepted socket), as Apache Kafka sets it on each connection: a
 * response then leaves at once instead of waiting for the ACK of the one before it. The mock
 * cluster does not set it and does not hand out its sockets, so they are found among this
 * process's descriptors: every listening TCP socket here is one of them. 0 or TLY_E_IO.
 */
static int nodelay_listeners(char *errstr, size_t errlen)
{
	DIR *d = opendir("/proc/self/fd");
	if (!d) {
		snprintf(errstr, errlen, "could not open /proc/self/fd: %s", strerror(errno));
		return TLY_E_IO;
	}
	int rc = 0, on = 1;
	struct dirent *de;
	while (rc == 0 && (de = readdir(d))) {
		int fd = atoi(de->d_name), listening = 0, domain = 0;
		socklen_t len = sizeof(int);
		if (de->d_name[0] == '.' || fd == dirfd(d) ||
		    getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening ||
		    getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 ||
		    (domain != AF_INET && domain != AF_INET6))
			continue;
		if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on)) != 0) {
			snprintf(errstr, errlen, "could not set TCP_NODELAY on a mock broker's socket: %s",
				 strerror(errno));
			rc = TLY_E_IO;
		}
	}
	closedir(d);
	return rc;
}

static void devbroker_cleanup(struct devbroker *db)
{
	while (db->conns)
		conn_close(db->conns);
	if (db->listen_fd >= 0) {
		ev_io_stop(db->loop, &db->accept_w);
		close(db->listen_fd);
	}
	if (db->ctl_created && unlink(db->ctl_path) != 0)
		tly_warn("could not remove control socket", "path=\"%s\" reason=\"%s\"", db->ctl_path,
			 strerror(errno));
	if (db->mcluster)
		rd_kafka_mock_cluster_destroy(db->mcluster);
	if (db->rk)
		rd_kafka_destroy(db->rk);
	if (db->loop) {
		ev_signal_stop(db->loop, &db->sigterm);
		ev_signal_stop(db->loop, &db->sigint);
	}
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"brokers", required_argument, NULL, 'b'},
		{"partitions", required_argument, NULL, 'p'},
		{"bootstrap-file", required_argument, NULL, 'f'},
		{"control", required_argument, NULL, 'c'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	struct devbroker db = {.listen_fd = -1, .brokers = 3, .partitions = 12};
	const char *bootstrap_file = NULL;
	char errstr[3 * PATH_MAX]; /* room for two paths and a reason */
	long v;
	int opt;
	int rc = EXIT_FAILURE;

	tly_log_init(PROG, TLY_LOG_INFO);
	while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (opt) {
		case 'b':
			if (!parse_long(optarg, 1, MAX_BROKERS, &v)) {
				fprintf(stderr, PROG ": invalid --brokers \"%s\": expected 1..%d\n",
					optarg, MAX_BROKERS);
				return 2;
			}
			db.brokers = (int)v;
			break;
		case 'p':
			if (!parse_long(optarg, 1, MAX_PARTITIONS, &v)) {
				fprintf(stderr, PROG ": invalid --partitions \"%s\": expected 1..%d\n",
					optarg, MAX_PARTITIONS);
				return 2;
			}
			db.partitions = (int)v;
			break;
		case 'f':
			bootstrap_file = optarg;
			break;
		case 'c':
			db.ctl_path = optarg;
			break;
		case 'h':
			fputs(usage_text, stdout);
			return fflush(stdout) == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
		default:
			fprintf(stderr, "Try \"" PROG " --help\" for more information.\n");
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, PROG ": unexpected argument \"%s\"\nTry \"" PROG " --help\" for more information.\n",
			argv[optind]);
		return 2;
	}

	if (signal(SIGPIPE, SIG_IGN) == SIG_ERR) {
		tly_error("could not ignore SIGPIPE", "reason=\"%s\"", strerror(errno));
		return EXIT_FAILURE;
	}
	db.loop = ev_default_loop(EVFLAG_AUTO);
	if (!db.loop) {
		tly_error("could not initialise the event loop", NULL);
		return EXIT_FAILURE;
	}
	ev_signal_init(&db.sigterm, on_signal, SIGTERM);
	ev_signal_init(&db.sigint, on_signal, SIGINT);
	ev_signal_start(db.loop, &db.sigterm);
	ev_signal_start(db.loop, &db.sigint);

	if (cluster_start(&db, errstr, sizeof(errstr)) != 0 ||
	    nodelay_listeners(errstr, sizeof(errstr)) != 0)
		goto fail;
	const char *bootstraps = rd_kafka_mock_cluster_bootstraps(db.mcluster);
	if (db.ctl_path && ctl_open(&db, errstr, sizeof(errstr)) != 0)
		goto fail;
	if (bootstrap_file && write_bootstrap_file(bootstrap_file, bootstraps, errstr, sizeof(errstr)) != 0)
		goto fail;
	if (printf("%s\n", bootstraps) < 0 || fflush(stdout) != 0) {
		snprintf(errstr, sizeof(errstr), "could not write bootstrap servers to stdout: %s",
			 strerror(errno));
		goto fail;
	}
	tly_info("dev broker ready", "bootstraps=%s brokers=%d partitions=%d control=\"%s\"",
		 bootstraps, db.brokers, db.partitions, db.ctl_path ? db.ctl_path : "");

	ev_run(db.loop, 0);
	rc = EXIT_SUCCESS;
	goto done;
fail:
	tly_error(errstr, NULL);
done:
	devbroker_cleanup(&db);
	if (rc == EXIT_SUCCESS)
		tly_info("dev broker stopped", NULL);
	return rc;
}
