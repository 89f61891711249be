/* CRC-64-AVRO as specified in "Schema Fingerprints" of the Avro specification (avro-c lacks it). */
#include "crc64.h"

#include <pthread.h>

#define CRC64_EMPTY 0xc15d213aa4d7a795ULL

static uint64_t table[256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

/* The specification's 256-entry table, built once. */
static void build_table(void)
{
	for (unsigned i = 0; i < 256; i++) {
		uint64_t fp = i;
		for (int j = 0; j < 8; j++)
			fp = (fp >> 1) ^ (CRC64_EMPTY & (0 - (fp & 1)));
		table[i] = fp;
	}
}

uint64_t tly_crc64_avro(const void *buf, size_t len)
{
	pthread_once(&table_once, build_table);
	const unsigned char *p = buf;
	uint64_t fp = CRC64_EMPTY;
	for (size_t i = 0; i < len; i++)
		fp = (fp >> 8) ^ table[(fp ^ p[i]) & 0xff];
	return fp;
}
