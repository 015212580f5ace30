# Two commands on a fresh Debian 12 machine (as root): `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := runc e2fsprogs debootstrap busybox-static iproute2 util-linux fuse3 gcc libc6-dev ca-certificates redis-server nftables conntrack qemu-system-x86 cpio lz4 zstd
DATA_DIR ?= /var/lib/wisp
LISTEN ?= 127.0.0.1:7770
# Where `make install` links the `wisp` command (on root's and every user's default PATH).
BINDIR ?= /usr/local/bin
PYTEST_ARGS ?=

.PHONY: run test bench check install deps venv init vm js bin clean

install: deps venv init vm js bin

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

# The microvm guest's kernel, modules and python image (wisp/runtime/vm/assets.py): from
# Debian packages into build/vm, once; a warm machine only checks that they exist.
vm: deps venv
	$(PY) -m wisp.runtime.vm.assets

# The official JS SDK and a Node 24 to run it (tests/functional/test_js_sdk.py), from npm.
tests/js/node_modules/.installed: tests/js/package.json
	@if command -v npm >/dev/null; then \
		cd tests/js && npm install --no-audit --no-fund --no-package-lock --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the JS SDK test will be skipped"; fi

js: tests/js/node_modules/.installed

# `wisp` on the PATH: BINDIR/wisp -> this checkout's .venv/bin/wisp, so the "Try:" line
# `make run` prints works as printed. A BINDIR/wisp that is not a link is left alone (then
# `wisp serve` prints the venv script's full path instead).
bin:
	@link="$(BINDIR)/wisp"; target="$(CURDIR)/$(VENV)/bin/wisp"; \
	if [ "$$(readlink "$$link")" = "$$target" ]; then :; \
	elif [ -e "$$link" ] && [ ! -L "$$link" ]; then echo "$$link is not a link: left alone"; \
	elif ln -sfn "$$target" "$$link" 2>/dev/null; then echo "linked $$link -> $$target"; \
	else echo "cannot write $(BINDIR): use $$target, or add $(CURDIR)/$(VENV)/bin to PATH"; fi

run: install
	$(VENV)/bin/wisp serve --data-dir $(DATA_DIR) --listen $(LISTEN)

# Lint and types first: ruff (rules in pyproject.toml), mypy --strict over the package.
check: install
	$(VENV)/bin/ruff check wisp tests
	$(VENV)/bin/mypy --strict wisp

# The suite's base images first (tests/framework/images.py), so that no server start
# has to build one inside its own timeout.
test: install check
	$(PY) -m tests.framework.images
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m tests.performance.bench

clean:
	rm -rf build $(VENV)
