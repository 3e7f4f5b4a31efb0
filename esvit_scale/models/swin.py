"""Swin backbone (timm) returning the view feature and the region tokens for any crop size."""
from __future__ import annotations

import logging
from functools import partial

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from esvit_scale.config import KernelConfig, ModelConfig, resolved_arch
from esvit_scale.ops.swin_attention import install_window_attention

log = logging.getLogger("esvit_scale")
_logged: set[str] = set()


def layer_norm_class(on_gpu: bool, kernels: KernelConfig, compiled: bool) -> type[nn.Module]:
    """NVIDIA apex's FusedLayerNorm on a GPU where apex is importable and kernels.apex_layer_norm allows it, else
    torch's LayerNorm (also under model.compile: apex's op would break the graph, and inductor fuses the norm
    itself); logs the choice once. Both hold `weight` and `bias`, so checkpoints load either way, and
    FusedLayerNorm runs torch's layer_norm on non-CUDA tensors (the FLOP counter's meta tensors)."""
    why = ("apex is for GPUs only" if not on_gpu else "kernels.apex_layer_norm=false" if not kernels.apex_layer_norm
           else "model.compile" if compiled else "")
    if not why:
        try:
            from apex.normalization import FusedLayerNorm
            _log_once("apex FusedLayerNorm")
            return FusedLayerNorm
        except ImportError:
            why = "apex not importable"
    _log_once(f"torch LayerNorm ({why})")
    return nn.LayerNorm


def _log_once(choice: str) -> None:
    if choice not in _logged:
        _logged.add(choice)
        log.info("backbone LayerNorm: %s", choice)


class SwinBackbone(nn.Module):
    """x (B, 3, S, S) -> view (B, C), region (B, L, C); L = (S / patch / 8)^2 rounded up per stage."""

    def __init__(self, cfg: ModelConfig, img_size: int, drop_path_rate: float | None = None,
                 kernels: KernelConfig | None = None, on_gpu: bool = False):
        super().__init__()
        arch = resolved_arch(cfg)
        kernels = kernels if kernels is not None else KernelConfig()
        norm = layer_norm_class(on_gpu, kernels, compiled=cfg.compile)
        self.swin = SwinTransformer(
            img_size=img_size, patch_size=cfg.patch_size, embed_dim=arch["embed_dim"],
            depths=tuple(arch["depths"]), num_heads=tuple(arch["num_heads"]), window_size=cfg.window_size,
            drop_path_rate=arch["drop_path_rate"] if drop_path_rate is None else drop_path_rate,
            num_classes=0, strict_img_size=False, norm_layer=partial(norm, eps=1e-6))
        self.num_features = self.swin.num_features
        # Our attention path in every block (padded tokens masked); the fused op unless the config says no. Which
        # implementation the fused op runs (CUDA, CPU, reference) is process-wide: ops.configure, called by the
        # entry points (trainer, eval, benchmarks) from the run config.
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
