/* CRC-64-AVRO, the Rabin fingerprint the Avro specification uses for schema fingerprints. */
#ifndef TLY_CRC64_H
#define TLY_CRC64_H

#include <stddef.h>
#include <stdint.h>

/* Fingerprint of buf[0..len); the empty input gives 0xc15d213aa4d7a795. Thread-safe. */
uint64_t tly_crc64_avro(const void *buf, size_t len);

#endif
