"""Every collective the training code runs, in one place. Each one works without a process group too (one process:
it returns its input), so callers never ask whether they are distributed.

Objects (pickled, small: listings, errors, file names) and tensors (values every rank agrees on: a flag, the step's
mean losses, the loss centres' batch means) are kept apart by name.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _many() -> bool:
    return world_size() > 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank."""
    if not _many():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's `obj`, in rank order."""
    if not _many():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def merged_dicts(local: dict) -> dict:
    """The union of every rank's dict (keys are expected to be disjoint)."""
    return {k: v for part in all_gather_object(local) for k, v in part.items()}


def first_error(error: Any) -> Any:
    """The first rank's non-empty `error` (in rank order), the same on every rank; None if no rank has one."""
    return next((e for e in all_gather_object(error) if e), None)


def any_rank(flag: bool) -> bool:
    return _reduce_flag(flag, dist.ReduceOp.MAX) if _many() else flag


def every_rank(flag: bool) -> bool:
    return _reduce_flag(flag, dist.ReduceOp.MIN) if _many() else flag


def _reduce_flag(flag: bool, op) -> bool:
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=op)
    return bool(value.item())


def sum_over_ranks_(values: torch.Tensor) -> torch.Tensor:
    """In place: the element-wise sum over the ranks (on the tensor's own device)."""
    if _many():
        dist.all_reduce(values)
    return values


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """A new tensor: the element-wise mean over the ranks."""
    return sum_over_ranks_(values.clone()) / world_size() if _many() else values.clone()


def max_over_ranks(values: torch.Tensor) -> torch.Tensor:
    out = values.clone()
    if _many():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out
