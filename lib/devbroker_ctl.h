/*
 * Client of tally-devbroker's control socket: a unix stream socket speaking one command per line,
 * answered by one line, "ok" (optionally followed by a value, "ok 3") or "error: <reason>".
 *
 * Commands: ping; broker-down ID; broker-up ID; rtt ID MS; errors API COUNT ERR...;
 * broker-errors ID API COUNT ERR...; error-count ID API; clear-errors API; leader TOPIC PARTITION ID;
 * help. API is a Kafka request name (Produce, Fetch, Metadata…) or its number; ERR is a librdkafka
 * error name without the RD_KAFKA_RESP_ERR_ prefix (NOT_LEADER_FOR_PARTITION) or its number; a single
 * ERR with COUNT > 1 is pushed COUNT times.
 */
#ifndef TLY_DEVBROKER_CTL_H
#define TLY_DEVBROKER_CTL_H

#include <stddef.h>

#include "err.h"

/* Longest command or reply line, newline excluded. */
#define TLY_DEVBROKER_LINE_MAX 1024

/*
 * Connect to socket_path, send command (one line, no newline in it), read the reply line into reply
 * (NUL-terminated, newline stripped, truncated to replylen-1). Returns 0 when the reply is "ok" or
 * "ok <value>", TLY_E_INVALID when the broker answered "error: …" (reply holds it), TLY_E_IO when it
 * could not talk to the broker (reply holds the reason). Waits at most 10 s for the reply.
 */
int tly_devbroker_ctl(const char *socket_path, const char *command, char *reply,
		      size_t replylen) TLY_MUST_CHECK;

#endif
