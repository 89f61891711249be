/* Loading the bad-bytes corpus: input files and their .expect sidecars. */
#include "corpus.h"

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	ck_assert_msg(f != NULL, "could not open \"%s\": %s", path, strerror(errno));
	size_t cap = 4096, n = 0;
	unsigned char *buf = malloc(cap);
	ck_assert_ptr_nonnull(buf);
	size_t got;
	while ((got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
		n += got;
		if (cap - n - 1 == 0)
			ck_assert_ptr_nonnull(buf = realloc(buf, cap *= 2));
	}
	ck_assert_msg(!ferror(f), "could not read \"%s\"", path);
	fclose(f);
	buf[n] = '\0';
	*len = n;
	return buf;
}

static void read_expect(const char *path, struct tly_corpus_case *c)
{
	size_t len;
	char *text = (char *)slurp(path, &len);
	for (char *save = NULL, *line = strtok_r(text, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save)) {
		if (strncmp(line, "error: ", 7) == 0 || strncmp(line, "status: ", 8) == 0)
			snprintf(c->error, sizeof(c->error), "%s", strchr(line, ' ') + 1);
		else if (strncmp(line, "text: ", 6) == 0)
			snprintf(c->text, sizeof(c->text), "%s", line + 6);
		else
			ck_abort_msg("%s: unknown line \"%s\"", path, line);
	}
	ck_assert_msg(c->error[0], "%s: no error: or status: line", path);
	free(text);
}

static int by_name(const void *a, const void *b)
{
	return strcmp(((const struct tly_corpus_case *)a)->name,
		      ((const struct tly_corpus_case *)b)->name);
}

size_t tly_test_corpus_load(const char *entry, struct tly_corpus_case **cases)
{
	const char *root = getenv("TALLY_CORPUS") ? getenv("TALLY_CORPUS") : "tests/corpus";
	char dir[512], path[1024];
	snprintf(dir, sizeof(dir), "%s/%s", root, entry);
	DIR *d = opendir(dir);
	ck_assert_msg(d != NULL, "could not open corpus directory \"%s\": %s", dir, strerror(errno));
	struct tly_corpus_case *v = NULL;
	size_t n = 0;
	struct dirent *de;
	while ((de = readdir(d)) != NULL) {
		const char *dot = strrchr(de->d_name, '.');
		if (de->d_name[0] == '.' || !dot || strcmp(dot, ".expect") == 0)
			continue;
		ck_assert_ptr_nonnull(v = realloc(v, (n + 1) * sizeof(*v)));
		struct tly_corpus_case *c = &v[n++];
		memset(c, 0, sizeof(*c));
		ck_assert_msg((size_t)(dot - de->d_name) < sizeof(c->name), "name too long: %s", de->d_name);
		memcpy(c->name, de->d_name, (size_t)(dot - de->d_name));
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		c->data = slurp(path, &c->len);
		snprintf(path, sizeof(path), "%s/%s.expect", dir, c->name);
		read_expect(path, c);
	}
	closedir(d);
	ck_assert_msg(n > 0, "corpus directory \"%s\" has no case", dir);
	qsort(v, n, sizeof(*v), by_name);
	*cases = v;
	return n;
}

void tly_test_corpus_free(struct tly_corpus_case *cases, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(cases[i].data);
	free(cases);
}
