"""Process-group set-up for one process, torchrun, or srun; device choice."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from esvit_scale.cluster.slurm import rendezvous_from_slurm, slurm_node_count
from esvit_scale.config import ConfigError

log = logging.getLogger(__name__)
STALE_BUILD_LOCK_S = 30 * 60      # a JIT build takes minutes; a lock file this old was left by a killed build


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_rank_and_world(env=os.environ) -> tuple[int, int]:
    """(rank, world size) as the launcher set them (torchrun's RANK/WORLD_SIZE, srun's SLURM_PROCID/SLURM_NTASKS),
    before any process group exists; (0, 1) for a plain `python train.py`."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


GPU_LISTS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")         # device indices ("0" is a GPU)
GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")  # "0": none; "a100:2"


class DeviceError(ConfigError):
    """The configured device cannot be had: stops the run before any work, in one line (train.py)."""


def resolve_device(choice: str) -> str:
    """'cuda' or 'cpu' for run.device. `auto` picks the CPU only when the job was given no GPU: a job given GPUs that
    torch cannot see (a driver older than torch's CUDA build, tasks not bound to the GPUs) must not train on the CPU
    for days by accident."""
    if choice == "cpu":
        return "cpu"
    with warnings.catch_warnings(record=True) as caught:       # torch says here why it found no device
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return "cuda"
    given = gpus_given_to_job()
    if choice == "auto" and given is None:
        return "cpu"
    why = "; ".join(str(w.message).strip().splitlines()[0] for w in caught) or "torch.cuda.is_available() is False"
    raise DeviceError(
        f"run.device={choice}: " + (f"the job was given GPUs ({given}) but " if given else "") +
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) sees none: {why}. Likely causes: the node's "
        f"NVIDIA driver is older than CUDA {torch.version.cuda or '?'} needs, or the job's tasks are not bound to the "
        f"GPUs (srun --gpus-per-task / --gpu-bind). To train on the CPU anyway: run.device=cpu")


def gpus_given_to_job(env=os.environ) -> str | None:
    """What says this job has GPUs (a SLURM GPU variable, CUDA_VISIBLE_DEVICES, nvidia-smi listing devices), or None."""
    for name in GPU_LISTS + GPU_COUNTS:
        value = env.get(name, "").strip()
        none = ("", "-1", "NoDevFiles", "none") + (("0",) if name in GPU_COUNTS else ())
        if value not in none and not value.endswith(":0"):
            return f"{name}={value}"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
        if gpus:
            return f"nvidia-smi lists {len(gpus)} GPU(s)"
    return None


def set_cpu_threads(requested: int, loader_workers: int) -> str:
    """torch's intra-op threads for a CPU run (run.cpu_threads); says how many and why. On 2 cores with 2 loader
    workers the quickstart's step runs at 130 images/s on 1 thread, 94 on 2 (docs/performance.md)."""
    if requested > 0:
        torch.set_num_threads(requested)
        return f"{requested} (run.cpu_threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, cores - loader_workers)
    torch.set_num_threads(threads)
    return f"{threads} ({cores} cores for this process, less data.num_workers={loader_workers})"


def prepare_environment(device: str) -> None:
    """Before deepspeed is imported: CPU accelerator off a GPU; rank variables for one process or srun."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # JIT-built DeepSpeed ops (e.g. the shared-memory comm op, ~35 s) are cached with the project
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".torch_extensions"))
    clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            addr, port = rendezvous_from_slurm()
            os.environ.setdefault("MASTER_ADDR", addr)
            os.environ.setdefault("MASTER_PORT", str(port))
    if "RANK" not in os.environ:                       # a plain `python train.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if "MASTER_ADDR" not in os.environ and slurm_node_count() > 1:
        raise RuntimeError("this job spans several nodes but MASTER_ADDR is not set, and the ranks were not started "
                           "by srun (whose node list would name the rendezvous host): set MASTER_ADDR to the first "
                           "node's address and MASTER_PORT to a free port, or launch with srun or torchrun")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def clear_stale_build_locks(ext_dir: Path, max_age_s: float = STALE_BUILD_LOCK_S,
                            plain_lock: bool | None = None) -> list[Path]:
    """Older torch (2.11, as on the GPU image) marks a JIT build in progress by the mere existence of a `lock`
    file: a build killed mid-way (preemption, OOM, SIGKILL) leaves it, and every later start waits on it forever,
    silently. Such files older than any build are removed, each with a warning. Newer torch holds a kernel lock
    on the file, released when its holder dies, and needs none of this (plain_lock None: ask torch)."""
    if plain_lock is None:
        from torch.utils import cpp_extension
        plain_lock = hasattr(cpp_extension, "FileBaton") and not hasattr(cpp_extension, "FileLock")
    if not plain_lock:
        return []
    removed = []
    for lock in sorted(ext_dir.glob("*/lock")):
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed %s, left %.0f min ago by a JIT build that did not finish (it would block "
                            "this start forever); the op is built again", lock, age / 60)
        except FileNotFoundError:      # another process got there first
            pass
    return removed


def init_distributed(device: str, timeout_minutes: float = 30.0) -> DistInfo:
    """The process group (NCCL on GPUs, gloo on the CPU) with `timeout_minutes` as its collective timeout."""
    prepare_environment(device)
    import deepspeed
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if device == "cpu" and os.environ["WORLD_SIZE"] == "1":
        _skip_shared_memory_comm_op()
    if not torch.distributed.is_initialized():
        backend, timeout = ("nccl" if device == "cuda" else "gloo"), timedelta(minutes=timeout_minutes)
        store = _restart_store(timeout)
        if store is not None:
            torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                                 world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)   # reuses a group
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistInfo(rank, local_rank, world, dev)


def restart_prefix() -> str:
    """Store keys of this attempt of the workers: torchrun restarts them (--max-restarts) around a store that
    outlives them."""
    return f"esvit/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _restart_store(timeout: timedelta):
    """Under torchrun, the process group's store is the launcher's, which outlives the workers: restarted workers
    that used the same key names as their predecessors would read the addresses of dead ones (gloo then fails to
    connect, restart after restart). Keys of their own per attempt. None where the group makes its own store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return torch.distributed.PrefixStore(restart_prefix(), store)


def _skip_shared_memory_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it starts (0.5-2 min on a fresh
    2-core machine, most of a quickstart's start-up); one process never communicates, so mark it unusable."""
    import deepspeed.ops
    compatible = deepspeed.ops.__compatible_ops__
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
