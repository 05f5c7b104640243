# jbl — the entry points a newcomer types (as root on Debian): `make demo`, `make test`, and
# `make install` (jbl for every user: a venv on the system Python in PREFIX, BINDIR/jbl).
# Every target is idempotent: system packages and the venv are only installed when missing.

VENV     ?= .venv
PY       := $(VENV)/bin/python
JBL      := $(VENV)/bin/jbl
APT_PKGS := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv libarchive-tools mtree-netbsd bubblewrap util-linux iproute2 psmisc slirp4netns nginx-light squid
STAMP    := $(VENV)/.jbl-installed
PREFIX   ?= /opt/jbl
BINDIR   ?= /usr/local/bin
PYTHON   ?= /usr/bin/python3

.PHONY: setup system-deps install uninstall demo test bench clean lint

setup: $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml | system-deps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# Not editable, built from this clone; a second run only hashes the sources (tools/install.py).
install: system-deps
	@$(PYTHON) tools/install.py --prefix $(PREFIX) --bindir $(BINDIR) --python $(PYTHON)

uninstall:
	@if [ "$$(readlink $(BINDIR)/jbl)" = "$(PREFIX)/bin/jbl" ]; then rm -f $(BINDIR)/jbl; fi
	@if [ -f $(PREFIX)/pyvenv.cfg ]; then rm -rf $(PREFIX) $(PREFIX).lock; fi

demo: setup
	$(PY) -m jbl.cli.demo

# The tests that act as other users run the install (tests/fixtures_users.py refreshes it).
test: setup install
	JBL_PREFIX=$(PREFIX) JBL_BINDIR=$(BINDIR) $(PY) -m pytest -q tests

BENCH_STAMP := $(VENV)/.jbl-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

lint: setup
	$(VENV)/bin/ruff check store fusefs runner cli tests benchmarks
	$(VENV)/bin/mypy store fusefs runner cli

clean:
	rm -rf $(VENV) build *.egg-info
