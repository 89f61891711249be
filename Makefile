# Tally: one plain, non-recursive Makefile.
#
#   make            build libtally.a and every program into build/
#   make deps       install the Debian packages the build, the tests and the dev stack need
#   make check      install deps, build, run the Check suites (unit + integration)
#   make demo       the whole product in one command: dev stack, tally-ledger, tally-projector,
#                   DEMO_SECONDS (default 30) of tally-loadgen traffic, a report; up until Ctrl-C
#   make demo-stop  stop a running demo (every process it started)
#   make dev        bring up the embedded dev stack (dev broker + throw-away PostgreSQL, migrated)
#   make clean      remove build/

.DEFAULT_GOAL := all
SHELL := /bin/bash

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
	lib/audit_pg.c \
	lib/audit_proj.c \
	lib/cli.c \
	lib/config.c \
	lib/copyout.c \
	lib/crc64.c \
	lib/codec.c \
	lib/codec_plan.c \
	lib/decision.c \
	lib/entries.c \
	lib/devbroker_ctl.c \
	lib/devpg.c \
	lib/err.c \
	lib/event.c \
	lib/event_json.c \
	lib/health.c \
	lib/http.c \
	lib/kafka.c \
	lib/lag.c \
	lib/log.c \
	lib/metrics.c \
	lib/migrate.c \
	lib/pg.c \
	lib/pgcopy.c \
	lib/proc.c \
	lib/producer.c \
	lib/schema.c \
	lib/uuidmap.c \
	lib/validate_bytes.c \
	ledger/decide.c \
	ledger/wallet.c \
	projections/fold.c \
	$(BUILD)/gen/schemas_embedded.c
LIB_OBJS := $(patsubst %.c,$(OBJ)/%.o,$(LIB_SRCS:$(BUILD)/gen/%=gen/%))
LIB      := $(BUILD)/libtally.a

SCHEMAS  := $(sort $(wildcard schemas/*.avsc))
RELEASED := $(sort $(wildcard schemas/released/*.avsc))
MIGRATIONS := $(sort $(wildcard migrations/*.sql))

# ---- programs: thin mains over the library ---------------------------------------------
PROGRAMS := tallyctl tally-devbroker tally-bench tally-ledger tally-loadgen tally-bench-publish \
            tally-projector tally-bench-projector tally-bench-audit
tallyctl_SRCS        := tools/tallyctl.c tools/tallyctl_publish.c tools/tallyctl_tail.c \
                        tools/tallyctl_quarantine.c tools/tallyctl_reserve.c \
                        tools/tallyctl_status.c tools/tallyctl_rebuild.c \
                        tools/tallyctl_devstack.c tools/tallyctl_demo.c tools/tallyctl_audit.c \
                        tools/tallyctl_balance.c tools/tallyctl_statement.c
tally-devbroker_SRCS := tools/devbroker.c
tally-ledger_SRCS    := consumers/ledger_main.c consumers/ledger_partition.c \
                        consumers/ledger_publisher.c consumers/ledger_store.c
tally-bench_SRCS     := tools/bench.c
tally-bench-publish_SRCS := tools/bench_publish.c
tally-loadgen_SRCS   := producers/loadgen_main.c producers/loadgen.c
tally-projector_SRCS := consumers/projector_main.c
tally-bench-projector_SRCS := tools/bench_projector.c
tally-bench-audit_SRCS := tools/bench_audit.c consumers/ledger_partition.c consumers/ledger_store.c \
                          producers/loadgen.c

# ---- tests: one Check runner, one suite per module -------------------------------------
TEST_SRCS := \
	tests/check_main.c \
	tests/fixtures.c \
	tests/harness_broker.c \
	tests/harness_ledger.c \
	tests/harness_pg.c \
	tests/harness.c \
	tests/check_audit.c \
	tests/check_codec.c \
	tests/check_config.c \
	tests/check_decide.c \
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
             $(OBJ)/consumers/ledger_store.o
TEST_BIN  := $(BIN)/tally-tests

.PHONY: all deps check unit bench clean dev demo demo-stop schemas-release
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

# The .avsc and .sql files are compiled into the library, so programs need no data files.
$(BUILD)/gen/schemas_embedded.c: scripts/embed $(SCHEMAS) $(RELEASED) $(MIGRATIONS)
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
# parses and resolves it; no engine needed), run every suite (unit and integration).
check: deps
	$(MAKE) all
	docker-compose -f docker-compose.yml config -q
	TALLY_BIN=$(BIN) $(TEST_BIN)

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
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
