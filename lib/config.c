/* The settings table and a configuration built from defaults, a file, the environment and overrides. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "log.h"

#define KAFKA_PREFIX "kafka."
#define MAX_LINE 4096 /* bytes of one config file line, newline included */

/* The one table of settings: --help and the README's configuration section are generated from it. */
static const struct tly_setting settings[] = {
	{"log.level", TLY_SET_LOGLEVEL, "info", 0, 0, "minimum log level: debug, info, warn or error"},
	{"database.url", TLY_SET_STR, NULL, 0, 0,
	 "libpq connection string or URI of the Tally database"},
	{"kafka.bootstrap.servers", TLY_SET_STR, NULL, 0, 0,
	 "Kafka brokers; every kafka.* key goes to librdkafka unchanged (SASL, TLS, timeouts…)"},
	{"topics.events", TLY_SET_STR, "tally.events", 0, 0, "topic of chat and billing events"},
	{"topics.ledger", TLY_SET_STR, "tally.ledger", 0, 0, "topic the ledger publishes its entries to"},
	{"topics.catalog", TLY_SET_STR, "tally.catalog", 0, 0, "topic of plan catalog events"},
	{"topics.deadletter", TLY_SET_STR, "tally.deadletter", 0, 0,
	 "topic quarantined input is copied to"},
	{"topics.partitions", TLY_SET_INT, "12", 1, 100000,
	 "partition count of tally.events and tally.ledger (checked at start-up)"},
	{"ledger.group.id", TLY_SET_STR, "tally-ledger", 0, 0, "consumer group of tally-ledger"},
	{"ledger.batch.max.events", TLY_SET_INT, "1000", 1, 1000000,
	 "input records (all partitions together) applied in one PostgreSQL transaction; "
	 "up to 4x as many while a backlog lasts"},
	{"ledger.batch.max.ms", TLY_SET_INT, "50", 1, 60000,
	 "longest records wait for more under steady input; with none ready they commit at once"},
	{"ledger.writers", TLY_SET_INT, "1", 1, 16,
	 "PostgreSQL connections of tally-ledger committing at once, each the partitions p with "
	 "p % ledger.writers equal to its number (one transaction each per group)"},
	{"ledger.writers.backlog", TLY_SET_INT, "1", 1, 16,
	 "writer connections of tally-ledger while it works off a backlog (groups grown past "
	 "ledger.batch.max.events), ledger.writers otherwise; 2 pays only where a core would idle"},
	{"ledger.lock.timeout.ms", TLY_SET_INT, "5000", 1, 3600000,
	 "longest a group's transaction waits for another owner's new keys before its offsets' "
	 "compare-and-set (lock_timeout; then it reloads and retries); 0 (no bound) is refused"},
	{"ledger.overdraft.limit", TLY_SET_INT, "0", 0, INT64_MAX,
	 "tokens a tenant's available balance may go below zero by reservations"},
	{"projector.group.id", TLY_SET_STR, "tally-projector", 0, 0,
	 "consumer group of tally-projector"},
	{"http.listen", TLY_SET_STR, "127.0.0.1:9464", 0, 0,
	 "address of /healthz, /readyz and /metrics (host:port; empty disables)"},
	{"readyz.max.lag", TLY_SET_INT, "10000", 0, INT64_MAX,
	 "consumer lag (records) above which /readyz answers 503"},
	{"shutdown.timeout.ms", TLY_SET_INT, "10000", 0, 600000,
	 "how long SIGTERM waits for the current batch to commit and messages to flush"},
};

#define N_SETTINGS (sizeof(settings) / sizeof(settings[0]))

struct kv {
	char *key;
	char *value;
};

struct tly_config {
	char *values[N_SETTINGS]; /* NULL: unset; owned */
	struct kv *extra;         /* kafka.* keys not in the table, insertion order; owned */
	size_t n_extra, cap_extra;
};

const struct tly_setting *tly_settings(size_t *n)
{
	*n = N_SETTINGS;
	return settings;
}

static int find_setting(const char *key)
{
	for (size_t i = 0; i < N_SETTINGS; i++) {
		if (strcmp(settings[i].key, key) == 0)
			return (int)i;
	}
	return -1;
}

static const char *type_name(enum tly_setting_type t)
{
	switch (t) {
	case TLY_SET_STR: return "string";
	case TLY_SET_INT: return "integer";
	case TLY_SET_BOOL: return "boolean";
	case TLY_SET_LOGLEVEL: return "log level";
	}
	return "?";
}

static int parse_int(const char *s, int64_t *out)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0')
		return -1;
	*out = v;
	return 0;
}

static int parse_bool(const char *s, bool *out)
{
	if (!strcmp(s, "true") || !strcmp(s, "1") || !strcmp(s, "yes") || !strcmp(s, "on"))
		*out = true;
	else if (!strcmp(s, "false") || !strcmp(s, "0") || !strcmp(s, "no") || !strcmp(s, "off"))
		*out = false;
	else
		return -1;
	return 0;
}

/* Check value against the setting's type and bounds; 0 or TLY_E_CONFIG with errstr. */
static int check_value(const struct tly_setting *s, const char *value, char *errstr, size_t errlen)
{
	int64_t i;
	bool b;
	enum tly_log_level lvl;
	switch (s->type) {
	case TLY_SET_STR:
		return 0;
	case TLY_SET_INT:
		if (parse_int(value, &i) != 0) {
			snprintf(errstr, errlen, "invalid value for \"%s\": \"%s\" is not an integer",
				 s->key, value);
			return TLY_E_CONFIG;
		}
		if (i < s->min || i > s->max) {
			snprintf(errstr, errlen,
				 "invalid value for \"%s\": %" PRId64 " is outside [%" PRId64
				 ", %" PRId64 "]",
				 s->key, i, s->min, s->max);
			return TLY_E_CONFIG;
		}
		return 0;
	case TLY_SET_BOOL:
		if (parse_bool(value, &b) != 0) {
			snprintf(errstr, errlen,
				 "invalid value for \"%s\": \"%s\" is not a boolean (true or false)",
				 s->key, value);
			return TLY_E_CONFIG;
		}
		return 0;
	case TLY_SET_LOGLEVEL:
		if (tly_log_level_parse(value, &lvl) != 0) {
			snprintf(errstr, errlen,
				 "invalid value for \"%s\": \"%s\" is not one of debug, info, warn, error",
				 s->key, value);
			return TLY_E_CONFIG;
		}
		return 0;
	}
	return TLY_E_CONFIG;
}

struct tly_config *tly_config_new(void)
{
	struct tly_config *cfg = calloc(1, sizeof(*cfg));
	if (!cfg)
		return NULL;
	for (size_t i = 0; i < N_SETTINGS; i++) {
		if (settings[i].def && !(cfg->values[i] = strdup(settings[i].def))) {
			tly_config_free(cfg);
			return NULL;
		}
	}
	return cfg;
}

void tly_config_free(struct tly_config *cfg)
{
	if (!cfg)
		return;
	for (size_t i = 0; i < N_SETTINGS; i++)
		free(cfg->values[i]);
	for (size_t i = 0; i < cfg->n_extra; i++) {
		free(cfg->extra[i].key);
		free(cfg->extra[i].value);
	}
	free(cfg->extra);
	free(cfg);
}

static int set_extra(struct tly_config *cfg, const char *key, const char *value)
{
	char *v = strdup(value);
	if (!v)
		return TLY_E_NOMEM;
	for (size_t i = 0; i < cfg->n_extra; i++) {
		if (strcmp(cfg->extra[i].key, key) == 0) {
			free(cfg->extra[i].value);
			cfg->extra[i].value = v;
			return 0;
		}
	}
	if (cfg->n_extra == cfg->cap_extra) {
		size_t cap = cfg->cap_extra ? cfg->cap_extra * 2 : 8;
		struct kv *grown = realloc(cfg->extra, cap * sizeof(*grown));
		if (!grown) {
			free(v);
			return TLY_E_NOMEM;
		}
		cfg->extra = grown;
		cfg->cap_extra = cap;
	}
	char *k = strdup(key);
	if (!k) {
		free(v);
		return TLY_E_NOMEM;
	}
	cfg->extra[cfg->n_extra].key = k;
	cfg->extra[cfg->n_extra].value = v;
	cfg->n_extra++;
	return 0;
}

int tly_config_set(struct tly_config *cfg, const char *key, const char *value, char *errstr,
		   size_t errlen)
{
	int idx = find_setting(key);
	if (idx < 0) {
		if (strncmp(key, KAFKA_PREFIX, strlen(KAFKA_PREFIX)) == 0 &&
		    key[strlen(KAFKA_PREFIX)] != '\0') {
			int rc = set_extra(cfg, key, value);
			if (rc != 0)
				snprintf(errstr, errlen, "out of memory");
			return rc;
		}
		snprintf(errstr, errlen, "unknown setting \"%s\"", key);
		return TLY_E_CONFIG;
	}
	int rc = check_value(&settings[idx], value, errstr, errlen);
	if (rc != 0)
		return rc;
	char *v = strdup(value);
	if (!v) {
		snprintf(errstr, errlen, "out of memory");
		return TLY_E_NOMEM;
	}
	free(cfg->values[idx]);
	cfg->values[idx] = v;
	return 0;
}

static char *trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *end = s + strlen(s);
	while (end > s && isspace((unsigned char)end[-1]))
		*--end = '\0';
	return s;
}

int tly_config_load_file(struct tly_config *cfg, const char *path, char *errstr, size_t errlen)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		snprintf(errstr, errlen, "could not open config file \"%s\": %s", path,
			 strerror(errno));
		return TLY_E_CONFIG;
	}
	char *line = NULL;
	size_t cap = 0;
	ssize_t len;
	char inner[512];
	int lineno = 0;
	int rc = 0;
	while ((len = getline(&line, &cap, f)) >= 0) {
		lineno++;
		if (len >= MAX_LINE) {
			snprintf(errstr, errlen, "%s:%d: line too long", path, lineno);
			rc = TLY_E_CONFIG;
			break;
		}
		if (strlen(line) != (size_t)len) {
			snprintf(errstr, errlen, "%s:%d: NUL byte in line", path, lineno);
			rc = TLY_E_CONFIG;
			break;
		}
		char *hash = strchr(line, '#');
		if (hash)
			*hash = '\0';
		char *s = trim(line);
		if (*s == '\0')
			continue;
		char *eq = strchr(s, '=');
		if (!eq) {
			snprintf(errstr, errlen, "%s:%d: expected \"key = value\"", path, lineno);
			rc = TLY_E_CONFIG;
			break;
		}
		*eq = '\0';
		char *key = trim(s);
		char *value = trim(eq + 1);
		rc = tly_config_set(cfg, key, value, inner, sizeof(inner));
		if (rc != 0) {
			snprintf(errstr, errlen, "%s:%d: %s", path, lineno, inner);
			break;
		}
	}
	if (rc == 0 && ferror(f)) {
		snprintf(errstr, errlen, "could not read config file \"%s\": %s", path,
			 strerror(errno));
		rc = TLY_E_CONFIG;
	}
	free(line);
	fclose(f);
	return rc;
}

int tly_config_load_env(struct tly_config *cfg, char *const *envp, char *errstr, size_t errlen)
{
	static const char prefix[] = "TALLY_";
	char key[256];
	char inner[512];
	for (; envp && *envp; envp++) {
		const char *e = *envp;
		if (strncmp(e, prefix, sizeof(prefix) - 1) != 0)
			continue;
		const char *name = e + sizeof(prefix) - 1;
		const char *eq = strchr(name, '=');
		if (!eq || eq == name || (size_t)(eq - name) >= sizeof(key))
			continue;
		size_t n = (size_t)(eq - name);
		for (size_t i = 0; i < n; i++)
			key[i] = name[i] == '_' ? '.' : (char)tolower((unsigned char)name[i]);
		key[n] = '\0';
		/* A table key with '_' in its own name is matched with '_' and '.' treated alike. */
		for (size_t i = 0; i < N_SETTINGS; i++) {
			const char *k = settings[i].key;
			if (strlen(k) != n)
				continue;
			bool same = true;
			for (size_t j = 0; j < n && same; j++)
				same = (k[j] == '_' ? '.' : k[j]) == key[j];
			if (same)
				memcpy(key, k, n);
		}
		bool ours = find_setting(key) >= 0 || strncmp(key, KAFKA_PREFIX, 6) == 0;
		if (!ours)
			continue; /* TALLY_BIN and other variables that are not settings */
		int rc = tly_config_set(cfg, key, eq + 1, inner, sizeof(inner));
		if (rc != 0) {
			snprintf(errstr, errlen, "environment variable %.*s: %s", (int)(eq - e), e,
				 inner);
			return rc;
		}
	}
	return 0;
}

static int must_find(const char *key)
{
	int idx = find_setting(key);
	if (idx < 0) {
		tly_error("unknown setting requested by the program", "key=%s", key);
		abort();
	}
	return idx;
}

const char *tly_config_str(const struct tly_config *cfg, const char *key)
{
	return cfg->values[must_find(key)];
}

int64_t tly_config_int(const struct tly_config *cfg, const char *key)
{
	int64_t v = 0;
	const char *s = cfg->values[must_find(key)];
	if (s && parse_int(s, &v) != 0)
		v = 0;
	return v;
}

bool tly_config_bool(const struct tly_config *cfg, const char *key)
{
	bool b = false;
	const char *s = cfg->values[must_find(key)];
	if (s && parse_bool(s, &b) != 0)
		b = false;
	return b;
}

int tly_config_foreach(const struct tly_config *cfg, const char *prefix,
		       int (*fn)(const char *key, const char *value, void *ud), void *ud)
{
	size_t plen = strlen(prefix);
	for (size_t i = 0; i < N_SETTINGS; i++) {
		if (cfg->values[i] && strncmp(settings[i].key, prefix, plen) == 0) {
			int rc = fn(settings[i].key, cfg->values[i], ud);
			if (rc != 0)
				return rc;
		}
	}
	for (size_t i = 0; i < cfg->n_extra; i++) {
		if (strncmp(cfg->extra[i].key, prefix, plen) == 0) {
			int rc = fn(cfg->extra[i].key, cfg->extra[i].value, ud);
			if (rc != 0)
				return rc;
		}
	}
	return 0;
}

void tly_config_print_help(FILE *out)
{
	fprintf(out, "Settings (config file \"key = value\", or TALLY_KEY_WITH_UNDERSCORES=value):\n");
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const struct tly_setting *s = &settings[i];
		fprintf(out, "  %-26s %-9s %s", s->key, type_name(s->type), s->doc);
		if (s->def)
			fprintf(out, " (default: %s)", *s->def ? s->def : "\"\"");
		fputc('\n', out);
	}
}

void tly_config_print_markdown(FILE *out)
{
	fprintf(out, "| key | type | default | environment | meaning |\n|---|---|---|---|---|\n");
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const struct tly_setting *s = &settings[i];
		char env[128];
		size_t n = 0;
		n += (size_t)snprintf(env, sizeof(env), "TALLY_");
		for (const char *k = s->key; *k && n + 1 < sizeof(env); k++)
			env[n++] = *k == '.' ? '_' : (char)toupper((unsigned char)*k);
		env[n] = '\0';
		fprintf(out, "| `%s` | %s | %s | `%s` | %s |\n", s->key, type_name(s->type),
			s->def ? (*s->def ? s->def : "(empty)") : "(none)", env, s->doc);
	}
}
