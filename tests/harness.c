/* Harness pieces shared by every integration suite (the services are in harness_pg.c, harness_broker.c). */
#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

const char *tly_test_bin(const char *program)
{
	static char path[512];
	const char *dir = getenv("TALLY_BIN");
	snprintf(path, sizeof(path), "%s/%s", dir && *dir ? dir : "build/bin", program);
	return path;
}
