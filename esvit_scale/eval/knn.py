"""Weighted k-NN classification on the teacher's L2-normalised view features (the reference protocol).

Each test image votes over its k most similar training images with weight exp(sim / T), T = 0.07.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from esvit_scale.data.folder import ImageIndex, index_folder
from esvit_scale.engine import collectives
from esvit_scale.data.torch_loader import open_rgb
from esvit_scale.data.transforms import eval_transform

log = logging.getLogger(__name__)


class EvalImages(Dataset):
    def __init__(self, paths: list[str], resize: int, crop: int):
        self.paths, self.resize, self.crop = paths, resize, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return eval_transform(open_rgb(self.paths[i]), self.resize, self.crop)


@torch.no_grad()
def extract_features(forward: Callable[[torch.Tensor], torch.Tensor], index: ImageIndex, resize: int, crop: int,
                     device: torch.device, batch_size: int = 64, num_workers: int = 2,
                     normalize: bool = True) -> torch.Tensor:
    """(N, C) features in index order, L2-normalised unless told not to. Every rank calls it (ZeRO-3 forwards are
    collective); each embeds its share and the shares are gathered."""
    rank, world = collectives.rank(), collectives.world_size()
    mine = list(range(rank, len(index), world))
    data = EvalImages([index.paths[i] for i in mine], resize, crop)
    feats = []
    # same number of batches on every rank, so that collective forwards line up
    largest_share = -(-len(index) // world)
    n_batches = -(-largest_share // batch_size)
    batches = iter(DataLoader(data, batch_size=batch_size, num_workers=num_workers))
    dummy = torch.zeros(1, 3, crop, crop)
    for _ in range(n_batches):
        x = next(batches, None)
        out = forward((dummy if x is None else x).to(device))
        if x is not None:
            feats.append((F.normalize(out.float(), dim=-1) if normalize else out.float()).cpu())
    local = torch.cat(feats) if feats else torch.zeros(0, 1)
    if world == 1:
        return local
    shares = collectives.all_gather_object((mine, local))
    full = torch.zeros(len(index), max(s[1].shape[1] for s in shares))
    for idx, f in shares:
        if len(idx):
            full[idx] = f
    return full


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: list[int], temperature: float = 0.07,
                 chunk: int = 256) -> dict[int, float]:
    """Top-1 accuracy (%) for each k."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = {k: 0 for k in ks}
    kmax = min(max(ks), len(train_features))
    for start in range(0, len(test_features), chunk):
        sim = test_features[start:start + chunk] @ train_features.T           # (n, N)
        top_sim, top_idx = sim.topk(kmax, dim=1)
        top_labels = train_labels[top_idx]                                      # (n, kmax)
        weights = (top_sim / temperature).exp()
        truth = test_labels[start:start + chunk]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(len(truth), num_classes)
            votes.scatter_add_(1, top_labels[:, :kk], weights[:, :kk])
            correct[k] += int((votes.argmax(dim=1) == truth).sum())
    return {k: 100.0 * correct[k] / len(test_features) for k in ks}


def knn_eval(forward: Callable[[torch.Tensor], torch.Tensor], train_path: str, val_path: str, ks: list[int],
             temperature: float, resize: int, crop: int, device: torch.device) -> dict[int, float]:
    train, val = index_folder(train_path), index_folder(val_path)
    if train.classes != val.classes:
        raise ValueError(f"k-NN: the class folders of {train_path} and {val_path} differ")
    train_f = extract_features(forward, train, resize, crop, device)
    val_f = extract_features(forward, val, resize, crop, device)
    result = knn_classify(train_f, torch.tensor(train.labels), val_f, torch.tensor(val.labels), ks, temperature)
    log.info("k-NN top-1 on %s (%d train / %d val images): %s", val_path, len(train), len(val),
             ", ".join(f"k={k}: {acc:.1f}%" for k, acc in result.items()))
    return result
