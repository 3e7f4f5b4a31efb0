"""Region matching of the EsViT region loss: pure-PyTorch reference (defines what is correct).

    region_argmax(fs, ft)[n, i] = argmax_j cos(fs[n, i], ft[n, j])                       (no gradient)
    matched_soft_cross_entropy(s, pt, idx, tau)[n] = mean_i sum_k -pt[n, idx[n, i], k] * log_softmax(s[n, i] / tau)[k]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def region_argmax_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """student (N, Ls, C), teacher (N, Lt, C) -> (N, Ls) int64 index of the most cosine-similar teacher token."""
    sim = torch.bmm(F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1).transpose(1, 2))
    return sim.argmax(dim=-1)


def matched_soft_cross_entropy_reference(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                                         index: torch.Tensor, student_temp: float) -> torch.Tensor:
    """student_logits (N, Ls, K), teacher_probs (N, Lt, K), index (N, Ls) -> (N,) mean CE over the Ls tokens.

    The gather formulation: builds the (N, Ls, K) matched target tensor. Gradient flows to student_logits only.
    """
    target = torch.gather(teacher_probs, 1, index.unsqueeze(-1).expand(-1, -1, teacher_probs.shape[-1]))
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(target.float() * log_p).sum(dim=-1).mean(dim=-1)


# The loss calls these names; the kernels swap in fused implementations behind them.
region_argmax = region_argmax_reference
matched_soft_cross_entropy = matched_soft_cross_entropy_reference
