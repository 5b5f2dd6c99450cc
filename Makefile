# kithmail — the two commands a new machine needs are `make run` and `make test`.
#
# .venv        debug build of the extension, installed editable (maturin develop)
# .venv-bench  release wheel, for `make bench` only, so the two never mix

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
BENCH_VENV  := .venv-bench
BPY         := $(BENCH_VENV)/bin/python
MATURIN_VER := 1.16.0
SOAK_MINUTES ?= 10
RUST_SRC    := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml Cargo.lock
STAMP       := $(VENV)/.built-debug
# pytest processes (pytest-xdist); every test picks its own free ports and
# temporary directories, so they run side by side. PYTEST_JOBS=0 runs in one.
PYTEST_JOBS ?= 4
# Debian packages the tests drive for real (installed by `make test` when missing).
DEB_PACKAGES := dnsmasq postfix swaks knot clamav-daemon chromium prometheus systemd sqlite3 rsync
# ... and those the benchmarks compare against (installed by `make bench`).
BENCH_DEB_PACKAGES := postgrey clamdscan

.PHONY: all build test test-rust test-python lint fmt bench run clean sysdeps bench-sysdeps install-debs

all: build

# The venv counts as made only once maturin is in it, so an interrupted
# creation is finished by the next run instead of failing for ever.
$(VENV)/bin/maturin:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet maturin==$(MATURIN_VER)

$(STAMP): $(VENV)/bin/maturin $(RUST_SRC) pyproject.toml
	$(VENV)/bin/maturin develop --quiet --extras test
	touch $@

build: $(STAMP)

sysdeps:
	@$(MAKE) --no-print-directory install-debs PKGS="$(DEB_PACKAGES)"

bench-sysdeps:
	@$(MAKE) --no-print-directory install-debs PKGS="$(DEB_PACKAGES) $(BENCH_DEB_PACKAGES)"

install-debs:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: build sysdeps test-rust test-python

test-rust:
	cargo test -p kithmail-store --quiet

test-python: build
	$(PY) -m mypy.stubtest kithmail._core --allowlist tests/stubtest-allowlist.txt
	$(PY) -m pytest -q -n $(PYTEST_JOBS)

lint: build
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench
	$(PY) -m mypy python/kithmail
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings

fmt: build
	$(VENV)/bin/ruff format python tests bench
	$(VENV)/bin/ruff check --fix python tests bench
	cargo fmt --all

$(BENCH_VENV)/bin/maturin:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BPY) -m pip install --quiet --upgrade pip
	$(BPY) -m pip install --quiet maturin==$(MATURIN_VER)

bench: $(BENCH_VENV)/bin/maturin bench-sysdeps
	rm -f target/wheels-bench/kithmail-*.whl
	$(BENCH_VENV)/bin/maturin build --release --quiet --out target/wheels-bench
	$(BPY) -m pip install --quiet --force-reinstall --no-deps target/wheels-bench/kithmail-*.whl
	$(BPY) -m pip install --quiet target/wheels-bench/kithmail-*.whl
	$(BPY) -m pip install --quiet "lmdb==3.0.0"
	cargo build --release -p kithmail-store --bin kithmail-floor --quiet
	mkdir -p bench/results
	$(BPY) bench/core.py --json bench/results/core.json --floor target/release/kithmail-floor
	$(BPY) bench/policy.py --json bench/results/policy.json
	$(BPY) bench/smtp.py --wait-idle 120 --json bench/results/smtp.json
	$(BPY) bench/layers.py --wait-idle 120 --json bench/results/layers.json
	$(BPY) bench/community.py --wait-idle 120 --json bench/results/community.json
	$(BPY) bench/soak.py --wait-idle 120 --minutes $(SOAK_MINUTES) --json bench/results/soak.json

# The gateway on the embedded default: data in ./var, local domain example.test,
# Maildirs under ./var/mail, inbound SMTP on 127.0.0.1:2525, /metrics on :8025.
run: build
	$(VENV)/bin/kith serve

clean:
	rm -rf $(VENV) $(BENCH_VENV) target python/kithmail/_core.*.so
