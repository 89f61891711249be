#!/usr/bin/python3
"""Write the hostile Avro corpus (tests/corpus/avro/*.bin and their .expect sidecars).

The valid starting points are encoded by the Python avro library from schemas/*.avsc (not by
Tally's codec), then broken one way each. Run from the repository root; the output is committed,
so this only runs again when a case is added: /usr/bin/python3 tests/corpus/make_avro.py
"""
import io
import os
import struct
import sys

sys.path.pop(0)  # this directory holds avro/ (the corpus), which would shadow the avro library
import avro.io  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from py_publish import single_object  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "avro")
TENANT = "11111111-2222-4333-8444-555555555555"
EVENT = "0b6f8e1c-2a4d-4f6e-9c1b-3d5e7f9a1b2c"
T0 = 1767225600000000


def encode(name, record):
    return single_object(f"schemas/{name}.avsc", record)[0]


def varint(n):
    """Avro long (zig-zag varint), written by the avro library."""
    buf = io.BytesIO()
    avro.io.BinaryEncoder(buf).write_long(n)
    return buf.getvalue()


def string(s):
    buf = io.BytesIO()
    avro.io.BinaryEncoder(buf).write_bytes(s)  # length + bytes: raw bytes, so invalid UTF-8 can go in
    return buf.getvalue()


def tenant_created(slug="acme", name="Acme"):
    return encode("TenantCreated", {"event_id": EVENT, "tenant_id": TENANT, "occurred_at": T0,
                                    "slug": slug, "name": name})


def tenant_body_with(slug_bytes):
    """A TenantCreated whose slug is the raw bytes given (header from a valid message)."""
    good = tenant_created()
    head = good[:10] + string(EVENT.encode()) + string(TENANT.encode()) + varint(T0)
    return head + slug_bytes + string(b"Acme")


def plan_prefix():
    """PlanPublished up to (not including) feature_toggles."""
    good = encode("PlanPublished", plan())
    body = (string(EVENT.encode()) + varint(T0) + string(EVENT.encode()) + string(b"pro")
            + string(b"Pro") + string(b"month") + varint(1) + varint(2900) + string(b"USD")
            + varint(0) + varint(1) + varint(100000) + varint(0))
    assert good.startswith(good[:10] + body), "plan prefix no longer matches the schema"
    return good[:10] + body


def plan():
    return {"event_id": EVENT, "occurred_at": T0, "plan_id": EVENT, "code": "pro", "name": "Pro",
            "interval": "month", "interval_count": 1, "price_cents": 2900, "currency": "USD",
            "trial_days": 0, "seat_included": 1, "tokens_per_period": 100000,
            "overage_price_micros_per_1k_tokens": None, "feature_toggles": {}, "features": [],
            "is_active": True}


def feature(key):
    # feature_key, display_name, hard_limit (null), soft_limit (null), is_metered
    return string(key) + string(b"F") + varint(0) + varint(0) + b"\x00"


CASES = []


def case(name, data, error, text):
    CASES.append((name, data, error, text))


good = tenant_created()
case("empty", b"", "truncated", "shorter than the 10-byte header")
case("bad_magic", b"garbage!", "bad_magic", "no C3 01 header")
case("json_not_avro", b'{"type":"TenantCreated"}', "bad_magic", "no C3 01 header")
case("magic_only", b"\xc3\x01", "truncated", "shorter than the 10-byte header")
case("short_fingerprint", good[:6], "truncated", "shorter than the 10-byte header")
case("header_only", good[:10], "truncated", "TenantCreated")
case("wrong_fingerprint", good[:2] + bytes(b ^ 0x5A for b in good[2:10]) + good[10:],
     "unknown_fingerprint", "unknown schema fingerprint")
case("zero_fingerprint", good[:2] + bytes(8) + good[10:], "unknown_fingerprint",
     "unknown schema fingerprint 0000000000000000")
case("truncated_in_uuid", good[:30], "truncated", "TenantCreated")
case("truncated_in_varint", good[:10 + 74 + 3], "truncated", "TenantCreated")
case("truncated_last_byte", good[:-1], "truncated", "TenantCreated")
case("negative_string_length", good[:10] + varint(-5) + good[11:], "corrupt", "negative length")
case("negative_length_min", good[:10] + varint(-(1 << 63)) + good[11:], "corrupt", "negative length")
case("oversized_string_length", good[:10] + varint(1 << 62), "truncated", "length")
case("string_length_past_end", good[:10] + varint(1000) + good[11:], "truncated", "length")
case("overlong_varint", good[:10] + b"\x80" * 11 + b"\x01", "corrupt", "varint")
case("varint_unterminated", good[:10] + b"\xff" * 5, "truncated", "TenantCreated")
case("invalid_utf8", tenant_body_with(string(b"\xff\xfeac")), "corrupt", "UTF-8")
case("utf8_overlong_nul", tenant_body_with(string(b"a\xc0\x80")), "corrupt", "UTF-8")
case("utf8_surrogate", tenant_body_with(string(b"\xed\xa0\x80")), "corrupt", "UTF-8")
case("utf8_beyond_unicode", tenant_body_with(string(b"\xf4\x90\x80\x80")), "corrupt", "UTF-8")
case("utf8_cut_sequence", tenant_body_with(string(b"ab\xe2\x82")), "corrupt", "UTF-8")
case("nul_in_string", tenant_body_with(string(b"ac\x00me")), "invalid", "NUL")
case("trailing_bytes", good + b"\x00", "corrupt", "trailing")
case("uuid_not_uuid", good[:10] + string(b"z" * 36) + good[10 + 37:], "invalid", "field event_id")
case("empty_required_string", tenant_body_with(string(b"")), "invalid", "field slug")

res = encode("TokensReserved", {"event_id": EVENT, "tenant_id": TENANT, "occurred_at": T0,
                                "reservation_id": EVENT, "tokens": 10, "expires_at": T0 + 1,
                                "model": "m", "conversation_id": None})
case("union_branch_out_of_range", res[:-1] + varint(7), "corrupt", "union")
case("union_branch_negative", res[:-1] + varint(-1), "corrupt", "union")
case("tokens_negative", res[:10 + 37 + 37 + len(varint(T0)) + 37] + varint(-10)
     + res[10 + 37 + 37 + len(varint(T0)) + 37 + 1:], "invalid", "field tokens")

can = encode("SubscriptionCancelled", {"event_id": EVENT, "tenant_id": TENANT, "occurred_at": T0,
                                       "subscription_id": EVENT, "at_period_end": True})
case("boolean_not_0_or_1", can[:-1] + b"\x02", "corrupt", "boolean")

pp = plan_prefix()
# feature_toggles: map<boolean>, then features: array of PlanFeature, then is_active
case("map_count_huge", pp + varint(1 << 60) + string(b"k") + b"\x01", "truncated", "")
case("map_count_negative_size_lies", pp + varint(-1) + varint(1 << 40) + string(b"k") + b"\x01"
     + varint(0) + varint(0) + b"\x01", "truncated", "")
case("array_count_huge", pp + varint(0) + varint(1 << 61) + feature(b"a"), "truncated", "")
case("array_count_min_long", pp + varint(0) + varint(-(1 << 63)) + varint(10) + feature(b"a"),
     "corrupt", "")
case("array_never_ends", pp + varint(0) + (varint(1) + feature(b"a")) * 200, "truncated", "")
case("array_many_empty_blocks", pp + varint(0) + varint(-1) + varint(0) * 1 + b"", "truncated", "")
# Deep nesting: the schemas nest at most a few levels, so depth is bounded by the schema and the
# walk (TLY_AVRO_MAX_DEPTH); what the wire can do is pile up blocks, each of one item.
case("array_thousand_blocks", pp + varint(0) + (varint(1) + feature(b"a")) * 1000 + varint(0)
     + b"\x01", "invalid", "")

os.makedirs(OUT, exist_ok=True)
for name, data, error, text in CASES:
    with open(os.path.join(OUT, name + ".bin"), "wb") as fh:
        fh.write(data)
    with open(os.path.join(OUT, name + ".expect"), "w", encoding="utf-8") as fh:
        fh.write(f"error: {error}\n")
        if text:
            fh.write(f"text: {text}\n")
print(f"wrote {len(CASES)} cases to {OUT}")
