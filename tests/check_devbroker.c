/* Suite "devbroker": tally-devbroker, its control socket, and lib/kafka.h against it (keys, partitions, faults). */
#include <check.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/pidfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <dirent.h>

#include "clock.h"
#include "config.h"
#include "devbroker_ctl.h"
#include "harness.h"
#include "kafka.h"
#include "proc.h"
#include "suites.h"

#define PARTITIONS 12
#define TOPIC "tally.events"

/* Send cmd and require the exact reply. */
static void ctl_expect(const struct tly_test_broker *b, const char *cmd, const char *want)
{
	char reply[TLY_DEVBROKER_LINE_MAX + 1];
	int rc = tly_devbroker_ctl(b->ctl_path, cmd, reply, sizeof(reply));
	ck_assert_msg(rc == 0 && strcmp(reply, want) == 0, "control \"%s\": want \"%s\", got rc %d \"%s\"",
		      cmd, want, rc, reply);
}

/* Send cmd and require an "error: …" reply. */
static void ctl_refused(const struct tly_test_broker *b, const char *cmd)
{
	char reply[TLY_DEVBROKER_LINE_MAX + 1];
	int rc = tly_devbroker_ctl(b->ctl_path, cmd, reply, sizeof(reply));
	ck_assert_msg(rc == TLY_E_INVALID && strncmp(reply, "error: ", 7) == 0 && strlen(reply) > 7,
		      "control \"%.60s\": want an error reply, got rc %d \"%s\"", cmd, rc, reply);
}

/* ---- producer and consumer through lib/kafka.h --------------------------------------------- */

struct delivery {
	int ok;                          /* delivered and persisted */
	int failed;
	rd_kafka_resp_err_t last_err;
	rd_kafka_msg_status_t last_status;
	int wrong_partition;             /* keyed messages not on murmur2(key) % PARTITIONS */
};

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	struct delivery *d = opaque;
	(void)rk;
	d->last_err = m->err;
	d->last_status = rd_kafka_message_status(m);
	if (m->err) {
		d->failed++;
		return;
	}
	d->ok++;
	if (m->key && m->partition != tly_kafka_partition_for_key(m->key, m->key_len, PARTITIONS))
		d->wrong_partition++;
}

/* A configuration pointing at b, plus extra "kafka.*" key/value pairs (NULL-terminated). */
static struct tly_config *test_config(const struct tly_test_broker *b, const char *const *extra)
{
	char errstr[512];
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert_msg(tly_config_set(cfg, "kafka.bootstrap.servers", b->bootstraps, errstr,
				     sizeof(errstr)) == 0, "%s", errstr);
	for (; extra && extra[0]; extra += 2)
		ck_assert_msg(tly_config_set(cfg, extra[0], extra[1], errstr, sizeof(errstr)) == 0,
			      "%s", errstr);
	return cfg;
}

static rd_kafka_t *test_producer(const struct tly_test_broker *b, struct delivery *d,
				 const char *const *extra)
{
	char errstr[512];
	struct tly_config *cfg = test_config(b, extra);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(conf != NULL, "%s", errstr);
	rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
	rd_kafka_conf_set_opaque(conf, d);
	rd_kafka_t *rk = tly_kafka_producer_new(conf, errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	return rk;
}

static void produce_one(rd_kafka_t *rk, int32_t partition, const char *key, const char *value)
{
	struct tly_kafka_msg msg = {
		.topic = TOPIC,
		.partition = partition,
		.key = key,
		.keylen = key ? strlen(key) : 0,
		.value = value,
		.valuelen = strlen(value),
	};
	rd_kafka_resp_err_t err;
	int rc = tly_kafka_produce(rk, &msg, 5000, &err);
	ck_assert_msg(rc == 0, "could not produce: %s (%s)", tly_err_name(rc), rd_kafka_err2str(err));
}

/* Serve delivery reports until *counter reaches target or timeout_ms passes. */
static bool poll_until(rd_kafka_t *rk, const int *counter, int target, int timeout_ms)
{
	int64_t deadline = tly_clock_ms() + timeout_ms;
	while (*counter < target && tly_clock_ms() < deadline)
		rd_kafka_poll(rk, 50);
	return *counter >= target;
}

/* ---- tests ----------------------------------------------------------------------------------- */

/* Vectors of the Java client's murmur2 (Kafka's UtilsTest, librdkafka's rdmurmur2.c and test 0048). */
START_TEST(test_murmur2_partitioner)
{
	static const struct {
		const char *key;
		int32_t hash; /* Java's Utils.murmur2 */
	} vectors[] = {
		{"21", -973932308},
		{"foobar", -790332482},
		{"a-little-bit-long-string", -985981536},
		{"a-little-bit-longer-string", -1486304829},
		{"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971},
		{"abc", 479470107},
		{"kafka", (int32_t)0xd067cf64},
		{"giberish123456789", (int32_t)0x8f552b0c},
		{"1234", (int32_t)0x9fc97b14},
		{"234", (int32_t)0xe7c009ca},
		{"34", (int32_t)0x873930da},
		{"4", (int32_t)0x5a4b5ca1},
		{"PreAmbleWillBeRemoved,ThePrePartThatIs", (int32_t)0x78424f1c},
		{"", (int32_t)0x106e08d9},
		{"23456", (int32_t)0x058d780f},
		{"this is another string with more length to it perhaps", (int32_t)0x4f7703da},
		{"hejsan", (int32_t)0x5ec19395},
	};
	static const int32_t counts[] = {1, 7, 12, 17, 64, 1000};
	for (size_t i = 0; i < sizeof(vectors) / sizeof(vectors[0]); i++) {
		for (size_t j = 0; j < sizeof(counts) / sizeof(counts[0]); j++) {
			/* Java: Utils.toPositive(murmur2(key)) % numPartitions */
			int32_t want = (int32_t)(((uint32_t)vectors[i].hash & 0x7fffffffu) % (uint32_t)counts[j]);
			int32_t got = tly_kafka_partition_for_key(vectors[i].key, strlen(vectors[i].key),
								  counts[j]);
			ck_assert_msg(got == want, "key \"%s\" over %d partitions: want %d, got %d",
				      vectors[i].key, counts[j], want, got);
		}
	}
	/* Keys are bytes, not strings: an embedded NUL counts. */
	ck_assert_int_ne(tly_kafka_partition_for_key("a\0b", 3, 1000),
			 tly_kafka_partition_for_key("a", 1, 1000));
	ck_assert_int_eq(tly_kafka_partition_for_key("x", 1, 0), -1);
}
END_TEST

static void conf_expect(const rd_kafka_conf_t *conf, const char *name, const char *want)
{
	char val[256];
	size_t len = sizeof(val);
	ck_assert_msg(rd_kafka_conf_get(conf, name, val, &len) == RD_KAFKA_CONF_OK, "no %s", name);
	ck_assert_msg(strcmp(val, want) == 0, "%s: want \"%s\", got \"%s\"", name, want, val);
}

START_TEST(test_kafka_conf_and_errclass)
{
	char errstr[512];
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert(tly_config_set(cfg, "kafka.no.such.property", "1", errstr, sizeof(errstr)) == 0);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	ck_assert_ptr_null(conf);
	ck_assert_msg(strstr(errstr, "invalid Kafka setting \"kafka.no.such.property\": ") == errstr &&
			      strstr(errstr, "No such configuration property"),
		      "errstr: %s", errstr);
	tly_config_free(cfg);

	cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert(tly_config_set(cfg, "kafka.linger.ms", "7", errstr, sizeof(errstr)) == 0);
	ck_assert(tly_config_set(cfg, "kafka.session.timeout.ms", "4500", errstr, sizeof(errstr)) == 0);
	conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	ck_assert_msg(conf != NULL, "%s", errstr);
	conf_expect(conf, "linger.ms", "7");
	rd_kafka_conf_destroy(conf);

	/* Consumer: forced settings, and session.timeout.ms from the config wins over the default. */
	conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	ck_assert_msg(conf != NULL, "%s", errstr);
	rd_kafka_t *rk = tly_kafka_consumer_new(conf, "g1", errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	conf_expect(rd_kafka_conf(rk), "session.timeout.ms", "4500");
	conf_expect(rd_kafka_conf(rk), "enable.auto.commit", "false");
	conf_expect(rd_kafka_conf(rk), "group.id", "g1");
	conf_expect(rd_kafka_conf(rk), "partition.assignment.strategy", "cooperative-sticky");
	tly_kafka_consumer_destroy(rk);
	tly_config_free(cfg);

	conf = tly_kafka_conf_new(NULL, errstr, sizeof(errstr));
	ck_assert_msg(conf != NULL, "%s", errstr);
	rk = tly_kafka_consumer_new(conf, "g2", errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	conf_expect(rd_kafka_conf(rk), "session.timeout.ms", "6000");
	tly_kafka_consumer_destroy(rk);

	conf = tly_kafka_conf_new(NULL, errstr, sizeof(errstr));
	ck_assert_msg(conf != NULL, "%s", errstr);
	rk = tly_kafka_producer_new(conf, errstr, sizeof(errstr));
	ck_assert_msg(rk != NULL, "%s", errstr);
	conf_expect(rd_kafka_conf(rk), "enable.idempotence", "true");
	conf_expect(rd_kafka_conf(rk), "partitioner", "murmur2_random");
	tly_kafka_producer_destroy(rk, 0);

	/* A bad value reports librdkafka's text too. */
	conf = rd_kafka_conf_new();
	ck_assert_int_eq(tly_kafka_conf_set(conf, "linger.ms", "soon", errstr, sizeof(errstr)),
			 TLY_E_CONFIG);
	ck_assert_msg(strstr(errstr, "invalid Kafka setting \"linger.ms\": ") == errstr, "%s", errstr);
	rd_kafka_conf_destroy(conf);

	ck_assert_int_eq(tly_kafka_errclass(RD_KAFKA_RESP_ERR__FATAL, false), TLY_ERRCLASS_FATAL);
	ck_assert_int_eq(tly_kafka_errclass(RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION, true),
			 TLY_ERRCLASS_FATAL);
	ck_assert_int_eq(tly_kafka_errclass(RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION, false),
			 TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_kafka_errclass(RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT, false),
			 TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_kafka_errclass(RD_KAFKA_RESP_ERR__TRANSPORT, false),
			 TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_kafka_errclass(RD_KAFKA_RESP_ERR__MSG_TIMED_OUT, false),
			 TLY_ERRCLASS_RETRIABLE);
	ck_assert_int_eq(tly_kafka_errclass(RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, false),
			 TLY_ERRCLASS_PERMANENT);
	ck_assert_int_eq(tly_kafka_errclass(RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED, false),
			 TLY_ERRCLASS_PERMANENT);
	ck_assert_int_eq(tly_kafka_errclass(RD_KAFKA_RESP_ERR_PRODUCER_FENCED, false),
			 TLY_ERRCLASS_FATAL);
}
END_TEST

/* Keyed messages through a consumer group: every one arrives once, on murmur2(key) % P, in order. */
START_TEST(test_produce_consume_keyed)
{
	enum { N = 400, TENANTS = 50 };
	struct tly_test_broker b;
	struct delivery d = {0};
	char errstr[512];
	static bool seen[N];
	int64_t last_offset[PARTITIONS];
	int last_seq[PARTITIONS];
	int received = 0;

	tly_test_broker_start(&b, 3, PARTITIONS);
	rd_kafka_t *producer = test_producer(&b, &d, NULL);
	for (int i = 0; i < N; i++) {
		char key[40], value[40];
		snprintf(key, sizeof(key), "tenant-%08d", (i * 7919) % TENANTS);
		snprintf(value, sizeof(value), "%d", i);
		produce_one(producer, RD_KAFKA_PARTITION_UA, key, value);
		rd_kafka_poll(producer, 0);
	}
	ck_assert_msg(tly_kafka_flush(producer, 15000) == 0, "flush did not finish");
	ck_assert_int_eq(d.ok, N);
	ck_assert_int_eq(d.failed, 0);
	ck_assert_int_eq(d.wrong_partition, 0);
	tly_kafka_producer_destroy(producer, 1000);

	static const char *const extra[] = {"kafka.auto.offset.reset", "earliest", NULL};
	struct tly_config *cfg = test_config(&b, extra);
	rd_kafka_conf_t *conf = tly_kafka_conf_new(cfg, errstr, sizeof(errstr));
	tly_config_free(cfg);
	ck_assert_msg(conf != NULL, "%s", errstr);
	rd_kafka_t *consumer = tly_kafka_consumer_new(conf, "devbroker-test", errstr, sizeof(errstr));
	ck_assert_msg(consumer != NULL, "%s", errstr);
	const char *const topics[] = {TOPIC};
	ck_assert(tly_kafka_subscribe(consumer, topics, 1) == 0);

	for (int p = 0; p < PARTITIONS; p++) {
		last_offset[p] = -1;
		last_seq[p] = -1;
	}
	int64_t deadline = tly_clock_ms() + 30000;
	while (received < N && tly_clock_ms() < deadline) {
		rd_kafka_message_t *m = rd_kafka_consumer_poll(consumer, 100);
		if (!m)
			continue;
		if (m->err) {
			ck_assert_msg(m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF, "consumer error: %s",
				      rd_kafka_message_errstr(m));
			rd_kafka_message_destroy(m);
			continue;
		}
		ck_assert_msg(m->key && m->key_len > 0, "message at offset %lld has no key",
			      (long long)m->offset);
		ck_assert_int_eq(m->partition, tly_kafka_partition_for_key(m->key, m->key_len, PARTITIONS));
		char value[40];
		ck_assert(m->len < sizeof(value));
		memcpy(value, m->payload, m->len);
		value[m->len] = '\0';
		int seq = atoi(value);
		ck_assert(seq >= 0 && seq < N);
		char key[40];
		snprintf(key, sizeof(key), "tenant-%08d", (seq * 7919) % TENANTS);
		ck_assert(m->key_len == strlen(key) && memcmp(m->key, key, m->key_len) == 0);
		ck_assert_msg(!seen[seq], "message %d received twice", seq);
		seen[seq] = true;
		ck_assert_msg(m->offset > last_offset[m->partition] && seq > last_seq[m->partition],
			      "partition %d out of order: seq %d at offset %lld after seq %d at %lld",
			      (int)m->partition, seq, (long long)m->offset, last_seq[m->partition],
			      (long long)last_offset[m->partition]);
		last_offset[m->partition] = m->offset;
		last_seq[m->partition] = seq;
		received++;
		rd_kafka_message_destroy(m);
	}
	ck_assert_msg(received == N, "received %d of %d messages", received, N);
	int used = 0;
	for (int p = 0; p < PARTITIONS; p++)
		used += last_seq[p] >= 0;
	ck_assert_msg(used > PARTITIONS / 2, "only %d partitions used by %d tenants", used, TENANTS);
	tly_kafka_consumer_destroy(consumer);
	tly_test_broker_stop(&b);
}
END_TEST

/* Errors pushed on one broker's Produce are consumed by the retries, then the message is persisted. */
START_TEST(test_fault_produce_errors_retried)
{
	struct tly_test_broker b;
	struct delivery d = {0};
	static const char *const extra[] = {"kafka.retry.backoff.ms", "20", NULL};

	tly_test_broker_start(&b, 3, PARTITIONS);
	ctl_expect(&b, "leader " TOPIC " 0 1", "ok");
	ctl_expect(&b, "broker-errors 1 Produce 3 NOT_LEADER_FOR_PARTITION", "ok");
	ctl_expect(&b, "error-count 1 Produce", "ok 3");

	rd_kafka_t *producer = test_producer(&b, &d, extra);
	produce_one(producer, 0, "tenant-a", "1");
	ck_assert_msg(poll_until(producer, &d.ok, 1, 15000), "no delivery (failed %d: %s)", d.failed,
		      rd_kafka_err2str(d.last_err));
	ck_assert_int_eq(d.failed, 0);
	ck_assert_int_eq(d.last_status, RD_KAFKA_MSG_STATUS_PERSISTED);
	ctl_expect(&b, "error-count 1 Produce", "ok 0");

	/*
	 * Cluster-wide errors: a retriable one is retried, a permanent one fails the message. On a
	 * broker other than 1: librdkafka consults the cluster-wide stack only for brokers that never
	 * had a stack of their own for that request type.
	 */
	ctl_expect(&b, "leader " TOPIC " 1 2", "ok");
	ctl_expect(&b, "errors Produce 2 REQUEST_TIMED_OUT", "ok");
	ctl_expect(&b, "errors Produce 1 MSG_SIZE_TOO_LARGE", "ok");
	produce_one(producer, 1, "tenant-a", "2");
	ck_assert_msg(poll_until(producer, &d.failed, 1, 15000),
		      "second message did not fail (delivered %d, last error %s, queued %d)", d.ok,
		      rd_kafka_err2name(d.last_err), rd_kafka_outq_len(producer));
	ck_assert_int_eq(d.last_err, RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE);
	ck_assert_int_eq(d.ok, 1);

	ctl_expect(&b, "errors Produce 5 MSG_SIZE_TOO_LARGE", "ok");
	ctl_expect(&b, "clear-errors Produce", "ok");
	produce_one(producer, 1, "tenant-a", "3");
	ck_assert_msg(poll_until(producer, &d.ok, 2, 15000), "no delivery after clear-errors: %s",
		      rd_kafka_err2str(d.last_err));
	ck_assert_int_eq(d.failed, 1);

	tly_kafka_producer_destroy(producer, 1000);
	tly_test_broker_stop(&b);
}
END_TEST

/* With the partition's leader down a message waits; when it comes back up the message is delivered. */
START_TEST(test_fault_broker_down_up)
{
	struct tly_test_broker b;
	struct delivery d = {0};
	static const char *const extra[] = {
		"kafka.reconnect.backoff.ms", "50", "kafka.reconnect.backoff.max.ms", "200",
		"kafka.retry.backoff.ms", "50", NULL};

	tly_test_broker_start(&b, 3, PARTITIONS);
	ctl_expect(&b, "leader " TOPIC " 0 2", "ok");
	rd_kafka_t *producer = test_producer(&b, &d, extra);
	produce_one(producer, 0, "tenant-b", "1");
	ck_assert_msg(poll_until(producer, &d.ok, 1, 15000), "no delivery before broker-down: %s",
		      rd_kafka_err2str(d.last_err));

	ctl_expect(&b, "broker-down 2", "ok");
	produce_one(producer, 0, "tenant-b", "2");
	ck_assert_msg(!poll_until(producer, &d.ok, 2, 2000),
		      "message delivered while the partition leader was down");
	ck_assert_int_eq(d.failed, 0);
	ck_assert_int_eq(rd_kafka_outq_len(producer) > 0, 1);

	ctl_expect(&b, "broker-up 2", "ok");
	ck_assert_msg(poll_until(producer, &d.ok, 2, 15000), "no delivery after broker-up: %s",
		      rd_kafka_err2str(d.last_err));
	ck_assert_int_eq(d.failed, 0);
	ck_assert_int_eq(d.last_status, RD_KAFKA_MSG_STATUS_PERSISTED);

	tly_kafka_producer_destroy(producer, 1000);
	tly_test_broker_stop(&b);
}
END_TEST

/* Send raw bytes on one connection and read until want_lines replies arrived (or EOF). */
static void raw_exchange(const char *path, const char *data, size_t len, char *out, size_t outlen,
			 int want_lines)
{
	struct sockaddr_un sun = {.sun_family = AF_UNIX};
	struct timeval tv = {.tv_sec = 5};
	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
	ck_assert_msg(connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0, "connect: %s",
		      strerror(errno));
	ck_assert_int_eq(send(fd, data, len, MSG_NOSIGNAL), (ssize_t)len);
	size_t used = 0;
	int lines = 0;
	while (lines < want_lines && used < outlen - 1) {
		ssize_t n = recv(fd, out + used, outlen - 1 - used, 0);
		if (n <= 0)
			break;
		for (ssize_t i = 0; i < n; i++)
			lines += out[used + (size_t)i] == '\n';
		used += (size_t)n;
	}
	out[used] = '\0';
	close(fd);
}

START_TEST(test_control_protocol)
{
	struct tly_test_broker b;
	char reply[TLY_DEVBROKER_LINE_MAX + 1];
	static const char *const bad[] = {
		"",
		"   ",
		"nonsense",
		"PING",
		"ping extra",
		"broker-down",
		"broker-down 0",
		"broker-down 4",
		"broker-down two",
		"broker-down 1x",
		"broker-up 99999999999999999999",
		"rtt 1",
		"rtt 1 -5",
		"rtt 1 fast",
		"rtt 9 10",
		"errors",
		"errors Produce",
		"errors Produce 1",
		"errors NoSuchApi 1 NOT_LEADER_FOR_PARTITION",
		"errors 59 1 NOT_LEADER_FOR_PARTITION",
		"errors -1 1 NOT_LEADER_FOR_PARTITION",
		"errors Produce 0 NOT_LEADER_FOR_PARTITION",
		"errors Produce -3 NOT_LEADER_FOR_PARTITION",
		"errors Produce 100000 NOT_LEADER_FOR_PARTITION",
		"errors Produce 1 NO_SUCH_ERROR",
		"errors Produce 1 31337",
		"errors Produce 3 REQUEST_TIMED_OUT NOT_LEADER_FOR_PARTITION",
		"broker-errors 7 Produce 1 REQUEST_TIMED_OUT",
		"error-count 1",
		"error-count 1 Bogus",
		"clear-errors",
		"clear-errors Nope",
		"leader",
		"leader tally.events 0",
		"leader no.such.topic 0 1",
		"leader tally.events 12 1",
		"leader tally.events -1 1",
		"leader tally.events x 1",
		"leader tally.events 0 4",
		"leader tally.events 0 0",
	};
	tly_test_broker_start(&b, 3, PARTITIONS);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ctl_refused(&b, bad[i]);
		ctl_expect(&b, "ping", "ok");
	}
	/* Names, numbers and prefixes that are valid. */
	ctl_expect(&b, "errors produce 2 not_leader_for_partition RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT", "ok");
	ctl_expect(&b, "errors 1 1 6", "ok");
	ctl_expect(&b, "clear-errors 0", "ok");
	ctl_expect(&b, "clear-errors Fetch", "ok");
	ctl_expect(&b, "rtt 3 0", "ok");
	ctl_expect(&b, "leader tally.deadletter 11 -1", "ok");
	ctl_expect(&b, "leader tally.deadletter 11 3", "ok");
	ck_assert_int_eq(tly_devbroker_ctl(b.ctl_path, "help", reply, sizeof(reply)), 0);
	ck_assert_msg(strstr(reply, "broker-down") && strstr(reply, "errors"), "help: %s", reply);

	/* Several commands on one connection, CRLF, a control byte, then a line over the limit. */
	char out[4096];
	static const char pipelined[] = "ping\r\nbroker-up 9\nhelp\n\x01\xff\nping\n";
	raw_exchange(b.ctl_path, pipelined, sizeof(pipelined) - 1, out, sizeof(out), 5);
	ck_assert_msg(strncmp(out, "ok\nerror: ", 10) == 0, "pipelined replies: %s", out);
	char *third = strchr(strchr(out, '\n') + 1, '\n') + 1;
	ck_assert_msg(strncmp(third, "ok ping", 7) == 0, "pipelined replies: %s", out);
	char *fourth = strchr(third, '\n') + 1;
	ck_assert_msg(strncmp(fourth, "error: ", 7) == 0 && strcmp(strchr(fourth, '\n'), "\nok\n") == 0,
		      "pipelined replies: %s", out);

	static char longline[3 * TLY_DEVBROKER_LINE_MAX];
	memset(longline, 'x', sizeof(longline) - 1);
	longline[sizeof(longline) - 2] = '\n';
	raw_exchange(b.ctl_path, longline, sizeof(longline) - 1, out, sizeof(out), 1);
	ck_assert_msg(strncmp(out, "error: command too long", 23) == 0, "long line: %s", out);
	ctl_expect(&b, "ping", "ok");

	/* The client refuses what it cannot send and reports a dead socket as an I/O failure. */
	ck_assert_int_eq(tly_devbroker_ctl(b.ctl_path, "ping\nping", reply, sizeof(reply)), TLY_E_INVALID);
	char nosock[512];
	snprintf(nosock, sizeof(nosock), "%s/missing.sock", b.dir);
	ck_assert_int_eq(tly_devbroker_ctl(nosock, "ping", reply, sizeof(reply)), TLY_E_IO);
	ck_assert_msg(strstr(reply, "could not connect") != NULL, "reply: %s", reply);

	ck_assert_int_eq(kill(b.pid, 0), 0);
	tly_test_broker_stop(&b);
}
END_TEST

/* A TCP connection to host:port ("127.0.0.1:1234"), or -1. */
static int connect_to(const char *hostport)
{
	char host[64];
	const char *colon = strrchr(hostport, ':');
	if (!colon || (size_t)(colon - hostport) >= sizeof(host))
		return -1;
	memcpy(host, hostport, (size_t)(colon - hostport));
	host[colon - hostport] = '\0';
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
	if (getaddrinfo(host, colon + 1, &hints, &ai) != 0)
		return -1;
	int fd = socket(ai->ai_family, ai->ai_socktype, 0);
	if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
		close(fd);
		fd = -1;
	}
	freeaddrinfo(ai);
	return fd;
}

/*
 * Every TCP connection the mock brokers accepted has TCP_NODELAY, as Apache Kafka's brokers set it:
 * read from the dev broker's own sockets (pidfd_getfd), one connection made to each broker.
 */
START_TEST(test_accepted_connections_nodelay)
{
	struct tly_test_broker b;
	tly_test_broker_start(&b, 3, 2);
	int client[3], n_clients = 0;
	char *list = strdup(b.bootstraps), *save = NULL;
	for (char *hp = strtok_r(list, ",", &save); hp && n_clients < 3; hp = strtok_r(NULL, ",", &save)) {
		client[n_clients] = connect_to(hp);
		ck_assert_msg(client[n_clients] >= 0, "could not connect to %s", hp);
		n_clients++;
	}
	free(list);
	ck_assert_int_eq(n_clients, 3);

	int pidfd = pidfd_open(b.pid, 0);
	ck_assert_msg(pidfd >= 0, "pidfd_open: %s", strerror(errno));
	int accepted = 0, nodelay = 0;
	for (double until = tly_clock_s() + 5; accepted < n_clients && tly_clock_s() < until;) {
		char dir[64];
		snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)b.pid);
		DIR *d = opendir(dir);
		ck_assert_ptr_nonnull(d);
		accepted = nodelay = 0;
		for (struct dirent *de; (de = readdir(d));) {
			if (de->d_name[0] == '.')
				continue;
			int fd = pidfd_getfd(pidfd, atoi(de->d_name), 0);
			if (fd < 0)
				continue;
			int listening = 1, domain = 0, type = 0, on = 0;
			socklen_t len = sizeof(int);
			if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && !listening &&
			    getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
			    (domain == AF_INET || domain == AF_INET6) &&
			    getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM) {
				accepted++;
				if (getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, &len) == 0 && on)
					nodelay++;
			}
			close(fd);
		}
		closedir(d);
		if (accepted < n_clients)
			usleep(50000);
	}
	close(pidfd);
	ck_assert_msg(accepted >= n_clients, "the dev broker holds %d TCP connections, want %d",
		      accepted, n_clients);
	ck_assert_int_eq(nodelay, accepted);
	for (int i = 0; i < n_clients; i++)
		close(client[i]);
	tly_test_broker_stop(&b);
}
END_TEST

START_TEST(test_help_lists_limits)
{
	char out[8192];
	char *const help[] = {(char *)tly_test_bin("tally-devbroker"), "--help", NULL};
	ck_assert_int_eq(tly_proc_run(help, out, sizeof(out)), 0);
	static const char *const want[] = {
		"--brokers", "--partitions", "--bootstrap-file", "--control", "memory only",
		"5 MiB", "100k batches", "older data is dropped", "transactions are accepted but not implemented",
		"no admin API", "bind()", "session.timeout.ms <= 3000", "broker-down", "errors API COUNT",
		"one batch per partition",
	};
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
		ck_assert_msg(strstr(out, want[i]) != NULL, "--help lacks \"%s\":\n%s", want[i], out);

	char *const bad[] = {(char *)tly_test_bin("tally-devbroker"), "--brokers", "0", NULL};
	ck_assert_int_eq(tly_proc_run(bad, out, sizeof(out)), 2);
	ck_assert_msg(strstr(out, "invalid --brokers") != NULL, "%s", out);
	char *const bad2[] = {(char *)tly_test_bin("tally-devbroker"), "--partitions", "12x", NULL};
	ck_assert_int_eq(tly_proc_run(bad2, out, sizeof(out)), 2);
	char *const bad3[] = {(char *)tly_test_bin("tally-devbroker"), "--frobnicate", NULL};
	ck_assert_int_eq(tly_proc_run(bad3, out, sizeof(out)), 2);
}
END_TEST

static char *slurp(const char *path)
{
	static char buf[65536];
	FILE *f = fopen(path, "r");
	ck_assert_msg(f != NULL, "could not open \"%s\": %s", path, strerror(errno));
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

/* SIGTERM: exit 0, control socket gone, bootstrap file kept, the same line that went to stdout. */
START_TEST(test_sigterm_clean_exit)
{
	struct tly_test_broker b;
	char line[600];
	int status = 0;

	tly_test_broker_start(&b, 1, 4);
	ck_assert_msg(strchr(b.bootstraps, ',') == NULL, "one broker, one address: %s", b.bootstraps);
	ck_assert(kill(b.pid, SIGTERM) == 0);
	ck_assert_msg(tly_proc_wait(b.pid, 10000, &status) == 0, "no exit within 10 s of SIGTERM");
	b.pid = 0;
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "wait status %d", status);

	struct stat st;
	ck_assert_msg(stat(b.ctl_path, &st) != 0 && errno == ENOENT, "control socket left behind");
	snprintf(line, sizeof(line), "%s\n", b.bootstraps);
	ck_assert_str_eq(slurp(b.bootstrap_file), line);
	/* The log holds stdout and stderr: the bootstrap line is there on its own. */
	char *log = slurp(b.log_path);
	bool found = false;
	for (char *p = log; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
		found |= strncmp(p, line, strlen(line)) == 0;
	ck_assert_msg(found, "stdout line \"%s\" not in log:\n%s", b.bootstraps, log);
	ck_assert_msg(strstr(log, "dev broker stopped") != NULL, "log:\n%s", log);

	/* No temporary files from the atomic write are left. */
	DIR *dir = opendir(b.dir);
	ck_assert_ptr_nonnull(dir);
	struct dirent *e;
	int files = 0;
	while ((e = readdir(dir)) != NULL) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		ck_assert_msg(strcmp(e->d_name, "bootstrap") == 0 || strcmp(e->d_name, "devbroker.log") == 0,
			      "unexpected file \"%s\" in %s", e->d_name, b.dir);
		files++;
	}
	closedir(dir);
	ck_assert_int_eq(files, 2);
	tly_test_broker_stop(&b);
}
END_TEST

Suite *devbroker_suite(void)
{
	Suite *s = suite_create("devbroker");
	TCase *unit = tcase_create("partitioner");
	tcase_add_test(unit, test_murmur2_partitioner);
	tcase_add_test(unit, test_kafka_conf_and_errclass);
	suite_add_tcase(s, unit);

	TCase *broker = tcase_create("broker");
	tcase_set_timeout(broker, 60);
	tcase_add_test(broker, test_produce_consume_keyed);
	tcase_add_test(broker, test_fault_produce_errors_retried);
	tcase_add_test(broker, test_fault_broker_down_up);
	tcase_add_test(broker, test_control_protocol);
	tcase_add_test(broker, test_help_lists_limits);
	tcase_add_test(broker, test_accepted_connections_nodelay);
	tcase_add_test(broker, test_sigterm_clean_exit);
	suite_add_tcase(s, broker);
	return s;
}
