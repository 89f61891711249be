/* Kafka client boilerplate shared by every program: configuration pass-through, handles, produce, errors. */
#include "kafka.h"

#include <stdio.h>
#include <string.h>

#include "clock.h"
#include "log.h"

#define KAFKA_PREFIX "kafka."
#define CONSUMER_SESSION_TIMEOUT_MS "6000"

/* librdkafka uses syslog levels: 0..3 are errors, 4 warnings, 5..6 information, 7 debug. */
static void log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
	enum tly_log_level lvl = TLY_LOG_DEBUG;
	if (level <= 3)
		lvl = TLY_LOG_ERROR;
	else if (level == 4)
		lvl = TLY_LOG_WARN;
	else if (level <= 6)
		lvl = TLY_LOG_INFO;
	tly_log(lvl, buf, "component=rdkafka facility=%s client=%s", fac ? fac : "-",
		rk ? rd_kafka_name(rk) : "-");
}

struct conf_fill {
	rd_kafka_conf_t *conf;
	char *errstr;
	size_t errlen;
};

static int conf_fill_one(const char *key, const char *value, void *ud)
{
	struct conf_fill *f = ud;
	char rderr[512];
	if (rd_kafka_conf_set(f->conf, key + strlen(KAFKA_PREFIX), value, rderr, sizeof(rderr)) !=
	    RD_KAFKA_CONF_OK) {
		snprintf(f->errstr, f->errlen, "invalid Kafka setting \"%s\": %s", key, rderr);
		return TLY_E_CONFIG;
	}
	return 0;
}

rd_kafka_conf_t *tly_kafka_conf_new(const struct tly_config *cfg, char *errstr, size_t errlen)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	if (!conf) {
		snprintf(errstr, errlen, "could not create Kafka configuration: out of memory");
		return NULL;
	}
	rd_kafka_conf_set_log_cb(conf, log_cb);
	/*
	 * TCP_NODELAY on every broker connection, as the Java client and the brokers set it: with
	 * Nagle a request written while an earlier one on the same connection is unanswered (a
	 * produce behind a produce, a fetch behind a held fetch) waits for that answer's ACK.
	 * kafka.socket.nagle.disable, applied below, still decides.
	 */
	if (tly_kafka_conf_set(conf, "socket.nagle.disable", "true", errstr, errlen) != 0)
		goto fail;
	if (cfg) {
		struct conf_fill f = {conf, errstr, errlen};
		if (tly_config_foreach(cfg, KAFKA_PREFIX, conf_fill_one, &f) != 0)
			goto fail;
	}
	return conf;
fail:
	rd_kafka_conf_destroy(conf);
	return NULL;
}

int tly_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *errstr,
		       size_t errlen)
{
	char rderr[512];
	if (rd_kafka_conf_set(conf, name, value, rderr, sizeof(rderr)) != RD_KAFKA_CONF_OK) {
		snprintf(errstr, errlen, "invalid Kafka setting \"%s\": %s", name, rderr);
		return TLY_E_CONFIG;
	}
	return 0;
}

rd_kafka_t *tly_kafka_producer_new(rd_kafka_conf_t *conf, char *errstr, size_t errlen)
{
	rd_kafka_t *rk = NULL;
	char rderr[512];
	if (tly_kafka_conf_set(conf, "enable.idempotence", "true", errstr, errlen) != 0 ||
	    tly_kafka_conf_set(conf, "partitioner", "murmur2_random", errstr, errlen) != 0)
		goto fail;
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, rderr, sizeof(rderr));
	if (!rk) {
		snprintf(errstr, errlen, "could not create Kafka producer: %s", rderr);
		goto fail;
	}
	return rk; /* conf is owned by rk now */
fail:
	rd_kafka_conf_destroy(conf);
	return NULL;
}

/*
 * True when conf still holds librdkafka's own default for name (the caller did not set it). A
 * topic property (auto.offset.reset…) set on the global conf lives in its default topic conf.
 */
static bool conf_is_default(const rd_kafka_conf_t *conf, const char *name)
{
	char have[128], dflt[128];
	size_t havelen = sizeof(have), dfltlen = sizeof(dflt);
	if (rd_kafka_conf_get(conf, name, have, &havelen) != RD_KAFKA_CONF_OK) {
		const rd_kafka_topic_conf_t *tconf = rd_kafka_conf_get_default_topic_conf(
			(rd_kafka_conf_t *)conf);
		rd_kafka_topic_conf_t *tpristine = rd_kafka_topic_conf_new();
		bool known = tpristine && rd_kafka_topic_conf_get(tpristine, name, dflt, &dfltlen) ==
					 RD_KAFKA_CONF_OK;
		bool same = known && (!tconf || (rd_kafka_topic_conf_get(tconf, name, have, &havelen) ==
						 RD_KAFKA_CONF_OK && strcmp(have, dflt) == 0));
		if (tpristine)
			rd_kafka_topic_conf_destroy(tpristine);
		return same;
	}
	rd_kafka_conf_t *pristine = rd_kafka_conf_new();
	bool same = pristine && rd_kafka_conf_get(pristine, name, dflt, &dfltlen) == RD_KAFKA_CONF_OK &&
		    strcmp(have, dflt) == 0;
	rd_kafka_conf_destroy(pristine);
	return same;
}

int tly_kafka_conf_default(rd_kafka_conf_t *conf, const char *name, const char *value,
			   char *errstr, size_t errlen)
{
	return conf_is_default(conf, name) ? tly_kafka_conf_set(conf, name, value, errstr, errlen) : 0;
}

rd_kafka_t *tly_kafka_consumer_new(rd_kafka_conf_t *conf, const char *group_id, char *errstr,
				   size_t errlen)
{
	rd_kafka_t *rk = NULL;
	char rderr[512];
	if (tly_kafka_conf_set(conf, "group.id", group_id, errstr, errlen) != 0 ||
	    tly_kafka_conf_set(conf, "enable.auto.commit", "false", errstr, errlen) != 0 ||
	    tly_kafka_conf_set(conf, "partition.assignment.strategy", "cooperative-sticky", errstr,
			       errlen) != 0)
		goto fail;
	if (tly_kafka_conf_default(conf, "session.timeout.ms", CONSUMER_SESSION_TIMEOUT_MS, errstr,
				   errlen) != 0)
		goto fail;
	rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, rderr, sizeof(rderr));
	if (!rk) {
		snprintf(errstr, errlen, "could not create Kafka consumer for group \"%s\": %s",
			 group_id, rderr);
		goto fail;
	}
	conf = NULL; /* owned by rk */
	rd_kafka_resp_err_t err = rd_kafka_poll_set_consumer(rk);
	if (err) {
		snprintf(errstr, errlen, "could not redirect the main queue of consumer \"%s\": %s",
			 group_id, rd_kafka_err2str(err));
		rd_kafka_destroy(rk);
		return NULL;
	}
	return rk;
fail:
	rd_kafka_conf_destroy(conf);
	return NULL;
}

int tly_kafka_subscribe(rd_kafka_t *rk, const char *const *topics, size_t n)
{
	int rc = 0;
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new((int)n);
	if (!list)
		return TLY_E_NOMEM;
	for (size_t i = 0; i < n; i++)
		rd_kafka_topic_partition_list_add(list, topics[i], RD_KAFKA_PARTITION_UA);
	rd_kafka_resp_err_t err = rd_kafka_subscribe(rk, list);
	if (err) {
		tly_error("could not subscribe to Kafka topics", "topic=%s count=%zu reason=\"%s\"",
			  n > 0 ? topics[0] : "-", n, rd_kafka_err2str(err));
		rc = TLY_E_KAFKA;
	}
	rd_kafka_topic_partition_list_destroy(list);
	return rc;
}

int tly_kafka_produce(rd_kafka_t *rk, const struct tly_kafka_msg *msg, int timeout_ms,
		      rd_kafka_resp_err_t *errp)
{
	int64_t deadline = tly_clock_ms() + timeout_ms;
	if (errp)
		*errp = RD_KAFKA_RESP_ERR_NO_ERROR;
	for (;;) {
		rd_kafka_resp_err_t err = rd_kafka_producev(
			rk, RD_KAFKA_V_TOPIC(msg->topic), RD_KAFKA_V_PARTITION(msg->partition),
			RD_KAFKA_V_KEY(msg->key, msg->keylen),
			RD_KAFKA_V_VALUE((void *)msg->value, msg->valuelen),
			RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(msg->headers),
			RD_KAFKA_V_OPAQUE(msg->opaque), RD_KAFKA_V_END);
		if (!err)
			return 0;
		if (errp)
			*errp = err;
		if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
			tly_error("could not produce Kafka message", "topic=%s partition=%d reason=\"%s\"",
				  msg->topic, (int)msg->partition, rd_kafka_err2str(err));
			return TLY_E_KAFKA;
		}
		int64_t left = deadline - tly_clock_ms();
		if (left <= 0) {
			tly_warn("could not produce Kafka message: local queue still full",
				 "topic=%s partition=%d timeout_ms=%d", msg->topic,
				 (int)msg->partition, timeout_ms);
			return TLY_E_TIMEOUT;
		}
		/* Serve delivery reports so the queue drains, then try again. */
		rd_kafka_poll(rk, left < 100 ? (int)left : 100);
	}
}

int tly_kafka_flush(rd_kafka_t *rk, int timeout_ms)
{
	rd_kafka_resp_err_t err = rd_kafka_flush(rk, timeout_ms);
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		return 0;
	tly_warn("could not flush Kafka producer: messages still queued", "client=%s queued=%d timeout_ms=%d",
		 rd_kafka_name(rk), rd_kafka_outq_len(rk), timeout_ms);
	return TLY_E_TIMEOUT;
}

void tly_kafka_producer_destroy(rd_kafka_t *rk, int flush_timeout_ms)
{
	if (!rk)
		return;
	if (tly_kafka_flush(rk, flush_timeout_ms) != 0)
		tly_warn("dropping undelivered Kafka messages", "client=%s queued=%d",
			 rd_kafka_name(rk), rd_kafka_outq_len(rk));
	rd_kafka_destroy(rk);
}

void tly_kafka_consumer_destroy(rd_kafka_t *rk)
{
	if (!rk)
		return;
	rd_kafka_resp_err_t err = rd_kafka_consumer_close(rk);
	if (err)
		tly_warn("could not leave Kafka consumer group cleanly", "client=%s reason=\"%s\"",
			 rd_kafka_name(rk), rd_kafka_err2str(err));
	rd_kafka_destroy(rk);
}

enum tly_errclass tly_kafka_errclass(rd_kafka_resp_err_t err, bool fatal)
{
	if (fatal || err == RD_KAFKA_RESP_ERR__FATAL)
		return TLY_ERRCLASS_FATAL;
	switch (err) {
	/* Local: the connection, a timeout, a full queue, a coordinator or leader being looked up. */
	case RD_KAFKA_RESP_ERR__TRANSPORT:
	case RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN:
	case RD_KAFKA_RESP_ERR__RESOLVE:
	case RD_KAFKA_RESP_ERR__TIMED_OUT:
	case RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE:
	case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
	case RD_KAFKA_RESP_ERR__QUEUE_FULL:
	case RD_KAFKA_RESP_ERR__WAIT_COORD:
	case RD_KAFKA_RESP_ERR__WAIT_CACHE:
	case RD_KAFKA_RESP_ERR__IN_PROGRESS:
	case RD_KAFKA_RESP_ERR__PREV_IN_PROGRESS:
	case RD_KAFKA_RESP_ERR__RETRY:
	case RD_KAFKA_RESP_ERR__NODE_UPDATE:
	case RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION:
	case RD_KAFKA_RESP_ERR__ISR_INSUFF:
	case RD_KAFKA_RESP_ERR__PARTIAL:
	/* Broker: leadership moving, coordinators loading, replicas catching up, throttling. */
	case RD_KAFKA_RESP_ERR_INVALID_MSG: /* CorruptRecordException */
	case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
	case RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE:
	case RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION:
	case RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT:
	case RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE:
	case RD_KAFKA_RESP_ERR_REPLICA_NOT_AVAILABLE:
	case RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION:
	case RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS:
	case RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE:
	case RD_KAFKA_RESP_ERR_NOT_COORDINATOR:
	case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS:
	case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND:
	case RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS:
	case RD_KAFKA_RESP_ERR_NOT_CONTROLLER:
	case RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS:
	case RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR:
	case RD_KAFKA_RESP_ERR_FETCH_SESSION_ID_NOT_FOUND:
	case RD_KAFKA_RESP_ERR_INVALID_FETCH_SESSION_EPOCH:
	case RD_KAFKA_RESP_ERR_LISTENER_NOT_FOUND:
	case RD_KAFKA_RESP_ERR_FENCED_LEADER_EPOCH:
	case RD_KAFKA_RESP_ERR_UNKNOWN_LEADER_EPOCH:
	case RD_KAFKA_RESP_ERR_OFFSET_NOT_AVAILABLE:
	case RD_KAFKA_RESP_ERR_PREFERRED_LEADER_NOT_AVAILABLE:
	case RD_KAFKA_RESP_ERR_ELIGIBLE_LEADERS_NOT_AVAILABLE:
	case RD_KAFKA_RESP_ERR_UNSTABLE_OFFSET_COMMIT:
	case RD_KAFKA_RESP_ERR_THROTTLING_QUOTA_EXCEEDED:
		return TLY_ERRCLASS_RETRIABLE;
	/* A fenced producer or a lost producer id: this process must not go on writing. */
	case RD_KAFKA_RESP_ERR__FENCED:
	case RD_KAFKA_RESP_ERR_PRODUCER_FENCED:
	case RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH:
	case RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER:
		return TLY_ERRCLASS_FATAL;
	default:
		return TLY_ERRCLASS_PERMANENT;
	}
}

int32_t tly_kafka_partition_for_key(const void *key, size_t len, int32_t partition_count)
{
	if (partition_count < 1)
		return -1;
	/* librdkafka's murmur2 partitioner reads neither the topic nor the opaques: NULL is safe. */
	return rd_kafka_msg_partitioner_murmur2(NULL, key, len, partition_count, NULL, NULL);
}

int tly_kafka_topic_partitions(rd_kafka_t *rk, const char *topic, int timeout_ms, int32_t *count,
			       char *errstr, size_t errlen)
{
	/* Every topic's metadata, never one topic's: a request naming a topic may create it on a
	 * cluster that auto-creates topics (the dev broker does), and a missing topic must be seen. */
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 1, NULL, &md, timeout_ms);
	if (err) {
		snprintf(errstr, errlen, "could not read Kafka metadata of topic \"%s\": %s", topic,
			 rd_kafka_err2str(err));
		return -1;
	}
	int rc = -1;
	const struct rd_kafka_metadata_topic *t = NULL;
	for (int i = 0; i < md->topic_cnt && !t; i++)
		if (strcmp(md->topics[i].topic, topic) == 0)
			t = &md->topics[i];
	if (!t || t->err || t->partition_cnt < 1)
		snprintf(errstr, errlen, "topic \"%s\" does not exist: %s", topic,
			 t ? rd_kafka_err2str(t->err) : "not in the cluster's metadata");
	else {
		*count = t->partition_cnt;
		rc = 0;
	}
	rd_kafka_metadata_destroy(md);
	return rc;
}

void tly_kafka_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *parts,
			 bool failed, void (*assign)(void *ud, rd_kafka_topic_partition_list_t *parts),
			 void (*revoke)(void *ud, rd_kafka_topic_partition_list_t *parts, bool lost),
			 void *ud)
{
	if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
		assign(ud, parts);
		return;
	}
	if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) {
		revoke(ud, parts, rd_kafka_assignment_lost(rk) || failed);
	} else {
		tly_error("unexpected rebalance event", "reason=\"%s\"", rd_kafka_err2str(err));
		revoke(ud, parts, true);
	}
	rd_kafka_error_t *error = rd_kafka_incremental_unassign(rk, parts);
	if (error) {
		tly_error("could not unassign partitions", "reason=\"%s\"", rd_kafka_error_string(error));
		rd_kafka_error_destroy(error);
	}
}
