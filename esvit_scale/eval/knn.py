"""Weighted k-NN classification on the teacher's L2-normalised view features (the reference protocol), at any size.

Each test image votes over its k most similar training images with weight exp(sim / T), T = 0.07.

Distributed as DINOv2 does it: every rank embeds its share of the training images and keeps it as its shard of the
bank (`storage_dtype`: fp32, or bf16 for half the memory, eval.knn_dtype; checked in tests/test_eval.py); the queries
(every rank's share of the test images, all-gathered as tensors) go past every shard in chunks; each rank finds the
k nearest in its shard (similarities in fp32, bank rows upcast a block at a time), the ranks' candidates are
all-gathered and merged into the global k nearest. Memory per rank: its bank shard, the queries, and a chunk. On a
GPU it all runs there. Nothing is pickled; one process is the same code with a world of one.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from esvit_scale.data.source import ImageSource, open_source_collectively
from esvit_scale.data.torch_loader import open_rgb
from esvit_scale.data.transforms import eval_transform
from esvit_scale.engine import collectives

log = logging.getLogger(__name__)

QUERY_CHUNK = 1024          # queries compared at once
BANK_BLOCK = 8192           # bank rows upcast to fp32 at once


class EvalImages(Dataset):
    def __init__(self, source: ImageSource, indices: np.ndarray, resize: int, crop: int):
        self.source, self.indices, self.resize, self.crop = source, indices, resize, crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return eval_transform(open_rgb(self.source.read(int(self.indices[i]))), self.resize, self.crop)


@torch.no_grad()
def extract_features(forward: Callable[[torch.Tensor], torch.Tensor], source: ImageSource, resize: int, crop: int,
                     device: torch.device, batch_size: int = 64, num_workers: int = 2, normalize: bool = True,
                     dtype: torch.dtype = torch.float32, what: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of `source` embedded: (features (n_local, C) in `dtype` on `device`, L2-normalised unless
    told not to; their labels). Every rank calls it (ZeRO-3 forwards are collective): the same number of batches on
    each, a rank short of images running a dummy one."""
    rank, world = collectives.rank(), collectives.world_size()
    mine = np.arange(rank, len(source), world)
    n_batches = -(-(-(-len(source) // world)) // batch_size)
    batches = iter(DataLoader(EvalImages(source, mine, resize, crop), batch_size=batch_size, num_workers=num_workers))
    dummy = torch.zeros(1, 3, crop, crop)
    local: Optional[torch.Tensor] = None          # filled in place: never a second copy of the share
    done, started, reported = 0, time.time(), time.time()
    for b in range(n_batches):
        x = next(batches, None)
        out = forward((dummy if x is None else x).to(device))
        if local is None:
            local = torch.empty((len(mine), out.shape[1]), dtype=dtype, device=device)
        if x is not None:
            out = out.float()
            local[done:done + len(out)] = (F.normalize(out, dim=-1) if normalize else out).to(dtype)
            done += len(out)
        if rank == 0 and time.time() - reported > 30:
            reported = time.time()
            log.info("%s of %s: %d of %d batches per rank (%.0f s)", what, source.root, b + 1, n_batches,
                     reported - started)
    if local is None:
        local = torch.zeros(0, 1, dtype=dtype, device=device)
    return local, torch.as_tensor(np.asarray(source.labels)[mine].astype(np.int64), device=device)


@torch.no_grad()
def nearest_in_shard(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, bank rows) of the k nearest bank rows of each query, in fp32, a bank block at a time."""
    best_sim = torch.full((len(queries), 0), float("-inf"), device=queries.device)
    best_idx = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)
    q = queries.float()
    for start in range(0, len(bank), BANK_BLOCK):
        sim = q @ bank[start:start + BANK_BLOCK].float().T
        sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        best_sim, order = torch.cat([best_sim, sim], 1).topk(min(k, best_sim.shape[1] + sim.shape[1]), dim=1)
        best_idx = torch.cat([best_idx, idx + start], 1).gather(1, order)
    return best_sim, best_idx


@torch.no_grad()
def knn_classify_sharded(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                         query_labels: torch.Tensor, ks: list[int], temperature: float = 0.07,
                         num_classes: Optional[int] = None, chunk: int = QUERY_CHUNK) -> dict[int, float]:
    """Collective: top-1 accuracy (%) per k of every rank's queries against the bank spread over the ranks (each
    rank passes its shard and its queries). The same result on every rank."""
    queries, query_labels = collectives.all_gather_rows(queries), collectives.all_gather_rows(query_labels)
    kmax = min(max(ks), int(collectives.sum_over_ranks_(torch.tensor([len(bank)])).item()))
    if num_classes is None:
        num_classes = int(collectives.max_over_ranks(torch.tensor([int(bank_labels.max()) if len(bank) else 0,
                                                                   int(query_labels.max())])).max()) + 1
    correct = {k: 0 for k in ks}
    started, reported = time.time(), time.time()
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        sim, idx = nearest_in_shard(q, bank, kmax)
        labels = bank_labels[idx] if len(bank) else idx
        pad = kmax - sim.shape[1]                # a shard with fewer than kmax rows
        if pad:
            sim = torch.cat([sim, torch.full((len(q), pad), float("-inf"), device=sim.device)], 1)
            labels = torch.cat([labels, torch.zeros((len(q), pad), dtype=torch.long, device=sim.device)], 1)
        every_sim, every_label = collectives.all_gather_columns(sim), collectives.all_gather_columns(labels)
        top_sim, order = every_sim.topk(kmax, dim=1)
        top_labels = every_label.gather(1, order)
        weights = (top_sim / temperature).exp()
        truth = query_labels[start:start + chunk]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(len(truth), num_classes, device=weights.device)
            votes.scatter_add_(1, top_labels[:, :kk], weights[:, :kk])
            correct[k] += int((votes.argmax(dim=1) == truth).sum())
        if collectives.rank() == 0 and time.time() - reported > 30:
            reported = time.time()
            log.info("k-NN: %d of %d queries classified (%.0f s)", start + len(q), len(queries), reported - started)
    return {k: 100.0 * correct[k] / len(queries) for k in ks}


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: list[int], temperature: float = 0.07,
                 chunk: int = QUERY_CHUNK) -> dict[int, float]:
    """Top-1 accuracy (%) for each k, all features in this process (no process group needed)."""
    return knn_classify_sharded(train_features, train_labels, test_features, test_labels, ks, temperature,
                                chunk=chunk)


def knn_eval(forward: Callable[[torch.Tensor], torch.Tensor], train_path: str, val_path: str, ks: list[int],
             temperature: float, resize: int, crop: int, device: torch.device,
             storage_dtype: torch.dtype = torch.float32) -> dict[int, float]:
    """Collective (every rank, or one process): embed both sets, each rank its share, and classify."""
    train, val = open_source_collectively(train_path), open_source_collectively(val_path)
    if train.classes != val.classes:
        raise ValueError(f"k-NN: the classes of {train_path} and {val_path} differ")
    bank, bank_labels = extract_features(forward, train, resize, crop, device, dtype=storage_dtype,
                                         what="k-NN bank")
    queries, query_labels = extract_features(forward, val, resize, crop, device, dtype=storage_dtype,
                                              what="k-NN queries")
    result = knn_classify_sharded(bank, bank_labels, queries, query_labels, ks, temperature,
                                  num_classes=len(train.classes))
    log.info("k-NN top-1 on %s (%d train / %d val images): %s", val_path, len(train), len(val),
             ", ".join(f"k={k}: {acc:.1f}%" for k, acc in result.items()))
    return result
