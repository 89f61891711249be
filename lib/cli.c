/* Command-line configuration: one precedence rule for every program. */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

struct tly_config *tly_cli_config(const char *config_file, char *const *sets, size_t n_sets,
				  char *const *envp, char *errstr, size_t errlen)
{
	char *key = NULL;
	struct tly_config *cfg = tly_config_new();
	if (!cfg) {
		snprintf(errstr, errlen, "out of memory");
		goto fail;
	}
	if (config_file && tly_config_load_file(cfg, config_file, errstr, errlen) != 0)
		goto fail;
	if (tly_config_load_env(cfg, envp, errstr, errlen) != 0)
		goto fail;
	for (size_t i = 0; i < n_sets; i++) {
		const char *eq = strchr(sets[i], '=');
		if (!eq || eq == sets[i]) {
			snprintf(errstr, errlen, "--set expects KEY=VALUE, got \"%s\"", sets[i]);
			goto fail;
		}
		if (!(key = strndup(sets[i], (size_t)(eq - sets[i])))) {
			snprintf(errstr, errlen, "out of memory");
			goto fail;
		}
		if (tly_config_set(cfg, key, eq + 1, errstr, errlen) != 0)
			goto fail;
		free(key);
		key = NULL;
	}
	return cfg;
fail:
	free(key);
	tly_config_free(cfg);
	return NULL;
}

int tly_cli_reload(const char *config_file, char *const *sets, size_t n_sets, char *const *envp)
{
	char errstr[1024] = "";
	enum tly_log_level level;
	static const char *const names[] = {"debug", "info", "warn", "error"};
	struct tly_config *cfg = tly_cli_config(config_file, sets, n_sets, envp, errstr, sizeof(errstr));
	if (cfg && tly_log_level_parse(tly_config_str(cfg, "log.level"), &level) != 0)
		snprintf(errstr, sizeof(errstr), "invalid log.level \"%s\"", tly_config_str(cfg, "log.level"));
	if (!cfg || errstr[0]) {
		tly_config_free(cfg);
		tly_warn("could not reload the configuration, keeping the running one",
			 "reason=\"%s\" log_level=%s", errstr, names[tly_log_get_level()]);
		return -1;
	}
	tly_config_free(cfg);
	tly_log_set_level(TLY_LOG_INFO); /* the line is written whatever the new level */
	tly_info("configuration reloaded", "log_level=%s", names[level]);
	tly_log_set_level(level);
	return 0;
}

int tly_cli_help_only(int argc, char **argv, const char *help)
{
	if (argc < 2)
		return 0;
	if (argc == 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
		fputs(help, stdout);
		return 1;
	}
	fprintf(stderr, "%s: unexpected argument \"%s\"\n\n%s", argv[0], argv[1], help);
	return -1;
}
