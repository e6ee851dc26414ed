# Two commands on a fresh machine (see README):  `make demo`  and  `make test`.
# Each creates its own virtual environment in .venv from the pinned requirements the first time.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: setup demo test clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
