"""The EsViT objective: teacher targets (centred, sharpened) and a sum of loss terms, each a module of its own.

    loss = sum over terms of weight * term      (view and region: pair_factor = 0.5 as in the official code;
                                                 koleo: loss.koleo_weight)
Terms (TERMS; a term is on by its config entry, see `term_names`): view.py (the DINO view term), region.py (the
region-matching term), koleo.py (a feature-spreading regulariser). Each returns its loss and named readings; the
objective returns {"loss": total, "<term>_loss": ..., readings...}, and the trainer sums and logs whatever is in
that dict. With `monitor` set (the trainer sets it on log steps) the terms and the objective add the health
readings of esvit_scale/losses/monitors.py.

Teacher outputs are centred (separate view and region centres) and sharpened by the teacher temperature; the
centres follow an EMA of the batch mean, all-reduced over the ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from esvit_scale.config import LossConfig
from esvit_scale.engine import collectives
from esvit_scale.losses.koleo import KoLeoTerm
from esvit_scale.losses.monitors import feature_spread
from esvit_scale.losses.region import RegionTerm
from esvit_scale.losses.view import ViewTerm
from esvit_scale.models.esvit import MultiCropOutput

TERMS = {"view": ViewTerm, "region": RegionTerm, "koleo": KoLeoTerm}


def term_names(cfg: LossConfig) -> list[str]:
    """The terms a config switches on."""
    return ["view"] + (["region"] if cfg.region_loss else []) + (["koleo"] if cfg.koleo_weight > 0 else [])


@dataclass
class TeacherTargets:
    view: list[torch.Tensor]                 # 2 x (B, K) probabilities
    region: Optional[torch.Tensor]           # (2, B, Lt, K) probabilities, None without the region term


class EsViTLoss(nn.Module):
    def __init__(self, cfg: LossConfig, out_dim: int, accumulation: int = 1):
        super().__init__()
        self.cfg, self.accumulation = cfg, accumulation
        self.monitor = False
        self._pending: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []     # batch means of this step
        self.register_buffer("view_center", torch.zeros(1, out_dim))
        self.register_buffer("region_center", torch.zeros(1, out_dim))
        self.terms = nn.ModuleList(TERMS[name](cfg) for name in term_names(cfg))

    def forward(self, student: MultiCropOutput, teacher: MultiCropOutput, teacher_temp: float, geometry=None
                ) -> dict[str, torch.Tensor]:
        """geometry: (crop boxes (B, n_crops, 6), crop sizes) of the batch, for the region term's correspondence
        readings on monitored steps (losses/correspondence.py)."""
        targets = self.teacher_targets(teacher, teacher_temp)
        out: dict[str, torch.Tensor] = {}
        total = 0.0
        for term in self.terms:
            loss, readings = term(student, teacher, targets, monitor=self.monitor, geometry=geometry)
            total = total + term.weight * loss
            out[f"{term.name}_loss"] = loss.detach()
            out.update(readings)
        if self.monitor:
            with torch.no_grad():
                out["feature_std"] = feature_spread(torch.cat([f.mean(dim=1) for f in teacher.region_features[:2]]))
                out["view_center_norm"] = self.view_center.norm()
                if targets.region is not None:
                    out["region_center_norm"] = self.region_center.norm()
        self.update_centers(teacher)
        return {"loss": total, **out}

    @torch.no_grad()
    def teacher_targets(self, teacher: MultiCropOutput, teacher_temp: float) -> TeacherTargets:
        view = [F.softmax((z.float() - self.view_center) / teacher_temp, dim=-1) for z in teacher.view_logits]
        region = None
        if self.cfg.region_loss:
            logits = teacher.region_logits
            region = torch.empty((len(logits), *logits[0].shape), dtype=torch.float32, device=logits[0].device)
            for g, z in enumerate(logits):
                torch.softmax((z.float() - self.region_center) / teacher_temp, dim=-1, out=region[g])
        return TeacherTargets(view, region)

    @torch.no_grad()
    def update_centers(self, teacher: MultiCropOutput) -> None:
        """The centres move once per optimizer step, by the mean over its global batch (all ranks, all `accumulation`
        micro-batches): the same trajectory whatever the split into ranks and micro-batches."""
        region = None
        if self.cfg.region_loss:
            region = _global_mean(torch.cat([z.flatten(0, 1) for z in teacher.region_logits]))  # of (2 B Lt, K)
        self._pending.append((_global_mean(torch.cat(teacher.view_logits)), region))
        if len(self._pending) < self.accumulation:
            return
        m = self.cfg.center_momentum
        self.view_center.mul_(m).add_(torch.stack([v for v, _ in self._pending]).mean(0), alpha=1 - m)
        if region is not None:
            self.region_center.mul_(m).add_(torch.stack([r for _, r in self._pending]).mean(0), alpha=1 - m)
        self._pending = []


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of x on every rank: (1, K)."""
    total = collectives.sum_over_ranks_(x.float().sum(dim=0, keepdim=True))
    count = collectives.sum_over_ranks_(torch.tensor([x.shape[0]], dtype=torch.float32, device=x.device))
    return total / count
