VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo lint format bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -e ".[test]"

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The embedded CPU demo: train, sample, evaluate; report in runs/demo/report/ (~15 min on 2 cores).
demo: install
	$(PY) -m jointnet_jax.demo --out runs/demo

lint: install
	$(VENV)/bin/ruff check jointnet_jax tests benchmarks configs
	$(VENV)/bin/ruff format --check jointnet_jax tests benchmarks configs

format: install
	$(VENV)/bin/ruff check --fix jointnet_jax tests benchmarks configs
	$(VENV)/bin/ruff format jointnet_jax tests benchmarks configs

clean:
	rm -rf $(VENV) build *.egg-info
