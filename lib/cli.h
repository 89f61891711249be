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

#endif
