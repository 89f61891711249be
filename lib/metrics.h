/*
 * A registry of counters, gauges and histograms, rendered in the Prometheus text exposition
 * format. Families (name, help, up to two label names) are registered once; a series (one set of
 * label values) is looked up once and then updated through its handle.
 *
 * Thread notes: any thread may register, look up and update; tly_metrics_render may run on
 * another thread at the same time. Counter and gauge updates are single atomic operations (cheap
 * enough for a per-record hot path); histogram observations take the registry's mutex.
 */
#ifndef TLY_METRICS_H
#define TLY_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define TLY_METRICS_MAX_LABELS 2
#define TLY_METRICS_MAX_BUCKETS 24

struct tly_metrics;
struct tly_metric; /* a family */
struct tly_series; /* one series of a family */

struct tly_metrics *tly_metrics_new(void); /* NULL on OOM */
void tly_metrics_free(struct tly_metrics *m); /* accepts NULL; frees every family and series */

/*
 * Register a family. name must start with "tally_" and be a valid Prometheus name; labels is
 * NULL-terminated (at most TLY_METRICS_MAX_LABELS names, may be NULL for none). A histogram's
 * upper bounds are given in increasing order (the +Inf bucket is implicit). Every string is
 * copied. NULL on OOM or on an invalid argument (a programming error).
 */
struct tly_metric *tly_metrics_counter(struct tly_metrics *m, const char *name, const char *help,
				       const char *const *labels);
struct tly_metric *tly_metrics_gauge(struct tly_metrics *m, const char *name, const char *help,
				     const char *const *labels);
struct tly_metric *tly_metrics_histogram(struct tly_metrics *m, const char *name, const char *help,
					 const char *const *labels, const double *bounds,
					 size_t n_bounds);

/*
 * The series of family f with these label values (as many as the family has label names; NULL
 * when it has none), created on first use. The handle stays valid until tly_metrics_free. NULL
 * on OOM.
 */
struct tly_series *tly_metrics_series(struct tly_metric *f, const char *const *values);

/* Updates; each accepts a NULL series (a failed lookup) and then does nothing. */
void tly_metrics_add(struct tly_series *s, uint64_t n);     /* counter */
void tly_metrics_set(struct tly_series *s, int64_t v);      /* gauge; shows the series again */
void tly_metrics_unset(struct tly_series *s);               /* gauge: hide it until the next set */
void tly_metrics_observe(struct tly_series *s, double v);   /* histogram */

/* A counter's or a gauge's current value (tests and readiness checks). */
int64_t tly_metrics_value(const struct tly_series *s);

/*
 * The exposition text of every family in registration order (series in creation order): a
 * malloc'd NUL-terminated string in *out (caller frees) and its length. 0 or TLY_E_NOMEM.
 */
int tly_metrics_render(struct tly_metrics *m, char **out, size_t *len) TLY_MUST_CHECK;

#endif
