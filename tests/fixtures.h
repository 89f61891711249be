/* Sample events for tests: one fully populated, valid event of every type. */
#ifndef TLY_TEST_FIXTURES_H
#define TLY_TEST_FIXTURES_H

#include "event.h"

/* Fill ev (tly_event_init'ed by the call) with a valid sample of type; seed varies ids and numbers. */
void tly_fixture_event(struct tly_event *ev, enum tly_event_type type, unsigned seed);

#endif
