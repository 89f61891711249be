/* consumers/ledger_pace: when tally-ledger decides the records it has taken. */
#include <check.h>

#include "../consumers/ledger_pace.h"
#include "../consumers/ledger_writer.h"
#include "suites.h"

/* A loop with 10 records taken, none ready, the writer free, 50 ms of batch bound left. */
static struct tly_ledger_pace_state idle(void)
{
	return (struct tly_ledger_pace_state){.pending = 10, .max_events = 1000,
					      .bound_us = 1050000, .none_ready = true,
					      .now_us = 1000000};
}

START_TEST(test_writer_free_decides_when_none_ready)
{
	struct tly_ledger_pace p = {.commit_us = 20000, .decide_ns = 1000};
	struct tly_ledger_pace_state s = idle();
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), 0);
	s.none_ready = false; /* more records are there to take first */
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), -1);
	s.pending = 0;
	s.none_ready = true;
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), -1);
}
END_TEST

START_TEST(test_busy_writer_decides_before_its_commit_ends)
{
	/* a commit takes 20 ms, deciding a record 100 us: 10 records are decided 1 ms before its end */
	struct tly_ledger_pace p = {.commit_us = 20000, .decide_ns = 100000};
	struct tly_ledger_pace_state s = idle();
	s.writer_busy = true;
	s.submitted_us = s.now_us - 5000;
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), 14000);
	s.now_us += 14000;
	s.bound_us += 14000;
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), 0);
	/* with more records taken, deciding them starts earlier */
	s = idle();
	s.writer_busy = true;
	s.submitted_us = s.now_us;
	s.pending = 100;
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), 10000);
	/* unknown averages: at once, as without pacing */
	struct tly_ledger_pace none = {0};
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&none, &s), 0);
}
END_TEST

START_TEST(test_bounds_and_waiting_group)
{
	struct tly_ledger_pace p = {.commit_us = 200000, .decide_ns = 0};
	struct tly_ledger_pace_state s = idle();
	s.writer_busy = true;
	s.submitted_us = s.now_us;
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), 50000); /* ledger.batch.max.ms */
	s.bound_us = s.now_us;
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), 0);
	s = idle();
	s.writer_busy = true;
	s.submitted_us = s.now_us;
	s.none_ready = false;
	s.pending = s.max_events;
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), 0);
	s.group_waiting = true; /* one decided group waits already: never a second */
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), -1);
}
END_TEST

START_TEST(test_averages_follow_observations)
{
	struct tly_ledger_pace p = {0};
	for (int i = 0; i < 100; i++) {
		tly_ledger_pace_committed(&p, 8000);
		tly_ledger_pace_decided(&p, 3000, 100);
	}
	ck_assert_int_ge(p.commit_us, 7900);
	ck_assert_int_le(p.commit_us, 8000);
	ck_assert_int_ge(p.decide_ns, 29000);
	ck_assert_int_le(p.decide_ns, 30000);
	tly_ledger_pace_decided(&p, 5000, 0); /* nothing decided: no change */
	ck_assert_int_le(p.decide_ns, 30000);
	tly_ledger_pace_committed(&p, 80000); /* a slow commit moves it, by an eighth */
	ck_assert_int_gt(p.commit_us, 16000);
	ck_assert_int_lt(p.commit_us, 18000);
}
END_TEST

START_TEST(test_backlog_grows_groups)
{
	struct tly_ledger_pace p = {0};
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 1000);
	/* a full group with records still ready is a backlog: the limit doubles, up to 4x */
	tly_ledger_pace_sized(&p, 1000, 1000, true, -1);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 2000);
	tly_ledger_pace_sized(&p, 1500, 1000, true, -1); /* not full at 2,000: stays */
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 2000);
	tly_ledger_pace_sized(&p, 2000, 1000, true, -1);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 4000);
	tly_ledger_pace_sized(&p, 4000, 1000, true, -1);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 4000);
	/* the limit is what decides at once */
	struct tly_ledger_pace_state s = idle();
	s.none_ready = false;
	s.pending = 1000;
	s.max_events = tly_ledger_pace_max_events(&p, 1000);
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), -1);
	s.pending = 4000;
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), 0);
	/* a group below ledger.batch.max.events (input slower than commits) ends the backlog */
	tly_ledger_pace_sized(&p, 999, 1000, false, -1);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 1000);
	/* a full group with nothing more ready is no backlog */
	tly_ledger_pace_sized(&p, 1000, 1000, false, -1);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 1000);
}
END_TEST

START_TEST(test_backlog_grows_with_depth_only)
{
	struct tly_ledger_pace p = {0};
	/* one slow commit left 1,500 records: full groups with more ready, but no real backlog */
	tly_ledger_pace_sized(&p, 1000, 1000, true, 1500);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 1000);
	tly_ledger_pace_sized(&p, 1000, 1000, true, 3999); /* less than two groups of 2,000 */
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 1000);
	/* a deep backlog grows the groups step by step, as deep as it is */
	tly_ledger_pace_sized(&p, 1000, 1000, true, 4000);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 2000);
	tly_ledger_pace_sized(&p, 2000, 1000, true, 7999); /* less than two groups of 4,000 */
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 2000);
	tly_ledger_pace_sized(&p, 2000, 1000, true, 100000);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 4000);
	tly_ledger_pace_sized(&p, 4000, 1000, true, 100000); /* at most 4x */
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 4000);
	/* less than one group left: the limit halves before any small group ends the backlog */
	tly_ledger_pace_sized(&p, 4000, 1000, true, 3999);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 2000);
	tly_ledger_pace_sized(&p, 2000, 1000, false, 2000); /* a group's worth: stays */
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 2000);
	tly_ledger_pace_sized(&p, 2000, 1000, false, 10);
	ck_assert_uint_eq(tly_ledger_pace_max_events(&p, 1000), 1000);
}
END_TEST

START_TEST(test_commit_expected_by_group_size)
{
	struct tly_ledger_pace p = {0};
	/* groups alternating 80 and 160 records, each committed in 2 ms + 30 us a record */
	for (int i = 0; i < 40; i++) {
		size_t n = i % 2 ? 160 : 80;
		tly_ledger_pace_group_committed(&p, 2000 + 30 * (int64_t)n, n);
	}
	ck_assert_int_ge(tly_ledger_pace_commit_us(&p, 100), 4900);
	ck_assert_int_le(tly_ledger_pace_commit_us(&p, 100), 5100);
	ck_assert_int_ge(tly_ledger_pace_commit_us(&p, 400), 13900);
	ck_assert_int_le(tly_ledger_pace_commit_us(&p, 400), 14100);
	/* the group average (about 5.6 ms) would say the same for both */
	ck_assert_int_ge(p.commit_us, 5400);
	ck_assert_int_le(p.commit_us, 5800);
	/* so the next group is decided when the committing one is expected to end, by its size */
	struct tly_ledger_pace_state s = idle();
	s.writer_busy = true;
	s.submitted_us = s.now_us;
	s.flight_records = 80;
	int64_t small = tly_ledger_pace_decide_in_us(&p, &s);
	s.flight_records = 160;
	int64_t large = tly_ledger_pace_decide_in_us(&p, &s);
	ck_assert_int_ge(small, 4300);
	ck_assert_int_le(small, 4500);
	ck_assert_int_ge(large, 6700);
	ck_assert_int_le(large, 6900);
	/* unknown size of the committing group: the average */
	s.flight_records = 0;
	ck_assert_int_eq(tly_ledger_pace_decide_in_us(&p, &s), p.commit_us);
}
END_TEST

START_TEST(test_commit_line_needs_two_sizes)
{
	struct tly_ledger_pace p = {0};
	ck_assert_int_eq(tly_ledger_pace_commit_us(&p, 100), 0); /* nothing seen: decide at once */
	tly_ledger_pace_group_committed(&p, 8000, 100);
	ck_assert_int_eq(tly_ledger_pace_commit_us(&p, 100), p.commit_us); /* one group: the average */
	/* groups all of one size: no slope, the average whatever the size */
	for (int i = 0; i < 20; i++)
		tly_ledger_pace_group_committed(&p, 8000, 100);
	ck_assert_int_ge(tly_ledger_pace_commit_us(&p, 1000), 7900);
	ck_assert_int_le(tly_ledger_pace_commit_us(&p, 1000), 8100);
	/* a larger group that committed faster (a stall before): never a negative per-record part */
	tly_ledger_pace_group_committed(&p, 1000, 1000);
	ck_assert_int_ge(tly_ledger_pace_commit_us(&p, 10), 0);
	ck_assert_int_le(tly_ledger_pace_commit_us(&p, 1000), tly_ledger_pace_commit_us(&p, 10) + 1);
}
END_TEST

/*
 * Two writer lanes through a backlog, one otherwise: the lanes follow the backlog that grew the
 * groups, and end with it.
 */
START_TEST(test_lanes_follow_backlog)
{
	struct tly_ledger_pace p = {0};
	ck_assert_uint_eq(tly_ledger_pace_lanes(&p, 1, 2), 1);
	tly_ledger_pace_sized(&p, 1000, 1000, true, 100000); /* full, more ready, deep */
	ck_assert_uint_eq(p.backlog, 1);
	ck_assert_uint_eq(tly_ledger_pace_lanes(&p, 1, 2), 2);
	tly_ledger_pace_sized(&p, 2000, 1000, true, 100000);
	ck_assert_uint_eq(tly_ledger_pace_lanes(&p, 1, 2), 2);
	tly_ledger_pace_sized(&p, 300, 1000, false, 0); /* input slower than commits: over */
	ck_assert_uint_eq(tly_ledger_pace_lanes(&p, 1, 2), 1);
	/* ledger.writers.backlog 1 keeps one lane through it */
	tly_ledger_pace_sized(&p, 1000, 1000, true, 100000);
	ck_assert_uint_eq(tly_ledger_pace_lanes(&p, 1, 1), 1);
}
END_TEST

/*
 * A partition goes to the lane partition % active, unless a batch of it is still with the writer:
 * then it stays in that batch's lane, whatever the lanes in use now.
 */
START_TEST(test_lane_kept_while_held)
{
	ck_assert_uint_eq(tly_ledger_writer_lane_for(5, 2, -1), 1);
	ck_assert_uint_eq(tly_ledger_writer_lane_for(5, 1, -1), 0);
	ck_assert_uint_eq(tly_ledger_writer_lane_for(4, 2, -1), 0);
	/* 2 -> 1 lanes while partition 5's batch commits in lane 1: its next one follows it there */
	ck_assert_uint_eq(tly_ledger_writer_lane_for(5, 1, 1), 1);
	/* 1 -> 2 while partition 7's batch commits in lane 0: not moved to lane 1 yet */
	ck_assert_uint_eq(tly_ledger_writer_lane_for(7, 2, 0), 0);
	ck_assert_uint_eq(tly_ledger_writer_lane_for(7, 2, -1), 1);
}
END_TEST

Suite *ledger_pace_suite(void)
{
	Suite *s = suite_create("ledger_pace");
	TCase *tc = tcase_create("ledger_pace");
	tcase_add_test(tc, test_writer_free_decides_when_none_ready);
	tcase_add_test(tc, test_busy_writer_decides_before_its_commit_ends);
	tcase_add_test(tc, test_bounds_and_waiting_group);
	tcase_add_test(tc, test_averages_follow_observations);
	tcase_add_test(tc, test_backlog_grows_groups);
	tcase_add_test(tc, test_backlog_grows_with_depth_only);
	tcase_add_test(tc, test_commit_expected_by_group_size);
	tcase_add_test(tc, test_commit_line_needs_two_sizes);
	tcase_add_test(tc, test_lanes_follow_backlog);
	tcase_add_test(tc, test_lane_kept_while_held);
	suite_add_tcase(s, tc);
	return s;
}
