/* Command-line configuration: one precedence rule for every program. */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
