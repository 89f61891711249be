/* Harness pieces shared by every integration suite (the services are in harness_pg.c, harness_broker.c). */
#include "harness.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const char *tly_test_bin(const char *program)
{
	static char path[512];
	const char *dir = getenv("TALLY_BIN");
	snprintf(path, sizeof(path), "%s/%s", dir && *dir ? dir : "build/bin", program);
	return path;
}

char *tly_test_read_file(const char *path)
{
	char *buf = NULL, chunk[4096];
	size_t len = 0, n;
	FILE *mem = open_memstream(&buf, &len);
	ck_assert_ptr_nonnull(mem);
	FILE *f = fopen(path, "r");
	while (f && (n = fread(chunk, 1, sizeof(chunk), f)) > 0)
		ck_assert_uint_eq(fwrite(chunk, 1, n, mem), n);
	if (f)
		fclose(f);
	ck_assert_int_eq(fclose(mem), 0);
	return buf;
}

int tly_test_log_count(const char *path, const char *needle)
{
	char *buf = tly_test_read_file(path);
	int count = 0;
	for (const char *s = buf; (s = strstr(s, needle)) != NULL; s += strlen(needle))
		count++;
	free(buf);
	return count;
}

int tly_test_log_lines(const char *path, const char *needle, const char *without)
{
	char line[4096];
	int count = 0;
	FILE *f = fopen(path, "r");
	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		count += strstr(line, needle) && (!without || !strstr(line, without));
	fclose(f);
	return count;
}

void tly_test_wait_log(const char *path, const char *needle, int count, int timeout_ms)
{
	for (int waited = 0; tly_test_log_count(path, needle) < count; waited += 100) {
		ck_assert_msg(waited < timeout_ms, "\"%s\" not %d times in %s within %d ms", needle,
			      count, path, timeout_ms);
		usleep(100000);
	}
}
