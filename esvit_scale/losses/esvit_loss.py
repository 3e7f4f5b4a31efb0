"""The EsViT loss: view-level DINO term + region-matching term over every (teacher global, student crop) pair.

For teacher global crop g in {0, 1} and every student crop v != g (18 pairs with 2 + 8 crops):
    L_V = sum_k -P_t_view[g, k] * log_softmax(z_s_view[v] / tau_s)[k]
    L_R = mean_i sum_k -P_t_region[g, j*(i), k] * log_softmax(z_s_region[v, i] / tau_s)[k],
          j*(i) = argmax_j cos(f_s[v, i], f_t[g, j])   (backbone features, no gradient)
    pair loss = pair_factor * (L_V + L_R)      (pair_factor 0.5 as in the official code)
Total = mean over pairs and images. Teacher outputs are centred (separate view and region centres) and
sharpened by the teacher temperature; the centres follow an EMA of the batch mean, all-reduced.

The region term runs one fused call per student crop (all its teacher targets at once) that writes its gradient
over student.region_logits while computing the loss: those tensors are consumed and must not be read after the
loss (with `kernels.region_matching: false` the reference formulation runs and nothing is consumed).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from esvit_scale.config import LossConfig
from esvit_scale.models.esvit import MultiCropOutput
from esvit_scale.ops import region_matching


class EsViTLoss(nn.Module):
    def __init__(self, cfg: LossConfig, out_dim: int, accumulation: int = 1):
        super().__init__()
        self.cfg, self.accumulation = cfg, accumulation
        self._pending: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []     # batch means of this step
        self.register_buffer("view_center", torch.zeros(1, out_dim))
        self.register_buffer("region_center", torch.zeros(1, out_dim))

    def forward(self, student: MultiCropOutput, teacher: MultiCropOutput, teacher_temp: float
                ) -> dict[str, torch.Tensor]:
        tau_s = self.cfg.student_temp
        t_view = [F.softmax((z.float() - self.view_center) / teacher_temp, dim=-1).detach()
                  for z in teacher.view_logits]                                     # 2 x (B, K)
        s_view = [F.log_softmax(z.float() / tau_s, dim=-1) for z in student.view_logits]
        use_region = self.cfg.region_loss
        if use_region:
            t_region = self._teacher_region_probs(teacher.region_logits, teacher_temp)  # (2, B, Lt, K)

        view_total = region_total = 0.0
        n_pairs = 0
        for v in range(len(s_view)):
            targets = [g for g in range(len(t_view)) if g != v]
            for g in targets:
                view_total = view_total + (-t_view[g] * s_view[v]).sum(dim=-1).mean()
            if use_region:
                matches = {g: region_matching.region_argmax(student.region_features[v].detach(),
                                                            teacher.region_features[g].detach()) for g in targets}
                region_total = region_total + region_matching.matched_soft_cross_entropy_sum(
                    student.region_logits[v], t_region, matches, tau_s, consume_logits=True)
            n_pairs += len(targets)
        view_loss = view_total / n_pairs
        region_loss = region_total / n_pairs if use_region else torch.zeros_like(view_loss)
        self.update_centers(teacher)
        return {"loss": self.cfg.pair_factor * (view_loss + region_loss),
                "view_loss": view_loss.detach(), "region_loss": region_loss.detach()}

    @torch.no_grad()
    def _teacher_region_probs(self, logits: list[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        """2 x (B, Lt, K) teacher region logits -> centred, sharpened probabilities in one (2, B, Lt, K) tensor."""
        probs = torch.empty((len(logits), *logits[0].shape), dtype=torch.float32, device=logits[0].device)
        for g, z in enumerate(logits):
            torch.softmax((z.float() - self.region_center) / teacher_temp, dim=-1, out=probs[g])
        return probs

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
    total = x.float().sum(dim=0, keepdim=True)
    count = torch.tensor([x.shape[0]], dtype=torch.float32, device=x.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total / count
