"""Region matching of the EsViT region loss: pure-PyTorch reference (defines what is correct).

    region_argmax(fs, ft)[n, i] = argmax_j cos(fs[n, i], ft[n, j])                       (no gradient)
    matched_soft_cross_entropy(s, pt, idx, tau)[n] = mean_i sum_k -pt[n, idx[n, i], k] * log_softmax(s[n, i] / tau)[k]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from esvit_scale.ops import _ext


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


# The fused implementations behind the names the loss calls (esvit_scale._C, see kernels/README.md).

def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernel runs in: the CPU kernels take float32/float64, the CUDA ones also fp16/bf16."""
    if x.is_cuda:
        return x.dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    return x.dtype if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def region_argmax(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """student (N, Ls, C), teacher (N, Lt, C) -> (N, Ls) int64; no similarity matrix is formed."""
    if _ext.backend("region_matching", student) == "reference":
        return region_argmax_reference(student, teacher)
    dtype = _kernel_dtype(student)
    return _ext.extension().region_argmax(student.detach().to(dtype), teacher.detach().to(dtype))


class _MatchedSoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_probs, index, student_temp):
        rows, lse, tsum = _ext.extension().matched_ce_forward(student_logits, teacher_probs, index, student_temp)
        ctx.save_for_backward(student_logits, teacher_probs, index, lse, tsum)
        ctx.student_temp = student_temp
        return rows.mean(dim=1)                                            # (N,)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, probs, index, lse, tsum = ctx.saved_tensors
        grad_rows = (grad_loss / index.shape[1]).unsqueeze(1).expand(-1, index.shape[1]).contiguous()
        grad = _ext.extension().matched_ce_backward(grad_rows, logits, probs, index, lse, tsum, ctx.student_temp)
        return grad, None, None, None


def matched_soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, index: torch.Tensor,
                               student_temp: float) -> torch.Tensor:
    """Same result as the reference; reads teacher_probs[n, index[n, i]] in place (no (N, Ls, K) target).

    Returns (N,) float32 (float64 for float64 logits). Gradient to student_logits only.
    """
    if _ext.backend("region_matching", student_logits) == "reference":
        return matched_soft_cross_entropy_reference(student_logits, teacher_probs, index, student_temp)
    dtype = _kernel_dtype(student_logits)
    logits = student_logits.to(dtype)
    probs = teacher_probs.detach()
    if not (probs.is_cuda and probs.dtype == torch.float32):   # the CUDA kernel also reads float32 probs
        probs = probs.to(dtype)
    return _MatchedSoftCrossEntropy.apply(logits, probs, index.long(), float(student_temp)).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
