/*
 * The bad-bytes corpus (tests/corpus/<entry point>/): hostile inputs, each a file NAME.EXT with a
 * sidecar NAME.expect of "key: value" lines saying what the entry point must answer:
 *   error: <tly_err_name of the expected error, or ok>     (avro, ndjson, config)
 *   status: <HTTP status, or none: no answer before the connection's deadline>   (http)
 *   text: <a substring of the error message or response>   (optional)
 * See tests/corpus/README.md.
 */
#ifndef TLY_TEST_CORPUS_H
#define TLY_TEST_CORPUS_H

#include <stddef.h>

struct tly_corpus_case {
	char name[128];      /* file name without extension */
	unsigned char *data; /* the input (malloc'd, NUL-terminated past len) */
	size_t len;
	char error[64];      /* "error:" or "status:" value */
	char text[256];      /* "text:" value, "" when absent */
};

/*
 * Every case of tests/corpus/<entry> ($TALLY_CORPUS overrides tests/corpus), sorted by name; fails
 * the current test when the directory is missing or empty, or a case has no sidecar.
 */
size_t tly_test_corpus_load(const char *entry, struct tly_corpus_case **cases);
void tly_test_corpus_free(struct tly_corpus_case *cases, size_t n);

#endif
