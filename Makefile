VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint format bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -e ".[test]"

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check jointnet_jax tests benchmarks configs
	$(VENV)/bin/ruff format --check jointnet_jax tests benchmarks configs

format: install
	$(VENV)/bin/ruff check --fix jointnet_jax tests benchmarks configs
	$(VENV)/bin/ruff format jointnet_jax tests benchmarks configs

clean:
	rm -rf $(VENV) build *.egg-info
