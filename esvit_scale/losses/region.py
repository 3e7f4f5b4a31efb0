"""The region-matching term: each student region token predicts the teacher's distribution of its best-matching
teacher token (cosine of backbone features, no gradient through the match), for every pair (g, v != g).

    L_R = mean over pairs of mean_i sum_k -P_t_region[g, j*(i), k] * log_softmax(z_s_region[v, i] / tau_s)[k]

One fused call per student crop (all its teacher targets at once) writes the gradient over student.region_logits
while computing the loss: those tensors are consumed and must not be read afterwards (with
`kernels.region_matching: false` the reference formulation runs and nothing is consumed).
"""
from __future__ import annotations

import torch
from torch import nn

from esvit_scale.config import LossConfig
from esvit_scale.losses import correspondence
from esvit_scale.losses.monitors import distribution_readings
from esvit_scale.ops import region_matching


class RegionTerm(nn.Module):
    name = "region"

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.weight, self.student_temp = cfg.pair_factor * cfg.region_weight, cfg.student_temp

    def forward(self, student, teacher, targets, monitor: bool = False, geometry=None) -> tuple[torch.Tensor, dict]:
        """geometry (monitor steps): (crop boxes (B, n_crops, 6), crop sizes), for the correspondence readings."""
        t_region = targets.region                                        # (2, B, Lt, K), no gradient
        total, pairs = 0.0, 0
        tokens = [f.shape[1] for f in student.region_features]
        found = [0.0, 0.0, 0.0, 0]                       # hits, near hits, chance hits, tokens counted
        for v in range(len(student.view_logits)):
            others = [g for g in range(t_region.shape[0]) if g != v]
            matches = {g: region_matching.region_argmax(student.region_features[v].detach(),
                                                        teacher.region_features[g].detach()) for g in others}
            if monitor and geometry is not None:
                found = [a + b for a, b in zip(found, correspondence.readings(matches, *geometry, tokens, v))]
            total = total + region_matching.matched_soft_cross_entropy_sum(
                student.region_logits[v], t_region, matches, self.student_temp, consume_logits=True)
            pairs += len(others)
        readings = {}
        if monitor:
            with torch.no_grad():
                readings = distribution_readings(t_region.flatten(0, 2), "region")
            if geometry is not None:        # every rank logs the same readings (averaged over the ranks)
                counted = max(found[3], 1)
                readings.update(region_correspondence=torch.tensor(found[0] / counted),
                                region_correspondence_near=torch.tensor(found[1] / counted),
                                region_correspondence_chance=torch.tensor(found[2] / counted))
        return total / pairs, readings
