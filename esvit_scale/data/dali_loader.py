"""The NVIDIA DALI multi-crop loader (data.multicrop.MultiCropLoader).

Python reads each batch's files (the order from ShardedOrder: sharding, drop-last and resume as the torch
loader), checks them (image_check), draws every crop's random parameters (dali_params, seeded per sample and
epoch as the reference), and feeds bytes + parameters to the DALI graph (dali_pipeline) through an
external source. DALI decodes each image once and makes all its crops on `data.num_workers` threads; on a GPU
(device_id set) it decodes with device="mixed" and augments on the GPU, and the batch reaches torch as
zero-copy DLPack views of DALI's output buffers (CUDA tensors on a GPU, no host copy).

Bad input (docs/data.md): an unusable file is logged once by name, remembered, and replaced in its batch
by the next usable image in index order (the torch loader's rule), keeping the sample's augmentation seed.
A decode error inside DALI (a corrupt JPEG body) is traced to its file(s) with a probe decode of the
in-flight samples; the pipeline is rebuilt and the epoch goes on at the batch that failed.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from esvit_scale.config import DataConfig
from esvit_scale.data import dali_params
from esvit_scale.data.image_check import Encoded, UnusableImage, check_image, probe_decode, read_encoded
from esvit_scale.data.multicrop import Crops, crop_specs
from esvit_scale.data.sampler import ShardedOrder, sample_seed
from esvit_scale.data.source import ImageSource

log = logging.getLogger(__name__)

PREFETCH = 2


def _plugin_loaded(required: bool) -> bool:
    from esvit_scale.data import dali_plugin
    if dali_plugin.available():
        return True
    if required:
        raise RuntimeError("plugin=True, but the esvit_multi_crop DALI plugin could not be built or loaded "
                           "(see the log)")
    return False


@dataclass
class BatchRecord:
    """What was fed for one batch (kept for error recovery and as a test/debug hook)."""
    batch: int                   # batch number within the epoch
    requested: np.ndarray        # sample indices from the order
    used: list[int]              # indices actually decoded (differs where a file was replaced)
    sizes: list[tuple[int, int]]  # (width, height) of each decoded image
    params: list[np.ndarray]     # (num_crops, dali_params.NUM_PARAMS) per sample
    data: list[np.ndarray]       # encoded bytes per sample


class DaliMultiCropLoader:
    def __init__(self, source: ImageSource, data: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device_id: int | None = None, num_threads: int | None = None, plugin: bool | None = None):
        """`plugin`: run the CPU graph's crops in the esvit_multi_crop operator (dali_plugin); None: when it
        builds and loads and the crops need nothing it lacks (rotation). Ignored on a GPU (device_id set)."""
        self.source, self.seed = source, seed
        self.specs = crop_specs(data)
        self.order = ShardedOrder(len(source), data.batch_size_per_gpu, rank, world_size, seed)
        self.batch_size = data.batch_size_per_gpu
        self.device_id = device_id
        self.num_threads = max(1, num_threads if num_threads is not None else data.num_workers)
        rotated = any(s.rotation > 0 for s in self.specs)
        if plugin and rotated:
            raise ValueError("plugin=True: the esvit_multi_crop operator does not rotate; data.rotation_degrees "
                             "needs the stock DALI operators (plugin=None or False)")
        self.plugin = device_id is None and plugin is not False and not rotated and _plugin_loaded(bool(plugin))
        self.unusable: dict[int, str] = {}          # sample -> reason, found while reading
        self.last_batch: BatchRecord | None = None  # the batch most recently yielded
        self._check_source()

    def __len__(self) -> int:
        return len(self.order)

    # ---- bad input -------------------------------------------------------------------------------------
    def _check_source(self) -> None:
        """Fail now, with the data's name, if no image of it decodes; otherwise cost one decode."""
        reasons = []
        for i in range(len(self.source)):
            if not self.source.available(i):
                continue
            try:
                check_image(self.source, i, self.device_id)
                return
            except UnusableImage as e:
                self._mark_unusable(i, str(e))
                reasons.append(f"{Path(self.source.name(i)).name}: {e}")
        raise RuntimeError(f"no usable image in {self.source.root}: all {len(self.source)} image files are "
                           f"unusable ({'; '.join(reasons[:5])}{' ...' if len(reasons) > 5 else ''})")

    def _mark_unusable(self, i: int, reason: str) -> None:
        if i not in self.unusable:
            self.unusable[i] = reason
            log.warning("skipping unusable image %s: %s (%d skipped so far)", self.source.name(i), reason,
                        len(self.unusable))

    def skipped_files(self) -> list[str]:
        """Everything left out so far: non-image names and damaged shards, then unusable images."""
        return list(self.source.skipped) + [self.source.name(i) for i in sorted(self.unusable)]

    def _read(self, i: int) -> tuple[int, Encoded]:
        """Image i, or the next usable one in index order (wrapping)."""
        n = len(self.source)
        for k in range(n):
            j = (i + k) % n
            if j in self.unusable or not self.source.available(j):
                continue
            try:
                return j, read_encoded(self.source, j)
            except UnusableImage as e:
                self._mark_unusable(j, str(e))
        raise RuntimeError(f"no usable image left in {self.source.root} ({len(self.unusable)} unusable)")

    # ---- feeding --------------------------------------------------------------------------------------
    def _record(self, epoch: int, batch: int, requested: np.ndarray) -> BatchRecord:
        used, sizes, params, data = [], [], [], []
        for i in requested:
            j, enc = self._read(int(i))
            used.append(j)
            sizes.append((enc.width, enc.height))
            params.append(dali_params.draw_sample(enc.width, enc.height, self.specs,
                                                  sample_seed(self.seed, epoch, int(i))))
            data.append(enc.data)
        return BatchRecord(batch, requested, used, sizes, params, data)

    def _source(self, epoch: int, start_batch: int, fed: deque):
        batches = enumerate(self.order.batches(epoch, start_batch), start=start_batch)

        def next_batch():
            b, requested = next(batches)       # StopIteration ends the epoch for DALI
            rec = self._record(epoch, b, requested)
            fed.append(rec)
            if self.plugin:
                return rec.data, rec.params
            taps = [[dali_params.blur_taps(p[c, dali_params.SIGMA] if p[c, dali_params.BLUR] else 0.0)
                     for p in rec.params] for c in range(len(self.specs))]
            return (rec.data, rec.params, *taps)
        return next_batch

    def _build(self, epoch: int, start_batch: int, fed: deque):
        from esvit_scale.data.dali_pipeline import multicrop_pipeline
        pipe = multicrop_pipeline(specs=self.specs, gpu=self.device_id is not None, plugin=self.plugin,
                                  source=self._source(epoch, start_batch, fed),
                                  batch_size=self.batch_size, num_threads=self.num_threads,
                                  device_id=self.device_id, prefetch_queue_depth=PREFETCH,
                                  seed=self.seed, exec_async=True, exec_pipelined=True, exec_dynamic=True)
        pipe.build()
        return pipe

    # ---- output ---------------------------------------------------------------------------------------
    @staticmethod
    def geometry(rec: BatchRecord) -> torch.Tensor:
        """(B, n_crops, 6) boxes, flips and turns of a fed batch, from its parameter rows (dali_params)."""
        rows = np.stack(rec.params).astype(np.float64)                 # (B, n, NUM_PARAMS)
        y0, x0, y1, x1 = (rows[..., dali_params.ROI][..., k] for k in range(4))
        geometry = np.stack([y0, np.minimum(x0, x1), y1 - y0, np.abs(x1 - x0), (x0 > x1).astype(np.float64),
                             rows[..., dali_params.ANGLE]], axis=-1)
        return torch.from_numpy(geometry.astype(np.float32))

    @staticmethod
    def _to_torch(outputs) -> list[torch.Tensor]:
        """Zero-copy views (DLPack) of the batch's outputs, CPU or CUDA as DALI made them.

        DALI's default (dynamic) executor allocates each iteration's outputs afresh and keeps a buffer alive
        while a DLPack view holds it, so the tensors stay valid after later iterations (tested). `run()`
        returns outputs synchronised with the host, so CUDA views are ready on any stream.
        """
        return [torch.from_dlpack(out.as_tensor()) for out in outputs]

    def _isolate(self, fed: deque) -> int:
        """After a DALI error: probe-decode the in-flight samples, mark the failures; how many failed."""
        found = 0
        for rec in fed:
            for j, data in zip(rec.used, rec.data):
                if j in self.unusable:
                    continue
                err = probe_decode(data, self.device_id)
                if err is not None:
                    self._mark_unusable(j, f"decode failed: {err}")
                    found += 1
        return found

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Crops]:
        return self._epoch(epoch, start_batch)

    def _epoch(self, epoch: int, start_batch: int) -> Iterator[Crops]:
        b = start_batch
        while b < len(self.order):
            fed: deque = deque()
            pipe = self._build(epoch, b, fed)
            try:
                while b < len(self.order):
                    try:
                        outputs = pipe.run()
                    except RuntimeError as e:
                        if not self._isolate(fed):
                            raise
                        log.warning("DALI error in batch %d of epoch %d (%s); rebuilding the pipeline",
                                    b, epoch, str(e).strip().splitlines()[-1][:200])
                        break
                    rec = fed.popleft()
                    assert rec.batch == b, (rec.batch, b)
                    crops = Crops(self._to_torch(outputs), self.geometry(rec))
                    self.last_batch = rec
                    b += 1
                    yield crops
            finally:
                del pipe
