"""The reference multi-crop loader: PIL decode + augmentation in torch DataLoader workers."""
from __future__ import annotations

import io
import logging
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from esvit_scale.config import DataConfig
from esvit_scale.data.multicrop import Crops, crop_specs
from esvit_scale.data.sampler import ShardedOrder, sample_seed
from esvit_scale.data.source import ImageSource
from esvit_scale.data.transforms import multi_crop

log = logging.getLogger(__name__)

MAX_FALLBACKS = 16   # unreadable images in a row before giving up on a sample


def open_rgb(data: bytes | str) -> Image.Image:
    """Decode any PIL-readable image (grayscale, CMYK, palette, RGBA), given its bytes or its path, to RGB; raises
    OSError if unreadable."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise UnidentifiedImageError("cannot identify image file (not an image PIL reads)") from None


class MultiCropDataset(Dataset):
    """Item (epoch, index) -> (the crops of image `index` augmented with the seed of (seed, epoch, index), their
    geometry, the unusable samples met on the way as (index, reason)).

    An unreadable image (corrupt, truncated, not an image, in a damaged shard) is replaced by the next readable one
    in index order, so a long run is not killed by one bad file. Workers are separate processes: they hand what they
    found back with the sample, and the loader counts and reports it; each worker remembers what it found and does
    not try it again (nor what the source knows it cannot read).
    """

    def __init__(self, source: ImageSource, data: DataConfig, seed: int):
        self.source, self.specs, self.seed = source, crop_specs(data), seed
        self.known_unusable: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        found: list[tuple[int, str]] = []
        n = len(self.source)
        for k in range(n):
            i = (index + k) % n
            if i in self.known_unusable or not self.source.available(i):
                continue
            try:
                img = open_rgb(self.source.read(i))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.known_unusable.add(i)
                found.append((i, str(e)))
                if len(found) == MAX_FALLBACKS:
                    raise RuntimeError(f"{MAX_FALLBACKS} unreadable images in a row from {self.source.name(index)} "
                                       f"(e.g. {self.source.name(found[0][0])}: {found[0][1]}): is "
                                       f"{self.source.root} the right data?")
                continue
            return (*multi_crop(img, self.specs, sample_seed(self.seed, epoch, index)), found)
        raise RuntimeError(f"no usable image in {self.source.root}: all {n} image files are unusable "
                           f"(e.g. {self.source.name(found[0][0]) + ': ' + found[0][1] if found else 'known'})")


def _collate(items):
    """(crop tensors, geometry, unusable samples met); made into Crops after the DataLoader (its memory pinning
    rebuilds sequences as their plain type)."""
    return ([torch.stack(group) for group in zip(*(c for c, _, _ in items))], torch.stack([g for _, g, _ in items]),
            [f for _, _, found in items for f in found])


class _EpochBatches:
    """The batch sampler of the loader's one DataLoader: the keys (epoch, sample) of the epoch and from the batch
    that `epoch()` set, read when a pass starts."""

    def __init__(self, order: ShardedOrder):
        self.order, self.epoch, self.start = order, 0, 0

    def __iter__(self):
        for batch in self.order.batches(self.epoch, self.start):
            yield [(self.epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return max(0, len(self.order) - self.start)


class TorchMultiCropLoader:
    """Implements data.multicrop.MultiCropLoader with one torch DataLoader whose workers live across epochs (a new
    epoch, a resume or a rewind starts a new pass over the same workers; batches prefetched for an abandoned pass
    are dropped)."""

    def __init__(self, source: ImageSource, data: DataConfig, rank: int = 0, world_size: int = 1,
                 seed: int = 0, pin_memory: bool = False):
        self.dataset = MultiCropDataset(source, data, seed)
        self.order = ShardedOrder(len(source), data.batch_size_per_gpu, rank, world_size, seed)
        self.source = source
        self.unusable: dict[int, str] = {}          # sample -> reason, as the batches report them
        self.batches = _EpochBatches(self.order)
        workers = data.num_workers
        self.loader = DataLoader(self.dataset, batch_sampler=self.batches, num_workers=workers,
                                 pin_memory=pin_memory, persistent_workers=workers > 0, collate_fn=_collate,
                                 prefetch_factor=4 if workers else None,
                                 generator=torch.Generator())   # leaves the global RNG (drop-path) untouched

    def __len__(self) -> int:
        return len(self.order)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Crops]:
        self.batches.epoch, self.batches.start = epoch, start_batch
        if start_batch >= len(self.order):
            return iter(())
        return self._counted(iter(self.loader))

    def _counted(self, loader) -> Iterator[Crops]:
        for crops, geometry, found in loader:
            for i, reason in found:
                if i not in self.unusable:
                    self.unusable[i] = reason
                    log.warning("skipping unusable image %s: %s (%d skipped so far)", self.source.name(i), reason,
                                len(self.unusable))
            yield Crops(crops, geometry)

    def skipped_files(self) -> list[str]:
        """Everything left out so far: non-image names and damaged shards, then unusable images."""
        return list(self.source.skipped) + [self.source.name(i) for i in sorted(self.unusable)]
