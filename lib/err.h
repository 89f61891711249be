/* Error codes shared by the whole library, and their classification (retriable, permanent, fatal). */
#ifndef TLY_ERR_H
#define TLY_ERR_H

#define TLY_MUST_CHECK __attribute__((warn_unused_result))

/* Every fallible library function returns 0 or one of these (negative). */
enum tly_err {
	TLY_OK = 0,
	TLY_E_NOMEM = -1,               /* allocation failed */
	TLY_E_INVALID = -2,             /* a value breaks its schema or a validation rule */
	TLY_E_TRUNCATED = -3,           /* input ends before the value does */
	TLY_E_CORRUPT = -4,             /* bytes that no writer could have produced */
	TLY_E_UNKNOWN_FINGERPRINT = -5, /* single-object header names a schema we do not know */
	TLY_E_BAD_MAGIC = -6,           /* not Avro single-object encoding (no C3 01) */
	TLY_E_TOO_LARGE = -7,           /* input or value over a configured bound */
	TLY_E_CONFIG = -8,              /* bad setting (key or value) */
	TLY_E_IO = -9,                  /* file, socket or process failure */
	TLY_E_PG = -10,                 /* PostgreSQL failure (see tly_pg_errclass) */
	TLY_E_KAFKA = -11,              /* Kafka failure (see tly_kafka_errclass) */
	TLY_E_MIGRATION = -12,          /* migrations missing, changed or failed */
	TLY_E_TIMEOUT = -13,            /* gave up waiting */
	TLY_E_NOT_FOUND = -14,          /* named thing does not exist */
	TLY_E_SCHEMA = -15,             /* schema text is not a valid Avro schema */
	TLY_E_INCOMPATIBLE = -16,       /* a reader schema cannot read a writer schema's data */
};

/* How a caller should react to a failure: decided once, here, and switched on by programs. */
enum tly_errclass {
	TLY_ERRCLASS_RETRIABLE, /* transient: retry the same operation after a pause */
	TLY_ERRCLASS_PERMANENT, /* this input or request will never succeed: quarantine or report */
	TLY_ERRCLASS_FATAL,     /* the process cannot go on safely: exit non-zero */
};

/* Short stable name of an error code ("truncated", "unknown_fingerprint"…), for logs and reasons. */
const char *tly_err_name(int err);

/* Class of a library error code. */
enum tly_errclass tly_err_class(int err);

#endif
