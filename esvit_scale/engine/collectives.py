"""Every collective the training code runs, in one place. Each one works without a process group too (one process:
it returns its input), so callers never ask whether they are distributed.

Objects (pickled, small: listings, errors, file names) and tensors (values every rank agrees on: a flag, the step's
mean losses, the loss centres' batch means) are kept apart by name. Tensors travel on the device the backend
needs (NCCL: the rank's GPU, gloo: the CPU) and come back on their own.
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
    return bool(max_over_ranks(torch.tensor([float(flag)])).item())


def every_rank(flag: bool) -> bool:
    return bool(_reduced(torch.tensor([float(flag)]), dist.ReduceOp.MIN).item())


def _device() -> torch.device:
    """Where the backend takes tensors: NCCL only CUDA ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduced(values: torch.Tensor, op) -> torch.Tensor:
    """A new tensor: `values` reduced element-wise over the ranks, on values' device (meta tensors, as the FLOP
    counter runs a step with, have nothing to send)."""
    if not _many() or values.is_meta:
        return values.clone()
    out = values.to(_device(), copy=True)
    dist.all_reduce(out, op=op)
    return out.to(values.device)


def sum_over_ranks_(values: torch.Tensor) -> torch.Tensor:
    """In place: the element-wise sum over the ranks."""
    if _many():
        values.copy_(_reduced(values, dist.ReduceOp.SUM))
    return values


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """A new tensor: the element-wise mean over the ranks."""
    return _reduced(values, dist.ReduceOp.SUM) / world_size()


def max_over_ranks(values: torch.Tensor) -> torch.Tensor:
    return _reduced(values, dist.ReduceOp.MAX)


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (first dimension; shares may differ in length), in rank order, as one tensor on every rank."""
    if not _many():
        return local
    counts = all_gather_object(len(local))
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=_device())
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(local.device)


def all_gather_columns(local: torch.Tensor) -> torch.Tensor:
    """(n, m) on every rank -> (n, world x m): each rank's columns side by side, in rank order."""
    if not _many():
        return local
    sent = local.to(_device()).contiguous()
    parts = [torch.empty_like(sent) for _ in range(world_size())]
    dist.all_gather(parts, sent)
    return torch.cat(parts, dim=1).to(local.device)
