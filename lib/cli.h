/* Command-line configuration shared by the programs: the precedence defaults < file < TALLY_* < --set. */
#ifndef TLY_CLI_H
#define TLY_CLI_H

#include <stddef.h>

#include "config.h"
#include "err.h"

/*
 * A configuration built from the defaults, then config_file (NULL: none), then the TALLY_*
 * variables of envp, then each "KEY=VALUE" of sets (n_sets of them; borrowed, not modified).
 * Returns it (caller owns it: tly_config_free) or NULL with errstr filled, naming the file, the
 * variable or the --set argument at fault.
 */
struct tly_config *tly_cli_config(const char *config_file, char *const *sets, size_t n_sets,
				  char *const *envp, char *errstr, size_t errlen);

/*
 * For programs that take no options (the benchmarks, the test runner): with -h or --help print
 * help to stdout and return 1 (exit 0); with any other argument print "unexpected argument" and
 * the help to stderr and return -1 (exit 2); with none return 0 (run).
 */
int tly_cli_help_only(int argc, char **argv, const char *help);

/*
 * SIGHUP: build the configuration again from the same sources (config_file, the TALLY_* variables
 * of envp, sets) and apply what can change in a running process: log.level. Logs the outcome; on
 * any failure (a missing or bad file, a bad value) the running configuration stays, and the line
 * says why. 0 when the new configuration was applied, else -1.
 */
int tly_cli_reload(const char *config_file, char *const *sets, size_t n_sets, char *const *envp);

#endif
