"""Linear probe on the frozen teacher backbone, the paper's headline protocol.

Features: the token-averaged outputs of the backbone's last `n_last` blocks, concatenated (Swin-T/S, n_last=4:
the last two blocks of stage 3 and both of stage 4, 2304-d). A linear classifier is trained on them with SGD
(momentum 0.9, no weight decay, cosine schedule) and scored top-1 on the held-out folder.

Unlike the paper's ImageNet runs, the features are extracted once, from the centre crop (no random-resized-crop
augmentation per epoch): on the CPU that keeps the probe to seconds; the features are standardised with the
training set's statistics so that one learning rate serves every backbone.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esvit_scale.data.folder import index_folder
from esvit_scale.eval.knn import extract_features

log = logging.getLogger(__name__)


def last_blocks(swin, n_last: int) -> list[nn.Module]:
    """The last n_last transformer blocks of a timm SwinTransformer, across stages, in order."""
    blocks = [block for stage in swin.layers for block in stage.blocks]
    return blocks[-n_last:]


def block_features_fn(backbone, n_last: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (B, 3, S, S) -> (B, sum of the blocks' widths): a forward of `backbone` (our SwinBackbone) with hooks that
    average each of the last blocks' output tokens."""
    blocks = last_blocks(backbone.swin, n_last)

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
                 epochs: int = 100, lr: float = 0.1, batch_size: int = 256, seed: int = 0) -> float:
    """Top-1 (%) on val of a linear classifier trained on (train_x, train_y)."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = -(-len(train_x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100.0 * float((head(val_x).argmax(dim=1) == val_y).float().mean())


def linear_eval(features: Callable[[torch.Tensor], torch.Tensor], train_path: str, val_path: str, resize: int,
                crop: int, device: torch.device, epochs: int = 100) -> float:
    """Extract the block features of both folders (every rank its share, gathered), then train and score the
    probe (the same on every rank: the features and the seed are the same)."""
    train, val = index_folder(train_path), index_folder(val_path)
    if train.classes != val.classes:
        raise ValueError(f"linear probe: the class folders of {train_path} and {val_path} differ")
    train_x = extract_features(features, train, resize, crop, device, normalize=False)
    val_x = extract_features(features, val, resize, crop, device, normalize=False)
    top1 = train_linear(train_x, torch.tensor(train.labels), val_x, torch.tensor(val.labels), epochs=epochs)
    log.info("linear probe top-1 on %s (%d train / %d val images, %d-d features): %.1f%%", val_path, len(train),
             len(val), train_x.shape[1], top1)
    return top1
