# make run | make gateway | make test | make demo | make bench | make lint | make build
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run gateway test faults demo bench lint build clean

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

# The live gateway (docs/gateway.md), beside `make run`: GATEWAY_TOKEN_SECRET (or GATEWAY_PUBLIC=true) in .env.
gateway: venv
	$(PY) -m processor.devservers -- $(PY) processor.py gateway

# The test command (README, .ci/run): the whole suite, fault scenarios included.
test: venv
	$(PY) -m pytest

faults: venv
	$(PY) -m pytest -m faults

# The processor, the simulator and the live gateway together; prints the live map's URL.
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
