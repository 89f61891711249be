/*
 * Suite "uuidmap": lib/uuidmap's pair map. Values found under their keys, and ids that differ only
 * in a few bytes (a counter in any byte of the UUID, as upstream systems number tenants and events)
 * spread over the table instead of forming one long probe run.
 */
#include <check.h>
#include <string.h>

#include "suites.h"
#include "uuidmap.h"

/* The longest run of occupied slots (a lookup's worst probe sequence), wrapping around. */
static size_t longest_run(const struct tly_uuidmap *map)
{
	size_t cap = tly_uuidmap_capacity(map), best = 0, run = 0;
	for (size_t i = 0; i < 2 * cap; i++) {
		run = tly_uuidmap_slot(map, i % cap) ? run + 1 : 0;
		if (run > best)
			best = run;
	}
	return best < cap ? best : cap;
}

START_TEST(test_counter_in_any_byte_spreads)
{
	/* 512 ids whose only difference is a 9-bit counter at byte position _i (and the next byte) */
	enum { N = 512 };
	static tly_uuid ids[N];
	int pos = _i;
	struct tly_uuidmap *map = tly_uuidmap_new();
	ck_assert_ptr_nonnull(map);
	for (int n = 0; n < N; n++) {
		memset(ids[n].b, 0x5a, sizeof(ids[n].b));
		ids[n].b[pos] = (unsigned char)(n & 0xff);
		ids[n].b[(pos + 1) % 16] = (unsigned char)(0x5a ^ (n >> 8));
		ck_assert_int_eq(tly_uuidmap_put(map, &ids[n], NULL, &ids[n]), 0);
	}
	ck_assert_uint_eq(tly_uuidmap_count(map), N);
	for (int n = 0; n < N; n++)
		ck_assert_ptr_eq(tly_uuidmap_get(map, &ids[n], NULL), &ids[n]);
	/* at most half full: a uniform hash keeps runs to a few dozen slots; a degenerate one makes
	 * one run of (nearly) all N */
	size_t run = longest_run(map);
	ck_assert_msg(run < 64, "counter at byte %d: a probe run of %zu slots for %d ids", pos, run,
		      N);
	tly_uuidmap_free(map);
}
END_TEST

START_TEST(test_pairs_kept_apart)
{
	tly_uuid a, b;
	memset(a.b, 1, sizeof(a.b));
	memset(b.b, 2, sizeof(b.b));
	int x, y, z;
	struct tly_uuidmap *map = tly_uuidmap_new();
	ck_assert_ptr_nonnull(map);
	ck_assert_int_eq(tly_uuidmap_put(map, &a, &b, &x), 0);
	ck_assert_int_eq(tly_uuidmap_put(map, &b, &a, &y), 0);
	ck_assert_int_eq(tly_uuidmap_put(map, &a, NULL, &z), 0);
	ck_assert_ptr_eq(tly_uuidmap_get(map, &a, &b), &x);
	ck_assert_ptr_eq(tly_uuidmap_get(map, &b, &a), &y);
	ck_assert_ptr_eq(tly_uuidmap_get(map, &a, NULL), &z);
	ck_assert_ptr_null(tly_uuidmap_get(map, &b, NULL));
	ck_assert_int_eq(tly_uuidmap_put(map, &a, &b, &z), 0); /* replaces */
	ck_assert_ptr_eq(tly_uuidmap_get(map, &a, &b), &z);
	ck_assert_uint_eq(tly_uuidmap_count(map), 3);
	tly_uuidmap_clear(map);
	ck_assert_uint_eq(tly_uuidmap_count(map), 0);
	ck_assert_ptr_null(tly_uuidmap_get(map, &a, &b));
	tly_uuidmap_free(map);
}
END_TEST

Suite *uuidmap_suite(void)
{
	Suite *s = suite_create("uuidmap");
	TCase *tc = tcase_create("uuidmap");
	tcase_add_loop_test(tc, test_counter_in_any_byte_spreads, 0, 16);
	tcase_add_test(tc, test_pairs_kept_apart);
	suite_add_tcase(s, tc);
	return s;
}
