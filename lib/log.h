/* Structured log lines on stderr: ts=… level=… prog=… msg="…" key=value… */
#ifndef TLY_LOG_H
#define TLY_LOG_H

#include "err.h"

enum tly_log_level { TLY_LOG_DEBUG, TLY_LOG_INFO, TLY_LOG_WARN, TLY_LOG_ERROR };

/* Process-wide: the program name on every line and the minimum level written. */
void tly_log_init(const char *prog, enum tly_log_level level);
void tly_log_set_level(enum tly_log_level level);
enum tly_log_level tly_log_get_level(void);

/* Parse "debug", "info", "warn" or "error". */
int tly_log_level_parse(const char *s, enum tly_log_level *out) TLY_MUST_CHECK;

/*
 * Write one line. msg is the human sentence in PostgreSQL's style (lower case, no trailing period,
 * "could not <verb> <object>: <reason>"); kvfmt formats the context as key=value pairs (or NULL).
 * Thread-safe: each line is written with a single write(2).
 */
void tly_log(enum tly_log_level level, const char *msg, const char *kvfmt, ...)
	__attribute__((format(printf, 3, 4)));

#define tly_debug(...) tly_log(TLY_LOG_DEBUG, __VA_ARGS__)
#define tly_info(...) tly_log(TLY_LOG_INFO, __VA_ARGS__)
#define tly_warn(...) tly_log(TLY_LOG_WARN, __VA_ARGS__)
#define tly_error(...) tly_log(TLY_LOG_ERROR, __VA_ARGS__)

#endif
