"""Our attention path for timm's Swin V1 and V2 blocks: fused window attention, padded tokens masked.

    install_window_attention(swin, fused=True)

Every SwinTransformerBlock of `swin` gets our `_attn` (roll + pad + window partition as one cached gather,
the shift mask and the padding mask as a cached (nW, N) region table instead of timm's (nW, N, N) float mask,
rebuilt by timm on every forward with strict_img_size=False) and every WindowAttention our forward. Parameters
and state_dict keys stay timm's (attn.qkv, attn.proj, attn.relative_position_bias_table), so checkpoints load
either way. fused=False runs the pure-PyTorch reference op on the same path: the same numbers, kernels or not.
SwinV2's cosine attention is the same op around a normalisation: q and k L2-normalised, q times the head's clamped
logit scale, the op's scale 1, and its bias table the continuous-position-bias MLP's 16 * sigmoid(...) output,
computed once per forward (the op's table gradient flows back into the MLP).
The parameters are used inside the modules' own forward calls, as DeepSpeed ZeRO-3's gather hooks require.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.swin_transformer_v2 import SwinTransformerV2Block
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2

from esvit_scale.ops.window_attention import window_attention


@lru_cache(maxsize=256)
def window_layout(H: int, W: int, ws: tuple[int, int], shift: tuple[int, int], device: torch.device):
    """Token layout of one shifted-window attention for an (H, W) map; cached per size.

    Returns (gather, scatter, region):
      gather  (nW*N,) int64: window token -> source token h*W+w of the map (H*W for a padded token, read as 0)
      scatter (H*W,) int64:  source token -> its window token (the inverse of gather on real tokens)
      region  (nW, N) int32 or None: timm's shift-mask region of each window token, -1 for padded tokens
    Same geometry as timm: roll by -shift over (H, W), pad bottom/right to multiples of the window, partition.
    """
    wh, ww = ws
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    rows, cols = torch.arange(Hp), torch.arange(Wp)
    src_r, src_c = (rows + shift[0]) % H, (cols + shift[1]) % W               # rolled position -> source
    real = (rows < H).unsqueeze(1) & (cols < W).unsqueeze(0)                    # (Hp, Wp)
    src = torch.where(real, src_r.unsqueeze(1) * W + src_c.unsqueeze(0), torch.full_like(real, H * W, dtype=torch.long))

    def label(pos, size, w, s):                                                # timm's 3 slices per axis
        return (pos >= size - w).long() + (pos >= size - s).long() if s > 0 else torch.zeros_like(pos)
    lab = label(rows, Hp, wh, shift[0]).unsqueeze(1) * 3 + label(cols, Wp, ww, shift[1]).unsqueeze(0)
    lab = torch.where(real, lab, torch.full_like(lab, -1))

    def partition(t):                                                          # (Hp, Wp) -> (nW, N)
        return t.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    gather = partition(src).reshape(-1)
    # the inverse on real tokens; every padded token writes into one spare slot, dropped (no data-dependent shapes,
    # so that torch.compile traces this into its graph: model.compile)
    scatter = torch.zeros(H * W + 1, dtype=torch.long).scatter_(0, gather, torch.arange(gather.numel()))[:H * W]
    region = partition(lab).to(torch.int32)
    if not any(shift) and Hp == H and Wp == W:
        region = None
    return gather.to(device), scatter.to(device), None if region is None else region.to(device)


class EsvitWindowAttention(WindowAttention):
    """timm's WindowAttention (same parameters) with our op: x (B_, N, C), region (nW, N) -> (B_, N, C)."""
    use_kernel: bool = True

    def forward(self, x: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        qkv = self.qkv(x)                                                      # (B_, N, 3*H*D)
        out = window_attention(qkv, self.relative_position_bias_table, self.relative_position_index,
                               region, self.num_heads, self.scale, use_kernel=self.use_kernel)
        return self.proj_drop(self.proj(out))


class EsvitWindowAttentionV2(WindowAttentionV2):
    """timm's SwinV2 WindowAttention (same parameters) with our op: x (B_, N, C), region (nW, N) -> (B_, N, C)."""
    use_kernel: bool = True

    def forward(self, x: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        # timm's float buffers (k_bias, relative_coords_table) in the parameters' dtype: DeepSpeed's bf16 / fp16
        # casts the parameters only
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias.to(self.q_bias.dtype), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).view(B_, N, 3, self.num_heads, -1).unbind(2)
        logit_scale = self.logit_scale.clamp(max=math.log(100.0)).exp().view(self.num_heads, 1)   # timm's clamp
        qkv = torch.stack((F.normalize(q, dim=-1) * logit_scale.to(q.dtype), F.normalize(k, dim=-1), v), dim=2)
        coords = self.relative_coords_table.to(self.cpb_mlp[0].weight.dtype)
        table = 16 * torch.sigmoid(self.cpb_mlp(coords).view(-1, self.num_heads))                        # (T, H)
        out = window_attention(qkv.view(B_, N, 3 * C), table, self.relative_position_index, region, self.num_heads,
                               1.0, use_kernel=self.use_kernel)
        return self.proj_drop(self.proj(out))


def _windowed_attention(block, x: torch.Tensor) -> torch.Tensor:
    """The blocks' _attn: x (B, H, W, C) -> (B, H, W, C) through window_layout's gather and scatter."""
    B, H, W, C = x.shape
    gather, scatter, region = window_layout(H, W, tuple(block.window_size), tuple(block.shift_size), x.device)
    tokens = torch.cat([x.reshape(B, H * W, C), x.new_zeros(B, 1, C)], dim=1)   # + one zero "pad" token
    windows = tokens[:, gather].view(-1, block.window_area, C)                  # (B*nW, N, C)
    out = block.attn(windows, region=region)                                    # (B*nW, N, C)
    return out.view(B, -1, C)[:, scatter].view(B, H, W, C)


class EsvitSwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock with the attention path of this module (forward/MLP unchanged)."""
    _attn = _windowed_attention


class EsvitSwinV2Block(SwinTransformerV2Block):
    """timm's SwinTransformerV2Block (res-post-norm) with the attention path of this module."""
    _attn = _windowed_attention


OUR_CLASSES = {SwinTransformerBlock: (EsvitSwinBlock, EsvitWindowAttention),
               SwinTransformerV2Block: (EsvitSwinV2Block, EsvitWindowAttentionV2)}
OUR_BLOCKS = tuple(block for block, _ in OUR_CLASSES.values())


def install_window_attention(swin: torch.nn.Module, fused: bool = True) -> int:
    """Switch every Swin V1 or V2 block of `swin` to our attention path; returns the number of blocks switched."""
    count = 0
    for module in swin.modules():
        ours = next((classes for timm_block, classes in OUR_CLASSES.items() if isinstance(module, timm_block)), None)
        if ours is None:
            continue
        if getattr(module, "attn_drop_p", 0.0) or module.attn.attn_drop.p > 0:
            raise ValueError("window attention kernels do not implement attention dropout")
        module.__class__, module.attn.__class__ = ours
        module.attn.use_kernel = bool(fused)
        module.attn_mask = None  # timm's static (nW, N, N) mask is replaced by the region table
        count += 1
    return count
