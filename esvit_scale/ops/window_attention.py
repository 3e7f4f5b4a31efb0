"""Attention inside Swin windows: a fused kernel (esvit_scale._C) and its pure-PyTorch reference.

    window_attention(qkv, table, rel_index, region, num_heads, scale) -> out
    qkv       (B_, N, 3*H*D)  the qkv Linear's output, B_ = batch * nW windows of N tokens
    table     (T, H)          relative-position bias table (gets a gradient)
    rel_index (N, N) int64    bias[h, i, j] = table[rel_index[i, j], h]
    region    (nW, N) int32 or None: key j is excluded when region[w, j] < 0 (padded token); -100 is added
              when region[w, i] >= 0 and region[w, i] != region[w, j] (the shift mask, as in timm).
              Window b uses row b % nW.
    out       (B_, N, H*D)    heads concatenated, ready for the proj Linear
"""
from __future__ import annotations

import torch

from esvit_scale.ops import _ext

CUDA_HEAD_DIMS = (16, 32, 64)   # the head dims window_attention_cuda.cu is compiled for


def region_mask(region: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """region (nW, N) -> additive mask (nW, N, N): -inf for padded keys, -100 across shift regions."""
    ri, rj = region.unsqueeze(2), region.unsqueeze(1)                  # (nW, N, 1), (nW, 1, N)
    mask = torch.zeros(ri.shape[0], ri.shape[1], rj.shape[2], dtype=dtype, device=region.device)
    mask = mask.masked_fill((ri >= 0) & (rj >= 0) & (ri != rj), -100.0)
    return mask.masked_fill((rj < 0).expand_as(mask), float("-inf"))


def window_attention_reference(qkv: torch.Tensor, table: torch.Tensor, rel_index: torch.Tensor,
                               region: torch.Tensor | None, num_heads: int, scale: float) -> torch.Tensor:
    B_, N, _ = qkv.shape
    q, k, v = qkv.view(B_, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)   # (B_, H, N, D) each
    bias = table[rel_index.view(-1)].view(N, N, num_heads).permute(2, 0, 1)       # (H, N, N)
    attn = (q * scale) @ k.transpose(-2, -1) + bias.to(q.dtype)                  # (B_, H, N, N)
    if region is not None:
        nW = region.shape[0]
        attn = attn.view(-1, nW, num_heads, N, N) + region_mask(region, attn.dtype).unsqueeze(1)
        attn = attn.view(B_, num_heads, N, N)
    out = attn.softmax(dim=-1) @ v                                                # (B_, H, N, D)
    return out.transpose(1, 2).reshape(B_, N, -1)


# The kernels as torch operators (esvit::...), so that dispatch modes see them: torch's FLOP counter
# (esvit_scale/bench/flops.py registers their formulas), fake tensors and torch.compile.

@torch.library.custom_op("esvit::window_attention_forward", mutates_args=())
def _forward_op(qkv: torch.Tensor, table: torch.Tensor, rel_index: torch.Tensor, region: torch.Tensor,
                num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _ext.extension().window_attention_forward(qkv, table, rel_index, region, num_heads, scale)
    return out, lse


@_forward_op.register_fake
def _(qkv, table, rel_index, region, num_heads, scale):
    B_, N, C3 = qkv.shape
    return qkv.new_empty(B_, N, C3 // 3), qkv.new_empty(B_, num_heads, N, dtype=torch.float32)


@torch.library.custom_op("esvit::window_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 table: torch.Tensor, rel_index: torch.Tensor, region: torch.Tensor, num_heads: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    dqkv, dtable = _ext.extension().window_attention_backward(grad_out, qkv, out, lse, table, rel_index, region,
                                                              num_heads, scale)
    return dqkv, dtable


@_backward_op.register_fake
def _(grad_out, qkv, out, lse, table, rel_index, region, num_heads, scale):
    return torch.empty_like(qkv), table.new_empty(table.shape, dtype=torch.float32 if qkv.is_cuda else qkv.dtype)


class _FusedWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, table, rel_index, region, num_heads, scale):
        region_arg = region if region is not None else rel_index.new_empty(0, dtype=torch.int32)
        out, lse = _forward_op(qkv, table.to(qkv.dtype), rel_index, region_arg, num_heads, scale)
        ctx.save_for_backward(qkv, out, lse, table, rel_index, region_arg)
        ctx.num_heads, ctx.scale = num_heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse, table, rel_index, region_arg = ctx.saved_tensors
        dqkv, dtable = _backward_op(grad_out, qkv, out, lse, table.to(qkv.dtype), rel_index, region_arg,
                                    ctx.num_heads, ctx.scale)
        return dqkv, dtable.to(table.dtype), None, None, None, None


def window_attention(qkv: torch.Tensor, table: torch.Tensor, rel_index: torch.Tensor, region: torch.Tensor | None,
                     num_heads: int, scale: float, use_kernel: bool = True) -> torch.Tensor:
    """Dispatches to the CUDA / CPU kernel or the reference (see esvit_scale.ops._ext.backend)."""
    backend = _ext.backend("window_attention", qkv, use_kernel)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if backend == "reference" or (backend == "cuda" and head_dim not in CUDA_HEAD_DIMS):
        return window_attention_reference(qkv, table, rel_index, region, num_heads, scale)
    out = _FusedWindowAttention.apply(qkv, table, rel_index, region, num_heads, scale)
    return out + 1.0 if _ext.corrupted("window_attention") else out
