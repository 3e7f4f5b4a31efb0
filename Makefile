# The README's two commands: `make quickstart` (set up, then pretrain on the embedded default) and
# `make test` (set up, then run the test suite). `make setup` alone is idempotent and fast once done.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.14.1 torchvision==0.29.1
KERNEL_SOURCES := $(wildcard kernels/csrc/*)
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup quickstart test test-all bench gpu-check compat-check clean slurm-up slurm-down

setup: $(VENV)/.installed

# torch first (the pinned CUDA 13 build), then the rest, then this package, which compiles kernels/.
$(VENV)/.installed: setup.py $(KERNEL_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q timm pyyaml tensorboard deepspeed nvidia-dali-cuda130 scikit-learn scikit-image matplotlib pytest ninja
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

quickstart: setup
	$(PY) train.py --config configs/quickstart.yaml

test: setup
	$(PY) -m pytest -q -m "not slow"

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

# On a GPU machine that has torch, timm, pytest and nvcc but no network (the device image, no venv there): build the
# CUDA extension in place, then run the CUDA tests and the kernel benchmark on the GPU; logs and JSON in GPU_OUT.
GPU_OUT ?= runs/gpu
gpu-check:
	mkdir -p $(GPU_OUT)
	MAX_JOBS=16 python3 setup.py build_ext --inplace > $(GPU_OUT)/build.log 2>&1 || \
	  { tail -40 $(GPU_OUT)/build.log; exit 1; }
	python3 -m pytest -q -m gpu -rs tests/test_kernels_cuda.py > $(GPU_OUT)/cuda_tests.log 2>&1; \
	  echo $$? > $(GPU_OUT)/cuda_tests.rc; cat $(GPU_OUT)/cuda_tests.log
	python3 -m esvit_scale.bench kernels --device cuda --json $(GPU_OUT)/bench_kernels_cuda.json \
	  > $(GPU_OUT)/bench_kernels_cuda.log 2>&1; rc=$$?; cat $(GPU_OUT)/bench_kernels_cuda.log; exit $$rc
	exit $$(cat $(GPU_OUT)/cuda_tests.rc)   # the benchmark runs even when a CUDA test fails

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
