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
    """Item (epoch, index) -> (the crops of image `index` augmented with the seed of (seed, epoch, index), the
    unusable files met on the way as (path, reason)).

    An unreadable image (corrupt, truncated, not an image) is replaced by the next readable one in index order, so
    a long run is not killed by one bad file. Workers are separate processes: they hand what they found back with
    the sample, and the loader counts and reports it; files known to be unusable (`known_unusable`, set by the
    loader before each epoch) are not read again.
    """

    def __init__(self, index: ImageIndex, data: DataConfig, seed: int):
        self.paths, self.specs, self.seed = index.paths, crop_specs(data), seed
        self.root = index.root
        self.known_unusable: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], list[tuple[str, str]]]:
        epoch, index = key
        found: list[tuple[str, str]] = []
        tried = 0
        for k in range(len(self.paths)):
            i = (index + k) % len(self.paths)
            if i in self.known_unusable:
                continue
            try:
                img = open_rgb(self.paths[i])
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                found.append((self.paths[i], str(e)))
                tried += 1
                if tried == MAX_FALLBACKS:
                    raise RuntimeError(f"{MAX_FALLBACKS} unreadable images in a row from {self.paths[index]} "
                                       f"(e.g. {found[0][0]}: {found[0][1]}): is {self.root} the right folder?")
                continue
            return multi_crop(img, self.specs, sample_seed(self.seed, epoch, index)), found
        raise RuntimeError(f"no usable image in {self.root}: all {len(self.paths)} image files are unusable "
                           f"(e.g. {found[0][0] if found else self.paths[0]}: {found[0][1] if found else 'known'})")


def _collate(items: list[tuple[list[torch.Tensor], list[tuple[str, str]]]]):
    crops = [torch.stack(group) for group in zip(*(c for c, _ in items))]
    return crops, [f for _, found in items for f in found]


class TorchMultiCropLoader:
    """Implements data.multicrop.MultiCropLoader with a torch DataLoader per epoch."""

    def __init__(self, index: ImageIndex, data: DataConfig, rank: int = 0, world_size: int = 1,
                 seed: int = 0, pin_memory: bool = False):
        self.dataset = MultiCropDataset(index, data, seed)
        self.order = ShardedOrder(len(index), data.batch_size_per_gpu, rank, world_size, seed)
        self.num_workers, self.pin_memory = data.num_workers, pin_memory
        self.index = index
        self.unusable: dict[str, str] = {}          # path -> reason, as the batches report them

    def __len__(self) -> int:
        return len(self.order)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[torch.Tensor]]:
        keys = [[(epoch, int(i)) for i in batch] for batch in self.order.batches(epoch, start_batch)]
        if not keys:
            return iter(())
        position = {p: i for i, p in enumerate(self.dataset.paths)}
        self.dataset.known_unusable = frozenset(position[p] for p in self.unusable)
        loader = DataLoader(self.dataset, batch_sampler=keys, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False, collate_fn=_collate,
                            prefetch_factor=4 if self.num_workers else None,
                            generator=torch.Generator())   # leaves the global RNG (drop-path) untouched
        return self._counted(loader)

    def _counted(self, loader) -> Iterator[list[torch.Tensor]]:
        for crops, found in loader:
            for path, reason in found:
                if path not in self.unusable:
                    self.unusable[path] = reason
                    log.warning("skipping unusable image %s: %s (%d skipped so far)", path, reason,
                                len(self.unusable))
            yield crops

    def skipped_files(self) -> list[str]:
        """Every file left out so far: non-image names from the index, then unusable images."""
        return list(self.index.skipped) + sorted(self.unusable)
