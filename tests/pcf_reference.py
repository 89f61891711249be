#!/usr/bin/python3
"""Independent Parsing Canonical Form and CRC-64-AVRO fingerprints, for check_schema.c.

Canonical forms come from Debian's python3-avro; the CRC-64-AVRO is computed here from the
Avro specification's algorithm. python3-avro 1.11.1 keeps logical-type primitives as objects
({"type":"string"}) in canonical form, against the specification's [PRIMITIVES] rule, so
logicalType annotations are removed before parsing (canonical form drops them anyway).

Prints one line per file: <full name> TAB <canonical form> TAB <fingerprint as 16 hex digits>.
"""
import json
import sys

import avro.schema

EMPTY = 0xC15D213AA4D7A795
TABLE = []
for i in range(256):
    fp = i
    for _ in range(8):
        fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
    TABLE.append(fp)


def crc64_avro(data: bytes) -> int:
    fp = EMPTY
    for b in data:
        fp = (fp >> 8) ^ TABLE[(fp ^ b) & 0xFF]
    return fp


def strip_logical(node):
    if isinstance(node, dict):
        if "logicalType" in node and node.get("type") in ("string", "long", "int", "bytes", "fixed"):
            node = {k: v for k, v in node.items() if k != "logicalType"}
        return {k: strip_logical(v) for k, v in node.items()}
    if isinstance(node, list):
        return [strip_logical(v) for v in node]
    return node


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as fh:
            doc = strip_logical(json.load(fh))
        schema = avro.schema.parse(json.dumps(doc))
        pcf = schema.canonical_form
        print(f"{schema.fullname}\t{pcf}\t{crc64_avro(pcf.encode('utf-8')):016x}")
