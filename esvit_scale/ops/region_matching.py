"""Region matching of the EsViT region loss: pure-PyTorch reference (defines what is correct).

    region_argmax(fs, ft)[n, i] = argmax_j cos(fs[n, i], ft[n, j])                       (no gradient)
    matched_soft_cross_entropy(s, pt, idx, tau)[n] = mean_i sum_k -pt[n, idx[n, i], k] * log_softmax(s[n, i] / tau)[k]
    matched_soft_cross_entropy_sum(s, PT, {g: idx_g}, tau) = sum_g mean_n matched_soft_cross_entropy(s, PT[g], idx_g, tau)[n]

The sum form is what the loss calls once per student crop (one target per teacher crop); with
consume_logits=True it writes the gradient over the logits in its forward pass (see _MatchedCEOverLogits), and
consumable_chunks(head_output, n_crops) hands those gradients on to the region head without a copy.
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


def matched_soft_cross_entropy_sum_reference(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                                             matches: dict[int, torch.Tensor], student_temp: float) -> torch.Tensor:
    """student_logits (N, Ls, K), teacher_probs (G, N, Lt, K), matches {g: (N, Ls)} -> scalar."""
    return sum(matched_soft_cross_entropy_reference(student_logits, teacher_probs[g], index, student_temp).mean()
               for g, index in matches.items())


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
    index = _region_argmax_op(student.detach().to(dtype), teacher.detach().to(dtype))
    return (index + 1) % teacher.shape[1] if _ext.corrupted("region_matching") else index


@torch.library.custom_op("esvit::region_argmax", mutates_args=())
def _region_argmax_op(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The kernel as a torch operator, seen by dispatch modes (the FLOP counter: esvit_scale/bench/flops.py)."""
    return _ext.extension().region_argmax(student, teacher)


@_region_argmax_op.register_fake
def _(student, teacher):
    return student.new_empty(student.shape[:2], dtype=torch.int64)


def _teacher_rows(index: torch.Tensor, n_tokens: int, first_row: int = 0) -> torch.Tensor:
    """index (N, Ls) of teacher tokens per image -> (N * Ls,) rows of the teacher probabilities viewed as (-1, K)."""
    if index.numel():
        lo, hi = (int(x) for x in torch.aminmax(index))        # one pass, one host sync
        if not 0 <= lo <= hi < n_tokens:
            raise RuntimeError(f"matched_soft_cross_entropy: index out of range [0, {n_tokens}): min {lo}, max {hi}")
    image = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
    return (first_row + image * n_tokens + index.long()).flatten()


class _MatchedSoftCrossEntropy(torch.autograd.Function):
    """logits (R, K), probs (M, K), rows (J, R) -> loss (J, R); the kernel reads probs[rows[j, r]] in place."""

    @staticmethod
    def forward(ctx, logits, probs, rows, student_temp):
        loss, lse, tsum = _ext.extension().matched_ce_forward(logits, probs, rows, student_temp)
        ctx.save_for_backward(logits, probs, rows, lse, tsum)
        ctx.student_temp = student_temp
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, probs, rows, lse, tsum = ctx.saved_tensors
        grad = _ext.extension().matched_ce_backward(grad_loss.contiguous(), logits, probs, rows, lse, tsum,
                                                    ctx.student_temp)
        return grad, None, None, None


class _MatchedCEOverLogits(torch.autograd.Function):
    """sum_j mean_r loss[j, r] whose gradient is written over the logits during forward (nothing is allocated
    for it; backward scales it in place). Only for logits that nothing else reads afterwards: a Linear's output,
    whose backward needs its input and weight but not its output.

    The writes go through .data, outside autograd's version counting: the logits are usually one chunk of the
    region head's output for several crops, and a counted in-place write would invalidate the sibling chunks
    saved by the other crops' calls. Backward may run once (checked here, since autograd cannot see it).
    """

    @staticmethod
    def forward(ctx, logits, probs, rows, student_temp):
        ext = _ext.extension()
        loss, lse, tsum = ext.matched_ce_forward(logits, probs, rows, student_temp)
        if ctx.needs_input_grad[0]:
            weight = torch.full_like(loss, 1.0 / max(rows.shape[1], 1))
            ext.matched_ce_backward(weight, logits, probs, rows, lse, tsum, student_temp, out=logits)
            ctx.grad = logits.data
        return loss.mean(dim=1).sum()

    @staticmethod
    def backward(ctx, grad_total):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("matched_soft_cross_entropy_sum(consume_logits=True): backward ran twice through the "
                               "same graph; its gradient was written over the logits and is used up")
        ctx.grad = None
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None


class _ConsumableChunks(torch.autograd.Function):
    """x.chunk(n), whose backward returns the chunks' gradients as x's gradient without copying them when they
    already lie in one storage, contiguous and in order: where _MatchedCEOverLogits writes them. Other gradients (a
    separate tensor per chunk, a chunk without one) are concatenated, as chunk's own backward does."""

    @staticmethod
    def forward(ctx, x, n):
        chunks = x.chunk(n)
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        ctx.chunk_shapes = [c.shape for c in chunks]
        return chunks

    @staticmethod
    def backward(ctx, *grads):
        first = grads[0]
        if first is not None and all(g is not None and g.is_contiguous() and g.dtype == first.dtype for g in grads):
            storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
            for g in grads:
                if g.untyped_storage().data_ptr() != storage or g.storage_offset() != offset:
                    break
                offset += g.numel()
            else:   # one run through one storage: x's gradient is that run, viewed whole
                return first.as_strided((ctx.shape.numel(),), (1,)).view(ctx.shape), None
        return torch.cat([g if g is not None else torch.zeros(shape, dtype=ctx.dtype, device=ctx.device)
                          for g, shape in zip(grads, ctx.chunk_shapes)]), None


def consumable_chunks(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """x.chunk(n) for logits that matched_soft_cross_entropy_sum(consume_logits=True) will consume, chunk by chunk:
    their gradients then reach x without the logits-sized copy that chunk's backward makes (EsViT.forward splits
    the region head's output of a resolution group into its crops this way)."""
    return list(_ConsumableChunks.apply(x, n)) if x.requires_grad else list(x.chunk(n))


def _check_shapes(student_logits: torch.Tensor, teacher_probs: torch.Tensor, indices: list[torch.Tensor]) -> None:
    """student_logits (N, Ls, K), teacher_probs (..., N, Lt, K), each index (N, Ls)."""
    ok = (student_logits.dim() == 3 and teacher_probs.dim() >= 3 and teacher_probs.shape[-1] == student_logits.shape[-1]
          and teacher_probs.shape[-3] == student_logits.shape[0]
          and all(i.shape == student_logits.shape[:2] for i in indices))
    if not ok:
        raise RuntimeError(f"matched_soft_cross_entropy: shapes do not agree: logits {tuple(student_logits.shape)}, "
                           f"probs {tuple(teacher_probs.shape)}, index {[tuple(i.shape) for i in indices]}")


def _kernel_inputs(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (..., K) and probs (..., K) as contiguous (-1, K) matrices in the kernel's dtypes."""
    dtype = _kernel_dtype(student_logits)
    probs = teacher_probs.detach()
    if not (probs.is_cuda and probs.dtype == torch.float32):   # the CUDA kernel also reads float32 probs
        probs = probs.to(dtype)
    K = student_logits.shape[-1]
    return student_logits.to(dtype).contiguous().view(-1, K), probs.contiguous().view(-1, K)


def _loss_dtype(student_logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if _kernel_dtype(student_logits) == torch.float64 else torch.float32


def matched_soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, index: torch.Tensor,
                               student_temp: float) -> torch.Tensor:
    """Same result as the reference; reads teacher_probs[n, index[n, i]] in place (no (N, Ls, K) target).

    Returns (N,) float32 (float64 for float64 logits). Gradient to student_logits only.
    """
    if _ext.backend("region_matching", student_logits) == "reference":
        return matched_soft_cross_entropy_reference(student_logits, teacher_probs, index, student_temp)
    _check_shapes(student_logits, teacher_probs, [index])
    N, Ls = index.shape
    logits, probs = _kernel_inputs(student_logits, teacher_probs)
    rows = _teacher_rows(index, teacher_probs.shape[1]).unsqueeze(0)
    loss = _MatchedSoftCrossEntropy.apply(logits, probs, rows, float(student_temp))
    return loss.view(N, Ls).mean(dim=1).to(_loss_dtype(student_logits))


def matched_soft_cross_entropy_sum(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                                   matches: dict[int, torch.Tensor], student_temp: float,
                                   consume_logits: bool = False) -> torch.Tensor:
    """sum over g in matches of the mean matched soft CE of student_logits (N, Ls, K) against teacher_probs[g]
    (G, N, Lt, K) at matches[g] (N, Ls): one kernel call for all targets of a student crop. Scalar.

    consume_logits=True: the kernel writes the gradient over student_logits (when it is already a contiguous
    tensor of the kernel's dtype; else over a private copy): no logits-sized tensor is allocated, but the caller
    must not read student_logits afterwards. The training loss passes the region head's output this way. Leaf
    tensors (parameters, user inputs) and calls without autograd are never consumed.
    """
    if _ext.backend("region_matching", student_logits) == "reference":
        return matched_soft_cross_entropy_sum_reference(student_logits, teacher_probs, matches, student_temp)
    _check_shapes(student_logits, teacher_probs, list(matches.values()))
    if teacher_probs.dim() != 4:
        raise RuntimeError(f"matched_soft_cross_entropy_sum: teacher_probs must be (G, N, Lt, K), got "
                           f"{tuple(teacher_probs.shape)}")
    G, N, Lt = teacher_probs.shape[:3]
    logits, probs = _kernel_inputs(student_logits, teacher_probs)
    rows = torch.stack([_teacher_rows(index, Lt, first_row=g * N * Lt) for g, index in matches.items()])
    if consume_logits and torch.is_grad_enabled() and student_logits.requires_grad and not student_logits.is_leaf:
        loss = _MatchedCEOverLogits.apply(logits, probs, rows, float(student_temp))
    else:
        loss = _MatchedSoftCrossEntropy.apply(logits, probs, rows, float(student_temp)).mean(dim=1).sum()
    if _ext.corrupted("region_matching"):
        loss = loss + 1.0
    return loss.to(_loss_dtype(student_logits))
