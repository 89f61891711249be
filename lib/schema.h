/*
 * Avro schemas of the catalog: Parsing Canonical Form, CRC-64-AVRO fingerprints (avro-c has
 * neither), the registry that finds a writer schema by fingerprint, and the compatibility check
 * that keeps new readers able to read old data.
 */
#ifndef TLY_SCHEMA_H
#define TLY_SCHEMA_H

#include <avro.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

struct tly_schema;          /* one version of one named schema */
struct tly_schema_registry; /* every version the process can read; immutable once built */

/*
 * The Parsing Canonical Form of a schema given as JSON text (Avro specification, "Parsing
 * Canonical Form for Schemas"). Returns a malloc'd string, or NULL with errstr filled.
 */
char *tly_schema_canonical_form(const char *json, size_t len, char *errstr, size_t errlen);

/* CRC-64-AVRO fingerprint of a Parsing Canonical Form. */
uint64_t tly_schema_fingerprint_pcf(const char *pcf);

/*
 * A registry with the current schemas (schemas/NAME.avsc) and every released version
 * (schemas/released/), all compiled into the library. NULL with errstr on failure.
 */
struct tly_schema_registry *tly_schema_registry_new(char *errstr, size_t errlen);

/* An empty registry, for tests and tools that bring their own schemas. NULL on OOM. */
struct tly_schema_registry *tly_schema_registry_new_empty(void);

/*
 * Add a schema version. current marks the version writers use and readers read into (one per
 * full name); other versions are older writers' schemas. Adding a fingerprint twice is a no-op.
 */
int tly_schema_registry_add(struct tly_schema_registry *reg, const char *json, size_t len,
			    bool current, char *errstr, size_t errlen) TLY_MUST_CHECK;

void tly_schema_registry_free(struct tly_schema_registry *reg); /* accepts NULL */

/* Lookups; the result is borrowed from the registry. NULL when absent. */
const struct tly_schema *tly_schema_find(const struct tly_schema_registry *reg, uint64_t fingerprint);
const struct tly_schema *tly_schema_current(const struct tly_schema_registry *reg,
					    const char *fullname);
size_t tly_schema_count(const struct tly_schema_registry *reg);
const struct tly_schema *tly_schema_at(const struct tly_schema_registry *reg, size_t i);

/* Accessors; everything returned is borrowed from the registry. */
const char *tly_schema_fullname(const struct tly_schema *s);
const char *tly_schema_pcf(const struct tly_schema *s);
const char *tly_schema_text(const struct tly_schema *s); /* the .avsc as given */
uint64_t tly_schema_fingerprint(const struct tly_schema *s);
bool tly_schema_is_current(const struct tly_schema *s);
avro_schema_t tly_schema_avro(const struct tly_schema *s);
avro_value_iface_t *tly_schema_iface(const struct tly_schema *s); /* generic value class */
const json_t *tly_schema_json(const struct tly_schema *s);

/* The JSON default of a top-level field of s, or NULL when the field or its default is absent. */
const json_t *tly_schema_field_default(const struct tly_schema *s, const char *field);

/*
 * Can a reader with reader_json read data written with writer_json? Type resolution is avro-c's
 * (avro_resolved_writer_new). Because avro-c 1.11 does not apply reader defaults, a reader field
 * the writer lacks is checked here: it must carry a default (the codec fills it). 0, or
 * TLY_E_INCOMPATIBLE / TLY_E_SCHEMA with the reason in errstr.
 */
int tly_schema_check_compat(const char *writer_json, const char *reader_json, char *errstr,
			    size_t errlen) TLY_MUST_CHECK;

#endif
