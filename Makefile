# jbl — the two entry points a newcomer types (as root on Debian): `make demo`, `make test`.
# Every target is idempotent: system packages and the venv are only installed when missing.

VENV     ?= .venv
PY       := $(VENV)/bin/python
JBL      := $(VENV)/bin/jbl
APT_PKGS := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv libarchive-tools mtree-netbsd bubblewrap util-linux iproute2 psmisc
STAMP    := $(VENV)/.jbl-installed

.PHONY: setup system-deps demo test bench clean lint

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

demo: setup
	$(PY) -m jbl.cli.demo

test: setup
	$(PY) -m pytest -q tests

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
