# The README's two commands: `make quickstart` (set up, then pretrain on the embedded default) and
# `make test` (set up, then run the test suite). `make setup` alone is idempotent and fast once done.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.14.1 torchvision==0.29.1
KERNEL_SOURCES := $(wildcard kernels/csrc/*)
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup quickstart test test-all bench clean

setup: $(VENV)/.installed

# torch first (the pinned CUDA 13 build), then the rest, then this package, which compiles kernels/.
$(VENV)/.installed: setup.py $(KERNEL_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q timm pyyaml tensorboard deepspeed nvidia-dali-cuda130 pytest ninja
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

quickstart: setup
	$(PY) train.py --config configs/quickstart.yaml

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m esvit_scale.bench kernels --json runs/bench_kernels.json
	$(PY) -m esvit_scale.bench loader --json runs/bench_loader.json

clean:
	rm -rf build *.egg-info esvit_scale/_C*.so runs/quickstart
