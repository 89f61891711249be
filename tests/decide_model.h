/*
 * A reference model of one tenant's wallet, written apart from ledger/decide.c from the rules in
 * DESIGN.md and decide.h, and a runner that drives the real decision core and the model with the
 * same event sequence (decoded from bytes), checking after every event that they agree (outcome,
 * balances, open holds, ledger time) and that the entries keep the invariants: seq gap-free and
 * hash-chained, balances after = before + deltas, available >= -overdraft_limit while no
 * subscription allows overage, every hold ends at most once. Used by the decide suite (random
 * sequences from a fixed seed) and by tests/fuzz/fuzz_decide.c. No Check, no I/O.
 */
#ifndef TLY_TEST_DECIDE_MODEL_H
#define TLY_TEST_DECIDE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#define TLY_MODEL_OP_BYTES 5 /* one event per 5 input bytes (after the first, the settings) */

struct tly_codec;

/*
 * Run the events encoded in ops[0..n) through a fresh wallet and the model. Returns 0 when they
 * agree throughout, -1 with the step and the disagreement in why. codec is borrowed (hashing).
 */
int tly_model_run(struct tly_codec *codec, const uint8_t *ops, size_t n, char *why, size_t whylen);

#endif
