"""The view-level term: every student crop predicts the teacher's distribution of every other global crop.

    L_V = mean over pairs (g, v != g) of mean_b sum_k -P_t_view[g, b, k] * log_softmax(z_s_view[v, b] / tau_s)[k]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esvit_scale.config import LossConfig
from esvit_scale.losses.monitors import agreement, distribution_readings


class ViewTerm(nn.Module):
    name = "view"

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.weight, self.student_temp = cfg.pair_factor, cfg.student_temp

    def forward(self, student, teacher, targets, monitor: bool = False, geometry=None) -> tuple[torch.Tensor, dict]:
        t_view = targets.view                                                     # 2 x (B, K), no gradient
        s_view = [F.log_softmax(z.float() / self.student_temp, dim=-1) for z in student.view_logits]
        total, pairs = 0.0, 0
        for v, s in enumerate(s_view):
            for g, t in enumerate(t_view):
                if g != v:
                    total = total + (-t * s).sum(dim=-1).mean()
                    pairs += 1
        readings = {}
        if monitor:
            with torch.no_grad():
                readings = {**distribution_readings(torch.cat(t_view), "view"),
                            "view_agreement": agreement(t_view, student.view_logits)}
        return total / pairs, readings
