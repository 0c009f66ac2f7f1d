# Two entry points: `make study` runs the default study, `make test` runs the test suite.
# Both create the virtual environment first if it is missing.
VENV := .venv
PYTHON := $(VENV)/bin/python
CORES ?= 2

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# torch first, pinned, so pip takes the CPU wheel instead of pulling CUDA packages.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	# The scorer parity tests import lmms-eval's own task code; its package requires torchvision, accelerate, openai,
	# ... (and pins wandb), none of which that code uses: without them it needs only loguru (dev extra) beyond vtc's own.
	$(PYTHON) -m pip install --quiet --no-deps lmms-eval==0.7.3
	touch $@

.PHONY: setup study test
setup: $(VENV)/.installed

study: setup
	$(VENV)/bin/snakemake --cores $(CORES)

test: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)
