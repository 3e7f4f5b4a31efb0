"""Preemption-safe checkpoints: DeepSpeed's sharded student + optimizer, plus what DeepSpeed does not keep.

Layout of `<output_dir>/checkpoints/`:
    <tag>/                       DeepSpeed's files (model/optimizer shards of every rank)
    <tag>/teacher.pt             the full fp32 teacher (gathered one parameter at a time at ZeRO-3)
    <tag>/rank<R>.pt             that rank's RNG states
    <tag>/client_state.pt        epoch, step, loader position, loss centres, config (rank 0)
    <tag>/COMPLETE               written last, after every rank finished: a tag without it is ignored
    latest                       DeepSpeed's pointer (informational; resume uses COMPLETE markers)
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def complete_tags(root: Path) -> list[str]:
    """Finished checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    root = checkpoint_root(output_dir)
    tags = complete_tags(root)
    partial = [p.name for p in root.iterdir() if p.is_dir() and p.name not in tags] if root.is_dir() else []
    if partial:
        log.warning("ignoring unfinished checkpoints (no %s marker): %s", COMPLETE, ", ".join(sorted(partial)))
    return root / tags[-1] if tags else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(output_dir: str | Path, step: int, engine, teacher, client_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    path = root / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and path.exists():          # a leftover of an interrupted save of the same step
        shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag)
    teacher_state = teacher.full_state_dict()
    torch.save(rng_state(), path / f"rank{rank}.pt")
    if rank == 0:
        _atomic_save(teacher_state, path / "teacher.pt")
        _atomic_save(client_state, path / "client_state.pt")
    _barrier()
    if rank == 0:
        (path / COMPLETE).write_text(json.dumps({"step": step}))
        _prune(root, keep)
    _barrier()
    return path


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    tags = complete_tags(root)
    for tag in tags[:-keep]:
        shutil.rmtree(root / tag, ignore_errors=True)


def load_checkpoint(path: Path, engine, teacher) -> dict:
    """Restore student, optimizer, teacher and this rank's RNG; returns the client state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    teacher.load_full_state_dict(torch.load(path / "teacher.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s missing (resuming at another world size?): RNG streams restart", rng_file.name)
    return read_client_state(path)


def read_client_state(path: Path) -> dict:
    return torch.load(path / "client_state.pt", map_location="cpu", weights_only=False)
