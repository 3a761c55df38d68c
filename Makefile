# `make run` and `make test` set up everything they need on a Debian/Ubuntu host
# (see README.md); each step is a no-op when already in place.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
IMAGE_BUILD := $(VENV)/bin/sandpool image build
# The images `make setup` builds (docs/images.md); each is skipped when current.
# `make setup IMAGE_PROFILES=python` builds only the small one.
IMAGE_PROFILES ?= python datasci node

.PHONY: run test setup lint soak hostile

run: setup
	exec $(VENV)/bin/sandpool serve

test: setup lint
	@# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
	$(VENV)/bin/pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "sandpool: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

# Mixed load plus faults (killed containers, a SIGKILLed daemon, a dockerd
# restart) for about 5 minutes; then no leaked container and RSS growth < 10 %.
soak: setup
	$(VENV)/bin/python -m tests.soak

# Tenant traffic alone, beside busy neighbours, then beside attackers in pools
# of their own (every resource attack, idle connection floods): latency of each
# phase and where it went, nothing left behind (about 4.5 minutes; see tests/hostile.py).
hostile: setup
	$(VENV)/bin/python -m tests.hostile

setup: $(STAMP)
	bash scripts/ensure-docker.sh
	bash scripts/ensure-tools.sh
	bash scripts/ensure-wasm-datasci.sh
	for profile in $(IMAGE_PROFILES); do $(IMAGE_BUILD) --profile $$profile || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check pool api metrics tests bench clients/python deploy scripts
	$(VENV)/bin/mypy

# Removes each protection in scripts/mutations.toml in turn from a scratch copy
# of the tree and runs the test that names it; fails if any test still passes
# (docs/mutation.md). Never part of `make test`. MUTATE_ARGS="-k docker" selects rows.
.PHONY: mutate
mutate: setup
	$(VENV)/bin/python scripts/mutate.py $(MUTATE_ARGS)

# Benchmarks (docs/benchmarks.md): never part of `make test`.
# `make bench` takes at most 18 minutes and writes bench/results/<date>.{json,md,png}.
.PHONY: bench bench-quick
BENCH_STAMP := $(VENV)/.bench-installed

bench: setup $(BENCH_STAMP)
	$(VENV)/bin/python -m bench

bench-quick: setup $(BENCH_STAMP)
	$(VENV)/bin/python -m bench --quick

$(BENCH_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-e '.[test,bench]' -c constraints.txt
	touch $@

# Reinstalls only when the dependencies change.
$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt scripts/ensure-venv.sh
	bash scripts/ensure-venv.sh

# The daemon's own image, sandpool/daemon:bookworm (docs/kubernetes-image.md):
# built from Debian packages and this checkout, skipped when current.
.PHONY: daemon-image
daemon-image: setup
	$(VENV)/bin/python -m deploy.image.build

# Three daemon containers of that image behind HAProxy, under load, one drained
# and one killed; prints the report (about 2 minutes; docs/kubernetes-image.md).
# SIMULATE_ARGS="--json FILE" also writes it as JSON.
.PHONY: simulate
simulate: daemon-image
	$(VENV)/bin/python -m deploy.simulate.run $(SIMULATE_ARGS)
