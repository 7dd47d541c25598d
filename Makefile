# make run | make test | make faults | make soak | make demo | make bench | make lint | make build
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run test faults soak demo bench lint build clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Runs the service; if nothing answers on REDIS_URL/POSTGRES_URL and the server
# binaries are installed, starts throwaway local ones first and says so.
run: venv
	$(PY) -m processor.devservers -- $(PY) processor.py run

# The test command (README, .ci/run): the whole suite, fault scenarios included.
test: venv
	$(PY) -m pytest

faults: venv
	$(PY) -m pytest -m faults

# The ten-minute chaos soak at 2,000 positions/s (SOAK_SECONDS=... to change the length).
soak: venv
	$(PY) -m pytest -m soak -rP tests/faults/test_soak.py

demo: venv
	$(PY) -m processor.devservers --demo -- $(PY) processor.py run

bench: venv
	$(PY) bench/run.py

lint: venv
	$(PY) -m pip install -q ruff mypy
	$(VENV)/bin/ruff check processor tests bench
	$(VENV)/bin/mypy

build: venv
	$(PY) -m build

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
