/* tallyctl: the operator's command line (migrate, schemas, config, dev stack, dev broker control). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "devbroker_ctl.h"
#include "devpg.h"
#include "log.h"
#include "migrate.h"
#include "pg.h"
#include "proc.h"
#include "schema.h"
#include "tallyctl.h"

extern char **environ;

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: tallyctl [OPTIONS] COMMAND [ARGS]\n"
		"\n"
		"Commands:\n"
		"  migrate status|up            show or apply database migrations (database.url)\n"
		"  schemas list                 every schema version this build reads, with fingerprints\n"
		"  schemas release DIR          copy the current schemas into DIR as released versions\n"
		"  config [markdown]            the settings table (as Markdown for the README)\n"
		"  dev [--partitions N]         run the embedded dev stack until Ctrl-C: dev broker,\n"
		"                               throw-away PostgreSQL, migrated; prints how to connect\n"
		"  demo [--seconds N] [--rate R] [--tenants N] [--seed N] [--partitions N]\n"
		"       [--state-dir DIR] [--no-wait]\n"
		"                               the whole product: dev stack, tally-ledger, tally-projector,\n"
		"                               N s (30) of tally-loadgen, a report; up until Ctrl-C\n"
		"  demo stop [--state-dir DIR]  stop a running demo and every process it started\n"
		"  broker SOCKET COMMAND...     send a fault-injection command to a tally-devbroker\n"
		"  publish [FILE|-] [--dry-run] publish NDJSON events (docs/events.md); --dry-run validates only\n"
		"  tail TOPIC [--from-beginning] [--max N] [--timeout-ms T]  print decoded messages as JSON lines\n"
		"  quarantine list|replay ID|--all  input tally-ledger kept aside; replay re-produces it\n"
		"  reserve --tenant T --tokens N [--reservation-id R] [--expires-in S] [--model M]\n"
		"          [--wait [--timeout-ms T]]  reserve tokens; --wait prints the ledger's decision\n"
		"                               (exit 0 accepted, 3 rejected, 4 timeout)\n"
		"  status [--json] [--timeout-ms T]  lag of each consumer per topic and partition\n"
		"                               (stored offset behind the topic's end), with totals\n"
		"  rebuild all|PROJECTION...    rebuild projections into shadow tables and swap them in\n"
		"                               (database.url with the schema owner's rights, like migrate)\n"
		"  audit [--tenant T] [--from SEQ|TIME] [--to SEQ|TIME] [--json]  replay the ledger:\n"
		"                               re-execution, hash chain, identities, holds, offsets\n"
		"                               (exit 0 passed, 1 failures found, 3 could not run)\n"
		"  balance TENANT [--at SEQ|TIME] [--json]  the wallet at any point of the ledger\n"
		"  statement TENANT --period TIME|FROM..TO [--csv]  a period's entries, opening and\n"
		"                               closing balances and the invoice\n"
		"\n"
		"Options:\n"
		"  -c, --config FILE            read settings from FILE (\"key = value\" lines)\n"
		"  -s, --set KEY=VALUE          set one setting (after the file and TALLY_* variables)\n"
		"      --migrations DIR         use migrations from DIR instead of the compiled-in set\n"
		"  -h, --help                   this help\n"
		"\n");
	tly_config_print_help(out);
}

/* ---- migrate ------------------------------------------------------------------------------- */

PGconn *tallyctl_connect_db(struct app *app)
{
	char err[512];
	const char *url = tly_config_str(app->cfg, "database.url");
	if (!url) {
		fprintf(stderr, "tallyctl: database.url is not set (use -s database.url=… or TALLY_DATABASE_URL)\n");
		return NULL;
	}
	PGconn *conn = tly_pg_connect(url, "tallyctl", err, sizeof(err));
	if (!conn)
		fprintf(stderr, "tallyctl: %s\n", err);
	return conn;
}

struct tly_migrate_set *tallyctl_load_migrations(struct app *app, char *err, size_t errlen)
{
	return app->migrations_dir ? tly_migrate_load_dir(app->migrations_dir, err, errlen)
				   : tly_migrate_load_embedded(err, errlen);
}

static int cmd_migrate(struct app *app, int argc, char **argv)
{
	char err[1024];
	int rc = 1;
	PGconn *conn = NULL;
	struct tly_migrate_set *set = NULL;
	if (argc != 2 || (strcmp(argv[1], "status") != 0 && strcmp(argv[1], "up") != 0)) {
		fprintf(stderr, "tallyctl: usage: tallyctl migrate status|up\n");
		return 2;
	}
	if (!(set = tallyctl_load_migrations(app, err, sizeof(err)))) {
		fprintf(stderr, "tallyctl: %s\n", err);
		goto out;
	}
	if (!(conn = tallyctl_connect_db(app)))
		goto out;
	if (strcmp(argv[1], "status") == 0) {
		if (tly_migrate_status(conn, set, stdout, err, sizeof(err)) != 0) {
			fprintf(stderr, "tallyctl: %s\n", err);
			goto out;
		}
	} else {
		int applied = 0;
		if (tly_migrate_up(conn, set, &applied, err, sizeof(err)) != 0) {
			fprintf(stderr, "tallyctl: %s\n", err);
			goto out;
		}
		printf(applied ? "applied %d migration(s); database at version %d\n"
			       : "nothing to apply (%d); database at version %d\n",
		       applied, tly_migrate_head(set));
	}
	rc = 0;
out:
	if (conn)
		PQfinish(conn);
	tly_migrate_free(set);
	return rc;
}

/* ---- schemas ------------------------------------------------------------------------------- */

static int cmd_schemas(struct app *app, int argc, char **argv)
{
	(void)app;
	char err[512];
	if (argc < 2 || (strcmp(argv[1], "list") != 0 && strcmp(argv[1], "release") != 0) ||
	    (strcmp(argv[1], "release") == 0 && argc != 3)) {
		fprintf(stderr, "tallyctl: usage: tallyctl schemas list | schemas release DIR\n");
		return 2;
	}
	struct tly_schema_registry *reg = tly_schema_registry_new(err, sizeof(err));
	if (!reg) {
		fprintf(stderr, "tallyctl: %s\n", err);
		return 1;
	}
	int rc = 0;
	for (size_t i = 0; i < tly_schema_count(reg) && rc == 0; i++) {
		const struct tly_schema *s = tly_schema_at(reg, i);
		if (strcmp(argv[1], "list") == 0) {
			printf("%016" PRIx64 "  %-8s %s\n", tly_schema_fingerprint(s),
			       tly_schema_is_current(s) ? "current" : "released", tly_schema_fullname(s));
			continue;
		}
		if (!tly_schema_is_current(s))
			continue;
		const char *name = strrchr(tly_schema_fullname(s), '.');
		char path[PATH_MAX];
		snprintf(path, sizeof(path), "%s/%s.%016" PRIx64 ".avsc", argv[2],
			 name ? name + 1 : tly_schema_fullname(s), tly_schema_fingerprint(s));
		struct stat st;
		if (stat(path, &st) == 0)
			continue;
		FILE *f = fopen(path, "w");
		if (!f || fputs(tly_schema_text(s), f) == EOF || fclose(f) != 0) {
			fprintf(stderr, "tallyctl: could not write \"%s\": %s\n", path, strerror(errno));
			rc = 1;
			continue;
		}
		printf("released %s\n", path);
	}
	tly_schema_registry_free(reg);
	return rc;
}

/* ---- config -------------------------------------------------------------------------------- */

static int cmd_config(struct app *app, int argc, char **argv)
{
	(void)app;
	if (argc > 1 && strcmp(argv[1], "markdown") == 0)
		tly_config_print_markdown(stdout);
	else
		tly_config_print_help(stdout);
	return 0;
}

/* ---- broker -------------------------------------------------------------------------------- */

static int cmd_broker(struct app *app, int argc, char **argv)
{
	(void)app;
	if (argc < 3) {
		fprintf(stderr, "tallyctl: usage: tallyctl broker SOCKET COMMAND [ARGS...]\n");
		return 2;
	}
	char line[512] = "";
	for (int i = 2; i < argc; i++) {
		size_t n = strlen(line);
		snprintf(line + n, sizeof(line) - n, "%s%s", i > 2 ? " " : "", argv[i]);
	}
	char reply[512];
	int rc = tly_devbroker_ctl(argv[1], line, reply, sizeof(reply));
	printf("%s\n", reply);
	return rc == 0 ? 0 : 1;
}

/* ---- dev ----------------------------------------------------------------------------------- */

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static int cmd_dev(struct app *app, int argc, char **argv)
{
	int partitions = (int)tly_config_int(app->cfg, "topics.partitions");
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--partitions") == 0 && i + 1 < argc)
			partitions = atoi(argv[++i]);
		else {
			fprintf(stderr, "tallyctl: usage: tallyctl dev [--partitions N]\n");
			return 2;
		}
	}
	if (partitions < 1) {
		fprintf(stderr, "tallyctl: --partitions must be at least 1\n");
		return 2;
	}
	int rc = 1;
	struct devstack ds;
	char dir[] = "/tmp/tally-dev-XXXXXX";
	if (!mkdtemp(dir)) {
		fprintf(stderr, "tallyctl: could not create a temp dir: %s\n", strerror(errno));
		return 1;
	}
	if (tallyctl_devstack_up(app, dir, partitions, &ds) != 0)
		goto out;
	char self[PATH_MAX];
	tly_proc_sibling("tallyctl", self, sizeof(self));
	printf("Tally dev stack is up (%d migration(s) applied, %d partitions per topic).\n\n"
	       "  PostgreSQL   psql \"%s\"\n"
	       "  Kafka        %s   (topics tally.events, tally.ledger, tally.catalog, tally.deadletter)\n"
	       "  faults       %s broker %s help\n"
	       "  environment  . %s\n\n"
	       "Press Ctrl-C to stop; everything started here is removed.\n",
	       ds.applied, partitions, tly_devpg_conninfo(ds.pg), ds.bootstraps, self, ds.ctl,
	       ds.envfile);
	fflush(stdout);

	if (tly_proc_on_signals(on_stop, NULL) != 0) {
		fprintf(stderr, "tallyctl: could not install the signal handlers: %s\n", strerror(errno));
		goto out;
	}
	while (!stop_requested) {
		int status;
		if (tly_proc_wait(ds.broker, 200, &status) == 0) {
			ds.broker = -1;
			if (stop_requested)
				break; /* Ctrl-C reached the whole process group: the broker stopped too */
			fprintf(stderr, "tallyctl: tally-devbroker exited unexpectedly (see %s)\n",
				ds.broker_log);
			goto out;
		}
	}
	printf("\nstopping the dev stack\n");
	rc = 0;
out:
	tallyctl_devstack_down(&ds);
	char *rmargv[] = {"rm", "-rf", dir, NULL};
	if (tly_proc_run(rmargv, NULL, 0) != 0)
		fprintf(stderr, "tallyctl: could not remove \"%s\"\n", dir);
	return rc;
}

/* ---- main ---------------------------------------------------------------------------------- */

static const struct {
	const char *name;
	command_fn fn;
} commands[] = {
	{"migrate", cmd_migrate}, {"schemas", cmd_schemas}, {"config", cmd_config},
	{"dev", cmd_dev},         {"broker", cmd_broker},
	{"publish", cmd_publish},
	{"tail", cmd_tail},
	{"quarantine", cmd_quarantine},
	{"reserve", cmd_reserve},
	{"status", cmd_status},
	{"rebuild", cmd_rebuild},
	{"demo", cmd_demo},
	{"audit", cmd_audit},
	{"balance", cmd_balance},
	{"statement", cmd_statement},
};

int main(int argc, char **argv)
{
	char err[1024];
	struct app app = {0};
	int rc = 2;
	tly_log_init("tallyctl", TLY_LOG_WARN);
	if (!(app.cfg = tly_config_new())) {
		fprintf(stderr, "tallyctl: out of memory\n");
		return 1;
	}
	if (tly_config_load_env(app.cfg, environ, err, sizeof(err)) != 0) {
		fprintf(stderr, "tallyctl: %s\n", err);
		goto out;
	}
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'}, {"set", required_argument, NULL, 's'},
		{"migrations", required_argument, NULL, 'm'}, {"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0}};
	const char *config_file = NULL;
	char *sets[64];
	int n_sets = 0;
	int opt;
	while ((opt = getopt_long(argc, argv, "+c:s:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'c': config_file = optarg; break;
		case 's':
			if (n_sets < 64)
				sets[n_sets++] = optarg;
			break;
		case 'm': app.migrations_dir = optarg; break;
		case 'h': usage(stdout); rc = 0; goto out;
		default: usage(stderr); goto out;
		}
	}
	/* Precedence: defaults < file < environment < --set. */
	if (config_file) {
		struct tly_config *fresh = tly_config_new();
		if (!fresh || tly_config_load_file(fresh, config_file, err, sizeof(err)) != 0 ||
		    tly_config_load_env(fresh, environ, err, sizeof(err)) != 0) {
			fprintf(stderr, "tallyctl: %s\n", fresh ? err : "out of memory");
			tly_config_free(fresh);
			goto out;
		}
		tly_config_free(app.cfg);
		app.cfg = fresh;
	}
	for (int i = 0; i < n_sets; i++) {
		char *eq = strchr(sets[i], '=');
		if (!eq) {
			fprintf(stderr, "tallyctl: --set expects KEY=VALUE, got \"%s\"\n", sets[i]);
			goto out;
		}
		*eq = '\0';
		if (tly_config_set(app.cfg, sets[i], eq + 1, err, sizeof(err)) != 0) {
			fprintf(stderr, "tallyctl: %s\n", err);
			goto out;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		goto out;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(commands[i].name, argv[optind]) == 0) {
			rc = commands[i].fn(&app, argc - optind, argv + optind);
			goto out;
		}
	}
	fprintf(stderr, "tallyctl: unknown command \"%s\" (see tallyctl --help)\n", argv[optind]);
out:
	tly_config_free(app.cfg);
	return rc;
}
