/* Schema suite: canonical form, CRC-64-AVRO, the registry, and backward compatibility. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "crc64.h"
#include "embedded.h"
#include "proc.h"
#include "schema.h"
#include "suites.h"
#include "fixtures.h"

/* The Avro project's published test vectors (share/test/data/schema-tests.txt). */
static const struct {
	const char *input, *canonical;
	long long fingerprint; /* as the file gives it: the CRC-64 as a signed 64-bit integer */
} vectors[] = {
	{"\"null\"", "\"null\"", 7195948357588979594LL},
	{"{\"type\":\"null\"}", "\"null\"", 7195948357588979594LL},
	{"\"boolean\"", "\"boolean\"", -6970731678124411036LL},
	{"\"int\"", "\"int\"", 8247732601305521295LL},
	{"{\"type\":\"int\"}", "\"int\"", 8247732601305521295LL},
	{"\"long\"", "\"long\"", -3434872931120570953LL},
	{"\"float\"", "\"float\"", 5583340709985441680LL},
	{"\"double\"", "\"double\"", -8181574048448539266LL},
	{"\"bytes\"", "\"bytes\"", 5746618253357095269LL},
	{"\"string\"", "\"string\"", -8142146995180207161LL},
	{"[  ]", "[]", -1241056759729112623LL},
	{"[ \"int\"  ]", "[\"int\"]", -5232228896498058493LL},
	{"[ \"int\" , {\"type\":\"boolean\"} ]", "[\"int\",\"boolean\"]", 5392556393470105090LL},
	{"{\"fields\":[], \"type\":\"record\", \"name\":\"foo\"}",
	 "{\"name\":\"foo\",\"type\":\"record\",\"fields\":[]}", -4824392279771201922LL},
	{"{\"fields\":[], \"type\":\"record\", \"name\":\"foo\", \"namespace\":\"x.y\"}",
	 "{\"name\":\"x.y.foo\",\"type\":\"record\",\"fields\":[]}", 5916914534497305771LL},
	{"{\"fields\":[], \"type\":\"record\", \"name\":\"a.b.foo\", \"namespace\":\"x.y\"}",
	 "{\"name\":\"a.b.foo\",\"type\":\"record\",\"fields\":[]}", -4616218487480524110LL},
	{"{\"fields\":[], \"type\":\"record\", \"name\":\"foo\", \"doc\":\"Useful info\"}",
	 "{\"name\":\"foo\",\"type\":\"record\",\"fields\":[]}", -4824392279771201922LL},
	{"{\"fields\":[], \"type\":\"record\", \"name\":\"foo\", \"aliases\":[\"foo\",\"bar\"]}",
	 "{\"name\":\"foo\",\"type\":\"record\",\"fields\":[]}", -4824392279771201922LL},
	{"{\"fields\":[{\"type\":{\"type\":\"boolean\"}, \"name\":\"f1\"}], \"type\":\"record\", \"name\":\"foo\"}",
	 "{\"name\":\"foo\",\"type\":\"record\",\"fields\":[{\"name\":\"f1\",\"type\":\"boolean\"}]}",
	 7843277075252814651LL},
	{"{ \"fields\":[{\"type\":\"boolean\", \"aliases\":[], \"name\":\"f1\", \"default\":\"true\"},\n"
	 "  {\"order\":\"descending\",\"name\":\"f2\",\"doc\":\"Hello\",\"type\":\"int\"}],\n"
	 "  \"type\":\"record\", \"name\":\"foo\"\n}",
	 "{\"name\":\"foo\",\"type\":\"record\",\"fields\":[{\"name\":\"f1\",\"type\":\"boolean\"},{\"name\":\"f2\",\"type\":\"int\"}]}",
	 -4860222112080293046LL},
	{"{\"type\":\"enum\", \"name\":\"foo\", \"symbols\":[\"A1\"]}",
	 "{\"name\":\"foo\",\"type\":\"enum\",\"symbols\":[\"A1\"]}", -6342190197741309591LL},
	{"{\"namespace\":\"x.y.z\", \"type\":\"enum\", \"name\":\"foo\", \"doc\":\"foo bar\", \"symbols\":[\"A1\", \"A2\"]}",
	 "{\"name\":\"x.y.z.foo\",\"type\":\"enum\",\"symbols\":[\"A1\",\"A2\"]}", -4448647247586288245LL},
	{"{\"name\":\"foo\",\"type\":\"fixed\",\"size\":15}",
	 "{\"name\":\"foo\",\"type\":\"fixed\",\"size\":15}", 1756455273707447556LL},
	{"{\"namespace\":\"x.y.z\", \"type\":\"fixed\", \"name\":\"foo\", \"doc\":\"foo bar\", \"size\":32}",
	 "{\"name\":\"x.y.z.foo\",\"type\":\"fixed\",\"size\":32}", -3064184465700546786LL},
	{"{ \"items\":{\"type\":\"null\"}, \"type\":\"array\"}", "{\"type\":\"array\",\"items\":\"null\"}",
	 -589620603366471059LL},
	{"{ \"values\":\"string\", \"type\":\"map\"}", "{\"type\":\"map\",\"values\":\"string\"}",
	 -8732877298790414990LL},
	{"{\"name\":\"PigValue\",\"type\":\"record\",\n"
	 " \"fields\":[{\"name\":\"value\", \"type\":[\"null\", \"int\", \"long\", \"PigValue\"]}]}",
	 "{\"name\":\"PigValue\",\"type\":\"record\",\"fields\":[{\"name\":\"value\",\"type\":[\"null\",\"int\",\"long\",\"PigValue\"]}]}",
	 -1759257747318642341LL},
};

START_TEST(test_crc64_empty)
{
	ck_assert_uint_eq(tly_crc64_avro("", 0), 0xc15d213aa4d7a795ULL);
}
END_TEST

START_TEST(test_spec_vectors)
{
	char err[256];
	char *pcf = tly_schema_canonical_form(vectors[_i].input, strlen(vectors[_i].input), err,
					      sizeof(err));
	ck_assert_msg(pcf, "vector %d: %s", _i, err);
	ck_assert_str_eq(pcf, vectors[_i].canonical);
	ck_assert_uint_eq(tly_schema_fingerprint_pcf(pcf), (uint64_t)vectors[_i].fingerprint);
	free(pcf);
}
END_TEST

START_TEST(test_logical_types_dropped)
{
	char err[256];
	const char *in = "{\"type\":\"record\",\"name\":\"R\",\"namespace\":\"n\",\"fields\":["
			 "{\"name\":\"id\",\"type\":{\"type\":\"string\",\"logicalType\":\"uuid\"}},"
			 "{\"name\":\"h\",\"type\":{\"type\":\"fixed\",\"name\":\"H\",\"size\":2}},"
			 "{\"name\":\"h2\",\"type\":\"H\"}]}";
	char *pcf = tly_schema_canonical_form(in, strlen(in), err, sizeof(err));
	ck_assert_msg(pcf, "%s", err);
	ck_assert_str_eq(pcf, "{\"name\":\"n.R\",\"type\":\"record\",\"fields\":[{\"name\":\"id\",\"type\":"
			      "\"string\"},{\"name\":\"h\",\"type\":{\"name\":\"n.H\",\"type\":\"fixed\","
			      "\"size\":2}},{\"name\":\"h2\",\"type\":\"n.H\"}]}");
	free(pcf);
	ck_assert_ptr_null(tly_schema_canonical_form("{\"type\":", 8, err, sizeof(err)));
	ck_assert_ptr_null(tly_schema_canonical_form("{\"type\":\"record\"}", 17, err, sizeof(err)));
}
END_TEST

/* Every current schema agrees with python3-avro's canonical form and an independent CRC-64. */
START_TEST(test_matches_python_avro)
{
	char err[256];
	struct tly_schema_registry *reg = tly_schema_registry_new(err, sizeof(err));
	ck_assert_msg(reg, "%s", err);

	char *argv[64];
	int argc = 0;
	argv[argc++] = "/usr/bin/python3";
	argv[argc++] = "tests/pcf_reference.py";
	char paths[40][128];
	int n = 0;
	for (const struct tly_embedded *e = tly_embedded_schemas; e->name; e++, n++) {
		ck_assert_int_lt(n, 40);
		snprintf(paths[n], sizeof(paths[n]), "schemas/%s", e->name);
		argv[argc++] = paths[n];
	}
	argv[argc] = NULL;
	static char out[1 << 20];
	int rc = tly_proc_run(argv, out, sizeof(out));
	ck_assert_msg(rc == 0, "python3 reference failed: %s", out);

	int checked = 0;
	for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
		char *tab1 = strchr(line, '\t');
		ck_assert_ptr_nonnull(tab1);
		char *tab2 = strchr(tab1 + 1, '\t');
		ck_assert_ptr_nonnull(tab2);
		*tab1 = *tab2 = '\0';
		const struct tly_schema *s = tly_schema_current(reg, line);
		ck_assert_msg(s, "no current schema %s", line);
		ck_assert_str_eq(tly_schema_pcf(s), tab1 + 1);
		char hex[17];
		snprintf(hex, sizeof(hex), "%016llx", (unsigned long long)tly_schema_fingerprint(s));
		ck_assert_str_eq(hex, tab2 + 1);
		checked++;
	}
	ck_assert_int_eq(checked, n);
	ck_assert_int_eq(n, TLY_EV__COUNT);
	tly_schema_registry_free(reg);
}
END_TEST

/*
 * The schema-compatibility gate: every released version must stay readable by the current
 * schema, and every current schema must itself be released (make schemas-release) so the next
 * change is checked against it.
 */
START_TEST(test_released_versions_readable)
{
	char err[512];
	struct tly_schema_registry *cur = tly_schema_registry_new_empty();
	for (const struct tly_embedded *e = tly_embedded_schemas; e->name; e++)
		ck_assert_msg(tly_schema_registry_add(cur, e->data, e->len, true, err, sizeof(err)) == 0,
			      "%s: %s", e->name, err);
	int released = 0;
	for (const struct tly_embedded *e = tly_embedded_released; e->name; e++, released++) {
		struct tly_schema_registry *one = tly_schema_registry_new_empty();
		ck_assert_int_eq(tly_schema_registry_add(one, e->data, e->len, false, err, sizeof(err)), 0);
		const struct tly_schema *old = tly_schema_at(one, 0);
		const struct tly_schema *now = tly_schema_current(cur, tly_schema_fullname(old));
		ck_assert_msg(now, "released %s has no current schema (a type may never be removed)",
			      e->name);
		ck_assert_msg(tly_schema_check_compat(e->data, tly_schema_text(now), err, sizeof(err)) == 0,
			      "schemas/%s.avsc can no longer read data written with released/%s: %s",
			      tly_schema_fullname(old), e->name, err);
		tly_schema_registry_free(one);
	}
	ck_assert_int_ge(released, TLY_EV__COUNT);
	for (size_t i = 0; i < tly_schema_count(cur); i++) {
		const struct tly_schema *s = tly_schema_at(cur, i);
		bool found = false;
		for (const struct tly_embedded *e = tly_embedded_released; e->name && !found; e++) {
			char *pcf = tly_schema_canonical_form(e->data, e->len, err, sizeof(err));
			found = pcf && strcmp(pcf, tly_schema_pcf(s)) == 0;
			free(pcf);
		}
		ck_assert_msg(found, "schema %s changed but is not released: run make schemas-release",
			      tly_schema_fullname(s));
	}
	tly_schema_registry_free(cur);
}
END_TEST

#define REC(fields) "{\"type\":\"record\",\"name\":\"R\",\"fields\":[" fields "]}"

START_TEST(test_compat_rules)
{
	char err[512];
	const char *w = REC("{\"name\":\"a\",\"type\":\"int\"},{\"name\":\"b\",\"type\":\"string\"}");
	/* compatible: same, promoted int->long, field dropped, field added with a default */
	ck_assert_int_eq(tly_schema_check_compat(w, w, err, sizeof(err)), 0);
	ck_assert_msg(tly_schema_check_compat(w, REC("{\"name\":\"a\",\"type\":\"long\"},{\"name\":\"b\",\"type\":\"string\"}"), err, sizeof(err)) == 0, "%s", err);
	ck_assert_msg(tly_schema_check_compat(w, REC("{\"name\":\"b\",\"type\":\"string\"}"), err, sizeof(err)) == 0, "%s", err);
	ck_assert_msg(tly_schema_check_compat(w, REC("{\"name\":\"a\",\"type\":\"int\"},{\"name\":\"b\",\"type\":\"string\"},"
						     "{\"name\":\"c\",\"type\":[\"null\",\"long\"],\"default\":null}"), err, sizeof(err)) == 0, "%s", err);
	/* incompatible: a type change, a new field without default */
	ck_assert_int_eq(tly_schema_check_compat(w, REC("{\"name\":\"a\",\"type\":\"string\"},{\"name\":\"b\",\"type\":\"string\"}"), err, sizeof(err)), TLY_E_INCOMPATIBLE);
	ck_assert_int_eq(tly_schema_check_compat(w, REC("{\"name\":\"a\",\"type\":\"int\"},{\"name\":\"b\",\"type\":\"string\"},"
							 "{\"name\":\"c\",\"type\":\"long\"}"), err, sizeof(err)), TLY_E_INCOMPATIBLE);
	ck_assert_msg(strstr(err, "\"c\"") && strstr(err, "no default"), "%s", err);
	/* narrowing long->int is refused by avro-c's resolution */
	ck_assert_int_eq(tly_schema_check_compat(REC("{\"name\":\"a\",\"type\":\"long\"}"), REC("{\"name\":\"a\",\"type\":\"int\"}"), err, sizeof(err)), TLY_E_INCOMPATIBLE);
}
END_TEST

/* Data written with an older TokensReserved (no conversation_id, int tokens) reads into today's. */
START_TEST(test_decode_old_writer)
{
	char err[512];
	const struct tly_embedded *cur = NULL;
	for (const struct tly_embedded *e = tly_embedded_schemas; e->name; e++) {
		if (strcmp(e->name, "TokensReserved.avsc") == 0)
			cur = e;
	}
	ck_assert_ptr_nonnull(cur);
	const char *old =
		"{\"type\":\"record\",\"name\":\"TokensReserved\",\"namespace\":\"tally.events\",\"fields\":["
		"{\"name\":\"event_id\",\"type\":\"string\"},{\"name\":\"tenant_id\",\"type\":\"string\"},"
		"{\"name\":\"occurred_at\",\"type\":\"long\"},{\"name\":\"reservation_id\",\"type\":\"string\"},"
		"{\"name\":\"tokens\",\"type\":\"int\"},{\"name\":\"expires_at\",\"type\":\"long\"},"
		"{\"name\":\"model\",\"type\":\"string\"}]}";
	ck_assert_msg(tly_schema_check_compat(old, cur->data, err, sizeof(err)) == 0, "%s", err);

	/* Write raw with avro-c under the old schema. */
	avro_schema_t os;
	ck_assert_int_eq(avro_schema_from_json_length(old, strlen(old), &os), 0);
	avro_value_iface_t *iface = avro_generic_class_from_schema(os);
	avro_value_t v, f;
	ck_assert_int_eq(avro_generic_value_new(iface, &v), 0);
	struct tly_event sample = {0};
	tly_fixture_event(&sample, TLY_EV_TOKENS_RESERVED, 1);
	char id[37], tid[37], rid[37];
	tly_uuid_format(&sample.event_id, id);
	tly_uuid_format(&sample.tenant_id, tid);
	tly_uuid_format(&sample.u.tokens_reserved.reservation_id, rid);
	avro_value_get_by_name(&v, "event_id", &f, NULL);
	avro_value_set_string(&f, id);
	avro_value_get_by_name(&v, "tenant_id", &f, NULL);
	avro_value_set_string(&f, tid);
	avro_value_get_by_name(&v, "occurred_at", &f, NULL);
	avro_value_set_long(&f, sample.occurred_at);
	avro_value_get_by_name(&v, "reservation_id", &f, NULL);
	avro_value_set_string(&f, rid);
	avro_value_get_by_name(&v, "tokens", &f, NULL);
	avro_value_set_int(&f, 777);
	avro_value_get_by_name(&v, "expires_at", &f, NULL);
	avro_value_set_long(&f, sample.occurred_at + 5);
	avro_value_get_by_name(&v, "model", &f, NULL);
	avro_value_set_string(&f, "m1");
	unsigned char msg[512];
	char *pcf = tly_schema_canonical_form(old, strlen(old), err, sizeof(err));
	uint64_t fp = tly_schema_fingerprint_pcf(pcf);
	msg[0] = 0xC3;
	msg[1] = 0x01;
	for (int i = 0; i < 8; i++)
		msg[2 + i] = (unsigned char)(fp >> (8 * i));
	avro_writer_t wr = avro_writer_memory((char *)msg + 10, sizeof(msg) - 10);
	ck_assert_int_eq(avro_value_write(wr, &v), 0);
	size_t len = 10 + (size_t)avro_writer_tell(wr);

	/* A reader that knows the old version as released decodes it into the current struct. */
	struct tly_schema_registry *reg = tly_schema_registry_new(err, sizeof(err));
	ck_assert_int_eq(tly_schema_registry_add(reg, old, strlen(old), false, err, sizeof(err)), 0);
	struct tly_codec *codec = tly_codec_new_with_registry(reg, err, sizeof(err));
	struct tly_event ev = {0};
	ck_assert_msg(tly_codec_decode(codec, msg, len, &ev, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(ev.type, TLY_EV_TOKENS_RESERVED);
	ck_assert_int_eq(ev.u.tokens_reserved.tokens, 777);
	ck_assert_str_eq(ev.u.tokens_reserved.model, "m1");
	ck_assert(tly_uuid_is_nil(&ev.u.tokens_reserved.conversation_id));
	ck_assert_mem_eq(ev.tenant_id.b, sample.tenant_id.b, 16);

	/* Without that version the fingerprint is unknown. */
	struct tly_codec *plain = tly_codec_new(err, sizeof(err));
	ck_assert_int_eq(tly_codec_decode(plain, msg, len, &ev, err, sizeof(err)), TLY_E_UNKNOWN_FINGERPRINT);

	free(pcf);
	tly_event_free(&ev);
	tly_event_free(&sample);
	tly_codec_free(codec);
	tly_codec_free(plain);
	avro_writer_free(wr);
	avro_value_decref(&v);
	avro_value_iface_decref(iface);
	avro_schema_decref(os);
}
END_TEST

Suite *schema_suite(void)
{
	Suite *s = suite_create("schema");
	TCase *tc = tcase_create("canonical");
	tcase_add_test(tc, test_crc64_empty);
	tcase_add_loop_test(tc, test_spec_vectors, 0, (int)(sizeof(vectors) / sizeof(vectors[0])));
	tcase_add_test(tc, test_logical_types_dropped);
	tcase_add_test(tc, test_matches_python_avro);
	suite_add_tcase(s, tc);
	tc = tcase_create("compat");
	tcase_add_test(tc, test_released_versions_readable);
	tcase_add_test(tc, test_compat_rules);
	tcase_add_test(tc, test_decode_old_writer);
	suite_add_tcase(s, tc);
	return s;
}
