# The single source of commands: README, CI and humans call these targets.
# `make help` lists them.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
# Where Rust crates come from (CARGO_SOURCE): "debian" (offline,
# /usr/share/cargo/registry) or "crates-io" (the network). Left unset, the build
# scripts decide when they run, after bootstrap has installed Debian's crates;
# deciding here, when make parses this file, picked crates-io on a fresh machine.

PROTO_FILES := $(wildcard proto/fl_sidecar/v1/*.proto)
NATIVE_SOURCES := $(shell find rust -name '*.rs' -o -name 'Cargo.toml' 2>/dev/null) Cargo.toml Cargo.lock

.PHONY: help install build proto proto-check lint test test-unit test-integration test-rust test-node bench demo clean image image-test

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMPS)/bootstrap: scripts/bootstrap.sh requirements-dev.txt $(wildcard examples/node/package*.json)
	bash scripts/bootstrap.sh
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/native: $(STAMPS)/bootstrap $(NATIVE_SOURCES) pyproject.toml scripts/build-native.sh scripts/build-libzstd.sh
	bash scripts/build-native.sh
	@mkdir -p $(STAMPS) && touch $@

install: $(STAMPS)/bootstrap $(STAMPS)/native ## set up ./.venv with everything and build the extension

build: $(STAMPS)/bootstrap ## (re)build the native extension into the venv
	bash scripts/build-native.sh
	@mkdir -p $(STAMPS) && touch $(STAMPS)/native

proto: $(STAMPS)/bootstrap ## regenerate the protobuf and gRPC code from proto/
	bash scripts/gen-proto.sh

proto-check: $(STAMPS)/bootstrap ## fail if the committed generated code is stale
	bash scripts/gen-proto.sh --check

lint: install ## ruff, mypy --strict, cargo fmt --check, cargo clippy
	$(VENV)/bin/ruff check python tests benchmarks
	$(VENV)/bin/ruff format --check python tests benchmarks
	$(VENV)/bin/mypy
	bash scripts/cargo.sh fmt --all --check
	bash scripts/cargo.sh clippy --workspace --all-targets -- -D warnings

test-rust: $(STAMPS)/bootstrap ## cargo test over the Rust core
	bash scripts/cargo.sh test -p fl-sidecar-core --release

test-unit: install ## unit tests (no sockets, no processes)
	$(PY) -m pytest tests/unit

test-integration: install ## integration tests (real servers, real clients)
	$(PY) -m pytest tests/integration

test: install ## everything CI runs: generated-code check, Rust tests, Python and Node tests, the image's smoke test
	bash scripts/gen-proto.sh --check
	bash scripts/cargo.sh test -p fl-sidecar-core --release
	$(PY) -m pytest tests --ignore=tests/integration/test_image.py
	@$(MAKE) --no-print-directory image-test

# The container image (docs/deploy.md). Where this machine cannot run
# containers, `image` says why and the smoke test is reported as skipped
# (FL_SIDECAR_REQUIRE_IMAGE=1 makes that a failure).
image: $(STAMPS)/bootstrap ## build the container image offline from Debian packages into build/image/
	bash scripts/image-build.sh

image-test: install image ## the image's smoke test: sidecar and Node.js trainer in containers, dev server on the host
	$(PY) -m pytest tests/integration/test_image.py --durations=0

bench: install ## benchmarks against named baselines (not part of the tests)
	$(PY) -m pip install -q -r benchmarks/requirements.txt
	$(PY) -m benchmarks $(BENCH)

demo: install ## the main job: a federated training on the embedded dev server through sidecars
	$(PY) -m fl_sidecar demo

clean: ## remove build outputs and the venv
	rm -rf $(VENV) $(STAMPS) target dist build
	find python -name '_codec*.so' -delete
