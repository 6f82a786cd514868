# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both build .venv (Python 3.10+ and pip are all they need) when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): requirements-test.txt setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .  # builds csrc/ against the pinned torch
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m presam_kernels compare

# One thread: the suite is many small ops, where thread hand-offs cost more than they give.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests bench --benchmark-disable

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
