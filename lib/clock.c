/* Monotonic time read once for every program (see clock.h). */
#include "clock.h"

#include <time.h>

static struct timespec now(void)
{
	struct timespec ts;
	(void)clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail for CLOCK_MONOTONIC */
	return ts;
}

int64_t tly_clock_us(void)
{
	struct timespec ts = now();
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t tly_clock_ms(void)
{
	struct timespec ts = now();
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

double tly_clock_s(void)
{
	struct timespec ts = now();
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}
