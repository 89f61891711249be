/* When tally-ledger decides the records it has taken (see ledger_pace.h). */
#include "ledger_pace.h"

#include <stdint.h>

#define WEIGHT 8 /* each new observation moves an average by 1/WEIGHT of the difference */

void tly_ledger_pace_committed(struct tly_ledger_pace *p, int64_t commit_us)
{
	p->commit_us += (commit_us - p->commit_us) / WEIGHT;
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
	int64_t due = s->submitted_us + p->commit_us - p->decide_ns * (int64_t)s->pending / 1000 -
		      s->now_us;
	return due <= 0 ? 0 : due < bound ? due : bound;
}
