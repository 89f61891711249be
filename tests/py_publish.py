#!/usr/bin/python3
"""Publish one Tally event from Python, using only schemas/*.avsc, the Avro single-object encoding
and the Java client's murmur2 partitioner: proof that an upstream service in another language can
publish what the ledger reads (check_producer.c runs it against the dev broker).

Usage: py_publish.py BOOTSTRAP SCHEMA_DIR TENANT_ID EVENT_ID [TOPIC] [--credits TOKENS]
Publishes a TenantCreated for TENANT_ID (with --credits: a CreditsGranted of TOKENS, which the
ledger applies), keyed by TENANT_ID, and prints "<partition> <offset> <fingerprint hex>" once the
broker acknowledged it.
"""
import io
import json
import os
import struct
import sys

import avro.io
import avro.schema
from confluent_kafka import Producer

# CRC-64-AVRO and the logicalType workaround, shared with the canonical-form reference (not Tally's C).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pcf_reference import crc64_avro, strip_logical  # noqa: E402


def single_object(schema_path: str, record: dict) -> (bytes, int):
    with open(schema_path, encoding="utf-8") as fh:
        schema = avro.schema.parse(json.dumps(strip_logical(json.load(fh))))
    fingerprint = crc64_avro(schema.canonical_form.encode("utf-8"))
    body = io.BytesIO()
    avro.io.DatumWriter(schema).write(record, avro.io.BinaryEncoder(body))
    # C3 01, the fingerprint little-endian, the Avro binary body.
    return b"\xc3\x01" + struct.pack("<Q", fingerprint) + body.getvalue(), fingerprint


def main() -> int:
    args = sys.argv[1:]
    credits = None
    if "--credits" in args:
        at = args.index("--credits")
        credits = int(args[at + 1])
        del args[at:at + 2]
    bootstrap, schema_dir, tenant_id, event_id = args[0:4]
    topic = args[4] if len(args) > 4 else "tally.events"
    record = {
        "event_id": event_id,
        "tenant_id": tenant_id,
        "occurred_at": 1767225600000000,  # 2026-01-01T00:00:00Z in microseconds
    }
    if credits is None:
        schema = "TenantCreated"
        record.update({"slug": "from-python", "name": "Published by Python"})
    else:
        schema = "CreditsGranted"
        # the grant id is derived from the event id, so the script stays deterministic
        record.update({"grant_id": event_id[:-12] + "00000000c0de", "tokens": credits,
                       "reason": "granted from Python", "expires_at": None})
    value, fingerprint = single_object(f"{schema_dir}/{schema}.avsc", record)
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "partitioner": "murmur2_random",  # the Java client's partitioner: murmur2(key) % P
        "enable.idempotence": True,
    })
    result = {}

    def on_delivery(err, msg):
        result["err"] = err
        result["partition"] = msg.partition()
        result["offset"] = msg.offset()

    producer.produce(topic, key=tenant_id.encode("ascii"), value=value, on_delivery=on_delivery)
    if producer.flush(15) != 0 or result.get("err") is not None:
        print(f"could not publish: {result.get('err')}", file=sys.stderr)
        return 1
    print(f"{result['partition']} {result['offset']} {fingerprint:016x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
