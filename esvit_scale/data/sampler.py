"""Which samples each rank reads, batch by batch: the same answer on every rank, worker and restart."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class ShardedOrder:
    """A seeded permutation per epoch, cut to whole global batches (drop-last), dealt to the ranks.

    Rank r takes every world_size-th sample of the permutation, so the ranks are disjoint and together
    read every kept sample once per epoch. Batch b of an epoch is the same whoever asks and whenever,
    which is what makes a mid-epoch resume exact.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_batches = num_samples // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{num_samples} images are fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks): lower data.batch_size_per_gpu or add images")

    def __len__(self) -> int:
        return self.num_batches

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in reading order (num_batches * batch_size of them)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        kept = perm[: self.num_batches * self.batch_size * self.world_size]
        return kept[self.rank:: self.world_size]

    def global_samples(self, epoch: int, first_batch: int, num_batches: int) -> np.ndarray:
        """Every rank's samples of micro-batches [first_batch, first_batch + num_batches) of `epoch`: after b
        micro-batches per rank, the first b * batch_size * world_size samples of the permutation have been read."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        per_batch = self.batch_size * self.world_size
        return perm[first_batch * per_batch:(first_batch + num_batches) * per_batch]

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[np.ndarray]:
        idx = self.indices(epoch)
        for b in range(start_batch, self.num_batches):
            yield idx[b * self.batch_size: (b + 1) * self.batch_size]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch, independent of rank, worker and batch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def batches_at(batches: int, written: tuple[int, int], now: tuple[int, int], global_batch: int) -> int:
    """A position inside an epoch, `batches` micro-batches per rank of (micro, world) `written`, in micro-batches per
    rank of `now`: whatever the split, after b micro-batches per rank the first b x micro x world samples of the
    epoch's permutation have been read. ValueError if that is not a whole number of global batches."""
    samples = batches * written[0] * written[1]
    if samples % global_batch:
        raise ValueError(f"it stopped {samples} samples into its epoch, not a whole number of this run's global "
                         f"batches ({global_batch}): change the batch settings or start from an epoch-end checkpoint")
    return samples // (now[0] * now[1])
