"""What the rest of the system may ask of a backbone. The model, the optimizer, the linear probe, the FLOP counter,
the memory planner, the kernel self-check and the export ask these and nothing else (families: models/registry.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TimmRecipe:
    """How timm rebuilds the backbone: timm.create_model(name, norm_layer=LayerNorm(eps=layer_norm_eps), **kwargs),
    loading the state_dict of Backbone.timm_state_dict strictly."""
    name: str
    kwargs: dict
    layer_norm_eps: float


class ExportError(ValueError):
    """A backbone that timm cannot rebuild; the message says what differs."""


class Backbone(nn.Module):
    """x (B, 3, S, S) -> view (B, C), region (B, L, C), for any S that is a whole number of patches."""
    num_features: int

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def blocks_by_stage(self) -> list[list[nn.Module]]:
        """The transformer blocks, stage by stage, in forward order (the linear probe averages the last ones)."""
        raise NotImplementedError

    def modules_in_order(self) -> list[nn.Module]:
        """Stem, then each stage's downsampling and blocks: applied in turn to an image they give the features
        before the final norm (the memory planner runs them one at a time)."""
        raise NotImplementedError

    def token_grid(self, crop: int) -> list[int]:
        """Side of each stage's token map for a square crop of `crop` px."""
        raise NotImplementedError

    def decays(self, name: str, dims: int) -> bool:
        """Whether the parameter `name` (relative to the backbone; `dims` dimensions before any partitioning) gets
        weight decay. Default: weights of two or more dimensions."""
        return dims > 1 and not name.endswith(".bias")

    def set_activation_checkpointing(self, per_stage: list[bool]) -> None:
        raise NotImplementedError

    def timm_recipe(self) -> TimmRecipe:
        """Raises ExportError for a backbone timm cannot rebuild."""
        raise ExportError(f"{type(self).__name__} has no timm equivalent")

    def timm_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state_dict entries (keys relative to the backbone) under timm's names."""
        raise ExportError(f"{type(self).__name__} has no timm equivalent")
