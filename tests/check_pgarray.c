/*
 * Suite "pgarray": lib/pgarray's binary arrays, built and read back, byte for byte against
 * array_send's form as PostgreSQL 15 writes it (the bytes below), and malformed arrays refused.
 * That the server reads what it builds is shown through the ledger's packed inputs (suites
 * ledger, audit, migrate).
 */
#include <check.h>
#include <string.h>

#include "pgarray.h"
#include "suites.h"

/* SELECT array_send('{7,NULL}'::int8[]) */
static const unsigned char int8_7_null[] = {0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 20, 0, 0, 0, 2,
					    0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7,
					    0xff, 0xff, 0xff, 0xff};
/* SELECT array_send('{}'::bytea[]) */
static const unsigned char bytea_empty[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 17};

START_TEST(test_built_as_postgres_sends)
{
	struct tly_pgarray *a = tly_pgarray_new();
	ck_assert_ptr_nonnull(a);
	size_t len;
	tly_pgarray_begin(a, TLY_PGARRAY_INT8);
	tly_pgarray_int8(a, 7);
	tly_pgarray_null(a);
	const void *v = tly_pgarray_value(a, &len);
	ck_assert_ptr_nonnull(v);
	ck_assert_uint_eq(len, sizeof(int8_7_null));
	ck_assert_mem_eq(v, int8_7_null, len);
	tly_pgarray_begin(a, TLY_PGARRAY_BYTEA);
	v = tly_pgarray_value(a, &len);
	ck_assert_ptr_nonnull(v);
	ck_assert_uint_eq(len, sizeof(bytea_empty));
	ck_assert_mem_eq(v, bytea_empty, len);
	tly_pgarray_free(a);
	tly_pgarray_free(NULL);
}
END_TEST

START_TEST(test_round_trip)
{
	struct tly_pgarray *a = tly_pgarray_new();
	ck_assert_ptr_nonnull(a);
	static const char *const elems[] = {"", "a", NULL, "longer value \x00 with a nul"};
	static const int lens[] = {0, 1, -1, 25};
	tly_pgarray_begin(a, TLY_PGARRAY_BYTEA);
	for (int i = 0; i < 4; i++) {
		if (elems[i])
			tly_pgarray_add(a, elems[i], (size_t)lens[i]);
		else
			tly_pgarray_null(a);
	}
	size_t len;
	const void *v = tly_pgarray_value(a, &len);
	ck_assert_ptr_nonnull(v);
	struct tly_pgarray_reader r;
	ck_assert_int_eq(tly_pgarray_open(&r, v, len, TLY_PGARRAY_BYTEA), 4);
	for (int i = 0; i < 4; i++) {
		const char *p;
		int n;
		ck_assert_int_eq(tly_pgarray_next(&r, &p, &n), 1);
		ck_assert_int_eq(n, lens[i]);
		if (n > 0)
			ck_assert_mem_eq(p, elems[i], (size_t)n);
	}
	const char *p;
	int n;
	ck_assert_int_eq(tly_pgarray_next(&r, &p, &n), 0);
	/* the wrong element type is refused */
	ck_assert_int_eq(tly_pgarray_open(&r, v, len, TLY_PGARRAY_UUID), TLY_E_CORRUPT);
	tly_pgarray_free(a);
}
END_TEST

START_TEST(test_malformed_refused)
{
	struct tly_pgarray_reader r;
	const char *p;
	int n;
	unsigned char b[sizeof(int8_7_null)];
	/* cut anywhere: refused at open or at an element, never read past the end */
	for (size_t cut = 0; cut < sizeof(int8_7_null); cut++) {
		int rc = tly_pgarray_open(&r, int8_7_null, cut, TLY_PGARRAY_INT8);
		while (rc >= 0 && (rc = tly_pgarray_next(&r, &p, &n)) == 1)
			ck_assert(n < 0 || p + n <= (const char *)int8_7_null + cut);
		ck_assert_msg(rc == TLY_E_CORRUPT, "cut at %zu not refused", cut);
	}
	/* two dimensions; an element longer than the value; bytes after the last element */
	memcpy(b, int8_7_null, sizeof(b));
	b[3] = 2;
	ck_assert_int_eq(tly_pgarray_open(&r, b, sizeof(b), TLY_PGARRAY_INT8), TLY_E_CORRUPT);
	memcpy(b, int8_7_null, sizeof(b));
	b[23] = 0x7f;
	ck_assert_int_eq(tly_pgarray_open(&r, b, sizeof(b), TLY_PGARRAY_INT8), 2);
	ck_assert_int_eq(tly_pgarray_next(&r, &p, &n), TLY_E_CORRUPT);
	memcpy(b, int8_7_null, sizeof(b));
	b[15] = 1; /* one element, then 4 bytes left over */
	ck_assert_int_eq(tly_pgarray_open(&r, b, sizeof(b), TLY_PGARRAY_INT8), 1);
	ck_assert_int_eq(tly_pgarray_next(&r, &p, &n), 1);
	ck_assert_int_eq(tly_pgarray_next(&r, &p, &n), TLY_E_CORRUPT);
}
END_TEST

Suite *pgarray_suite(void)
{
	Suite *s = suite_create("pgarray");
	TCase *tc = tcase_create("pgarray");
	tcase_add_test(tc, test_built_as_postgres_sends);
	tcase_add_test(tc, test_round_trip);
	tcase_add_test(tc, test_malformed_refused);
	suite_add_tcase(s, tc);
	return s;
}
