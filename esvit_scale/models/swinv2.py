"""Swin V2 backbone (timm's SwinTransformerV2): res-post-norm, scaled cosine attention with a clamped per-head logit
scale, and a log-spaced continuous position bias (an MLP over relative coordinates); Liu et al., CVPR 2022. The
design that trained the 3 B SwinV2-G where the V1 blocks' activations grew with depth (docs/performance.md, "V1 and
V2 blocks at depth"). Region tokens, both loss terms and our window-attention op are the same as for V1.
"""
from __future__ import annotations

import timm
from timm.models.swin_transformer_v2 import SwinTransformerV2

from esvit_scale.models.swin import PRESETS as V1_PRESETS
from esvit_scale.models.swin import SwinBackbone

# The V1 presets' widths, depths and (EsViT's) drop-path rates on V2 blocks: swinv2_nano ... swinv2_giant (the SwinV2
# paper's T/S/B/L, and its H and G: ~0.66 B and ~3.0 B backbone parameters). Without the extra main-branch LayerNorm
# every 6 blocks that the paper adds to H and G: timm's SwinTransformerV2 has none, and the export must stay loadable
# by timm.
PRESETS = {"swinv2_" + name[len("swin_"):]: dict(preset) for name, preset in V1_PRESETS.items()}


class SwinV2Backbone(SwinBackbone):
    """SwinBackbone on timm's SwinTransformerV2 blocks; same state_dict prefix (backbone.swin.)."""
    timm_class = SwinTransformerV2
    presets = PRESETS
    timm_prefix = "swinv2"               # timm names: swinv2_<size>_window<w>_<img> (patch 4)
    layer_norm_eps = 1e-5                # timm's and the official SwinV2's LayerNorm

    def decays(self, name: str, dims: int) -> bool:
        """timm's SwinV2 rule: the position-bias MLP and the logit scales get no weight decay, nor biases."""
        return super().decays(name, dims) and "cpb_mlp" not in name and "logit_scale" not in name

    def _registered_name(self, size: str, default_geometry: bool = False) -> str | None:
        if not default_geometry and self.patch_size != 4:
            return None
        window, img = (8, 256) if default_geometry else (self.window_size, self.img_size)
        name = f"swinv2_{size}_window{window}_{img}"
        return name if timm.is_model(name) else None


BACKBONE = SwinV2Backbone
