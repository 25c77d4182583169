# kvmlite — the two README commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all setup guest demo run test unit integration lint fuzz bench bench-qemu bench-postcopy soak clean

all: setup guest

# A venv with kvmlite installed editable; cffi compiles kvmlite._kvm against
# this machine's <linux/kvm.h>, and kvmlite._postcopy against <linux/userfaultfd.h>,
# during the install.
setup: $(STAMP)
$(STAMP): pyproject.toml setup.py kvmlite/_kvm_build.py kvmlite/migration/_wire_build.py \
		kvmlite/_postcopy_build.py
	@test -f /usr/include/openssl/evp.h || { echo "kvmlite needs OpenSSL's headers to build" \
	    "its stream integrity tags: apt-get install libssl-dev"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,fuzz]'
	touch $@

guest:
	$(MAKE) -C guest

# The main job: two kvmlite processes on this machine, one live migration
# mid-workload, the guest finishing on the destination, figures printed.
demo: setup guest
	$(PY) -m kvmlite.demo

run: setup guest
	$(PY) -m kvmlite run guest/guest.bin --cmdline "workload=churn pages=20000 rounds=50" --stats

# Four workers (pytest-xdist), a test file to each: most tests wait on guests,
# sockets and timeouts, so four share two CPUs well (the suite needs about six
# CPU-minutes).  `make test JOBS=0` runs them one at a time.
JOBS ?= 4
test: setup guest
	$(PY) -m pytest -q $(if $(filter-out 0,$(JOBS)),-n $(JOBS) --dist loadfile) tests

unit: setup
	$(PY) -m pytest -q tests/unit

integration: setup guest
	$(PY) -m pytest -q tests/integration

# mypy --strict on the public API and ruff on everything; both configured in
# pyproject.toml, both installed from its [lint] extra.
LINT_STAMP := $(VENV)/.lint-installed
$(LINT_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[lint]'
	touch $@
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Coverage-guided fuzzing of the destination's receive path (tests/fuzz/README.md):
# FUZZ_RUNS mutated streams from tests/fuzz/corpus; crashing inputs and the
# fuzzer's log go to bench/out/fuzz/.  `make test` runs a bounded 100,000.
FUZZ_RUNS ?= 1000000
fuzz: setup
	$(PY) -m tests.fuzz.run --runs $(FUZZ_RUNS) --corpus tests/fuzz/corpus --artifacts bench/out/fuzz

# kvmlite's bytecode is compiled first, as a pip install (not an editable one)
# compiles it: with PYTHONDONTWRITEBYTECODE set, as on this project's machines,
# every start-up would otherwise compile ~30 modules (~30 ms) again.
bench: setup guest
	$(MAKE) -C bench
	$(PY) -m compileall -q kvmlite
	$(PY) -m bench

# kvmlite against QEMU on the same workloads, and migration cost against guest
# size: tables on stdout, bench/out/qemu.{json,md,png}.  Needs qemu-system-x86_64
# from the distribution's packages (the bench says how if it is missing and
# installs nothing itself); matplotlib for the plot comes with .[bench].
bench-qemu: setup guest
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m bench.qemu

# Post-copy: remote-fault latency over loopback, local zero-page faults, and the
# real guest moved by post-copy (docs/postcopy.md); tables on stdout, bench/out/postcopy.json.
bench-postcopy: setup guest
	$(PY) -m bench.postcopy

# The claim-2 race under stress: 1000 live migrations of a guest churning flat
# out, each to a fresh destination process; 0 corrupted pages or it fails.
# `make soak SMP=2`: the guest churns on two vCPUs (SOAK_MIGRATIONS=100 for a shorter run).
SMP ?= 1
SOAK_MIGRATIONS ?= 1000
soak: setup guest
	$(PY) -m kvmlite.soak --migrations $(SOAK_MIGRATIONS) --smp $(SMP)

clean:
	$(MAKE) -C guest clean
	rm -rf build *.egg-info kvmlite/_kvm.c kvmlite/_postcopy.c kvmlite/migration/_wire.c kvmlite/*.so kvmlite/migration/*.so kvmlite/*.o bench/out
