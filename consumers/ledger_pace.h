/*
 * When tally-ledger decides the records it has taken: at once while its writer is free, and while
 * a group commits, just before that commit is expected to end (so the records that come in
 * meanwhile join the next group instead of waiting behind a small one's whole commit). Pure: the
 * caller passes the clock and the loop's state.
 */
#ifndef TLY_LEDGER_PACE_H
#define TLY_LEDGER_PACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Moving averages of the pipeline's two steps, and how far a backlog grew the group size;
 * zero-initialised it decides as soon as none is ready, in groups of at most max_events.
 */
struct tly_ledger_pace {
	int64_t commit_us;       /* a group's commit, submitted to result */
	int64_t decide_ns;       /* deciding one record */
	unsigned backlog;        /* doublings of ledger.batch.max.events in effect (a backlog) */
	/* moving moments of (records n, commit t) over groups, for t = fixed + per record * n */
	double n, t, nn, nt;
	unsigned groups;         /* groups observed into them (counts up to 2) */
};

/* Doublings of ledger.batch.max.events a backlog can reach: groups of up to 4x as many records. */
#define TLY_LEDGER_PACE_BACKLOG_MAX 2

/* The loop's state at one moment, as decide_in_us reads it. */
struct tly_ledger_pace_state {
	size_t pending;          /* records taken and not decided */
	size_t max_events;       /* tly_ledger_pace_max_events */
	int64_t bound_us;        /* when the first pending record was taken + ledger.batch.max.ms */
	bool group_waiting;      /* a decided group waits for the writer */
	bool none_ready;         /* librdkafka had no record ready on the last poll */
	bool writer_busy;        /* a group commits */
	int64_t submitted_us;    /* when it was handed to the writer */
	size_t flight_records;   /* records of the committing group (0: unknown) */
	int64_t now_us;
};

/* A group committed after commit_us. */
void tly_ledger_pace_committed(struct tly_ledger_pace *p, int64_t commit_us);

/*
 * A group of records committed after commit_us: tly_ledger_pace_committed, and the commit time's
 * line over the group's size (a fixed part, round trips and the fsync, plus a part per record),
 * fitted to the recent groups. decide_in_us expects the committing group to take what the line
 * gives for its size: an average over groups of every size expected a small group to take as long
 * as a large one (and the next group was decided too late) and a large one as a small one (the
 * next was decided too early, and the group after it collected what came meanwhile), so groups
 * alternated between small and large.
 */
void tly_ledger_pace_group_committed(struct tly_ledger_pace *p, int64_t commit_us, size_t records);

/* Microseconds the line gives for a group of records; the average commit before two groups. */
int64_t tly_ledger_pace_commit_us(const struct tly_ledger_pace *p, size_t records);

/* records were decided in decide_us. */
void tly_ledger_pace_decided(struct tly_ledger_pace *p, int64_t decide_us, size_t records);

/*
 * Most records a group takes now: max_events (ledger.batch.max.events), doubled for each step of
 * backlog. A group that filled its limit while records were still ready is a backlog: per-commit
 * costs (round trips, fsync, each statement's start) then weigh per record, and larger groups
 * take less of the writer's time a record. A group decided below max_events (input slower than
 * commits) ends the backlog, so at moderate rates groups stay small and latency low.
 */
size_t tly_ledger_pace_max_events(const struct tly_ledger_pace *p, size_t max_events);

/*
 * A group of records was decided, with max_events configured, more records ready or not, and
 * depth records on the partitions not taken yet (-1: unknown). The limit doubles only while
 * the depth holds TLY_LEDGER_PACE_DEPTH_GROUPS groups of the doubled size, and halves once it
 * is less than one group of the current one: the queue one slow commit leaves at half the
 * maximum rate (a few hundred to a few thousand records) is worked off in groups of max_events,
 * each committed in a fraction of a doubled group's time, while a real backlog (tens of
 * thousands of records) still grows them.
 */
void tly_ledger_pace_sized(struct tly_ledger_pace *p, size_t records, size_t max_events,
			   bool more_ready, int64_t depth);

/* Groups of the doubled size a backlog's depth must hold before the limit doubles. */
#define TLY_LEDGER_PACE_DEPTH_GROUPS 2

/*
 * Writer lanes the next group commits in: backlog_lanes (ledger.writers.backlog) while a backlog
 * grew the groups (tly_ledger_pace_sized), lanes (ledger.writers) otherwise. Through a backlog a
 * second lane's backend can use a core that would idle during the first one's fsync and round
 * trips; at moderate rates a record would wait for the slower of two lanes' commits and gain
 * nothing, so groups keep to ledger.writers there.
 */
size_t tly_ledger_pace_lanes(const struct tly_ledger_pace *p, size_t lanes, size_t backlog_lanes);

/*
 * Microseconds until the pending records are to be decided: 0 now, -1 not yet (more records are
 * ready to take, or a decided group already waits). Never later than bound_us; at once at
 * max_events.
 */
int64_t tly_ledger_pace_decide_in_us(const struct tly_ledger_pace *p,
				     const struct tly_ledger_pace_state *s);

#endif
