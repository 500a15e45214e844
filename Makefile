# nas-janitor: set-up and checks. Run as root on Debian 12.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := btrfs-progs docker.io busybox-static debootstrap docker-compose
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: test deps venv lint typecheck unit demo clean

## demo: the main job on the embedded lab: leak, agent, controller, reclaim, audit
demo: deps venv
	$(PY) -m lab.demo

## test: install what is needed, then lint, type checks, unit and lab tests
test: deps venv lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

## deps: the system packages the lab needs (installed only when missing)
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

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
## bench: every benchmark, each on a lab of its own (about 20 min, root), then rewrite
## the results sections of BENCHMARKS.md from $(BENCH_RESULTS)/*.json. Not part of `test`.
bench: deps venv
	$(PY) -m bench.b1_scan --json $(BENCH_RESULTS)/b1.json
	$(PY) -m bench.b2_reclaim --json $(BENCH_RESULTS)/b2.json
	$(PY) -m bench.b3_fleet --json $(BENCH_RESULTS)/b3.json
	$(PY) -m bench.b4_footprint --json $(BENCH_RESULTS)/b4.json
	$(PY) -m bench.b5_enumeration --json $(BENCH_RESULTS)/b5.json
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
