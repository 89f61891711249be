/* Every Check suite of the runner, one per module. */
#ifndef TLY_TEST_SUITES_H
#define TLY_TEST_SUITES_H

#include <check.h>

/* Unit suites: no I/O beyond the process itself. */
Suite *config_suite(void);
Suite *schema_suite(void);
Suite *event_suite(void);
Suite *codec_suite(void);
Suite *decide_suite(void);
Suite *badbytes_suite(void);
Suite *ledger_pace_suite(void);
Suite *proc_suite(void);
Suite *pgarray_suite(void);
Suite *uuidmap_suite(void);

/* Integration suites: run against the harness's PostgreSQL and dev broker. */
Suite *migrate_suite(void);
Suite *devbroker_suite(void);
Suite *ledger_suite(void);
Suite *producer_suite(void);
Suite *decision_suite(void);
Suite *projector_suite(void);
Suite *roles_suite(void);
Suite *status_suite(void);
Suite *rebuild_suite(void);
Suite *http_suite(void);
Suite *demo_suite(void);
Suite *lifecycle_suite(void);
Suite *audit_suite(void);
Suite *badbytes_programs_suite(void);
Suite *chaos_suite(void);

#endif
