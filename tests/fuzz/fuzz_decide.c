/*
 * libFuzzer harness: the decision core against the reference wallet model (tests/decide_model.c).
 * The input is a sequence of events (5 bytes each, after one settings byte); any disagreement or
 * broken invariant aborts with the step and the reason.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "../decide_model.h"
#include "codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct tly_codec *codec;

static void release(void)
{
	tly_codec_free(codec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char why[2048];
	if (!codec) {
		if (!(codec = tly_codec_new(why, sizeof(why)))) {
			fprintf(stderr, "could not create the codec: %s\n", why);
			abort();
		}
		atexit(release);
	}
	if (size > 1 + 400 * TLY_MODEL_OP_BYTES)
		return 0; /* long sequences add time, not coverage */
	if (tly_model_run(codec, data, size, why, sizeof(why)) != 0) {
		fprintf(stderr, "decision core and model disagree: %s\n", why);
		abort();
	}
	return 0;
}
