"""Backbone families: `model.arch` names a preset, the preset names its family, the family builds the backbone.

A family is a module with `PRESETS` ({arch name: {family, embed_dim, depths, num_heads, drop_path_rate}}) and
`BACKBONE` (a models.backbone.Backbone subclass). Adding one: its module, plus its line in FAMILIES. Nothing else
in the system knows a family: it asks the backbone (models/backbone.py says what it may ask).
"""
from __future__ import annotations

import importlib
from functools import lru_cache

FAMILIES = {
    "swin": "esvit_scale.models.swin",         # Swin V1 (timm's SwinTransformer)
    "swinv2": "esvit_scale.models.swinv2",     # Swin V2 (timm's SwinTransformerV2)
}


@lru_cache(maxsize=None)
def presets() -> dict[str, dict]:
    """Every family's presets, by arch name."""
    out: dict[str, dict] = {}
    for family, module in FAMILIES.items():
        for arch, preset in importlib.import_module(module).PRESETS.items():
            if arch in out:
                raise ValueError(f"preset {arch!r} is defined by two families ({out[arch]['family']}, {family})")
            out[arch] = {**preset, "family": family}
    return out


def backbone_class(arch: str):
    return importlib.import_module(FAMILIES[presets()[arch]["family"]]).BACKBONE


def build_backbone(cfg, img_size: int, drop_path_rate: float | None = None, kernels=None, on_gpu: bool = False):
    """The backbone of `cfg` (a ModelConfig) for global crops of `img_size` px."""
    return backbone_class(cfg.arch)(cfg, img_size=img_size, drop_path_rate=drop_path_rate, kernels=kernels,
                                    on_gpu=on_gpu)
