# nas-janitor: set-up and checks. Run as root on Debian 12.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := btrfs-progs docker.io busybox-static debootstrap docker-compose
# what the tests need beyond the lab: promtool checks the alert rules, chromium renders /docs
TEST_PACKAGES := prometheus chromium
# what building btrfs-progs 4.4.1 needs (lab/btrfs_progs.py BUILD_PACKAGES says the same)
BTRFS_PROGS_PACKAGES := autoconf automake pkg-config uuid-dev libblkid-dev zlib1g-dev \
  liblzo2-dev libattr1-dev
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: test deps test-deps venv lint typecheck unit demo clean btrfs-progs

## demo: the main job on the embedded lab: leak, agent, controller, reclaim, audit
demo: deps venv
	$(PY) -m lab.demo

## test: install what is needed (btrfs-progs 4.4.1 too), then lint, type checks, unit
## and lab tests (the agent's with the distro's btrfs-progs and with 4.4.1)
test: deps test-deps venv lint typecheck btrfs-progs
	$(PY) -m pytest $(PYTEST_ARGS)

# a shell command that installs those of the Debian packages $(1) that are missing
apt_install = missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

## deps: the system packages the lab needs (installed only when missing)
deps:
	@$(call apt_install,$(APT_PACKAGES))

## test-deps: the system packages only the tests need (promtool, chromium)
test-deps:
	@$(call apt_install,$(TEST_PACKAGES))

## btrfs-progs: btrfs-progs 4.4.1 for the agent's lab tests, built from
## ../shared/vendor/btrfs-progs-v4.4.1.tar.gz when it is there (see lab/btrfs_progs.py),
## cached outside the clone; the build's packages are installed only for a build
btrfs-progs: venv
	@if ! $(PY) -m lab.btrfs_progs path >/dev/null 2>&1 && \
	    $(PY) -m lab.btrfs_progs source >/dev/null 2>&1; then \
	  $(call apt_install,$(BTRFS_PROGS_PACKAGES)); \
	fi
	@$(PY) -m lab.btrfs_progs build >/dev/null

## venv: a virtualenv with the pinned dependencies and dev tools
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -m "not lab" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

.PHONY: images wheelhouse
## images: the agent and controller images on $$DOCKER_HOST (wheelhouse, cached Debian base)
images: deps venv
	deploy/build-images.sh all

## wheelhouse: wheels of the project and its pinned dependencies, for the image builds
wheelhouse: venv
	deploy/build-images.sh wheelhouse

.PHONY: bench
BENCH_RESULTS ?= bench/results
## bench: every benchmark, each on a lab of its own (about 35 min, root), then rewrite
## the results sections of BENCHMARKS.md from $(BENCH_RESULTS)/*.json. Not part of `test`.
bench: deps venv
	$(PY) -m bench.b1_scan --json $(BENCH_RESULTS)/b1.json
	$(PY) -m bench.b2_reclaim --json $(BENCH_RESULTS)/b2.json
	$(PY) -m bench.b3_fleet --json $(BENCH_RESULTS)/b3.json
	$(PY) -m bench.b4_footprint --json $(BENCH_RESULTS)/b4.json
	$(PY) -m bench.b5_enumeration --json $(BENCH_RESULTS)/b5.json
	$(PY) -m bench.b6_kept --json $(BENCH_RESULTS)/b6.json
	$(PY) -m bench.b7_holders --json $(BENCH_RESULTS)/b7.json
	$(PY) -m bench.report $(BENCH_RESULTS) BENCHMARKS.md

.PHONY: robustness
ROBUSTNESS_OUT ?= build/robustness
## robustness: the long robustness suite (root, labs; about 8 min): schemathesis with
## 400 examples per operation in process and against the real agent on a lab of its
## own, the state machine with more runs, kill -9 at more points of an apply, the load
## test at 50 clients for 30 s (summary in $(ROBUSTNESS_OUT)/load.json). `make test`
## runs the short versions. NAS_JANITOR_ROBUSTNESS_SEED=N replays a run's seed.
robustness: deps venv
	NAS_JANITOR_ROBUSTNESS=long NAS_JANITOR_ROBUSTNESS_OUT=$(ROBUSTNESS_OUT) \
	  $(PY) -m pytest -s -ra tests/robustness $(PYTEST_ARGS)
