# make run | make simulate | make gateway | make test | make faults | make soak | make demo | make bench | make lint | make build
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run simulate gateway test faults soak demo bench lint build clean

venv: $(STAMP)

# The C source too: an editable install builds processor/core/_speedups.c in place, once.
$(STAMP): pyproject.toml processor/core/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Runs the service. For REDIS_URL/POSTGRES_URL left unset (environment and .env)
# where nothing answers, starts throwaway local servers first (if installed) and
# says so; a URL you set is used as it is, answering or not.
run: venv
	$(PY) -m processor.devservers -- $(PY) processor.py run

# Feeds `make run` from a second terminal: 20 moving trackers, 20 positions/s, on REDIS_URL.
simulate: venv
	$(PY) processor.py simulate --devices 20 --rate 20

# The live gateway (docs/gateway.md), beside `make run`: GATEWAY_TOKEN_SECRET (or GATEWAY_PUBLIC=true) in .env.
gateway: venv
	$(PY) -m processor.devservers -- $(PY) processor.py gateway

# The test command (README, .ci/run): the whole suite, fault scenarios included.
test: venv
	$(PY) -m pytest

# -m replaces setup.cfg's "not soak": say it again, or the ten-minute soak (in tests/faults/) runs too.
faults: venv
	$(PY) -m pytest -m "faults and not soak"

# The ten-minute chaos soak at 2,000 positions/s (SOAK_SECONDS=... to change the length).
soak: venv
	$(PY) -m pytest -m soak -rP tests/faults/test_soak.py

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
