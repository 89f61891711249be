/*
 * Monotonic time, for timeouts, rates and latencies. Never ledger time: that comes from events
 * (DESIGN.md, invariant 5). Thread-safe.
 */
#ifndef TLY_CLOCK_H
#define TLY_CLOCK_H

#include <stdint.h>

int64_t tly_clock_us(void); /* microseconds on CLOCK_MONOTONIC */
int64_t tly_clock_ms(void); /* milliseconds on CLOCK_MONOTONIC */
double tly_clock_s(void);   /* seconds on CLOCK_MONOTONIC, with their fraction */

#endif
