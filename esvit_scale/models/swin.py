"""Swin V1 backbone (timm's SwinTransformer) returning the view feature and the region tokens for any crop size."""
from __future__ import annotations

import logging
from functools import partial

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from esvit_scale.config import KernelConfig, ModelConfig, resolved_arch
from esvit_scale.models.backbone import Backbone, ExportError, TimmRecipe
from esvit_scale.ops.swin_attention import install_window_attention

log = logging.getLogger("esvit_scale")
_logged: set[str] = set()

# Named presets; `model.embed_dim/depths/num_heads/drop_path_rate` override them when set. The V1 blocks at SwinV2-H's
# and -G's widths and depths (~0.65 B and ~3.0 B backbone parameters) are kept for comparison and for the checkpoints
# made with them; SwinV2 showed this design unstable at that size, so configs/swinv2_huge.yaml and swinv2_giant.yaml
# train the swinv2_ presets (models/swinv2.py).
PRESETS = {
    "swin_nano": dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], drop_path_rate=0.0),
    "swin_tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.1),
    "swin_small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.2),
    "swin_base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], drop_path_rate=0.2),
    "swin_large": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], drop_path_rate=0.2),
    "swin_huge": dict(embed_dim=352, depths=[2, 2, 18, 2], num_heads=[11, 22, 44, 88], drop_path_rate=0.2),
    "swin_giant": dict(embed_dim=512, depths=[2, 2, 42, 4], num_heads=[16, 32, 64, 128], drop_path_rate=0.3),
}


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


class SwinBackbone(Backbone):
    """x (B, 3, S, S) -> view (B, C), region (B, L, C); L = (S / patch / 8)^2 rounded up per stage."""
    timm_class = SwinTransformer
    presets = PRESETS
    timm_prefix = "swin"                 # timm names: swin_<size>_patch<p>_window<w>_<img>
    layer_norm_eps = 1e-6

    def __init__(self, cfg: ModelConfig, img_size: int, drop_path_rate: float | None = None,
                 kernels: KernelConfig | None = None, on_gpu: bool = False):
        super().__init__()
        self.arch_name, self.img_size = cfg.arch, img_size
        self.arch = resolved_arch(cfg)
        self.patch_size, self.window_size = cfg.patch_size, cfg.window_size
        kernels = kernels if kernels is not None else KernelConfig()
        norm = layer_norm_class(on_gpu, kernels, compiled=cfg.compile)
        self.swin = self.timm_class(
            **self._timm_kwargs(), drop_path_rate=self.arch["drop_path_rate"] if drop_path_rate is None
            else drop_path_rate, norm_layer=partial(norm, eps=self.layer_norm_eps))
        self.num_features = self.swin.num_features
        # Our attention path in every block (padded tokens masked); the fused op unless the config says no. Which
        # implementation the fused op runs (CUDA, CPU, reference) is process-wide: ops.configure, called by the
        # entry points (trainer, eval, benchmarks) from the run config.
        install_window_attention(self.swin, fused=kernels.window_attention and not kernels.force_reference)
        per_stage = cfg.activation_checkpointing
        self.set_activation_checkpointing([per_stage] * len(self.swin.layers) if isinstance(per_stage, bool)
                                          else per_stage)

    def _timm_kwargs(self) -> dict:
        return {"img_size": self.img_size, "patch_size": self.patch_size, "window_size": self.window_size,
                "embed_dim": self.arch["embed_dim"], "depths": list(self.arch["depths"]),
                "num_heads": list(self.arch["num_heads"]), "num_classes": 0, "strict_img_size": False}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.swin.forward_features(x)          # (B, H, W, C) after the final LayerNorm
        region = tokens.flatten(1, 2)                    # (B, L, C)
        return region.mean(dim=1), region

    def blocks_by_stage(self) -> list[list[nn.Module]]:
        return [list(stage.blocks) for stage in self.swin.layers]

    def modules_in_order(self) -> list[nn.Module]:
        return [self.swin.patch_embed] + [m for stage in self.swin.layers for m in (stage.downsample, *stage.blocks)]

    def token_grid(self, crop: int) -> list[int]:
        sides = [-(-crop // self.patch_size)]
        for _ in self.swin.layers[1:]:                  # timm pads an odd map before merging
            sides.append(-(-sides[-1] // 2))
        return sides

    def set_activation_checkpointing(self, per_stage: list[bool]) -> None:
        for stage, on in zip(self.swin.layers, per_stage):     # timm's set_grad_checkpointing, stage by stage
            stage.grad_checkpointing = on

    def timm_recipe(self) -> TimmRecipe:
        """The registered timm variant of this architecture where there is one (swin_base_patch4_window7_224, ...),
        else the family's tiny variant: every architectural argument is in the kwargs either way, and the export
        checks that timm's model has our parameters (export.py)."""
        size = self.arch_name.split("_", 1)[1]
        preset = self.presets.get(self.arch_name, {})
        same_as_preset = all(self.arch[k] == preset.get(k) for k in ("embed_dim", "depths", "num_heads"))
        exact = self._registered_name(size) if same_as_preset else None
        name = exact or self._registered_name("tiny", default_geometry=True)
        if name is None:
            raise ExportError(f"timm {timm.__version__} registers no {self.timm_prefix} model to build from")
        return TimmRecipe(name=name, kwargs=self._timm_kwargs(), layer_norm_eps=self.layer_norm_eps)

    def _registered_name(self, size: str, default_geometry: bool = False) -> str | None:
        patch, window, img = (4, 7, 224) if default_geometry else (self.patch_size, self.window_size, self.img_size)
        name = f"{self.timm_prefix}_{size}_patch{patch}_window{window}_{img}"
        return name if timm.is_model(name) else None

    def timm_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len("swin."):]: v for k, v in state.items() if k.startswith("swin.")}


BACKBONE = SwinBackbone
