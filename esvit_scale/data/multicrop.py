"""What a multi-crop batch is, shared by every loader (torch/PIL and DALI).

A loader yields, for each step, `Crops`: a list of crop tensors in this order
    [global_0, global_1, local crops of local_crops_size[0] ..., local crops of local_crops_size[1] ...]
each (B, 3, S, S) float32, normalised with the ImageNet mean/std (the teacher sees the first two), and their
geometry, (B, n_crops, 6): each crop's box in its image (top, left, height, width, in pixels), flip (1.0) and
counter-clockwise turn in degrees (losses/correspondence.py reads it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Protocol

import torch

from esvit_scale.config import DataConfig

if TYPE_CHECKING:
    from esvit_scale.data.sampler import ShardedOrder
    from esvit_scale.data.source import ImageSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER_PROB = 0.8
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
GRAYSCALE_PROB = 0.2
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
SOLARIZE_THRESHOLD = 128


@dataclass(frozen=True)
class CropSpec:
    size: int
    scale: tuple[float, float]
    blur_prob: float
    solarize_prob: float
    flip_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    rotation: float = 0.0            # degrees: turned by U(-rotation, rotation) after the flip; 0: not drawn


def crop_specs(data: DataConfig) -> list[CropSpec]:
    """The per-crop augmentation of the reference: 2 global crops, then the local crops by size group."""
    g = data.global_crops_size
    common = dict(flip_prob=data.hflip_prob, blur_sigma=tuple(data.blur_sigma), rotation=data.rotation_degrees)
    specs = [CropSpec(g, tuple(data.global_crops_scale), blur_prob=1.0, solarize_prob=0.0, **common),
             CropSpec(g, tuple(data.global_crops_scale), blur_prob=0.1, solarize_prob=data.solarize_prob, **common)]
    for size, number in zip(data.local_crops_size, data.local_crops_number):
        specs += [CropSpec(size, tuple(data.local_crops_scale), blur_prob=0.5, solarize_prob=0.0, **common)] * number
    return specs


class Crops(list):
    """A batch's crop tensors, in crop order, with their geometry (B, n_crops, 6)."""

    def __init__(self, tensors, geometry: Optional[torch.Tensor] = None):
        super().__init__(tensors)
        self.geometry = geometry


class MultiCropLoader(Protocol):
    """The interface the training loop reads; `epoch(e, start_batch)` resumes mid-epoch exactly. `order` says which
    samples each batch holds (data.sampler.ShardedOrder), `source` where they come from (data.source.ImageSource)."""

    order: "ShardedOrder"
    source: "ImageSource"

    def __len__(self) -> int:
        """Batches per epoch on this rank."""

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Crops]:
        """This rank's batches of `epoch`, from batch `start_batch` on."""

    def skipped_files(self) -> list[str]:
        """Every file this loader has left out so far: names that are not images, then unusable images."""
