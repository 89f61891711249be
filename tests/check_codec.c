/* Codec suite: round trip of every message type, and typed errors for hostile bytes. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <uuid/uuid.h>

#include "codec.h"
#include "fixtures.h"
#include "../producers/loadgen.h"
#include "suites.h"

static struct tly_codec *codec;
static struct tly_codec *generic; /* avro-c's generic values only: the plans' reference */

static void setup(void)
{
	char err[256];
	codec = tly_codec_new(err, sizeof(err));
	ck_assert_msg(codec, "%s", err);
	generic = tly_codec_new(err, sizeof(err));
	ck_assert_msg(generic, "%s", err);
	tly_codec_set_generic(generic, true);
}

static void teardown(void)
{
	tly_codec_free(codec);
	tly_codec_free(generic);
}

/* Encode a fixture of type; caller frees out. */
static void encode_fixture(enum tly_event_type type, struct tly_buf *out)
{
	struct tly_event ev = {0};
	char err[512];
	tly_fixture_event(&ev, type, 2);
	ck_assert_msg(tly_codec_encode(codec, &ev, out, err, sizeof(err)) == 0, "%s", err);
	tly_event_free(&ev);
}

START_TEST(test_round_trip)
{
	enum tly_event_type type = (enum tly_event_type)_i;
	struct tly_event in = {0}, out = {0};
	struct tly_buf a = {0}, b = {0};
	char err[512];
	tly_fixture_event(&in, type, 5);
	ck_assert_msg(tly_codec_encode(codec, &in, &a, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(a.data[0], 0xC3);
	ck_assert_uint_eq(a.data[1], 0x01);
	ck_assert_msg(tly_codec_decode(codec, a.data, a.len, &out, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(out.type, type);
	ck_assert_mem_eq(out.event_id.b, in.event_id.b, 16);
	ck_assert_mem_eq(out.tenant_id.b, in.tenant_id.b, 16);
	ck_assert_int_eq(out.occurred_at, in.occurred_at);
	/* Every field is encoded, so equal re-encodings mean equal values. */
	ck_assert_msg(tly_codec_encode(codec, &out, &b, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(a.len, b.len);
	ck_assert_mem_eq(a.data, b.data, a.len);
	/* And a different value encodes differently (the comparison above can fail). */
	struct tly_event other = {0};
	tly_fixture_event(&other, type, 6);
	ck_assert_int_eq(tly_codec_encode(codec, &other, &b, err, sizeof(err)), 0);
	ck_assert(a.len != b.len || memcmp(a.data, b.data, a.len) != 0);
	tly_event_free(&in);
	tly_event_free(&out);
	tly_event_free(&other);
	tly_buf_free(&a);
	tly_buf_free(&b);
}
END_TEST

START_TEST(test_round_trip_fields)
{
	struct tly_event in = {0}, out = {0};
	struct tly_buf a = {0};
	char err[512];
	tly_fixture_event(&in, TLY_EV_SUBSCRIPTION_STARTED, 1);
	ck_assert_int_eq(tly_codec_encode(codec, &in, &a, err, sizeof(err)), 0);
	ck_assert_int_eq(tly_codec_decode(codec, a.data, a.len, &out, err, sizeof(err)), 0);
	const struct tly_ev_subscription_started *s = &out.u.subscription_started;
	ck_assert_str_eq(s->terms.plan_code, "pro");
	ck_assert_str_eq(s->terms.currency, "USD");
	ck_assert(s->terms.overage_price_micros_per_1k_tokens.set);
	ck_assert_int_eq(s->terms.overage_price_micros_per_1k_tokens.v, 2000);
	ck_assert_uint_eq(s->terms.metered_prices.n, 2);
	ck_assert_str_eq(s->metadata.items[1].s, "ü-123");
	ck_assert_int_eq(s->period_end - s->period_start, 2678400000000LL);

	/* Optional fields absent travel as null. */
	in.u.subscription_started.billing_email = NULL;
	in.u.subscription_started.trial_ends_at.set = false;
	in.u.subscription_started.terms.overage_price_micros_per_1k_tokens.set = false;
	ck_assert_int_eq(tly_codec_encode(codec, &in, &a, err, sizeof(err)), 0);
	ck_assert_int_eq(tly_codec_decode(codec, a.data, a.len, &out, err, sizeof(err)), 0);
	ck_assert_ptr_null(out.u.subscription_started.billing_email);
	ck_assert(!out.u.subscription_started.trial_ends_at.set);
	ck_assert(!out.u.subscription_started.terms.overage_price_micros_per_1k_tokens.set);

	tly_fixture_event(&in, TLY_EV_LEDGER_ENTRY, 1);
	ck_assert_int_eq(tly_codec_encode(codec, &in, &a, err, sizeof(err)), 0);
	ck_assert_int_eq(tly_codec_decode(codec, a.data, a.len, &out, err, sizeof(err)), 0);
	const struct tly_ledger_entry *e = &out.u.ledger_entry;
	ck_assert_uint_eq(e->lines.n, 3);
	const struct tly_invoice_line *l = e->lines.items;
	ck_assert_str_eq(l[2].feature_key, "web_search");
	ck_assert_ptr_null(l[0].feature_key);
	ck_assert_int_eq(e->allowance_delta, -1500);
	ck_assert_mem_eq(e->prev_hash, in.u.ledger_entry.prev_hash, 32);
	tly_event_free(&in);
	tly_event_free(&out);
	tly_buf_free(&a);
}
END_TEST

START_TEST(test_invalid_not_encoded)
{
	struct tly_event ev = {0};
	struct tly_buf out = {0};
	char err[512];
	tly_fixture_event(&ev, TLY_EV_TOKENS_RESERVED, 1);
	ev.u.tokens_reserved.tokens = -10;
	ck_assert_int_eq(tly_codec_encode(codec, &ev, &out, err, sizeof(err)), TLY_E_INVALID);
	ck_assert_uint_eq(out.len, 0);
	ck_assert_msg(strstr(err, "TokensReserved: field tokens"), "%s", err);
	tly_buf_free(&out);
}
END_TEST

/* Decode raw bytes and return the error code; the event must be reusable afterwards. */
static int decode(const void *bytes, size_t len, char *err, size_t errlen)
{
	struct tly_event ev = {0};
	int rc = tly_codec_decode(codec, bytes, len, &ev, err, errlen);
	tly_event_free(&ev);
	return rc;
}

START_TEST(test_header_errors)
{
	char err[512];
	struct tly_buf m = {0};
	encode_fixture(TLY_EV_TENANT_CREATED, &m);
	ck_assert_int_eq(decode(m.data, 0, err, sizeof(err)), TLY_E_TRUNCATED);
	ck_assert_int_eq(decode(m.data, 5, err, sizeof(err)), TLY_E_TRUNCATED);
	ck_assert_int_eq(decode("{\"json\":1}", 10, err, sizeof(err)), TLY_E_BAD_MAGIC);
	ck_assert_int_eq(decode("\xC3\x02", 2, err, sizeof(err)), TLY_E_BAD_MAGIC);
	m.data[5] ^= 0x5A; /* a fingerprint nobody registered */
	ck_assert_int_eq(decode(m.data, m.len, err, sizeof(err)), TLY_E_UNKNOWN_FINGERPRINT);
	ck_assert_msg(strstr(err, "unknown schema fingerprint"), "%s", err);
	tly_buf_free(&m);
	static unsigned char big[TLY_CODEC_MAX_BYTES + 1];
	ck_assert_int_eq(decode(big, sizeof(big), err, sizeof(err)), TLY_E_TOO_LARGE);
}
END_TEST

/* Every strict prefix of a valid message is refused as truncated, never read. */
START_TEST(test_every_prefix_truncated)
{
	char err[512];
	struct tly_buf m = {0};
	encode_fixture((enum tly_event_type)_i, &m);
	ck_assert_int_eq(decode(m.data, m.len, err, sizeof(err)), 0);
	for (size_t n = 0; n < m.len; n++) {
		int rc = decode(m.data, n, err, sizeof(err));
		ck_assert_msg(rc == TLY_E_TRUNCATED, "prefix %zu/%zu: rc %d (%s)", n, m.len, rc, err);
	}
	tly_buf_free(&m);
}
END_TEST

/*
 * TenantCreated body: event_id (0x48 + 36 bytes), tenant_id (0x48 + 36), occurred_at (varint),
 * slug (0x08 "acme"), name. Offsets below are into the whole message (header is 10 bytes).
 */
START_TEST(test_hostile_bodies)
{
	char err[512];
	struct tly_buf m = {0};
	encode_fixture(TLY_EV_TENANT_CREATED, &m);
	unsigned char *b = malloc(m.len + 16);
	ck_assert_uint_eq(m.data[10], 0x48);

	/* negative string length */
	memcpy(b, m.data, m.len);
	b[10] = 0x01;
	ck_assert_int_eq(decode(b, m.len, err, sizeof(err)), TLY_E_CORRUPT);
	ck_assert_msg(strstr(err, "negative length"), "%s", err);

	/* huge string length (2^62) */
	unsigned char huge[] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01};
	memcpy(b, m.data, 10);
	memcpy(b + 10, huge, sizeof(huge));
	ck_assert_int_eq(decode(b, 20, err, sizeof(err)), TLY_E_TRUNCATED);

	/* over-long varint (11 continuation bytes) */
	memset(b + 10, 0x80, 11);
	b[21] = 0x01;
	ck_assert_int_eq(decode(b, 22, err, sizeof(err)), TLY_E_CORRUPT);

	/* invalid UTF-8 inside the slug */
	memcpy(b, m.data, m.len);
	size_t slug = 10 + 37 + 37;
	while (b[slug] & 0x80) /* skip occurred_at */
		slug++;
	slug++;
	ck_assert_uint_eq(b[slug], 0x08);
	b[slug + 1] = 0xFF;
	ck_assert_int_eq(decode(b, m.len, err, sizeof(err)), TLY_E_CORRUPT);
	ck_assert_msg(strstr(err, "UTF-8"), "%s", err);

	/* trailing garbage */
	memcpy(b, m.data, m.len);
	b[m.len] = 0x00;
	ck_assert_int_eq(decode(b, m.len + 1, err, sizeof(err)), TLY_E_CORRUPT);
	ck_assert_msg(strstr(err, "trailing"), "%s", err);

	/* a malformed UUID string of the right length decodes but breaks the schema's logical type */
	memcpy(b, m.data, m.len);
	b[11] = 'z';
	ck_assert_int_eq(decode(b, m.len, err, sizeof(err)), TLY_E_INVALID);
	ck_assert_msg(strstr(err, "field event_id") && strstr(err, "not a UUID"), "%s", err);

	/* a NUL byte inside a string */
	memcpy(b, m.data, m.len);
	b[slug + 2] = 0x00;
	ck_assert_int_eq(decode(b, m.len, err, sizeof(err)), TLY_E_INVALID);
	ck_assert_msg(strstr(err, "NUL"), "%s", err);

	/* the slug emptied: decodes, fails validation (required field present but empty) */
	memcpy(b, m.data, slug);
	b[slug] = 0x00;
	memcpy(b + slug + 1, m.data + slug + 5, m.len - slug - 5);
	ck_assert_int_eq(decode(b, m.len - 4, err, sizeof(err)), TLY_E_INVALID);
	ck_assert_msg(strstr(err, "field slug"), "%s", err);

	free(b);
	tly_buf_free(&m);
}
END_TEST

START_TEST(test_hostile_unions_and_booleans)
{
	char err[512];
	struct tly_buf m = {0};
	struct tly_event ev = {0};
	tly_fixture_event(&ev, TLY_EV_SUBSCRIPTION_CANCELLED, 1);
	ck_assert_int_eq(tly_codec_encode(codec, &ev, &m, err, sizeof(err)), 0);
	/* the last byte is at_period_end */
	ck_assert_uint_eq(m.data[m.len - 1], 1);
	m.data[m.len - 1] = 2;
	ck_assert_int_eq(decode(m.data, m.len, err, sizeof(err)), TLY_E_CORRUPT);

	tly_fixture_event(&ev, TLY_EV_TOKENS_RESERVED, 1);
	ck_assert_int_eq(tly_codec_encode(codec, &ev, &m, err, sizeof(err)), 0);
	/* conversation_id is last: branch 1 (0x02), then 0x48 + 36 bytes */
	ck_assert_uint_eq(m.data[m.len - 38], 0x02);
	m.data[m.len - 38] = 0x06; /* branch 3 of a two-branch union */
	ck_assert_int_eq(decode(m.data, m.len, err, sizeof(err)), TLY_E_CORRUPT);
	m.data[m.len - 38] = 0x01; /* branch -1 */
	ck_assert_int_eq(decode(m.data, m.len, err, sizeof(err)), TLY_E_CORRUPT);
	tly_event_free(&ev);
	tly_buf_free(&m);
}
END_TEST

/* Random corruption never crashes and never yields a value that breaks validation. */
START_TEST(test_random_mutations)
{
	char err[512];
	struct tly_buf m = {0};
	encode_fixture((enum tly_event_type)_i, &m);
	unsigned char *b = malloc(m.len);
	unsigned seed = 12345u + (unsigned)_i;
	struct tly_event ev = {0};
	for (int round = 0; round < 400; round++) {
		memcpy(b, m.data, m.len);
		int flips = 1 + (int)(rand_r(&seed) % 4);
		for (int k = 0; k < flips; k++) {
			size_t at = 10 + (size_t)rand_r(&seed) % (m.len - 10);
			b[at] = (unsigned char)rand_r(&seed);
		}
		size_t len = m.len - (size_t)(rand_r(&seed) % 3);
		int rc = tly_codec_decode(codec, b, len, &ev, err, sizeof(err));
		if (rc == 0)
			ck_assert_msg(tly_event_validate(&ev, err, sizeof(err)) == 0, "%s", err);
		else
			ck_assert(rc == TLY_E_TRUNCATED || rc == TLY_E_CORRUPT || rc == TLY_E_INVALID ||
				  rc == TLY_E_TOO_LARGE);
	}
	tly_event_free(&ev);
	free(b);
	tly_buf_free(&m);
}
END_TEST


/* ---- compiled plans against avro-c's generic values ----------------------------------------- */

/* ev encodes to the same bytes through the plan and through the generic path. */
static void assert_same_encoding(const struct tly_event *ev, struct tly_buf *fast)
{
	struct tly_buf slow = {0};
	char err[512], err2[512];
	int rc = tly_codec_encode(codec, ev, fast, err, sizeof(err));
	int rc2 = tly_codec_encode(generic, ev, &slow, err2, sizeof(err2));
	ck_assert_msg(rc == rc2, "plan rc %d (%s), generic rc %d (%s)", rc, err, rc2, err2);
	if (rc == 0) {
		ck_assert_uint_eq(fast->len, slow.len);
		ck_assert_mem_eq(fast->data, slow.data, slow.len);
	}
	tly_buf_free(&slow);
}

/*
 * bytes decode through the plan exactly as through the generic path: the same code and reason,
 * and on success the same value (equal generic re-encodings) and the digest of that re-encoding.
 */
static void assert_same_decoding(const void *bytes, size_t len)
{
	struct tly_event a = {0}, b = {0};
	struct tly_buf ea = {0}, eb = {0};
	char err[512] = "", err2[512] = "";
	unsigned char digest[32], want[32];
	int rc = tly_codec_decode_digest(codec, bytes, len, &a, digest, err, sizeof(err));
	int rc2 = tly_codec_decode(generic, bytes, len, &b, err2, sizeof(err2));
	ck_assert_msg(rc == rc2, "plan rc %d (%s), generic rc %d (%s)", rc, err, rc2, err2);
	if (rc != 0) {
		ck_assert_str_eq(err, err2);
	} else {
		ck_assert_int_eq(tly_codec_encode(generic, &a, &ea, err, sizeof(err)), 0);
		ck_assert_int_eq(tly_codec_encode(generic, &b, &eb, err, sizeof(err)), 0);
		ck_assert_uint_eq(ea.len, eb.len);
		ck_assert_mem_eq(ea.data, eb.data, eb.len);
		unsigned int n = 0;
		ck_assert_int_eq(EVP_Digest(eb.data, eb.len, want, &n, EVP_sha256(), NULL), 1);
		ck_assert_mem_eq(digest, want, 32);
	}
	tly_event_free(&a);
	tly_event_free(&b);
	tly_buf_free(&ea);
	tly_buf_free(&eb);
}

START_TEST(test_plan_matches_generic)
{
	enum tly_event_type type = (enum tly_event_type)_i;
	struct tly_buf m = {0};
	for (unsigned seed = 0; seed < 8; seed++) {
		struct tly_event ev = {0};
		tly_fixture_event(&ev, type, seed);
		assert_same_encoding(&ev, &m);
		assert_same_decoding(m.data, m.len);
		tly_event_free(&ev);
	}
	tly_buf_free(&m);
}
END_TEST

/* Varint edges, optional fields absent, empty lists: still the generic path's bytes. */
START_TEST(test_plan_edges)
{
	static const int64_t edges[] = {0, 1, -1, 63, 64, -64, -65, 127, 128, 8191, 8192,
					INT32_MAX, INT32_MIN, (int64_t)1 << 35, -((int64_t)1 << 49),
					INT64_MAX, INT64_MIN, INT64_MIN + 1};
	struct tly_buf m = {0};
	struct tly_event ev = {0};
	for (size_t i = 0; i < sizeof(edges) / sizeof(edges[0]); i++) {
		tly_fixture_event(&ev, TLY_EV_LEDGER_ENTRY, (unsigned)i);
		struct tly_ledger_entry *e = &ev.u.ledger_entry;
		e->allowance_delta = edges[i];
		e->credits_delta = -edges[i] / 2;
		e->held_delta = edges[(i + 1) % (sizeof(edges) / sizeof(edges[0]))];
		e->cause_partition = (int32_t)(edges[i] % 1000000);
		if (i % 2) {
			e->ref_id = (tly_uuid){{0}};
			e->currency = NULL;
			e->amount_cents.set = false;
			e->lines = (struct tly_list){NULL, 0};
			e->reason = NULL;
		}
		assert_same_encoding(&ev, &m);
		assert_same_decoding(m.data, m.len);
	}
	tly_event_free(&ev);
	tly_buf_free(&m);
}
END_TEST

/* Corrupt bytes: the plan refuses them and the generic path gives the same code and reason. */
START_TEST(test_plan_mutations)
{
	struct tly_buf m = {0};
	struct tly_event ev = {0};
	tly_fixture_event(&ev, (enum tly_event_type)_i, 3);
	assert_same_encoding(&ev, &m);
	unsigned char *b = malloc(m.len + 1);
	unsigned seed = 777u + (unsigned)_i;
	for (int round = 0; round < 300; round++) {
		memcpy(b, m.data, m.len);
		int flips = 1 + (int)(rand_r(&seed) % 3);
		for (int k = 0; k < flips; k++)
			b[10 + (size_t)rand_r(&seed) % (m.len - 10)] = (unsigned char)rand_r(&seed);
		assert_same_decoding(b, m.len - (size_t)(rand_r(&seed) % 2));
	}
	free(b);
	tly_event_free(&ev);
	tly_buf_free(&m);
}
END_TEST

/* tally-loadgen's traffic (every type it sends, duplicates and bad records) through both paths. */
START_TEST(test_plan_loadgen)
{
	char err[512];
	struct loadgen_opts o = {.seed = 5, .tenants = 40, .duplicate_pct = 2, .bad_pct = 5,
				 .start_us = 1767225600000000LL, .step_us = 2000000};
	struct loadgen *lg = loadgen_new(&o, err, sizeof(err));
	ck_assert_msg(lg, "%s", err);
	struct tly_buf m = {0};
	int events = 0, bad = 0;
	for (int i = 0; i < 5000; i++) {
		struct loadgen_item it;
		ck_assert_int_eq(loadgen_next(lg, &it, err, sizeof(err)), 0);
		if (it.kind == LOADGEN_EVENT) {
			assert_same_encoding(it.ev, &m);
			ck_assert_uint_eq(m.len, it.len);
			ck_assert_mem_eq(m.data, it.bytes, it.len);
			events++;
		} else if (it.kind == LOADGEN_BAD) {
			bad++;
		}
		assert_same_decoding(it.bytes, it.len);
	}
	ck_assert_int_gt(events, 4000);
	ck_assert_int_gt(bad, 50);
	loadgen_free(lg);
	tly_buf_free(&m);
}
END_TEST

/* A map key written twice and an array in two blocks: bytes only a foreign writer produces. */
START_TEST(test_plan_foreign_blocks)
{
	struct tly_event ev = {0};
	struct tly_buf m = {0};
	tly_fixture_event(&ev, TLY_EV_LEDGER_ENTRY, 1);
	assert_same_encoding(&ev, &m);
	/* lines: count 3 (0x06), items, 0; rewritten as a block of 1 with its byte size, then of 2 */
	const struct tly_ledger_entry *e = &ev.u.ledger_entry;
	ck_assert_uint_eq(e->lines.n, 3);
	/* where the lines block starts: the first byte that differs from an entry with no lines */
	struct tly_event none = ev;
	none.u.ledger_entry.lines = (struct tly_list){NULL, 0};
	struct tly_buf n = {0};
	assert_same_encoding(&none, &n);
	size_t at = 0;
	while (at < n.len && n.data[at] == m.data[at])
		at++;
	ck_assert_uint_eq(m.data[at], 0x06); /* the count of the only block */
	size_t items_len = m.len - n.len;    /* 3 items and the count byte */
	unsigned char *b = malloc(m.len + 16);
	/* the first item's length: encode a one-line entry */
	struct tly_event one = ev;
	one.u.ledger_entry.lines.n = 1;
	struct tly_buf o1 = {0};
	assert_same_encoding(&one, &o1);
	size_t first = o1.len - n.len - 1;
	size_t k = 0;
	memcpy(b, m.data, at);
	k = at;
	b[k++] = 0x01; /* count -1 */
	b[k++] = (unsigned char)(first << 1);
	memcpy(b + k, m.data + at + 1, first);
	k += first;
	b[k++] = 0x04; /* count 2 */
	memcpy(b + k, m.data + at + 1 + first, items_len - 1 - first);
	k += items_len - 1 - first;
	memcpy(b + k, m.data + at + items_len, m.len - at - items_len);
	k += m.len - at - items_len;
	assert_same_decoding(b, k);
	char err[512];
	struct tly_event back = {0};
	ck_assert_int_eq(tly_codec_decode(codec, b, k, &back, err, sizeof(err)), 0);
	ck_assert_uint_eq(back.u.ledger_entry.lines.n, 3);
	ck_assert_str_eq(((const struct tly_invoice_line *)back.u.ledger_entry.lines.items)[2].feature_key,
			 "web_search");
	tly_event_free(&back);
	free(b);
	tly_buf_free(&o1);
	tly_buf_free(&n);
	tly_buf_free(&m);
	tly_event_free(&ev);
}
END_TEST

/* The same key twice in a map: read the generic way (it keeps one entry), not as two. */
START_TEST(test_plan_duplicate_key)
{
	struct tly_event ev = {0};
	struct tly_buf m = {0};
	tly_fixture_event(&ev, TLY_EV_SUBSCRIPTION_STARTED, 1);
	struct tly_ev_subscription_started *s = &ev.u.subscription_started;
	ck_assert_uint_eq(s->metadata.n, 2);
	assert_same_encoding(&ev, &m);
	/* the second metadata key becomes the first's: same length needed */
	const char *k0 = s->metadata.items[0].key, *k1 = s->metadata.items[1].key;
	ck_assert_uint_eq(strlen(k0), strlen(k1));
	unsigned char *p = memmem(m.data, m.len, k1, strlen(k1));
	ck_assert_ptr_nonnull(p);
	memcpy(p, k0, strlen(k0));
	assert_same_decoding(m.data, m.len);
	tly_event_free(&ev);
	tly_buf_free(&m);
}
END_TEST

/*
 * Bytes another writer may produce for the same value (UUIDs in upper case, an over-long varint,
 * a nil UUID written as a value): they decode, and their cause digest is still that of the
 * current encoding, not of the bytes as given.
 */
START_TEST(test_plan_not_canonical)
{
	struct tly_event ev = {0}, back = {0};
	struct tly_buf m = {0};
	char err[512];
	tly_fixture_event(&ev, TLY_EV_TOKENS_RESERVED, 4);
	assert_same_encoding(&ev, &m);
	unsigned char *b = malloc(m.len + 1);
	ck_assert_uint_eq(m.data[10], 0x48);

	memcpy(b, m.data, m.len); /* event_id in upper case */
	int letters = 0;
	for (size_t i = 11; i < 47; i++) {
		if (b[i] >= 'a' && b[i] <= 'f') {
			b[i] = (unsigned char)(b[i] - 'a' + 'A');
			letters++;
		}
	}
	ck_assert_int_gt(letters, 0);
	ck_assert_int_eq(tly_codec_decode(codec, b, m.len, &back, err, sizeof(err)), 0);
	ck_assert_mem_eq(back.event_id.b, ev.event_id.b, 16);
	assert_same_decoding(b, m.len);

	size_t at = 10 + 37 + 37; /* occurred_at, padded with a zero byte */
	size_t end = at;
	while (m.data[end] & 0x80)
		end++;
	memcpy(b, m.data, end);
	b[end] = m.data[end] | 0x80;
	b[end + 1] = 0x00;
	memcpy(b + end + 2, m.data + end + 1, m.len - end - 1);
	ck_assert_int_eq(tly_codec_decode(codec, b, m.len + 1, &back, err, sizeof(err)), 0);
	ck_assert_int_eq(back.occurred_at, ev.occurred_at);
	assert_same_decoding(b, m.len + 1);

	memcpy(b, m.data, m.len); /* conversation_id (last) present but nil */
	ck_assert_uint_eq(b[m.len - 38], 0x02);
	memcpy(b + m.len - 36, "00000000-0000-0000-0000-000000000000", 36);
	ck_assert_int_eq(tly_codec_decode(codec, b, m.len, &back, err, sizeof(err)), 0);
	ck_assert(tly_uuid_is_nil(&back.u.tokens_reserved.conversation_id));
	assert_same_decoding(b, m.len);

	free(b);
	tly_event_free(&ev);
	tly_event_free(&back);
	tly_buf_free(&m);
}
END_TEST

/*
 * UUIDs offered to the codec (tly_codec_uuid_hint) and texts it parsed before are taken without
 * parsing only when the text is exactly theirs: a hint for another text changes nothing, and a
 * remembered upper-case text still makes the cause digest that of the current encoding.
 */
START_TEST(test_plan_uuid_hint)
{
	struct tly_event ev = {0}, back = {0};
	struct tly_buf m = {0};
	char err[512];
	unsigned char want[32], got[32];
	tly_fixture_event(&ev, TLY_EV_TOKENS_RESERVED, 4);
	assert_same_encoding(&ev, &m);
	ck_assert_int_eq(tly_codec_decode_digest(codec, m.data, m.len, &back, want, err, sizeof(err)),
			 0);
	unsigned char *b = malloc(m.len);
	ck_assert_uint_eq(m.data[10], 0x48);

	/* the hint is the event's own id: the same event and digest */
	tly_codec_uuid_hint(codec, &ev.event_id);
	ck_assert_int_eq(tly_codec_decode_digest(codec, m.data, m.len, &back, got, err, sizeof(err)),
			 0);
	ck_assert_mem_eq(back.event_id.b, ev.event_id.b, 16);
	ck_assert_mem_eq(got, want, 32);

	/* the hint is the event's id, the text another: the text's id */
	memcpy(b, m.data, m.len);
	b[11] = b[11] == '0' ? '1' : '0';
	tly_uuid other;
	char text[37];
	memcpy(text, b + 11, 36);
	text[36] = '\0';
	ck_assert_int_eq(tly_uuid_parse(text, &other), 0);
	tly_codec_uuid_hint(codec, &ev.event_id);
	ck_assert_int_eq(tly_codec_decode(codec, b, m.len, &back, err, sizeof(err)), 0);
	ck_assert_mem_eq(back.event_id.b, other.b, 16);
	ck_assert_mem_ne(back.event_id.b, ev.event_id.b, 16);

	/* the ids in upper case, decoded twice (the tenant's remembered the second time, the event's
	 * never: a new one in every event): the same digest */
	memcpy(b, m.data, m.len);
	ck_assert_uint_eq(b[47], 0x48);
	for (size_t i = 11; i < 84; i++)
		if (b[i] >= 'a' && b[i] <= 'f')
			b[i] = (unsigned char)(b[i] - 'a' + 'A');
	for (int round = 0; round < 2; round++) {
		ck_assert_int_eq(tly_codec_decode_digest(codec, b, m.len, &back, got, err, sizeof(err)),
				 0);
		ck_assert_mem_eq(back.event_id.b, ev.event_id.b, 16);
		ck_assert_mem_eq(back.tenant_id.b, ev.tenant_id.b, 16);
		ck_assert_mem_eq(got, want, 32);
	}

	free(b);
	tly_event_free(&ev);
	tly_event_free(&back);
	tly_buf_free(&m);
}
END_TEST

/* tly_codec_uuid_parse gives text's bytes and verdict as libuuid's uuid_parse; out kept on a refusal */
static void assert_parse_as_libuuid(const char *text, size_t len)
{
	char z[64];
	uuid_t want;
	tly_uuid got, kept;
	ck_assert_uint_lt(len, sizeof(z));
	memcpy(z, text, len);
	z[len] = '\0';
	memset(&kept, 0xa5, sizeof(kept));
	got = kept;
	int lib = uuid_parse(z, want);
	int ours = tly_codec_uuid_parse(text, len, &got);
	ck_assert_msg((lib == 0) == (ours == 0), "\"%s\" (%zu bytes): libuuid %d, ours %d", z, len,
		      lib, ours);
	if (ours == 0)
		ck_assert_mem_eq(got.b, want, 16);
	else {
		ck_assert_int_eq(ours, TLY_E_INVALID);
		ck_assert_mem_eq(got.b, kept.b, 16);
	}
}

/*
 * The UUID text parser accepts and refuses exactly what libuuid does, with the same bytes: texts
 * libuuid writes in either case, every byte value at every position of one, every length around
 * 36, and hand-picked near misses (what strtoul would take but a UUID text may not hold).
 */
START_TEST(test_uuid_parse_as_libuuid)
{
	char text[64];
	for (int i = 0; i < 200; i++) {
		uuid_t u;
		uuid_generate_random(u);
		if (i % 3 == 0)
			uuid_unparse_upper(u, text);
		else
			uuid_unparse_lower(u, text);
		if (i % 3 == 2) /* mixed case */
			for (size_t k = 0; k < 36; k += 3)
				if (text[k] >= 'a' && text[k] <= 'f')
					text[k] = (char)(text[k] - 'a' + 'A');
		assert_parse_as_libuuid(text, 36);
		tly_uuid got;
		ck_assert_int_eq(tly_codec_uuid_parse(text, 36, &got), 0);
		ck_assert_mem_eq(got.b, u, 16);
	}
	const char *base = "0123abcd-ef45-6789-ABCD-EF0123456789";
	for (size_t pos = 0; pos < 36; pos++)
		for (int c = 0; c < 256; c++) {
			memcpy(text, base, 37);
			text[pos] = (char)c;
			assert_parse_as_libuuid(text, 36);
		}
	for (size_t len = 0; len <= 40; len++) {
		memset(text, '0', sizeof(text));
		memcpy(text, base, 36);
		assert_parse_as_libuuid(text, len);
	}
	const char *const near[] = {
		"00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
		"FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF", " 0123abc-ef45-6789-abcd-ef0123456789",
		"+0123abc-ef45-6789-abcd-ef0123456789", "0x123abc-ef45-6789-abcd-ef0123456789",
		"0123abcd-+f45-6789-abcd-ef0123456789", "0123abcd-ef45-6789-abcd-ef012345678g",
		"0123abcd-ef45-6789-abcd-ef012345678G", "0123abcd-ef45-6789-abcd-ef012345678 ",
		"0123abcd0ef45-6789-abcd-ef0123456789", "0123abcd-ef45-6789-abcdef0123456789-",
		"{123abcd-ef45-6789-abcd-ef0123456789", "0123abcd-ef45-6789-abcd-ef0123456789",
	};
	for (size_t i = 0; i < sizeof(near) / sizeof(near[0]); i++)
		assert_parse_as_libuuid(near[i], strlen(near[i]));
}
END_TEST

/*
 * A sealed entry is appended after what the buffer holds, with the hash of the prefix and its body
 * (hash field zero), the same whether its hash field is zero or set; a refused one leaves the
 * buffer as it was.
 */
START_TEST(test_sealed_appended)
{
	struct tly_buf m = {0};
	struct tly_event e = {0};
	char err[512];
	unsigned char prev[32], hash[32], want[32];
	memset(prev, 0x5a, sizeof(prev));
	tly_fixture_event(&e, TLY_EV_LEDGER_ENTRY, 2);
	memset(e.u.ledger_entry.hash, 0, 32);
	ck_assert_int_eq(tly_codec_digest(generic, &e, true, prev, 32, want, err, sizeof(err)), 0);
	struct tly_buf out = {0};
	ck_assert_int_eq(tly_buf_reserve(&out, 3), 0);
	memcpy(out.data, "abc", 3);
	out.len = 3;
	ck_assert_int_eq(tly_codec_encode_sealed(codec, &e, prev, 32, &out, hash, err, sizeof(err)),
			 0);
	ck_assert_mem_eq(hash, want, 32);
	ck_assert_mem_eq(out.data, "abc", 3);
	memcpy(e.u.ledger_entry.hash, hash, 32);
	assert_same_encoding(&e, &m);
	ck_assert_uint_eq(out.len, 3 + m.len);
	ck_assert_mem_eq(out.data + 3, m.data, m.len);
	/* sealed again with its hash set: the same hash and bytes */
	unsigned char again[32];
	ck_assert_int_eq(tly_codec_encode_sealed(codec, &e, prev, 32, &out, again, err, sizeof(err)),
			 0);
	ck_assert_mem_eq(again, want, 32);
	ck_assert_uint_eq(out.len, 3 + 2 * m.len);
	ck_assert_mem_eq(out.data + 3 + m.len, m.data, m.len);
	size_t len = out.len;
	e.u.ledger_entry.seq = 0; /* below its minimum: refused */
	ck_assert_int_eq(tly_codec_encode_sealed(codec, &e, prev, 32, &out, hash, err, sizeof(err)),
			 TLY_E_INVALID);
	ck_assert_uint_eq(out.len, len);
	tly_event_free(&e);
	tly_buf_free(&out);
	tly_buf_free(&m);
}
END_TEST

/*
 * The unvalidated seal (the decision core's entries but invoices) writes the same bytes and hash
 * as the validating one, and encodes what the validating one refuses.
 */
START_TEST(test_sealed_trusted)
{
	struct tly_event e = {0};
	char err[512];
	unsigned char prev[32], hash[32], trusted[32];
	memset(prev, 0x3c, sizeof(prev));
	tly_fixture_event(&e, TLY_EV_LEDGER_ENTRY, 3);
	memset(e.u.ledger_entry.hash, 0, 32);
	struct tly_buf a = {0}, b = {0};
	ck_assert_int_eq(tly_codec_encode_sealed(codec, &e, prev, 32, &a, hash, err, sizeof(err)), 0);
	ck_assert_int_eq(tly_codec_encode_sealed_trusted(codec, &e, prev, 32, &b, trusted, err,
							 sizeof(err)), 0);
	ck_assert_mem_eq(hash, trusted, 32);
	ck_assert_uint_eq(a.len, b.len);
	ck_assert_mem_eq(a.data, b.data, a.len);
	e.u.ledger_entry.seq = 0; /* below its minimum */
	size_t len = a.len;
	ck_assert_int_eq(tly_codec_encode_sealed(codec, &e, prev, 32, &a, hash, err, sizeof(err)),
			 TLY_E_INVALID);
	ck_assert_uint_eq(a.len, len);
	ck_assert_int_eq(tly_codec_encode_sealed_trusted(codec, &e, prev, 32, &b, trusted, err,
							 sizeof(err)), 0);
	ck_assert_uint_gt(b.len, len);
	tly_event_free(&e);
	tly_buf_free(&a);
	tly_buf_free(&b);
}
END_TEST

/* tly_buf_append copies the sizes it inlines (2, 4, 8, 16) and any other size byte for byte. */
START_TEST(test_buf_append_sizes)
{
	unsigned char src[64], want[64 * 65 / 2];
	struct tly_buf buf = {0};
	size_t at = 0;
	for (size_t i = 0; i < sizeof(src); i++)
		src[i] = (unsigned char)(i * 37 + 11);
	for (size_t k = 1; k <= 65; k++) {
		size_t n = k % 65; /* sizes 1 to 64, then 0 (into a buffer that has memory) */
		ck_assert_int_eq(tly_buf_append(&buf, src + (64 - n), n), 0);
		memcpy(want + at, src + (64 - n), n);
		at += n;
		ck_assert_uint_eq(buf.len, at);
	}
	ck_assert_mem_eq(buf.data, want, at);
	tly_buf_free(&buf);
}
END_TEST

Suite *codec_suite(void)
{
	Suite *s = suite_create("codec");
	TCase *tc = tcase_create("round_trip");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_loop_test(tc, test_round_trip, 0, TLY_EV__COUNT);
	tcase_add_test(tc, test_round_trip_fields);
	tcase_add_test(tc, test_invalid_not_encoded);
	suite_add_tcase(s, tc);
	tc = tcase_create("bad_bytes");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_header_errors);
	tcase_add_loop_test(tc, test_every_prefix_truncated, 0, TLY_EV__COUNT);
	tcase_add_test(tc, test_hostile_bodies);
	tcase_add_test(tc, test_hostile_unions_and_booleans);
	tcase_add_loop_test(tc, test_random_mutations, 0, TLY_EV__COUNT);
	suite_add_tcase(s, tc);
	tc = tcase_create("plans");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_loop_test(tc, test_plan_matches_generic, 0, TLY_EV__COUNT);
	tcase_add_test(tc, test_plan_edges);
	tcase_add_loop_test(tc, test_plan_mutations, 0, TLY_EV__COUNT);
	tcase_add_test(tc, test_plan_loadgen);
	tcase_add_test(tc, test_plan_foreign_blocks);
	tcase_add_test(tc, test_plan_duplicate_key);
	tcase_add_test(tc, test_plan_not_canonical);
	tcase_add_test(tc, test_plan_uuid_hint);
	tcase_add_test(tc, test_uuid_parse_as_libuuid);
	tcase_add_test(tc, test_sealed_appended);
	tcase_add_test(tc, test_sealed_trusted);
	tcase_add_test(tc, test_buf_append_sizes);
	suite_add_tcase(s, tc);
	return s;
}
