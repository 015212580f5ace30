# Two commands on a fresh Debian 12 machine (as root): `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := runc e2fsprogs debootstrap busybox-static iproute2 util-linux fuse3 gcc libc6-dev ca-certificates redis-server
DATA_DIR ?= /var/lib/wisp
LISTEN ?= 127.0.0.1:7770
PYTEST_ARGS ?=

.PHONY: run test bench check install deps venv init js clean

install: deps venv init js

# Debian packages: installed only when one is missing, so a warm machine skips apt.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

build/wisp-init: wisp/runtime/init/wisp-init.c
	mkdir -p build
	gcc -static -O2 -Wall -Wextra -o $@.tmp $<
	mv $@.tmp $@

init: build/wisp-init

# The official JS SDK and a Node 24 to run it (tests/functional/test_js_sdk.py), from npm.
tests/js/node_modules/.installed: tests/js/package.json
	@if command -v npm >/dev/null; then \
		cd tests/js && npm install --no-audit --no-fund --no-package-lock --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the JS SDK test will be skipped"; fi

js: tests/js/node_modules/.installed

run: install
	$(VENV)/bin/wisp serve --data-dir $(DATA_DIR) --listen $(LISTEN)

# Lint and types first: ruff (rules in pyproject.toml), mypy --strict over the package.
check: install
	$(VENV)/bin/ruff check wisp tests
	$(VENV)/bin/mypy --strict wisp

test: install check
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m tests.performance.bench

clean:
	rm -rf build $(VENV)
