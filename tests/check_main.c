/*
 * The one Check runner. TALLY_SUITES=unit runs only the unit suites; TALLY_SUITE=name runs one
 * suite. Integration suites get the harness's throw-away PostgreSQL, started here, before forking.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "harness.h"
#include "suites.h"

struct suite_entry {
	const char *name;
	Suite *(*make)(void);
	bool integration;
};

static const struct suite_entry all_suites[] = {
	{"config", config_suite, false},
	{"schema", schema_suite, false},
	{"event", event_suite, false},
	{"codec", codec_suite, false},
	{"decide", decide_suite, false},
	{"badbytes", badbytes_suite, false},
	{"ledger_pace", ledger_pace_suite, false},
	{"proc", proc_suite, false},
	{"pgarray", pgarray_suite, false},
	{"uuidmap", uuidmap_suite, false},
	{"migrate", migrate_suite, true},
	{"devbroker", devbroker_suite, true},
	{"ledger", ledger_suite, true},
	{"producer", producer_suite, true},
	{"decision", decision_suite, true},
	{"projector", projector_suite, true},
	{"roles", roles_suite, true},
	{"status", status_suite, true},
	{"rebuild", rebuild_suite, true},
	{"http", http_suite, true},
	{"lifecycle", lifecycle_suite, true},
	{"demo", demo_suite, true},
	{"audit", audit_suite, true},
	{"badbytes-programs", badbytes_programs_suite, true},
	{"chaos", chaos_suite, true},
};

static const char help[] =
	"Usage: tally-tests\n"
	"\n"
	"The Check runner of every suite (make check). Environment:\n"
	"  TALLY_SUITE=NAME     run one suite (config, schema, event, codec, decide, migrate, devbroker,\n"
	"                       ledger, producer, decision, projector, roles, status, rebuild, http,\n"
	"                       lifecycle, demo, audit, badbytes, ledger_pace, proc,\n"
	"                       pgarray, uuidmap, badbytes-programs, chaos)\n"
	"  TALLY_SUITES=unit    run only the suites without I/O\n"
	"  CK_RUN_CASE=NAME     run one test case of the suite (Check)\n"
	"  TALLY_BIN=DIR        where the programs under test are (default build/bin)\n"
	"Integration suites start their own PostgreSQL cluster and dev brokers.\n";

int main(int argc, char **argv)
{
	int only_help = tly_cli_help_only(argc, argv, help);
	if (only_help != 0)
		return only_help > 0 ? EXIT_SUCCESS : 2;
	const char *only = getenv("TALLY_SUITE");
	const char *kind = getenv("TALLY_SUITES");
	bool unit_only = kind && strcmp(kind, "unit") == 0;
	bool need_pg = false;
	SRunner *sr = NULL;
	size_t n = sizeof(all_suites) / sizeof(all_suites[0]);

	for (size_t i = 0; i < n; i++) {
		const struct suite_entry *e = &all_suites[i];
		if (only && strcmp(only, e->name) != 0)
			continue;
		if (unit_only && e->integration)
			continue;
		need_pg |= e->integration;
		if (!sr)
			sr = srunner_create(e->make());
		else
			srunner_add_suite(sr, e->make());
	}
	if (!sr) {
		fprintf(stderr, "no suite matches TALLY_SUITE=%s\n", only ? only : "");
		return 2;
	}
	/* Daemons the suites spawn serve HTTP on a free port each, never the default one. */
	if (setenv("TALLY_HTTP_LISTEN", "127.0.0.1:0", 0) != 0) {
		perror("setenv");
		return 2;
	}
	if (need_pg)
		tly_test_pg_start();
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	if (need_pg)
		tly_test_pg_stop();
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
