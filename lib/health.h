/*
 * A daemon's liveness and readiness, as its consumer loop last saw them: a heartbeat, whether
 * PostgreSQL answered at the last check, whether the schema was at head at start-up, how many
 * partitions are assigned and the total lag. Written by the loop, read by the HTTP thread.
 * Thread notes: every field is a C11 atomic; any thread may call any function.
 */
#ifndef TLY_HEALTH_H
#define TLY_HEALTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

struct tly_health;

/* A state that is neither alive nor ready yet. max_lag: the readiness threshold (records). */
struct tly_health *tly_health_new(int64_t max_lag); /* NULL on OOM */
void tly_health_free(struct tly_health *h);        /* accepts NULL */

void tly_health_beat(struct tly_health *h);                 /* the loop is alive now */
void tly_health_set_pg(struct tly_health *h, bool reachable);
void tly_health_set_schema(struct tly_health *h, bool at_head);
void tly_health_set_assigned(struct tly_health *h, int partitions);
void tly_health_set_lag(struct tly_health *h, int64_t total); /* -1: unknown */

/* Whether the loop beat within alive_ms; else a one-line reason. */
bool tly_health_alive(const struct tly_health *h, int64_t alive_ms, char *reason, size_t len);

/* Whether every readiness condition holds; else a one-line reason naming the first that fails. */
bool tly_health_ready(const struct tly_health *h, char *reason, size_t len);

#endif
