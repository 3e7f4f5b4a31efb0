"""The compiled extension esvit_scale._C (built from kernels/csrc by setup.py) and the backend choice.

Each op asks `backend(op, tensor)` which implementation to run:
    "cuda"      the tensor is on a GPU and _C was built with CUDA
    "cpu"       the tensor is on the CPU, in a dtype the CPU kernels support (float32, float64), run with the
                vector instruction set cpu_isa() names for the ops of CPU_ISA_OPS (avx512 where the CPU has it,
                else avx2; see set_cpu_isa), with the build's own (avx2) for the others
    "reference" the pure-PyTorch reference: forced by config, op disabled, _C missing, or unsupported dtype
The first use of each (op, backend) is logged once, with the reason when it is the reference.
"""
from __future__ import annotations

import logging
import os

import torch

from esvit_scale.cluster import faults

log = logging.getLogger("esvit_scale.ops")

OPS = ("window_attention", "region_matching")
CPU_ISA_OPS = ("window_attention",)   # CPU kernels built for several instruction sets (the others: the build's)
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_state = {"enabled": {op: True for op in OPS}, "force_reference": False, "fallen_back": {}, "corrupt": set()}
_logged: set[tuple[str, str]] = set()

try:
    from esvit_scale import _C  # noqa: N812
    _import_error = None
except ImportError as e:  # not built: every op runs its reference
    _C = None
    _import_error = str(e)
_BUILT_WITH_CUDA = _C is not None and _C.built_with_cuda()


def extension():
    """The compiled module, or raise with the build command when it is missing."""
    if _C is None:
        raise RuntimeError(f"esvit_scale._C is not built ({_import_error}); run "
                           "`python setup.py build_ext --inplace` or `pip install -e . --no-build-isolation`")
    return _C


def available() -> bool:
    return _C is not None


def cuda_available() -> bool:
    return _BUILT_WITH_CUDA


def configure(window_attention: bool = True, region_matching: bool = True, force_reference: bool = False,
              cpu_isa: str = "auto") -> None:
    _state["enabled"].update(window_attention=bool(window_attention), region_matching=bool(region_matching))
    _state["force_reference"] = bool(force_reference)
    _state["fallen_back"] = {}
    _state["corrupt"] = faults.kernel_faults()      # test-only: the kernels of these ops return wrong numbers
    if _C is not None:
        set_cpu_isa(cpu_isa)
    _logged.clear()  # a new configuration is reported again


def cuda_arch_in_build(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA kernels can run on `device`'s architecture, and a line saying so (built for it, or for a PTX
    it can JIT-compile, or neither)."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = major * 10 + minor
    built = getattr(_C, "cuda_archs", lambda: "")().split("_") if _BUILT_WITH_CUDA else []
    if f"sm{arch}" in built:
        return True, f"sm_{arch} is in the build ({', '.join(built)})"
    ptx = [int(b[3:]) for b in built if b.startswith("ptx") and int(b[3:]) <= arch]
    if ptx:
        return True, (f"sm_{arch} is not in the build ({', '.join(built)}): the driver JIT-compiles its "
                      f"compute_{max(ptx)} PTX")
    return False, (f"sm_{arch} is not in the build ({', '.join(built) or 'no CUDA code'}): rebuild with "
                   f"TORCH_CUDA_ARCH_LIST including {major}.{minor} (setup.py)")


def cpu_isa() -> str | None:
    """The vector instruction set of the CPU kernels ("avx512", "avx2", "generic"), None when _C is missing."""
    return None if _C is None else _C.cpu_isa()


def set_cpu_isa(name: str = "auto") -> None:
    """"auto": the environment's ESVIT_CPU_ISA when set, else the best this CPU has; or one of
    _C.supported_cpu_isas(). One that this CPU or build lacks raises, naming it and the ones available."""
    if name == "auto":
        name = os.environ.get("ESVIT_CPU_ISA") or "auto"
    try:
        extension().set_cpu_isa(name)
    except RuntimeError as e:
        raise ValueError(str(e).splitlines()[0]) from None


def enabled(op: str) -> bool:
    return _state["enabled"][op] and not _state["force_reference"] and op not in _state["fallen_back"]


def fall_back(op: str, reason: str) -> None:
    """`op` runs its reference from now on (its kernel failed the self-check, ops/self_check.py)."""
    _state["fallen_back"][op] = reason
    _logged.difference_update({key for key in _logged if key[0] == op})


def corrupted(op: str) -> bool:
    """Whether the test fault ESVIT_FAULT_KERNEL asks this op's kernel to return wrong numbers."""
    return op in _state["corrupt"]


def implementation(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """What `op` runs for tensors of this device and dtype, in words (summary.json `kernels`)."""
    probe = torch.empty(0, device=device, dtype=dtype)
    choice, why = _choice(op, probe, True)
    return f"{choice} ({why})" if why else choice


def backend(op: str, x: torch.Tensor, use_kernel: bool = True) -> str:
    """Which implementation `op` runs for tensor `x` (see the module docstring); logs the choice once."""
    choice, why = _choice(op, x, use_kernel)
    # Under torch.compile (model.compile) the choice is made while tracing and becomes part of the graph; logging
    # there would break the graph, so only eager calls log (the loss's ops run eagerly and still do).
    if not torch.compiler.is_compiling() and (op, choice) not in _logged:
        _logged.add((op, choice))
        log.info("op %s uses the %s implementation%s", op, choice, f" ({why})" if why else "")
    return choice


def _choice(op: str, x: torch.Tensor, use_kernel: bool) -> tuple[str, str]:
    if op in _state["fallen_back"]:
        choice, why = "reference", _state["fallen_back"][op]
    elif not (use_kernel and enabled(op)):
        choice, why = "reference", "disabled by config"
    elif _C is None:
        choice, why = "reference", "esvit_scale._C is not built"
    elif x.is_cuda:
        ok = _BUILT_WITH_CUDA and x.dtype in CUDA_DTYPES
        choice, why = ("cuda", "") if ok else ("reference", f"no CUDA kernel for {x.dtype} / CPU-only build")
    elif x.device.type == "cpu" and x.dtype in CPU_DTYPES:
        choice, why = "cpu", _C.cpu_isa() if op in CPU_ISA_OPS else ""
    else:
        choice, why = "reference", f"no kernel for {x.device.type} {x.dtype}"
    return choice, why
