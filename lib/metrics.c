/* The metrics registry: families, their series, and their Prometheus text rendering. */
#include "metrics.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum kind { KIND_COUNTER, KIND_GAUGE, KIND_HISTOGRAM };

struct tly_series {
	struct tly_series *next;               /* the family's series, in creation order */
	struct tly_metric *family;
	char *values[TLY_METRICS_MAX_LABELS];  /* owned */
	_Atomic int64_t value;                 /* counter or gauge */
	atomic_bool hidden;                    /* gauge: not rendered (unset) */
	uint64_t buckets[TLY_METRICS_MAX_BUCKETS + 1]; /* histogram, under the registry's mutex; last: +Inf */
	uint64_t count;
	double sum;
};

struct tly_metric {
	struct tly_metric *next;               /* the registry's families, in registration order */
	struct tly_metrics *reg;
	enum kind kind;
	char *name, *help;                     /* owned */
	char *labels[TLY_METRICS_MAX_LABELS];  /* owned */
	size_t n_labels;
	double bounds[TLY_METRICS_MAX_BUCKETS];
	size_t n_bounds;
	struct tly_series *series, *last;
};

struct tly_metrics {
	pthread_mutex_t mu;  /* guards the lists and the histograms' fields */
	struct tly_metric *families, *last;
};

struct tly_metrics *tly_metrics_new(void)
{
	struct tly_metrics *m = calloc(1, sizeof(*m));
	if (!m)
		return NULL;
	if (pthread_mutex_init(&m->mu, NULL) != 0) {
		free(m);
		return NULL;
	}
	return m;
}

static void free_family(struct tly_metric *f)
{
	struct tly_series *s = f->series;
	while (s) {
		struct tly_series *next = s->next;
		for (size_t i = 0; i < TLY_METRICS_MAX_LABELS; i++)
			free(s->values[i]);
		free(s);
		s = next;
	}
	for (size_t i = 0; i < TLY_METRICS_MAX_LABELS; i++)
		free(f->labels[i]);
	free(f->name);
	free(f->help);
	free(f);
}

void tly_metrics_free(struct tly_metrics *m)
{
	if (!m)
		return;
	struct tly_metric *f = m->families;
	while (f) {
		struct tly_metric *next = f->next;
		free_family(f);
		f = next;
	}
	pthread_mutex_destroy(&m->mu);
	free(m);
}

static bool valid_name(const char *name)
{
	if (!name || strncmp(name, "tally_", 6) != 0)
		return false;
	for (const char *c = name; *c; c++)
		if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || *c == '_' ||
		      (*c >= '0' && *c <= '9')))
			return false;
	return true;
}

static struct tly_metric *add_family(struct tly_metrics *m, enum kind kind, const char *name,
				     const char *help, const char *const *labels,
				     const double *bounds, size_t n_bounds)
{
	struct tly_metric *f = NULL;
	if (!m || !valid_name(name) || !help || n_bounds > TLY_METRICS_MAX_BUCKETS)
		return NULL;
	for (size_t i = 1; i < n_bounds; i++)
		if (!(bounds[i] > bounds[i - 1]))
			return NULL;
	if (!(f = calloc(1, sizeof(*f))) || !(f->name = strdup(name)) || !(f->help = strdup(help)))
		goto fail;
	for (; labels && labels[f->n_labels]; f->n_labels++) {
		if (f->n_labels == TLY_METRICS_MAX_LABELS ||
		    !(f->labels[f->n_labels] = strdup(labels[f->n_labels])))
			goto fail;
	}
	f->kind = kind;
	f->reg = m;
	if (n_bounds)
		memcpy(f->bounds, bounds, n_bounds * sizeof(*bounds));
	f->n_bounds = n_bounds;
	pthread_mutex_lock(&m->mu);
	if (m->last)
		m->last->next = f;
	else
		m->families = f;
	m->last = f;
	pthread_mutex_unlock(&m->mu);
	return f;
fail:
	if (f)
		free_family(f);
	return NULL;
}

struct tly_metric *tly_metrics_counter(struct tly_metrics *m, const char *name, const char *help,
				       const char *const *labels)
{
	return add_family(m, KIND_COUNTER, name, help, labels, NULL, 0);
}

struct tly_metric *tly_metrics_gauge(struct tly_metrics *m, const char *name, const char *help,
				     const char *const *labels)
{
	return add_family(m, KIND_GAUGE, name, help, labels, NULL, 0);
}

struct tly_metric *tly_metrics_histogram(struct tly_metrics *m, const char *name, const char *help,
					 const char *const *labels, const double *bounds,
					 size_t n_bounds)
{
	return add_family(m, KIND_HISTOGRAM, name, help, labels, bounds, n_bounds);
}

static bool same_values(const struct tly_series *s, const char *const *values, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(s->values[i], values[i]) != 0)
			return false;
	return true;
}

struct tly_series *tly_metrics_series(struct tly_metric *f, const char *const *values)
{
	struct tly_series *s = NULL;
	if (!f || (f->n_labels && !values))
		return NULL;
	for (size_t i = 0; i < f->n_labels; i++)
		if (!values[i])
			return NULL;
	pthread_mutex_lock(&f->reg->mu);
	for (s = f->series; s; s = s->next)
		if (same_values(s, values, f->n_labels))
			goto out;
	if (!(s = calloc(1, sizeof(*s))))
		goto out;
	for (size_t i = 0; i < f->n_labels; i++) {
		if (!(s->values[i] = strdup(values[i]))) {
			for (size_t k = 0; k < i; k++)
				free(s->values[k]);
			free(s);
			s = NULL;
			goto out;
		}
	}
	s->family = f;
	if (f->last)
		f->last->next = s;
	else
		f->series = s;
	f->last = s;
out:
	pthread_mutex_unlock(&f->reg->mu);
	return s;
}

void tly_metrics_add(struct tly_series *s, uint64_t n)
{
	if (s)
		atomic_fetch_add_explicit(&s->value, (int64_t)n, memory_order_relaxed);
}

void tly_metrics_set(struct tly_series *s, int64_t v)
{
	if (!s)
		return;
	atomic_store_explicit(&s->value, v, memory_order_relaxed);
	atomic_store_explicit(&s->hidden, false, memory_order_relaxed);
}

void tly_metrics_unset(struct tly_series *s)
{
	if (s)
		atomic_store_explicit(&s->hidden, true, memory_order_relaxed);
}

void tly_metrics_observe(struct tly_series *s, double v)
{
	if (!s)
		return;
	struct tly_metric *f = s->family;
	size_t b = 0;
	while (b < f->n_bounds && v > f->bounds[b])
		b++;
	pthread_mutex_lock(&f->reg->mu);
	s->buckets[b]++;
	s->count++;
	s->sum += v;
	pthread_mutex_unlock(&f->reg->mu);
}

int64_t tly_metrics_value(const struct tly_series *s)
{
	return s ? atomic_load_explicit(&s->value, memory_order_relaxed) : 0;
}

/* A label value with backslash, double quote and newline escaped, as the format requires. */
static void put_escaped(FILE *out, const char *v)
{
	for (; *v; v++) {
		if (*v == '\\')
			fputs("\\\\", out);
		else if (*v == '"')
			fputs("\\\"", out);
		else if (*v == '\n')
			fputs("\\n", out);
		else
			fputc(*v, out);
	}
}

/* {a="x",b="y"} with an optional extra le label; nothing when there is no label at all. */
static void put_labels(FILE *out, const struct tly_series *s, const char *le)
{
	const struct tly_metric *f = s->family;
	if (f->n_labels == 0 && !le)
		return;
	fputc('{', out);
	for (size_t i = 0; i < f->n_labels; i++) {
		fprintf(out, "%s%s=\"", i ? "," : "", f->labels[i]);
		put_escaped(out, s->values[i]);
		fputc('"', out);
	}
	if (le)
		fprintf(out, "%sle=\"%s\"", f->n_labels ? "," : "", le);
	fputc('}', out);
}

static void put_histogram(FILE *out, const struct tly_series *s)
{
	const struct tly_metric *f = s->family;
	char le[32];
	uint64_t cumulative = 0;
	for (size_t b = 0; b <= f->n_bounds; b++) {
		cumulative += s->buckets[b];
		if (b < f->n_bounds)
			snprintf(le, sizeof(le), "%g", f->bounds[b]);
		else
			snprintf(le, sizeof(le), "+Inf");
		fprintf(out, "%s_bucket", f->name);
		put_labels(out, s, le);
		fprintf(out, " %llu\n", (unsigned long long)cumulative);
	}
	fprintf(out, "%s_sum", f->name);
	put_labels(out, s, NULL);
	fprintf(out, " %.17g\n", s->sum);
	fprintf(out, "%s_count", f->name);
	put_labels(out, s, NULL);
	fprintf(out, " %llu\n", (unsigned long long)s->count);
}

int tly_metrics_render(struct tly_metrics *m, char **out, size_t *len)
{
	static const char *const type_names[] = {"counter", "gauge", "histogram"};
	char *buf = NULL;
	size_t n = 0;
	FILE *f = open_memstream(&buf, &n);
	if (!f)
		return TLY_E_NOMEM;
	pthread_mutex_lock(&m->mu);
	for (const struct tly_metric *fam = m->families; fam; fam = fam->next) {
		fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", fam->name, fam->help, fam->name,
			type_names[fam->kind]);
		for (const struct tly_series *s = fam->series; s; s = s->next) {
			if (fam->kind == KIND_HISTOGRAM) {
				put_histogram(f, s);
				continue;
			}
			if (fam->kind == KIND_GAUGE &&
			    atomic_load_explicit(&s->hidden, memory_order_relaxed))
				continue;
			fputs(fam->name, f);
			put_labels(f, s, NULL);
			fprintf(f, " %lld\n",
				(long long)atomic_load_explicit(&s->value, memory_order_relaxed));
		}
	}
	pthread_mutex_unlock(&m->mu);
	bool failed = ferror(f) != 0;
	if (fclose(f) != 0 || failed || !buf) {
		free(buf);
		return TLY_E_NOMEM;
	}
	*out = buf;
	*len = n;
	return 0;
}
