/* Names and classes of the library's error codes. */
#include "err.h"

const char *tly_err_name(int err)
{
	switch ((enum tly_err)err) {
	case TLY_OK: return "ok";
	case TLY_E_NOMEM: return "out_of_memory";
	case TLY_E_INVALID: return "invalid";
	case TLY_E_TRUNCATED: return "truncated";
	case TLY_E_CORRUPT: return "corrupt";
	case TLY_E_UNKNOWN_FINGERPRINT: return "unknown_fingerprint";
	case TLY_E_BAD_MAGIC: return "bad_magic";
	case TLY_E_TOO_LARGE: return "too_large";
	case TLY_E_CONFIG: return "config";
	case TLY_E_IO: return "io";
	case TLY_E_PG: return "postgres";
	case TLY_E_KAFKA: return "kafka";
	case TLY_E_MIGRATION: return "migration";
	case TLY_E_TIMEOUT: return "timeout";
	case TLY_E_NOT_FOUND: return "not_found";
	case TLY_E_SCHEMA: return "schema";
	case TLY_E_INCOMPATIBLE: return "incompatible";
	}
	return "unknown_error";
}

enum tly_errclass tly_err_class(int err)
{
	switch ((enum tly_err)err) {
	case TLY_E_INVALID:
	case TLY_E_TRUNCATED:
	case TLY_E_CORRUPT:
	case TLY_E_UNKNOWN_FINGERPRINT:
	case TLY_E_BAD_MAGIC:
	case TLY_E_TOO_LARGE:
	case TLY_E_NOT_FOUND:
		return TLY_ERRCLASS_PERMANENT;
	case TLY_E_IO:
	case TLY_E_PG:
	case TLY_E_KAFKA:
	case TLY_E_TIMEOUT:
		return TLY_ERRCLASS_RETRIABLE;
	case TLY_OK:
	case TLY_E_NOMEM:
	case TLY_E_CONFIG:
	case TLY_E_MIGRATION:
	case TLY_E_SCHEMA:
	case TLY_E_INCOMPATIBLE:
		break;
	}
	return TLY_ERRCLASS_FATAL;
}
