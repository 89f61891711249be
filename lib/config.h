/*
 * Settings: one declarative table (key, type, default, doc), loaded from defaults, then a config
 * file, then TALLY_* environment variables, then explicit overrides. Every "kafka.*" key is kept
 * verbatim for librdkafka (checked by tly_kafka_conf_new, which shows librdkafka's error text).
 */
#ifndef TLY_CONFIG_H
#define TLY_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"

enum tly_setting_type { TLY_SET_STR, TLY_SET_INT, TLY_SET_BOOL, TLY_SET_LOGLEVEL };

struct tly_setting {
	const char *key;            /* "database.url" */
	enum tly_setting_type type;
	const char *def;            /* default as text; NULL: no default (unset) */
	int64_t min, max;           /* bounds for TLY_SET_INT */
	const char *doc;            /* one line */
};

struct tly_config;

/* The settings table, in documentation order. */
const struct tly_setting *tly_settings(size_t *n);

/* A configuration holding every default. NULL on OOM. */
struct tly_config *tly_config_new(void);
void tly_config_free(struct tly_config *cfg); /* accepts NULL */

/*
 * Set one key from text. Unknown keys (other than kafka.*) and values of the wrong type fail with
 * TLY_E_CONFIG and a message naming the key in errstr.
 */
int tly_config_set(struct tly_config *cfg, const char *key, const char *value, char *errstr,
		   size_t errlen) TLY_MUST_CHECK;

/* "key = value" lines; '#' starts a comment; blank lines ignored. Errors name file and line. */
int tly_config_load_file(struct tly_config *cfg, const char *path, char *errstr,
			 size_t errlen) TLY_MUST_CHECK;

/*
 * TALLY_<KEY> variables from envp: the key is lower-cased and '_' becomes '.', so
 * TALLY_DATABASE_URL sets database.url and TALLY_KAFKA_SECURITY_PROTOCOL sets
 * kafka.security.protocol. Keys whose own name has an underscore are matched against the table.
 */
int tly_config_load_env(struct tly_config *cfg, char *const *envp, char *errstr,
			size_t errlen) TLY_MUST_CHECK;

/* Typed getters; the key must be in the table (a programming error otherwise: aborts). */
const char *tly_config_str(const struct tly_config *cfg, const char *key); /* NULL if unset */
int64_t tly_config_int(const struct tly_config *cfg, const char *key);
bool tly_config_bool(const struct tly_config *cfg, const char *key);

/* Calls fn for every set key starting with prefix, in insertion order; stops on non-zero. */
int tly_config_foreach(const struct tly_config *cfg, const char *prefix,
		       int (*fn)(const char *key, const char *value, void *ud), void *ud);

/* The table as a help text (key, type, default, doc), and as a Markdown table for the README. */
void tly_config_print_help(FILE *out);
void tly_config_print_markdown(FILE *out);

#endif
