"""The reference multi-crop loader: PIL decode + augmentation in torch DataLoader workers."""
from __future__ import annotations

import logging
from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from esvit_scale.config import DataConfig
from esvit_scale.data.folder import ImageIndex
from esvit_scale.data.multicrop import crop_specs
from esvit_scale.data.sampler import ShardedOrder, sample_seed
from esvit_scale.data.transforms import multi_crop

log = logging.getLogger(__name__)

MAX_FALLBACKS = 16   # unreadable images in a row before giving up on a sample


def open_rgb(path: str) -> Image.Image:
    """Decode any PIL-readable image (grayscale, CMYK, palette, RGBA) to RGB; raises OSError if unreadable."""
    with Image.open(path) as img:
        return img.convert("RGB")


class MultiCropDataset(Dataset):
    """Item (epoch, index) -> the crops of image `index`, augmented with the seed of (seed, epoch, index).

    An unreadable image (corrupt, truncated, not an image) is logged and replaced by the next readable
    one in index order, so a long run is not killed by one bad file.
    """

    def __init__(self, index: ImageIndex, data: DataConfig, seed: int):
        self.paths, self.specs, self.seed = index.paths, crop_specs(data), seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        epoch, index = key
        for k in range(MAX_FALLBACKS):
            i = (index + k) % len(self.paths)
            try:
                img = open_rgb(self.paths[i])
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                log.warning("skipping unreadable image %s: %s", self.paths[i], e)
                continue
            return multi_crop(img, self.specs, sample_seed(self.seed, epoch, index))
        raise RuntimeError(f"{MAX_FALLBACKS} unreadable images in a row from {self.paths[index]}")


class TorchMultiCropLoader:
    """Implements data.multicrop.MultiCropLoader with a torch DataLoader per epoch."""

    def __init__(self, index: ImageIndex, data: DataConfig, rank: int = 0, world_size: int = 1,
                 seed: int = 0, pin_memory: bool = False):
        self.dataset = MultiCropDataset(index, data, seed)
        self.order = ShardedOrder(len(index), data.batch_size_per_gpu, rank, world_size, seed)
        self.num_workers, self.pin_memory = data.num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.order)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[torch.Tensor]]:
        keys = [[(epoch, int(i)) for i in batch] for batch in self.order.batches(epoch, start_batch)]
        if not keys:
            return iter(())
        loader = DataLoader(self.dataset, batch_sampler=keys, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False,
                            prefetch_factor=4 if self.num_workers else None,
                            generator=torch.Generator())   # leaves the global RNG (drop-path) untouched
        return iter(loader)
