/* Config suite: defaults, file, environment, kafka.* pass-through and clear errors. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "suites.h"

START_TEST(test_defaults)
{
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	ck_assert_str_eq(tly_config_str(cfg, "topics.events"), "tally.events");
	ck_assert_int_eq(tly_config_int(cfg, "topics.partitions"), 12);
	ck_assert_ptr_null(tly_config_str(cfg, "database.url"));
	ck_assert_int_eq(tly_config_int(cfg, "ledger.lock.timeout.ms"), 5000);
	tly_config_free(cfg);
}
END_TEST

START_TEST(test_set_errors_name_key)
{
	char err[256];
	struct tly_config *cfg = tly_config_new();
	ck_assert_int_eq(tly_config_set(cfg, "topics.partitions", "twelve", err, sizeof(err)), TLY_E_CONFIG);
	ck_assert_msg(strstr(err, "\"topics.partitions\"") && strstr(err, "not an integer"), "%s", err);
	ck_assert_int_eq(tly_config_set(cfg, "topics.partitions", "0", err, sizeof(err)), TLY_E_CONFIG);
	ck_assert_msg(strstr(err, "outside"), "%s", err);
	ck_assert_int_eq(tly_config_set(cfg, "log.level", "loud", err, sizeof(err)), TLY_E_CONFIG);
	ck_assert_int_eq(tly_config_set(cfg, "no.such.key", "1", err, sizeof(err)), TLY_E_CONFIG);
	ck_assert_msg(strstr(err, "unknown setting \"no.such.key\""), "%s", err);
	ck_assert_int_eq(tly_config_set(cfg, "kafka.", "x", err, sizeof(err)), TLY_E_CONFIG);
	/* the failed sets changed nothing */
	ck_assert_int_eq(tly_config_int(cfg, "topics.partitions"), 12);
	ck_assert_int_eq(tly_config_set(cfg, "topics.partitions", "24", err, sizeof(err)), 0);
	ck_assert_int_eq(tly_config_int(cfg, "topics.partitions"), 24);
	tly_config_free(cfg);
}
END_TEST

/* ledger.lock.timeout.ms: milliseconds, 1 to an hour; 0 (PostgreSQL's "no bound") is refused. */
START_TEST(test_ledger_lock_timeout)
{
	char err[256];
	struct tly_config *cfg = tly_config_new();
	ck_assert_ptr_nonnull(cfg);
	const char *const bad[] = {"0", "-1", "5s", "", "3600001"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = '\0';
		ck_assert_int_eq(tly_config_set(cfg, "ledger.lock.timeout.ms", bad[i], err, sizeof(err)),
				 TLY_E_CONFIG);
		ck_assert_msg(strstr(err, "\"ledger.lock.timeout.ms\"") &&
				      (strstr(err, "outside") || strstr(err, "not an integer")),
			      "%s: %s", bad[i], err);
	}
	ck_assert_int_eq(tly_config_int(cfg, "ledger.lock.timeout.ms"), 5000);
	ck_assert_int_eq(tly_config_set(cfg, "ledger.lock.timeout.ms", "250", err, sizeof(err)), 0);
	ck_assert_int_eq(tly_config_int(cfg, "ledger.lock.timeout.ms"), 250);
	char *envp[] = {"TALLY_LEDGER_LOCK_TIMEOUT_MS=3600000", NULL};
	ck_assert_msg(tly_config_load_env(cfg, envp, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(tly_config_int(cfg, "ledger.lock.timeout.ms"), 3600000);
	tly_config_free(cfg);
}
END_TEST

static int collect(const char *key, const char *value, void *ud)
{
	char *buf = ud;
	size_t n = strlen(buf);
	snprintf(buf + n, 1024 - n, "%s=%s;", key, value);
	return 0;
}

START_TEST(test_file_env_precedence)
{
	char err[256];
	char path[] = "/tmp/tally-config-XXXXXX";
	int fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	const char *text = "# comment\n\n database.url = host=/tmp dbname=x   \n"
			   "kafka.bootstrap.servers=127.0.0.1:9092\nkafka.security.protocol = plaintext # inline\n"
			   "topics.partitions = 6\n";
	ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
	struct tly_config *cfg = tly_config_new();
	ck_assert_msg(tly_config_load_file(cfg, path, err, sizeof(err)) == 0, "%s", err);
	ck_assert_str_eq(tly_config_str(cfg, "database.url"), "host=/tmp dbname=x");
	ck_assert_int_eq(tly_config_int(cfg, "topics.partitions"), 6);

	char *envp[] = {"PATH=/bin", "TALLY_TOPICS_PARTITIONS=8", "TALLY_KAFKA_CLIENT_ID=abc",
			"TALLY_BIN=build/bin", "TALLY_LEDGER_BATCH_MAX_EVENTS=10", NULL};
	ck_assert_msg(tly_config_load_env(cfg, envp, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(tly_config_int(cfg, "topics.partitions"), 8);
	ck_assert_int_eq(tly_config_int(cfg, "ledger.batch.max.events"), 10);

	char seen[1024] = "";
	ck_assert_int_eq(tly_config_foreach(cfg, "kafka.", collect, seen), 0);
	ck_assert_str_eq(seen, "kafka.bootstrap.servers=127.0.0.1:9092;kafka.security.protocol=plaintext;"
			       "kafka.client.id=abc;");

	char *bad_env[] = {"TALLY_TOPICS_PARTITIONS=lots", NULL};
	ck_assert_int_eq(tly_config_load_env(cfg, bad_env, err, sizeof(err)), TLY_E_CONFIG);
	ck_assert_msg(strstr(err, "TALLY_TOPICS_PARTITIONS") && strstr(err, "topics.partitions"), "%s", err);

	FILE *f = fopen(path, "w");
	fputs("topics.events = a\nthis line is wrong\n", f);
	fclose(f);
	ck_assert_int_eq(tly_config_load_file(cfg, path, err, sizeof(err)), TLY_E_CONFIG);
	ck_assert_msg(strstr(err, ":2:"), "%s", err);
	ck_assert_int_eq(tly_config_load_file(cfg, "/nonexistent/tally.conf", err, sizeof(err)), TLY_E_CONFIG);
	ck_assert_msg(strstr(err, "could not open config file"), "%s", err);
	unlink(path);
	tly_config_free(cfg);
}
END_TEST

Suite *config_suite(void)
{
	Suite *s = suite_create("config");
	TCase *tc = tcase_create("config");
	tcase_add_test(tc, test_defaults);
	tcase_add_test(tc, test_set_errors_name_key);
	tcase_add_test(tc, test_ledger_lock_timeout);
	tcase_add_test(tc, test_file_env_precedence);
	suite_add_tcase(s, tc);
	return s;
}
