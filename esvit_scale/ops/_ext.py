"""The compiled extension esvit_scale._C (built from kernels/csrc by setup.py) and the backend choice.

Each op asks `backend(op, tensor)` which implementation to run:
    "cuda"      the tensor is on a GPU and _C was built with CUDA
    "cpu"       the tensor is on the CPU, in a dtype the CPU kernels support (float32, float64)
    "reference" the pure-PyTorch reference: forced by config, op disabled, _C missing, or unsupported dtype
The first use of each (op, backend) is logged once, with the reason when it is the reference.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("esvit_scale.ops")

OPS = ("window_attention", "region_matching")
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_state = {"enabled": {op: True for op in OPS}, "force_reference": False}
_logged: set[tuple[str, str]] = set()

try:
    from esvit_scale import _C  # noqa: N812
    _import_error = None
except ImportError as e:  # not built: every op runs its reference
    _C = None
    _import_error = str(e)


def extension():
    """The compiled module, or raise with the build command when it is missing."""
    if _C is None:
        raise RuntimeError(f"esvit_scale._C is not built ({_import_error}); run "
                           "`python setup.py build_ext --inplace` or `pip install -e . --no-build-isolation`")
    return _C


def available() -> bool:
    return _C is not None


def cuda_available() -> bool:
    return _C is not None and _C.built_with_cuda()


def configure(window_attention: bool = True, region_matching: bool = True, force_reference: bool = False) -> None:
    _state["enabled"].update(window_attention=bool(window_attention), region_matching=bool(region_matching))
    _state["force_reference"] = bool(force_reference)
    _logged.clear()  # a new configuration is reported again


def enabled(op: str) -> bool:
    return _state["enabled"][op] and not _state["force_reference"]


def backend(op: str, x: torch.Tensor, use_kernel: bool = True) -> str:
    """Which implementation `op` runs for tensor `x` (see the module docstring); logs the choice once."""
    if not (use_kernel and enabled(op)):
        choice, why = "reference", "disabled by config"
    elif _C is None:
        choice, why = "reference", "esvit_scale._C is not built"
    elif x.is_cuda:
        ok = _C.built_with_cuda() and x.dtype in CUDA_DTYPES
        choice, why = ("cuda", "") if ok else ("reference", f"no CUDA kernel for {x.dtype} / CPU-only build")
    elif x.device.type == "cpu" and x.dtype in CPU_DTYPES:
        choice, why = "cpu", ""
    else:
        choice, why = "reference", f"no kernel for {x.device.type} {x.dtype}"
    if (op, choice) not in _logged:
        _logged.add((op, choice))
        log.info("op %s uses the %s implementation%s", op, choice, f" ({why})" if why else "")
    return choice
