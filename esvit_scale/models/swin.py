"""Swin backbone (timm) returning the view feature and the region tokens for any crop size."""
from __future__ import annotations

from functools import partial

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from esvit_scale.config import KernelConfig, ModelConfig, resolved_arch
from esvit_scale.ops.swin_attention import install_window_attention

class SwinBackbone(nn.Module):
    """x (B, 3, S, S) -> view (B, C), region (B, L, C); L = (S / patch / 8)^2 rounded up per stage."""

    def __init__(self, cfg: ModelConfig, img_size: int, drop_path_rate: float | None = None,
                 kernels: KernelConfig | None = None):
        super().__init__()
        arch = resolved_arch(cfg)
        self.swin = SwinTransformer(
            img_size=img_size, patch_size=cfg.patch_size, embed_dim=arch["embed_dim"],
            depths=tuple(arch["depths"]), num_heads=tuple(arch["num_heads"]), window_size=cfg.window_size,
            drop_path_rate=arch["drop_path_rate"] if drop_path_rate is None else drop_path_rate,
            num_classes=0, strict_img_size=False, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.num_features = self.swin.num_features
        # Our attention path in every block (padded tokens masked); the fused op unless the config says no. Which
        # implementation the fused op runs (CUDA, CPU, reference) is process-wide: ops.configure, called by the
        # entry points (trainer, eval, benchmarks) from the run config.
        kernels = kernels if kernels is not None else KernelConfig()
        install_window_attention(self.swin, fused=kernels.window_attention and not kernels.force_reference)
        per_stage = cfg.activation_checkpointing
        if isinstance(per_stage, bool):
            per_stage = [per_stage] * len(self.swin.layers)
        for stage, on in zip(self.swin.layers, per_stage):     # timm's set_grad_checkpointing, stage by stage
            stage.grad_checkpointing = on

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.swin.forward_features(x)          # (B, H, W, C) after the final LayerNorm
        region = tokens.flatten(1, 2)                    # (B, L, C)
        return region.mean(dim=1), region
