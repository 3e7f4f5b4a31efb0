"""Builds and loads the DALI plugin of the CPU multi-crop operator (`csrc/multicrop_op.cc`, `fn.esvit_multi_crop`).

DALI's stock CPU operators spend ~16 ms of CPU per image of 2 x 224 + 8 x 96 crops (the bicubic resize alone
~9 ms); the plugin does the same per-crop steps in one operator in ~3 ms (2026-11-23, git history of
docs/benchmarks.md). It is compiled on first use against the installed DALI (its headers ship in the wheel and
include CUDA's `cuda_runtime.h`, found in a CUDA toolkit or torch's nvidia wheels) with the system C++ compiler, and cached by source, DALI version and
flags in `$ESVIT_DALI_PLUGIN_DIR` (default `~/.cache/esvit_scale/dali_plugin`). Where it cannot be built or
loaded, `available()` says so once in the log and the pipeline uses the stock operators instead.
`ESVIT_DALI_PLUGIN=0` turns it off.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "multicrop_op.cc"
OP_NAME = "esvit_multi_crop"


def _cpu_flags() -> list[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def _cuda_include_dirs() -> list[str]:
    """A folder with cuda_runtime.h and crt/host_config.h (DALI's headers include them for __host__ etc.)."""
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    if shutil.which("nvcc"):
        roots.append(str(Path(shutil.which("nvcc")).resolve().parent.parent))
    dirs = [os.path.join(r, "include") for r in roots if r] + ["/usr/local/cuda/include"]
    dirs += sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)
    for base in sys.path:     # torch's nvidia wheels, triton
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "cuda_runtime", "include"))
        dirs.append(os.path.join(base, "triton", "backends", "nvidia", "include"))
    for d in dirs:
        if all(os.path.isfile(os.path.join(d, *h)) for h in (["cuda_runtime.h"], ["crt", "host_config.h"])):
            return [d]
    raise RuntimeError("no CUDA headers (cuda_runtime.h, crt/host_config.h) found; set CUDA_HOME")


def _build() -> Path:
    import nvidia.dali as dali
    from nvidia.dali import sysconfig

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler (set CXX)")
    flags = ["-std=c++20", "-O3", "-fPIC", "-shared", "-fno-trapping-math", "-ffp-contract=fast", "-w"]
    flags += _cpu_flags()
    key = hashlib.sha256(SOURCE.read_bytes() + f"{dali.__version__} {compiler} {flags}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("ESVIT_DALI_PLUGIN_DIR", Path.home() / ".cache" / "esvit_scale" / "dali_plugin"))
    lib = cache / f"libesvit_dali_{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    includes = [f"-I{d}" for d in _cuda_include_dirs()]
    cmd = [compiler, *flags, str(SOURCE), *sysconfig.get_compile_flags(), *includes, "-o", str(tmp),
           *sysconfig.get_link_flags(), f"-Wl,-rpath,{sysconfig.get_lib_dir()}"]
    log.info("building the DALI multi-crop plugin (once per DALI version): %s", lib)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, lib)         # atomic: concurrent ranks may build it at the same time
    return lib


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when `fn.esvit_multi_crop` can be used (built and loaded once per process)."""
    if os.environ.get("ESVIT_DALI_PLUGIN", "1") == "0":
        return False
    try:
        from nvidia.dali import plugin_manager
        plugin_manager.load_library(str(_build()))
        return True
    except Exception as e:      # noqa: BLE001 - any failure means: use the stock operators
        log.warning("DALI multi-crop plugin unavailable, using DALI's stock CPU operators (slower): %s", e)
        return False
