# Everything runs from a virtual environment that this Makefile creates and
# fills from pyproject.toml, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: all install lint test demo bench soak clean

all: test

# "strict" editable mode links the sources into build/ and puts that one directory on
# sys.path; the default mode installs an import hook whose own imports cost ~13 ms at every
# interpreter start, which would distort vm-token's start-up time. New files need a
# reinstall, hence every package directory (its mtime changes when a file is added).
$(STAMP): pyproject.toml $(shell find client daemon -type d -not -name __pycache__)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		--config-settings editable_mode=strict -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Four workers on two cores: most tests wait (on daemons, servers, token lifetimes), they
# do not compute; one worker took 4 min 16 s, four 1 min 48 s. worksteal: a worker that
# runs out takes tests queued for another, so a few long ones at the end of one queue
# no longer hold the run up (1,005 tests: 5 min 25 s with the default split, 3 min 45 s).
# Six workers took 3 min 57 s, with Chromium timing out under the load.
test: lint
	$(BIN)/python -m pytest -n 4 --dist worksteal

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python -m bench

# The real daemon and proxy under 30 clients and random faults for SOAK_MINUTES (10);
# SOAK_SEED replays a run's faults and requests (not the machine's timing). Not in `test`.
soak: $(STAMP)
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
