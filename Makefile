# Tally: one plain, non-recursive Makefile.
#
#   make            build libtally.a and every program into build/
#   make deps       install the Debian packages the build, the tests and the dev stack need
#   make check      install deps, build, run the Check suites (unit + integration)
#   make demo       the whole product in one command: dev stack, tally-ledger, tally-projector,
#                   DEMO_SECONDS (default 30) of tally-loadgen traffic, a report; up until Ctrl-C
#   make demo-stop  stop a running demo (every process it started)
#   make chaos      the long chaos run (CHAOS_SECONDS=300, SEED=1)
#   make soak       steady traffic for DURATION (seconds, or 30m, 2h): RSS and throughput
#   make dev        bring up the embedded dev stack (dev broker + throw-away PostgreSQL, migrated)
#   make asan check the same build in build-asan/ with AddressSanitizer + UBSan, every suite under it
#   make valgrind   the unit suites under valgrind (no error, no leak)
#   make fuzz       libFuzzer harnesses (tests/fuzz/, clang) for FUZZ_SECONDS each, into build-fuzz/
#   make clean      remove build/, build-asan/, build-fuzz/

.DEFAULT_GOAL := all
SHELL := /bin/bash

# `make asan <goal>`: the goal in the sanitizer variant (exported, so sub-makes build it too).
ifneq ($(filter asan,$(MAKECMDGOALS)),)
export SANITIZE := 1
endif
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
ifeq ($(SANITIZE),1)
BUILD  ?= build-asan
CFLAGS ?= -O1 -g $(SAN_FLAGS)
endif
# Sanitizer runs: stop at the first report. avro-c keeps its values 4 bytes into their allocation,
# so pointers inside them are unaligned: LeakSanitizer must scan unaligned words (use_unaligned=1)
# or it reports the memory they hold as leaked.
LSAN_ENV := LSAN_OPTIONS=use_unaligned=1
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1 \
           UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(LSAN_ENV)

BUILD  ?= build
OBJ    := $(BUILD)/obj
BIN    := $(BUILD)/bin

PKGS    := rdkafka avro-c libpq jansson uuid libcrypto
CC      ?= cc
CFLAGS  ?= -O2 -g
WARN    := -std=c11 -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
           -Wformat=2 -Wno-format-nonliteral -Werror
CPPFLAGS += -D_GNU_SOURCE -Ilib -Iledger -Iprojections -I$(BUILD)/gen
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null)
LDLIBS  := $(PKG_LIBS) -lev -lhttp_parser -lpthread -lm
ALL_CFLAGS = $(WARN) $(CPPFLAGS) $(PKG_CFLAGS) $(CFLAGS) -MMD -MP

# ---- the shared library: every program and the tests link it --------------------------
LIB_SRCS := \
	lib/arena.c \
	lib/audit.c \
	lib/audit_ids.c \
	lib/audit_pg.c \
	lib/audit_proj.c \
	lib/cli.c \
	lib/clock.c \
	lib/config.c \
	lib/copyout.c \
	lib/crc64.c \
	lib/codec.c \
	lib/codec_plan.c \
	lib/decision.c \
	lib/entries.c \
	lib/devbroker_ctl.c \
	lib/devpg.c \
	lib/devstack.c \
	lib/err.c \
	lib/event.c \
	lib/event_json.c \
	lib/health.c \
	lib/http.c \
	lib/kafka.c \
	lib/lag.c \
	lib/ledgercheck.c \
	lib/log.c \
	lib/metrics.c \
	lib/migrate.c \
	lib/pg.c \
	lib/pgarray.c \
	lib/pgcopy.c \
	lib/proc.c \
	lib/producer.c \
	lib/schema.c \
	lib/uuidmap.c \
	lib/validate_bytes.c \
	ledger/decide.c \
	ledger/wallet.c \
	projections/compare.c \
	projections/fold.c \
	projections/memfold.c \
	$(BUILD)/gen/schemas_embedded.c
LIB_OBJS := $(patsubst %.c,$(OBJ)/%.o,$(LIB_SRCS:$(BUILD)/gen/%=gen/%))
LIB      := $(BUILD)/libtally.a

SCHEMAS  := $(sort $(wildcard schemas/*.avsc))
RELEASED := $(sort $(wildcard schemas/released/*.avsc))
MIGRATIONS := $(sort $(wildcard migrations/*.sql))

# ---- programs: thin mains over the library ---------------------------------------------
PROGRAMS := tallyctl tally-devbroker tally-bench tally-ledger tally-loadgen tally-bench-publish \
            tally-projector tally-bench-projector tally-bench-audit tally-chaos tally-soak
tallyctl_SRCS        := tools/tallyctl.c tools/tallyctl_publish.c tools/tallyctl_tail.c \
                        tools/tallyctl_quarantine.c tools/tallyctl_reserve.c \
                        tools/tallyctl_status.c tools/tallyctl_rebuild.c tools/tallyctl_rebuild_read.c \
                        tools/tallyctl_devstack.c tools/tallyctl_demo.c tools/tallyctl_audit.c \
                        tools/tallyctl_balance.c tools/tallyctl_statement.c
tally-devbroker_SRCS := tools/devbroker.c
tally-ledger_SRCS    := consumers/ledger_main.c consumers/ledger_partition.c \
                        consumers/ledger_publisher.c consumers/ledger_store.c \
                        consumers/ledger_writer.c consumers/ledger_pace.c
tally-bench_SRCS     := tools/bench.c
tally-bench-publish_SRCS := tools/bench_publish.c
tally-loadgen_SRCS   := producers/loadgen_main.c producers/loadgen.c
tally-projector_SRCS := consumers/projector_main.c
tally-bench-projector_SRCS := tools/bench_projector.c
tally-bench-audit_SRCS := tools/bench_audit.c consumers/ledger_partition.c consumers/ledger_store.c \
                          producers/loadgen.c
tally-chaos_SRCS     := tools/chaos.c
tally-soak_SRCS      := tools/soak.c

# ---- tests: one Check runner, one suite per module -------------------------------------
TEST_SRCS := \
	tests/check_main.c \
	tests/fixtures.c \
	tests/harness_broker.c \
	tests/harness_ledger.c \
	tests/harness_pg.c \
	tests/harness.c \
	tests/check_audit.c \
	tests/check_badbytes.c \
	tests/check_chaos.c \
	tests/check_codec.c \
	tests/corpus.c \
	tests/check_config.c \
	tests/check_decide.c \
	tests/check_ledger_pace.c \
	tests/check_proc.c \
	tests/check_pgarray.c \
	tests/check_uuidmap.c \
	tests/decide_model.c \
	tests/check_devbroker.c \
	tests/check_producer.c \
	tests/check_decision.c \
	tests/check_roles.c \
	tests/check_status.c \
	tests/check_event.c \
	tests/check_http.c \
	tests/check_ledger.c \
	tests/check_migrate.c \
	tests/check_projector.c \
	tests/check_rebuild.c \
	tests/check_schema.c \
	tests/check_lifecycle.c \
	tests/check_demo.c
TEST_OBJS := $(TEST_SRCS:%.c=$(OBJ)/%.o) $(OBJ)/consumers/ledger_partition.o $(OBJ)/producers/loadgen.o \
             $(OBJ)/consumers/ledger_store.o $(OBJ)/consumers/ledger_pace.o \
             $(OBJ)/consumers/ledger_writer.o $(OBJ)/consumers/ledger_publisher.o
TEST_BIN  := $(BIN)/tally-tests

.PHONY: all deps check unit bench chaos soak clean dev demo demo-stop schemas-release asan \
        asan-unit valgrind fuzz fuzzers
all: $(LIB) $(addprefix $(BIN)/,$(PROGRAMS)) $(TEST_BIN)

# make V=1 shows the full commands.
Q := $(if $(V),,@)

$(OBJ)/%.o: %.c
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(OBJ)/gen/%.o: $(BUILD)/gen/%.c
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(ALL_CFLAGS) -c -o $@ $<

# The .avsc and .sql files are compiled into the library, so programs need no data files. The
# file list is a prerequisite too (rewritten only when it changes): removing or renaming a file
# changes no timestamp, and the library would keep embedding it.
EMBEDDED_LIST := $(BUILD)/gen/embedded.list
$(shell mkdir -p $(BUILD)/gen && echo '$(SCHEMAS) $(RELEASED) $(MIGRATIONS)' | \
	cmp -s - $(EMBEDDED_LIST) || echo '$(SCHEMAS) $(RELEASED) $(MIGRATIONS)' > $(EMBEDDED_LIST))

$(BUILD)/gen/schemas_embedded.c: scripts/embed $(SCHEMAS) $(RELEASED) $(MIGRATIONS) $(EMBEDDED_LIST)
	@mkdir -p $(@D)
	scripts/embed $@ $(SCHEMAS) -- $(RELEASED) -- $(MIGRATIONS)

$(LIB): $(LIB_OBJS)
	@rm -f $@
	@$(if $(Q),echo "  AR      $@")
	$(Q)ar rcs $@ $^

define program_rule
$(BIN)/$(1): $$($(1)_SRCS:%.c=$(OBJ)/%.o) $(LIB)
	@mkdir -p $$(@D)
	@$$(if $$(Q),echo "  LINK    $$@")
	$$(Q)$$(CC) $$(CFLAGS) -o $$@ $$^ $$(LDLIBS)
endef
$(foreach p,$(PROGRAMS),$(eval $(call program_rule,$(p))))

$(TEST_BIN): $(TEST_OBJS) $(LIB)
	@mkdir -p $(@D)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS) $(shell pkg-config --libs check)

deps:
	scripts/install-deps

# make check: install what is missing, build, check the production compose file (docker-compose
# parses and resolves it; no engine needed), run every suite (unit and integration); then the
# unit suites and the bad-bytes corpus again under the sanitizers (`make asan check` runs all).
check: deps
	$(MAKE) all
	docker-compose -f docker-compose.yml config -q
	$(if $(filter 1,$(SANITIZE)),$(SAN_ENV)) TALLY_BIN=$(BIN) $(TEST_BIN)
	$(if $(filter 1,$(SANITIZE)),,$(MAKE) SANITIZE=1 asan-unit)

# The goal `asan` only selects the variant (above); alone it builds it.
asan: $(if $(filter-out asan,$(MAKECMDGOALS)),,all)

asan-unit:
	$(MAKE) SANITIZE=1 BUILD=build-asan build-asan/bin/tally-tests
	$(SAN_ENV) TALLY_SUITES=unit build-asan/bin/tally-tests

# make valgrind: the unit suites in one process under valgrind; any error or leak fails.
valgrind: all
	scripts/install-deps valgrind
	CK_FORK=no TALLY_BIN=$(BIN) TALLY_SUITES=unit valgrind --error-exitcode=1 --leak-check=full \
		--quiet $(TEST_BIN)

# make fuzz: every harness in tests/fuzz/ for FUZZ_SECONDS, from its committed seed corpus
# (tests/fuzz/corpus/<name>/, read-only: new inputs go to build-fuzz/corpus/<name>/).
FUZZ_SECONDS ?= 60
FUZZERS := fuzz_codec fuzz_event_json fuzz_http fuzz_decide
fuzz_codec_SRCS      := tests/fuzz/fuzz_codec.c
fuzz_event_json_SRCS := tests/fuzz/fuzz_event_json.c
fuzz_http_SRCS       := tests/fuzz/fuzz_http.c
fuzz_decide_SRCS     := tests/fuzz/fuzz_decide.c tests/decide_model.c tests/fixtures.c
fuzz_codec_SEEDS      := tests/corpus/avro
fuzz_event_json_SEEDS := tests/corpus/ndjson
fuzz_http_SEEDS       := tests/corpus/http
FUZZ_FLAGS := -O1 -g -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer \
              -fno-sanitize-recover=all
fuzz:
	scripts/install-deps fuzz
	$(MAKE) BUILD=build-fuzz CC=clang CFLAGS="$(FUZZ_FLAGS)" fuzzers
	$(foreach f,$(FUZZERS),$(call fuzz_run,$(f)))

# One harness: new inputs into build-fuzz/corpus/<name>, seeds from the committed corpora; a
# crash leaves build-fuzz/<name>-crash-* (make it a regression test: tests/corpus/ or the suite).
define fuzz_run
	@mkdir -p build-fuzz/corpus/$(1)
	@echo "== $(1): $(FUZZ_SECONDS) s"
	$(LSAN_ENV) build-fuzz/bin/$(1) -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix=build-fuzz/$(1)- \
		build-fuzz/corpus/$(1) tests/fuzz/corpus/$(1) $($(1)_SEEDS)

endef

define fuzzer_rule
$(BIN)/$(1): $$($(1)_SRCS:%.c=$(OBJ)/%.o) $(LIB)
	@mkdir -p $$(@D)
	@$$(if $$(Q),echo "  LINK    $$@")
	$$(Q)$$(CC) $$(CFLAGS) -fsanitize=fuzzer -o $$@ $$^ $$(LDLIBS)
endef
$(foreach f,$(FUZZERS),$(eval $(call fuzzer_rule,$(f))))
fuzzers: $(addprefix $(BIN)/,$(FUZZERS))

# make unit: only the suites with no I/O (fast inner loop).
unit: all
	TALLY_BIN=$(BIN) TALLY_SUITES=unit $(TEST_BIN)

# make bench: throughput and latency figures, printed side by side (never asserted).
bench: deps
	$(MAKE) all
	$(BIN)/tally-bench
	$(BIN)/tally-bench-publish
	$(BIN)/tally-bench-projector
	$(BIN)/tally-bench-audit

# make chaos: the long chaos run (make check runs a short one); SEED and CHAOS_SECONDS choose it.
CHAOS_SECONDS ?= 300
SEED ?= 1
chaos: deps
	$(MAKE) all
	$(BIN)/tally-chaos --seed $(SEED) --seconds $(CHAOS_SECONDS)

# make soak: steady traffic for DURATION (600, 30m, 2h): RSS and throughput per daemon, printed.
DURATION ?= 600
soak: deps
	$(MAKE) all
	DURATION=$(DURATION) $(BIN)/tally-soak

dev: deps
	$(MAKE) all
	$(BIN)/tallyctl dev

# The one-command demo; DEMO_SECONDS=N sets how long tally-loadgen runs.
demo: deps
	$(MAKE) all
	$(BIN)/tallyctl demo $(if $(DEMO_SECONDS),--seconds $(DEMO_SECONDS))

demo-stop:
	$(BIN)/tallyctl demo stop

# Freeze the current schemas as released versions (run after a compatible schema change).
schemas-release: all
	$(BIN)/tallyctl schemas release schemas/released

clean:
	rm -rf build build-asan build-fuzz

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
