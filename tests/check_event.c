/* Event suite: descriptors agree with the .avsc files, and every validation rule rejects. */
#include <check.h>
#include <stdio.h>
#include <string.h>

#include "event.h"
#include "fixtures.h"
#include "schema.h"
#include "suites.h"

/* Expected Avro type of each descriptor kind (the branch type for optional kinds). */
static bool kind_matches(enum tly_field_kind k, avro_schema_t t)
{
	avro_type_t at = avro_typeof(t);
	if (at == AVRO_UNION) {
		if (k != TLY_F_OPT_UUID && k != TLY_F_OPT_STR && k != TLY_F_OPT_LONG && k != TLY_F_OPT_TS)
			return false;
		if (avro_schema_union_size(t) != 2 || avro_typeof(avro_schema_union_branch(t, 0)) != AVRO_NULL)
			return false;
		at = avro_typeof(avro_schema_union_branch(t, 1));
	}
	switch (k) {
	case TLY_F_UUID: case TLY_F_OPT_UUID: case TLY_F_STR: case TLY_F_OPT_STR: case TLY_F_JSON:
		return at == AVRO_STRING;
	case TLY_F_LONG: case TLY_F_TS: case TLY_F_OPT_LONG: case TLY_F_OPT_TS:
		return at == AVRO_INT64;
	case TLY_F_INT: return at == AVRO_INT32;
	case TLY_F_BOOL: return at == AVRO_BOOLEAN;
	case TLY_F_MAP_LONG: return at == AVRO_MAP && avro_typeof(avro_schema_map_values(t)) == AVRO_INT64;
	case TLY_F_MAP_STR: return at == AVRO_MAP && avro_typeof(avro_schema_map_values(t)) == AVRO_STRING;
	case TLY_F_MAP_BOOL: return at == AVRO_MAP && avro_typeof(avro_schema_map_values(t)) == AVRO_BOOLEAN;
	case TLY_F_RECORDS: return at == AVRO_ARRAY && avro_typeof(avro_schema_array_items(t)) == AVRO_RECORD;
	case TLY_F_SHA256: return at == AVRO_BYTES;
	}
	return false;
}

static void check_record(const struct tly_record_desc *rd, avro_schema_t rec)
{
	ck_assert_uint_eq(avro_schema_record_size(rec), rd->n_fields);
	for (size_t i = 0; i < rd->n_fields; i++) {
		const struct tly_field *f = &rd->fields[i];
		avro_schema_t t = avro_schema_record_field_get(rec, f->name);
		ck_assert_msg(t, "%s.%s: not in the schema", rd->name, f->name);
		ck_assert_msg(kind_matches(f->kind, t), "%s.%s: descriptor kind %d does not match the schema",
			      rd->name, f->name, f->kind);
		if (f->kind == TLY_F_RECORDS)
			check_record(f->sub, avro_schema_array_items(t));
	}
}

START_TEST(test_descriptors_match_schemas)
{
	char err[256];
	struct tly_schema_registry *reg = tly_schema_registry_new(err, sizeof(err));
	ck_assert_msg(reg, "%s", err);
	const struct tly_event_desc *d = tly_event_desc((enum tly_event_type)_i);
	ck_assert_ptr_nonnull(d);
	ck_assert_int_eq(d->type, _i);
	const struct tly_schema *s = tly_schema_current(reg, d->fullname);
	ck_assert_msg(s, "no schema %s", d->fullname);
	check_record(&d->record, tly_schema_avro(s));
	ck_assert_ptr_eq(tly_event_desc_by_name(d->name), d);
	tly_schema_registry_free(reg);
}
END_TEST

START_TEST(test_fixtures_valid)
{
	struct tly_event ev = {0};
	char err[256] = "";
	tly_fixture_event(&ev, (enum tly_event_type)_i, 3);
	ck_assert_msg(tly_event_validate(&ev, err, sizeof(err)) == 0, "%s", err);
}
END_TEST

/* One broken field per case; the error must name the field. */
static const char long_name[300] =
	"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
	"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
	"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

static const struct tly_map_entry neg_price[] = {{.key = "x", .i = -1}};
static const struct tly_map_entry dup_keys[] = {{.key = "x", .i = 1}, {.key = "x", .i = 2}};
static const struct tly_plan_feature bad_feature[] = {{"", "Empty key", {false, 0}, {false, 0}, false}};

struct bad_case {
	const char *name;
	enum tly_event_type type;
	void (*breakit)(struct tly_event *ev);
	const char *expect; /* substring of the error */
};

static void nil_tenant(struct tly_event *ev) { memset(&ev->tenant_id, 0, 16); }
static void nil_event_id(struct tly_event *ev) { memset(&ev->event_id, 0, 16); }
static void missing_slug(struct tly_event *ev) { ev->u.tenant_created.slug = NULL; }
static void empty_name(struct tly_event *ev) { ev->u.tenant_created.name = ""; }
static void long_slug(struct tly_event *ev) { ev->u.tenant_created.slug = long_name; }
static void bad_utf8(struct tly_event *ev) { ev->u.tenant_created.name = "caf\xc3"; }
static void overlong_utf8(struct tly_event *ev) { ev->u.tenant_created.name = "\xc0\xaf"; }
static void negative_tokens(struct tly_event *ev) { ev->u.tokens_debited.tokens = -1; }
static void zero_reserve(struct tly_event *ev) { ev->u.tokens_reserved.tokens = 0; }
static void expired_hold(struct tly_event *ev) { ev->u.tokens_reserved.expires_at = ev->occurred_at; }
static void negative_cost(struct tly_event *ev) { ev->u.reservation_settled.cost_micros = -5; }
static void bad_role(struct tly_event *ev) { ev->u.message_appended.role = "robot"; }
static void bad_content(struct tly_event *ev) { ev->u.message_appended.content = "{not json"; }
static void bad_currency(struct tly_event *ev) { ev->u.subscription_started.terms.currency = "usd"; }
static void bad_interval(struct tly_event *ev) { ev->u.subscription_started.terms.interval = "fortnight"; }
static void bad_period(struct tly_event *ev) { ev->u.subscription_started.period_end = ev->u.subscription_started.period_start; }
static void zero_seats(struct tly_event *ev) { ev->u.subscription_started.seat_count = 0; }
static void neg_metered(struct tly_event *ev) { ev->u.subscription_started.terms.metered_prices = (struct tly_map){neg_price, 1}; }
static void dup_metered(struct tly_event *ev) { ev->u.subscription_started.terms.metered_prices = (struct tly_map){dup_keys, 2}; }
static void bad_email(struct tly_event *ev) { ev->u.user_registered.email = "not-an-email"; }
static void bad_invoice_status(struct tly_event *ev) { ev->u.invoice_status_changed.status = "refunded"; }
static void neg_overage_price(struct tly_event *ev) { ev->u.subscription_changed.terms.overage_price_micros_per_1k_tokens = (struct tly_opt_i64){true, -1}; }
static void bad_feature_key(struct tly_event *ev) { ev->u.plan_published.features = (struct tly_list){bad_feature, 1}; }
static void ledger_seq0(struct tly_event *ev) { ev->u.ledger_entry.seq = 0; }
static void ledger_neg_balance(struct tly_event *ev) { ev->u.ledger_entry.held = -1; }
static void ledger_amount_no_currency(struct tly_event *ev) { ev->u.ledger_entry.currency = NULL; }
static void credits_expired(struct tly_event *ev) { ev->u.credits_granted.expires_at.v = ev->occurred_at - 1; }
static void neg_quantity(struct tly_event *ev) { ev->u.usage_reported.quantity = -3; }

static const struct bad_case bad_cases[] = {
	{"nil tenant", TLY_EV_TENANT_CREATED, nil_tenant, "field tenant_id: missing"},
	{"nil event id", TLY_EV_TOKENS_RESERVED, nil_event_id, "field event_id: missing"},
	{"missing slug", TLY_EV_TENANT_CREATED, missing_slug, "field slug: missing"},
	{"empty name", TLY_EV_TENANT_CREATED, empty_name, "field name: must not be empty"},
	{"long slug", TLY_EV_TENANT_CREATED, long_slug, "field slug: longer than 256"},
	{"bad utf8", TLY_EV_TENANT_CREATED, bad_utf8, "field name: not valid UTF-8"},
	{"overlong utf8", TLY_EV_TENANT_CREATED, overlong_utf8, "field name: not valid UTF-8"},
	{"negative tokens", TLY_EV_TOKENS_DEBITED, negative_tokens, "field tokens: must not be negative"},
	{"zero reservation", TLY_EV_TOKENS_RESERVED, zero_reserve, "field tokens: must be at least 1"},
	{"hold expires at once", TLY_EV_TOKENS_RESERVED, expired_hold, "field expires_at"},
	{"negative cost", TLY_EV_RESERVATION_SETTLED, negative_cost, "field cost_micros"},
	{"bad role", TLY_EV_MESSAGE_APPENDED, bad_role, "field role: \"robot\" is not one of"},
	{"content not json", TLY_EV_MESSAGE_APPENDED, bad_content, "field content: not JSON"},
	{"lower-case currency", TLY_EV_SUBSCRIPTION_STARTED, bad_currency, "field currency"},
	{"bad interval", TLY_EV_SUBSCRIPTION_STARTED, bad_interval, "field interval"},
	{"empty period", TLY_EV_SUBSCRIPTION_STARTED, bad_period, "field period_end"},
	{"zero seats", TLY_EV_SUBSCRIPTION_STARTED, zero_seats, "field seat_count"},
	{"negative metered price", TLY_EV_SUBSCRIPTION_STARTED, neg_metered, "field metered_prices: has a negative value"},
	{"duplicate map key", TLY_EV_SUBSCRIPTION_STARTED, dup_metered, "field metered_prices: has a duplicate key"},
	{"bad email", TLY_EV_USER_REGISTERED, bad_email, "field email: not an email"},
	{"bad invoice status", TLY_EV_INVOICE_STATUS_CHANGED, bad_invoice_status, "field status"},
	{"negative overage price", TLY_EV_SUBSCRIPTION_CHANGED, neg_overage_price, "field overage_price_micros_per_1k_tokens"},
	{"empty feature key", TLY_EV_PLAN_PUBLISHED, bad_feature_key, "field features[0].feature_key"},
	{"ledger seq 0", TLY_EV_LEDGER_ENTRY, ledger_seq0, "field seq: must be at least 1"},
	{"ledger negative held", TLY_EV_LEDGER_ENTRY, ledger_neg_balance, "field held: must not be negative"},
	{"ledger amount without currency", TLY_EV_LEDGER_ENTRY, ledger_amount_no_currency, "field currency"},
	{"credits already expired", TLY_EV_CREDITS_GRANTED, credits_expired, "field expires_at"},
	{"negative usage", TLY_EV_USAGE_REPORTED, neg_quantity, "field quantity"},
};

START_TEST(test_validation_rejects)
{
	const struct bad_case *c = &bad_cases[_i];
	struct tly_event ev = {0};
	char err[256] = "";
	tly_fixture_event(&ev, c->type, 1);
	ck_assert_int_eq(tly_event_validate(&ev, err, sizeof(err)), 0);
	c->breakit(&ev);
	ck_assert_msg(tly_event_validate(&ev, err, sizeof(err)) == TLY_E_INVALID, "%s: accepted", c->name);
	ck_assert_msg(strstr(err, c->expect), "%s: error \"%s\" lacks \"%s\"", c->name, err, c->expect);
	/* a decoder's event: every rule but UTF-8 (which the decoder checked) still holds */
	char derr[256] = "";
	int drc = tly_event_validate_decoded(&ev, derr, sizeof(derr));
	if (strstr(c->expect, "UTF-8"))
		ck_assert_int_eq(drc, 0);
	else
		ck_assert_msg(drc == TLY_E_INVALID && strcmp(derr, err) == 0, "%s: decoded: \"%s\"",
			      c->name, derr);
}
END_TEST

START_TEST(test_uuid_text)
{
	tly_uuid u;
	char out[37];
	ck_assert_int_eq(tly_uuid_parse("6F9619FF-8B86-D011-B42D-00C04FC964FF", &u), 0);
	tly_uuid_format(&u, out);
	ck_assert_str_eq(out, "6f9619ff-8b86-d011-b42d-00c04fc964ff");
	ck_assert_int_eq(tly_uuid_parse("6f9619ff8b86d011b42d00c04fc964ff", &u), TLY_E_INVALID);
	ck_assert_int_eq(tly_uuid_parse("6f9619ff-8b86-d011-b42d-00c04fc964fg", &u), TLY_E_INVALID);
	ck_assert_int_eq(tly_uuid_parse("", &u), TLY_E_INVALID);
	ck_assert_int_eq(tly_uuid_parse(NULL, &u), TLY_E_INVALID);
}
END_TEST

START_TEST(test_utf8)
{
	ck_assert(tly_utf8_valid("plain", 5));
	ck_assert(tly_utf8_valid("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9));
	ck_assert(!tly_utf8_valid("\xed\xa0\x80", 3)); /* surrogate */
	ck_assert(!tly_utf8_valid("\xf4\x90\x80\x80", 4)); /* past U+10FFFF */
	ck_assert(!tly_utf8_valid("\xe2\x82", 2));          /* cut short */
	ck_assert(!tly_utf8_valid("\x80", 1));
	/* ASCII is read eight bytes at a time: a bad or a good byte sequence at every offset */
	for (size_t at = 0; at < 24; at++) {
		char s[32];
		memset(s, 'a', sizeof(s));
		s[at] = '\xff';
		ck_assert_msg(!tly_utf8_valid(s, 25), "0xff at %zu", at);
		s[at] = '\xc3';
		ck_assert_msg(!tly_utf8_valid(s, 25), "a lone lead byte at %zu", at);
		ck_assert_msg(!tly_utf8_valid(s, at + 1), "cut short at %zu", at);
		s[at + 1] = '\xa9';
		ck_assert_msg(tly_utf8_valid(s, 25), "U+00E9 at %zu", at);
		ck_assert_msg(tly_utf8_valid(s, at), "ASCII before %zu", at);
	}
}
END_TEST

Suite *event_suite(void)
{
	Suite *s = suite_create("event");
	TCase *tc = tcase_create("descriptors");
	tcase_add_loop_test(tc, test_descriptors_match_schemas, 0, TLY_EV__COUNT);
	tcase_add_loop_test(tc, test_fixtures_valid, 0, TLY_EV__COUNT);
	suite_add_tcase(s, tc);
	tc = tcase_create("validation");
	tcase_add_loop_test(tc, test_validation_rejects, 0, (int)(sizeof(bad_cases) / sizeof(bad_cases[0])));
	tcase_add_test(tc, test_uuid_text);
	tcase_add_test(tc, test_utf8);
	suite_add_tcase(s, tc);
	return s;
}
