/* Structured logging: one line per call, written atomically to stderr. */
#include "log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *log_prog = "tally";
static _Atomic int log_level = TLY_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void tly_log_init(const char *prog, enum tly_log_level level)
{
	log_prog = prog;
	atomic_store(&log_level, (int)level);
}

void tly_log_set_level(enum tly_log_level level)
{
	atomic_store(&log_level, (int)level);
}

enum tly_log_level tly_log_get_level(void)
{
	return (enum tly_log_level)atomic_load(&log_level);
}

int tly_log_level_parse(const char *s, enum tly_log_level *out)
{
	for (int i = TLY_LOG_DEBUG; i <= TLY_LOG_ERROR; i++) {
		if (strcmp(s, level_names[i]) == 0) {
			*out = (enum tly_log_level)i;
			return 0;
		}
	}
	return TLY_E_CONFIG;
}

/* Append s to buf at *pos as a quoted logfmt value, escaping quotes, backslashes and controls. */
static void append_quoted(char *buf, size_t cap, size_t *pos, const char *s)
{
	if (*pos < cap)
		buf[(*pos)++] = '"';
	for (; *s && *pos + 2 < cap; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			buf[(*pos)++] = '\\';
			buf[(*pos)++] = (char)c;
		} else if (c == '\n') {
			buf[(*pos)++] = '\\';
			buf[(*pos)++] = 'n';
		} else if (c < 0x20) {
			buf[(*pos)++] = ' ';
		} else {
			buf[(*pos)++] = (char)c;
		}
	}
	if (*pos < cap)
		buf[(*pos)++] = '"';
}

void tly_log(enum tly_log_level level, const char *msg, const char *kvfmt, ...)
{
	if ((int)level < atomic_load(&log_level))
		return;

	char line[4096];
	size_t cap = sizeof(line) - 1; /* room for the newline */
	size_t pos = 0;
	struct timespec ts;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	int n = snprintf(line, cap, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s prog=%s msg=",
			 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
			 tm.tm_sec, ts.tv_nsec / 1000000, level_names[level], log_prog);
	pos = n > 0 ? ((size_t)n < cap ? (size_t)n : cap) : 0;
	append_quoted(line, cap, &pos, msg);
	if (kvfmt && *kvfmt && pos + 1 < cap) {
		line[pos++] = ' ';
		va_list ap;
		va_start(ap, kvfmt);
		n = vsnprintf(line + pos, cap - pos, kvfmt, ap);
		va_end(ap);
		if (n > 0)
			pos += (size_t)n < cap - pos ? (size_t)n : cap - pos - 1;
	}
	line[pos++] = '\n';
	/* A short write to stderr has nowhere better to be reported. */
	ssize_t w = write(STDERR_FILENO, line, pos);
	(void)w;
}
