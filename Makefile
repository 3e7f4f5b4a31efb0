# The README's two commands: `make quickstart` (set up, then pretrain on the embedded default) and
# `make test` (set up, then run the test suite). `make setup` alone is idempotent and fast once done.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.14.1 torchvision==0.29.1
KERNEL_SOURCES := $(wildcard kernels/csrc/*)
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup quickstart test test-all bench gpu-check gpu-check-dry gpu-bundle compat-check clean slurm-up slurm-down

setup: $(VENV)/.installed

# torch first (the pinned CUDA 13 build), then what a run needs; the rest (DALI's ~0.5 GB, the photographs' and the
# plots' packages, pytest) only for everything but the quickstart, which trains on the digits with the torch loader.
$(VENV)/.deps-run: setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q timm pyyaml tensorboard deepspeed scikit-learn ninja
	@touch $@

$(VENV)/.deps: $(VENV)/.deps-run
	$(PY) -m pip install -q nvidia-dali-cuda130 scikit-image matplotlib pytest
	@touch $@

# Then this package, which compiles kernels/ (with its CUDA sources wherever nvcc is: the tests build them).
$(VENV)/.installed: $(VENV)/.deps $(KERNEL_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

# The quickstart on a machine without a GPU needs the CPU kernels only: it skips the CUDA build (~3 min of a 2-core
# machine), unless a full build is already in place.
$(VENV)/.installed-quick: $(VENV)/.deps-run $(KERNEL_SOURCES)
	@if [ -f $(VENV)/.installed ] && [ -z "$$(find $(KERNEL_SOURCES) setup.py -newer $(VENV)/.installed)" ]; then \
	  echo "using the full build"; \
	elif command -v nvidia-smi > /dev/null; then \
	  $(PY) -m pip install -q --no-build-isolation --no-deps -e . && touch $(VENV)/.installed; \
	else \
	  ESVIT_CPU_ONLY_BUILD=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .; \
	fi
	@touch $@

quickstart: $(VENV)/.installed-quick
	$(PY) train.py --config configs/quickstart.yaml

test: setup
	$(PY) -m pytest -q -m "not slow" --durations=30

test-all: setup
	$(PY) -m pytest -q

# A real one-node SLURM on this machine (root; installs Debian's packages) for tests/test_slurm.py, which skip
# without a cluster outside CI. .ci/run starts and stops it around `make test`.
slurm-up:
	bash slurm/local_cluster.sh start

slurm-down:
	bash slurm/local_cluster.sh stop

bench: setup
	$(PY) -m esvit_scale.bench kernels --json runs/bench_kernels.json
	$(PY) -m esvit_scale.bench loader --json runs/bench_loader.json

# On the lent GPU machine (torch 2.11, timm, pytest, nvcc; no network, no DeepSpeed, no DALI, no venv): everything
# GPU-related in one script, each part run even when an earlier one failed; logs and gpu_check.json in GPU_OUT
# (esvit_scale/bench/gpu_check.py). `make gpu-bundle` first, here: the DeepSpeed wheels travel in build/gpu_bundle.
GPU_OUT ?= runs/gpu
gpu-check:
	python3 -m esvit_scale.bench gpu_check --out $(GPU_OUT)

# The same script on this CPU with tiny shapes (what needs a GPU reports "skipped: no GPU"); tests/test_gpu_check.py.
gpu-check-dry: setup
	$(PY) -m esvit_scale.bench gpu_check --dry --out runs/gpu-dry

# DeepSpeed and the dependencies the GPU machine lacks, as wheels for CPython 3.12 on x86_64 (~6 MB), for the device
# tool to carry (build/ is ignored by git; carry: ["build/gpu_bundle"]); installed there offline into build/gpu_site.
# a Python 3.12 to install the bundle into (PATH, else pyenv's); empty: skipped
PY312 ?= $(shell for p in $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $$(command -v python3.12); do \
	  $$p -c '' 2>/dev/null && echo $$p && break; done)
BUNDLE_DEPS := typing-extensions hjson msgpack py-cpuinfo pydantic pydantic-core annotated-types typing-inspection einops psutil nvidia-ml-py
BUNDLE_TAGS := --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any
gpu-bundle: setup
	rm -rf build/gpu_bundle && mkdir -p build/gpu_bundle
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w build/gpu_bundle \
	  deepspeed==$$($(PY) -c "from importlib.metadata import version; print(version('deepspeed'))")
	$(PY) -m pip download -q --no-deps $(BUNDLE_TAGS) -d build/gpu_bundle $(BUNDLE_DEPS)
	rm -rf build/gpu_bundle_check && $(PY) -m pip install -q --no-index --find-links build/gpu_bundle \
	  --target build/gpu_bundle_check $(BUNDLE_TAGS) --no-deps build/gpu_bundle/*.whl
	@if [ -n "$(PY312)" ]; then \
	  echo "offline install into a fresh Python 3.12 venv ($(PY312)), then import its compiled wheels"; \
	  rm -rf build/gpu_bundle_py312 && $(PY312) -m venv build/gpu_bundle_py312 && \
	  build/gpu_bundle_py312/bin/python -m pip install -q --no-index --no-deps build/gpu_bundle/*.whl && \
	  build/gpu_bundle_py312/bin/python -c "import sys, pydantic, msgpack, psutil, hjson, cpuinfo, einops; \
	    print('python', sys.version.split()[0], 'pydantic', pydantic.__version__, 'msgpack', msgpack.version)"; \
	else echo "no python3.12 here: the bundle was only installed for 3.12 into a target folder"; fi
	du -sh build/gpu_bundle

# The code must also run on the GPU machine's older torch: a side venv with that torch and its torchvision over
# .venv's other packages (no second copy of deepspeed, DALI, CUDA libraries), a copy of the tracked files with the
# extension built against that torch (CUDA sources included), then the test command; JIT-built DeepSpeed ops in a
# folder of their own (one built for another torch would be rebuilt on every switch). Downloads ~550 MB once.
COMPAT_TORCH ?= torch==2.11.0 torchvision==0.26.0
COMPAT_DIR   ?= build/compat
compat-check: setup
	@test -x $(COMPAT_DIR)/venv/bin/python || $(PYTHON) -m venv $(COMPAT_DIR)/venv
	$(COMPAT_DIR)/venv/bin/python -m pip install -q --no-deps $(COMPAT_TORCH)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > $$($(COMPAT_DIR)/venv/bin/python -c \
	  "import site; print(site.getsitepackages()[0])")/zz_esvit_main_venv.pth
	rm -rf $(COMPAT_DIR)/src && mkdir -p $(COMPAT_DIR)/src
	git ls-files -z | xargs -0 cp --parents -t $(COMPAT_DIR)/src
	cd $(COMPAT_DIR)/src && PATH=$(CURDIR)/$(COMPAT_DIR)/venv/bin:$$PATH:$(CURDIR)/$(VENV)/bin \
	  python setup.py -q build_ext --inplace > build.log 2>&1 || { tail -40 build.log; exit 1; }
	cd $(COMPAT_DIR)/src && export PATH=$(CURDIR)/$(COMPAT_DIR)/venv/bin:$$PATH \
	  PYTHONPATH=$(CURDIR)/$(COMPAT_DIR)/src TORCH_EXTENSIONS_DIR=$(CURDIR)/$(COMPAT_DIR)/torch_extensions && \
	  python -c "import torch; from esvit_scale import _C; print('torch', torch.__version__, _C.__file__)" && \
	  python -m pytest -q -p no:cacheprovider -m "not slow"

clean:
	rm -rf build *.egg-info esvit_scale/_C*.so runs/quickstart
