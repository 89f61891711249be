/*
 * libFuzzer harness: the NDJSON parser (tly_event_from_json_text) as `tallyctl publish` runs it,
 * then validation and encoding. An event that encodes must print as JSON that parses back to the
 * same encoding.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "event_json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct tly_codec *codec;
static struct tly_event ev, back;
static struct tly_buf once, twice;

/* Release what the runs share, so the leak check at exit sees only what an input leaked. */
static void release(void)
{
	tly_event_free(&ev);
	tly_event_free(&back);
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
	err[0] = '\0';
	int rc = tly_event_from_json_text((const char *)data, size, 0, &ev, err, sizeof(err));
	if (rc == 0)
		rc = tly_codec_encode(codec, &ev, &once, err, sizeof(err));
	if (rc != 0) {
		if (err[0] == '\0') {
			fprintf(stderr, "rejected with rc %d and no reason\n", rc);
			abort();
		}
		return 0;
	}
	char *text = tly_event_to_json_text(&ev);
	if (!text || tly_event_from_json_text(text, strlen(text), 0, &back, err, sizeof(err)) != 0 ||
	    tly_codec_encode(codec, &back, &twice, err, sizeof(err)) != 0) {
		fprintf(stderr, "an accepted event does not round-trip through JSON: %s\n%s\n", err,
			text ? text : "(no text)");
		abort();
	}
	if (once.len != twice.len || memcmp(once.data, twice.data, once.len) != 0) {
		fprintf(stderr, "JSON round trip changed the event:\n%s\n", text);
		abort();
	}
	free(text);
	return 0;
}
