"""Linear probe on the frozen teacher backbone, the paper's headline protocol.

Features: the token-averaged outputs of the backbone's last `n_last` blocks, concatenated (Swin-T/S, n_last=4:
the last two blocks of stage 3 and both of stage 4, 2304-d). A linear classifier is trained on them with SGD
(momentum 0.9, no weight decay, cosine schedule) and scored top-1 on the held-out folder.

Unlike the paper's ImageNet runs, the features are extracted once, from the centre crop (no random-resized-crop
augmentation per epoch): on the CPU that keeps the probe to seconds; the features are standardised with the
training set's statistics so that one learning rate serves every backbone.

At any size the features stay where they were extracted: each rank keeps its share (1/world of 2304-d x N) and the
classifier trains data-parallel over the shares (each step a slice of every rank's share, the gradients averaged:
the same weights on every rank); the statistics and the score are sums over the ranks. One process is the same code.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from esvit_scale.data.source import open_source_collectively
from esvit_scale.engine import collectives
from esvit_scale.eval.knn import extract_features

log = logging.getLogger(__name__)


def last_blocks(backbone, n_last: int) -> list[nn.Module]:
    """The last n_last transformer blocks of the backbone, across stages, in order."""
    return [block for stage in backbone.blocks_by_stage() for block in stage][-n_last:]


def block_features_fn(backbone, n_last: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (B, 3, S, S) -> (B, sum of the blocks' widths): a forward of `backbone` (models/backbone.py) with hooks that
    average each of the last blocks' output tokens."""
    blocks = last_blocks(backbone, n_last)

    @torch.no_grad()
    def forward(x: torch.Tensor) -> torch.Tensor:
        pooled: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, i, out: pooled.append(out.float().mean(dim=(1, 2))))
                 for b in blocks]                                  # block outputs are (B, H, W, C)
        try:
            backbone(x)
        finally:
            for h in hooks:
                h.remove()
        return torch.cat(pooled, dim=1)
    return forward


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 epochs: int = 100, lr: float = 0.1, batch_size: int = 256, seed: int = 0,
                 num_classes: Optional[int] = None) -> float:
    """Collective: top-1 (%) on every rank's val share of a linear classifier trained on every rank's train share
    (one process: on all of it). Global batch `batch_size`, split over the ranks."""
    world = collectives.world_size()
    count = collectives.sum_over_ranks_(torch.tensor([float(len(train_x))], dtype=torch.float64))
    total = collectives.sum_over_ranks_(train_x.double().sum(dim=0))
    squares = collectives.sum_over_ranks_(train_x.double().pow(2).sum(dim=0))
    mean = total / count
    std = ((squares - count * mean.pow(2)) / (count - 1)).clamp_min(1e-12).sqrt().float().clamp_min(1e-6)
    mean = mean.float()
    train_x, val_x = (train_x.float() - mean) / std, (val_x.float() - mean) / std
    if num_classes is None:
        num_classes = int(collectives.max_over_ranks(torch.tensor([int(train_y.max()), int(val_y.max())])).max()) + 1
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    with torch.no_grad():
        head.weight.copy_(torch.empty(head.weight.shape).normal_(0, 0.01, generator=g))
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = -(-int(count.item()) // batch_size)
    local_batch = -(-batch_size // world)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    mine = torch.Generator().manual_seed(seed + 1 + collectives.rank())
    order = torch.zeros(0, dtype=torch.long)
    for _ in range(epochs * steps_per_epoch):
        if len(order) < local_batch:                 # this rank's share, reshuffled as it runs out
            order = torch.cat([order, torch.randperm(len(train_x), generator=mine)])
        idx, order = order[:local_batch], order[local_batch:]
        loss = F.cross_entropy(head(train_x[idx.to(train_x.device)]), train_y[idx.to(train_y.device)])
        opt.zero_grad()
        loss.backward()
        for p in head.parameters():
            p.grad = collectives.mean_over_ranks(p.grad)
        opt.step()
        sched.step()
    with torch.no_grad():
        correct = float((head(val_x).argmax(dim=1) == val_y).sum()) if len(val_x) else 0.0
        scored = collectives.sum_over_ranks_(torch.tensor([correct, float(len(val_x))], dtype=torch.float64))
    return 100.0 * float(scored[0] / scored[1])


def linear_eval(features: Callable[[torch.Tensor], torch.Tensor], train_path: str, val_path: str, resize: int,
                crop: int, device: torch.device, epochs: int = 100) -> float:
    """Collective: every rank extracts the block features of its share of both sets, keeps them, and the probe
    trains over the shares."""
    train, val = open_source_collectively(train_path), open_source_collectively(val_path)
    if train.classes != val.classes:
        raise ValueError(f"linear probe: the classes of {train_path} and {val_path} differ")
    train_x, train_y = extract_features(features, train, resize, crop, device, normalize=False,
                                        what="linear-probe features")
    val_x, val_y = extract_features(features, val, resize, crop, device, normalize=False,
                                    what="linear-probe features")
    top1 = train_linear(train_x, train_y, val_x, val_y, epochs=epochs, num_classes=len(train.classes))
    log.info("linear probe top-1 on %s (%d train / %d val images, %d-d features): %.1f%%", val_path, len(train),
             len(val), train_x.shape[1], top1)
    return top1
