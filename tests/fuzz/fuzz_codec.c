/*
 * libFuzzer harness: the Avro decoder (tly_codec_decode) on arbitrary bytes. A decode that
 * succeeds must give a valid event that encodes again and decodes to the same encoding.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct tly_codec *codec;
static struct tly_event ev, again;
static struct tly_buf once, twice;

/* Release what the runs share, so the leak check at exit sees only what an input leaked. */
static void release(void)
{
	tly_event_free(&ev);
	tly_event_free(&again);
	tly_buf_free(&once);
	tly_buf_free(&twice);
	tly_codec_free(codec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char err[1024];
	if (!codec) {
		if (!(codec = tly_codec_new(err, sizeof(err)))) {
			fprintf(stderr, "could not create the codec: %s\n", err);
			abort();
		}
		atexit(release);
	}
	int rc = tly_codec_decode(codec, data, size, &ev, err, sizeof(err));
	if (rc != 0) {
		if (rc >= 0 || err[0] == '\0') {
			fprintf(stderr, "decode failed with rc %d and no reason\n", rc);
			abort();
		}
		return 0;
	}
	if (tly_event_validate(&ev, err, sizeof(err)) != 0 ||
	    tly_codec_encode(codec, &ev, &once, err, sizeof(err)) != 0 ||
	    tly_codec_decode(codec, once.data, once.len, &again, err, sizeof(err)) != 0 ||
	    tly_codec_encode(codec, &again, &twice, err, sizeof(err)) != 0) {
		fprintf(stderr, "a decoded event does not round-trip: %s\n", err);
		abort();
	}
	if (once.len != twice.len || memcmp(once.data, twice.data, once.len) != 0) {
		fprintf(stderr, "re-encoding a decoded event is not stable\n");
		abort();
	}
	return 0;
}
