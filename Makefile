# Two commands for a fresh clone: `make demo` (train filter atoms on the castle demo set with the
# embedded tiny model, then sample the paper's 20 prompts into a grid; run again, it replaces both) and `make test`.
# Both create the virtual environment first if needed.

VENV ?= .venv
PYTHON ?= python3
# A pinned torch keeps pip from replacing an installed build; override for another (e.g. CUDA) build.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdtune-installed
DEMO_STEPS ?= 200
RUN ?= runs/castle-atoms
DEMO_MODEL ?= tiny
# Tests run on one worker per core (at most 4), one thread each: the tiny model's small operations
# gain nothing from a second thread, and a second worker nearly halves the suite's time. worksteal: a worker
# that runs out of tests takes some of the other's, instead of idling through the last long ones.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal

.PHONY: env demo test test-all bench clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sdtune train --model $(DEMO_MODEL) --concept castle --method atoms --steps $(DEMO_STEPS) --output $(RUN) --overwrite
	$(VENV)/bin/sdtune sample --adapter $(RUN) --prompts prompts/castle.txt --num-images 4 --steps 30 --overwrite
	@echo "grid: $(RUN)/samples/grid.png"

test: $(STAMP)
	$(PYTEST)

test-all: $(STAMP)
	$(PYTEST) -m ""

clean:
	rm -rf runs .pytest_cache
