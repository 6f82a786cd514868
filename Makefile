# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both build .venv (Python 3.10+ and pip are all they need) when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean test-all-cases test-codegen-all test-triton-next

$(STAMP): requirements-test.txt setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .  # builds csrc/ against the pinned torch
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m presam_kernels compare

# One thread per process: the suite is many small ops, where thread hand-offs cost
# more than they give. Two pytest-xdist workers (XDIST; a module with a module-scoped
# fixture stays on one worker: tests/conftest.py).
XDIST := -n 2 --dist loadgroup
test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(XDIST) tests bench --benchmark-disable

# The interpreted Triton cases `make test` leaves out as not core (tests/conftest.py,
# PRESAM_ALL_CASES), at interpreter sizes (tests/helpers.py): 435 cases, 12 min with
# two workers on 2 nearly idle cores (fresh-clone .ci/run, 2026-12-01; 42 min at
# load 12 on a shared machine). Per-launch interpreter overhead,
# not tensor size, is most of it (test_properties' drawn examples: a third).
# Run by .ci/run right after `make test`.
test-all-cases: $(STAMP)
	PRESAM_ALL_CASES=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q $(XDIST) tests

# The kernels' GPU code for every specialization (make test: a covering set).
# About 1000 compiles: ~5-8 min on 2 idle cores, seconds when cached. Run by .ci/run.
test-codegen-all: $(STAMP)
	PRESAM_ALL_CASES=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/test_codegen.py

# Triton's newest release (what a current CUDA build of torch pulls) beside the
# pinned one: .venv-t39 holds only triton==3.9.0, layered over .venv's packages.
# Creating it takes about 20 s. Run by .ci/run after `make test`.
T39 := .venv-t39
$(T39)/.installed: $(STAMP)
	test -x $(T39)/bin/python || $(PYTHON) -m venv $(T39)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(T39)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/base-venv.pth"
	$(T39)/bin/python -m pip install --quiet --no-deps triton==3.9.0
	$(T39)/bin/python -c 'import triton; assert triton.__version__ == "3.9.0", triton.__version__'
	touch $@

# Every test that runs the Triton kernels (-m triton), core and non-core cases
# (PRESAM_EVERY_CASE), then the codegen sweep. The first line: 762 tests (11 GPU-only
# skipped), 6 min with two workers on 2 nearly idle cores (fresh-clone .ci/run,
# 2026-12-01; 46 min at load 12); the sweep: 4 min with half of it cached.
test-triton-next: $(T39)/.installed
	PRESAM_EVERY_CASE=1 OMP_NUM_THREADS=1 $(T39)/bin/python -m pytest -q $(XDIST) -m triton tests
	PRESAM_ALL_CASES=1 OMP_NUM_THREADS=1 $(T39)/bin/python -m pytest -q tests/test_codegen.py

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

clean:
	rm -rf $(VENV) $(T39) .pytest_cache .benchmarks
