"""KoLeo regulariser (Sablayrolles et al., 2019; used by DINOv2): spreads the student's L2-normalised view features
of each global crop over the sphere by penalising small nearest-neighbour distances within the batch.

    L_KoLeo = mean over global crops of -mean_b log(min_{b' != b} ||f_b - f_b'|| + eps)

On when loss.koleo_weight > 0 (DINOv2: 0.1). The batch is this rank's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esvit_scale.config import LossConfig

EPS = 1e-8


class KoLeoTerm(nn.Module):
    name = "koleo"

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.weight = cfg.koleo_weight

    def forward(self, student, teacher, targets, monitor: bool = False, geometry=None) -> tuple[torch.Tensor, dict]:
        total = 0.0
        globals_ = student.region_features[:2]
        for tokens in globals_:
            f = F.normalize(tokens.float().mean(dim=1), dim=-1)                   # (B, C) view features
            dist = torch.cdist(f, f)
            dist = dist + torch.eye(len(f), device=f.device, dtype=f.dtype) * 1e4  # not its own neighbour
            total = total - torch.log(dist.min(dim=1).values + EPS).mean()
        return total / len(globals_), {}
