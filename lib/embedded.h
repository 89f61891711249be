/* Schema and migration files compiled into the library by scripts/embed (see the Makefile). */
#ifndef TLY_EMBEDDED_H
#define TLY_EMBEDDED_H

#include <stddef.h>

struct tly_embedded {
	const char *name; /* file basename, e.g. "TokensReserved.avsc"; NULL ends a table */
	const char *data; /* file contents, NUL-terminated */
	size_t len;       /* bytes, without the NUL */
};

extern const struct tly_embedded tly_embedded_schemas[];    /* schemas/NAME.avsc: current versions */
extern const struct tly_embedded tly_embedded_released[];   /* schemas/released/: every released version */
extern const struct tly_embedded tly_embedded_migrations[]; /* migrations/NNNN_name.sql, in order */

#endif
