/* When tally-ledger decides the records it has taken (see ledger_pace.h). */
#include "ledger_pace.h"

#include <stdint.h>

#define WEIGHT 8 /* each new observation moves an average by 1/WEIGHT of the difference */

void tly_ledger_pace_committed(struct tly_ledger_pace *p, int64_t commit_us)
{
	p->commit_us += (commit_us - p->commit_us) / WEIGHT;
}

void tly_ledger_pace_group_committed(struct tly_ledger_pace *p, int64_t commit_us, size_t records)
{
	tly_ledger_pace_committed(p, commit_us);
	double n = (double)records, t = (double)commit_us;
	if (p->groups == 0) {
		p->n = n, p->t = t, p->nn = n * n, p->nt = n * t;
	} else {
		p->n += (n - p->n) / WEIGHT;
		p->t += (t - p->t) / WEIGHT;
		p->nn += (n * n - p->nn) / WEIGHT;
		p->nt += (n * t - p->nt) / WEIGHT;
	}
	if (p->groups < 2)
		p->groups++;
}

int64_t tly_ledger_pace_commit_us(const struct tly_ledger_pace *p, size_t records)
{
	if (p->groups < 2 || records == 0)
		return p->commit_us;
	double var = p->nn - p->n * p->n;
	/* groups of about one size: the line has no slope to speak of, their average is the guess */
	double per_record = var > 1.0 ? (p->nt - p->n * p->t) / var : 0;
	if (per_record < 0)
		per_record = 0;
	double fixed = p->t - per_record * p->n;
	if (fixed < 0)
		fixed = 0;
	return (int64_t)(fixed + per_record * (double)records);
}

void tly_ledger_pace_decided(struct tly_ledger_pace *p, int64_t decide_us, size_t records)
{
	if (records == 0)
		return;
	p->decide_ns += (1000 * decide_us / (int64_t)records - p->decide_ns) / WEIGHT;
}

size_t tly_ledger_pace_max_events(const struct tly_ledger_pace *p, size_t max_events)
{
	size_t limit = max_events;
	for (unsigned i = 0; i < p->backlog && limit <= SIZE_MAX / 2; i++)
		limit *= 2;
	return limit;
}

void tly_ledger_pace_sized(struct tly_ledger_pace *p, size_t records, size_t max_events,
			   bool more_ready, int64_t depth)
{
	size_t limit = tly_ledger_pace_max_events(p, max_events);
	bool deep = depth < 0 || (uint64_t)depth / TLY_LEDGER_PACE_DEPTH_GROUPS >= 2 * (uint64_t)limit;
	if (records < max_events)
		p->backlog = 0;
	else if (p->backlog > 0 && depth >= 0 && (uint64_t)depth < limit)
		p->backlog--;
	else if (more_ready && deep && records >= limit && p->backlog < TLY_LEDGER_PACE_BACKLOG_MAX)
		p->backlog++;
}

size_t tly_ledger_pace_lanes(const struct tly_ledger_pace *p, size_t lanes, size_t backlog_lanes)
{
	return p->backlog > 0 ? backlog_lanes : lanes;
}

int64_t tly_ledger_pace_decide_in_us(const struct tly_ledger_pace *p,
				     const struct tly_ledger_pace_state *s)
{
	if (!s->pending || s->group_waiting)
		return -1;
	int64_t bound = s->bound_us - s->now_us;
	if (s->pending >= s->max_events || bound <= 0)
		return 0;
	if (!s->none_ready)
		return -1;
	if (!s->writer_busy)
		return 0;
	int64_t due = s->submitted_us + tly_ledger_pace_commit_us(p, s->flight_records) -
		      p->decide_ns * (int64_t)s->pending / 1000 - s->now_us;
	return due <= 0 ? 0 : due < bound ? due : bound;
}
