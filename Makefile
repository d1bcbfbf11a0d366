# partialseg commands. Each target creates or reuses .venv and installs in the order the
# environment needs: torch==2.13.0 (a local CPU wheel) first, then everything else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= demo_output

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,monailabel,tracking]'
	# MONAI Label itself without its dependencies (they would pull torchvision, sam2 and a CUDA
	# torch); pydicom-seg pins numpy<2 but works with numpy 2
	$(PIP) install -q --no-deps pydicom-seg==0.4.1 monailabel==0.8.5
	# compile the optional native loss kernels now (cached per machine; on failure the losses
	# fall back to torch ops and this prints why)
	$(PY) -m partialseg._native || true
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	# the layering contract (setup.cfg [importlinter]): imports only go down the layers, no cycles
	$(VENV)/bin/lint-imports --config setup.cfg
	$(PY) -m pytest -n 2 --durations=15 tests

demo: install
	$(PY) -m partialseg.demo --out $(DEMO_DIR)

bench: install
	$(PY) benchmarks/transforms.py
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/marginal_iteration.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .hypothesis
