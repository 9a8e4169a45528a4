# automat - the two commands: `make run` and `make test`. Everything else is a helper.
#
#   make run         system packages + venv, then `automat run` (local stack + app on Ray)
#   make test        system packages + venv, then the whole pytest suite (real services, Ray)
#   make system      apt-get install redis-server dovecot-imapd openssl python3-venv if missing
#   make venv        .venv with `pip install -e '.[dev]'` (again only when pyproject.toml changes)
#   make stack-up    start the local stack (Redis, Tansu, Dovecot, SMTP sink) on 127.0.0.1
#   make stack-down  stop it
#   make clean       stop the stack, remove .run/ and caches (keeps .venv)
#   make loadtest    `automat loadtest` (KIM benchmark): MAILS=240000, LOADTEST_ARGS='--rate 7 ...'
#   make chaos       `automat chaos` on its own stack: CHAOS_ARGS='--mails 2000 --duration 300'
#   make fuzz        the parser fuzzers with the deep profile; prints examples tried per parser
#
# Variables: PYTHON (python3), PYTEST_ARGS (e.g. PYTEST_ARGS='-x tests/unit').

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.automat-installed
RUN_DIR := $(CURDIR)/.run
AUTOMAT := $(VENV)/bin/automat
PYTEST_ARGS ?=

# Debian packages the local stack needs (python3-venv: `python3 -m venv` on stock Debian)
SYSTEM_PKGS := redis-server dovecot-imapd openssl python3-venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Ray puts unix sockets under $RAY_TMPDIR/ray/session_<date>_<pid>/sockets/plasma_store and
# refuses paths over 107 bytes: that leaves ~40 characters for RAY_TMPDIR (measured).
# Use .run/tmp when it is short enough, else a per-checkout dir under /tmp.
RAY_TMP := $(shell d='$(RUN_DIR)/tmp'; if [ $${#d} -le 40 ]; then echo "$$d"; \
             else echo "/tmp/automat-ray-$$(printf %s '$(CURDIR)' | cksum | cut -d' ' -f1)"; fi)

# What every test/run process sees: nothing lands in ~ or /tmp, no Ray token auth locally.
TEST_ENV := HOME=$(RUN_DIR)/home TMPDIR=$(RAY_TMP) RAY_TMPDIR=$(RAY_TMP) \
            RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONDONTWRITEBYTECODE=1
RUN_ENV := TMPDIR=$(RAY_TMP) RAY_TMPDIR=$(RAY_TMP) RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0

.PHONY: help run test system venv stack-up stack-down stack-status clean

MAILS ?= 240000
LOADTEST_ARGS ?=
.PHONY: loadtest
loadtest: system venv
	@mkdir -p $(RAY_TMP)
	$(RUN_ENV) $(AUTOMAT) loadtest --mails $(MAILS) $(LOADTEST_ARGS)

CHAOS_ARGS ?= --mails 2000 --duration 300
.PHONY: chaos fuzz
chaos: system venv
	@mkdir -p $(RAY_TMP)
	$(RUN_ENV) $(AUTOMAT) chaos $(CHAOS_ARGS)

fuzz: venv
	@mkdir -p $(RAY_TMP) $(RUN_DIR)/home
	AUTOMAT_FUZZ_PROFILE=deep $(TEST_ENV) $(VENV)/bin/pytest -q -p no:cacheprovider --timeout=0 tests/unit/fuzz $(PYTEST_ARGS)

help:
	@sed -n '1,15p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

run: system venv
	@mkdir -p $(RAY_TMP)
	$(RUN_ENV) $(AUTOMAT) run

test: system venv
	@mkdir -p $(RAY_TMP) $(RUN_DIR)/home
	$(TEST_ENV) $(VENV)/bin/pytest -q $(PYTEST_ARGS)

# apt-get only for what is missing. Services must not start on install (policy-rc.d 101):
# our own instances run on other ports with their own config, a distro instance (systemd or
# sysv) is never used, so whether it autostarts does not matter for automat either way.
system:
	@missing=""; \
	for p in $(SYSTEM_PKGS); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "system packages present: $(SYSTEM_PKGS)"; exit 0; fi; \
	echo "installing:$$missing"; \
	created=""; \
	if [ ! -e /usr/sbin/policy-rc.d ]; then \
	  printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	  $(SUDO) chmod 755 /usr/sbin/policy-rc.d; created=1; \
	fi; \
	trap '[ -n "$$created" ] && $(SUDO) rm -f /usr/sbin/policy-rc.d' EXIT; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@if [ ! -x $(VENV)/bin/python ]; then \
	  $(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: run 'make system' (python3-venv)"; exit 1; }; \
	fi
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	@touch $@

stack-up: system venv
	$(AUTOMAT) stack up

stack-down:
	@if [ -x $(AUTOMAT) ]; then $(AUTOMAT) stack down; else echo "no venv, nothing to stop"; fi

stack-status: venv
	$(AUTOMAT) stack status

clean: stack-down
	rm -rf $(RUN_DIR) .pytest_cache .hypothesis build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
	@case "$(RAY_TMP)" in /tmp/automat-ray-*) rm -rf "$(RAY_TMP)";; esac
