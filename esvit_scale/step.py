"""One EsViT training micro-batch, in named phases: the step the trainer runs and the benchmarks time.

    step = TrainStep(parts, schedules, device)           # parts: engine/build.py; or build_train_step(cfg, ...)
    step.set_hyperparameters(i, freeze_last_layer=False)     # at the start of each optimizer step
    for crops in step.batches(loader.epoch(e)):          # records the data wait of each batch
        losses, phases = step.run(crops, epoch=e, step=i, boundary=True, timing=True)

Phases (PHASES): waiting for the loader and moving the batch to the device, teacher forward (2 global crops),
student forward (all crops), loss, backward, optimizer step (DeepSpeed's: a no-op between accumulation
boundaries), teacher EMA update (at a boundary). With timing on, the device is synchronised at each phase edge
so that the seconds belong to their phase; with timing off nothing is synchronised or measured.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator, Optional

import torch

from esvit_scale.cluster.faults import corrupt_loss
from esvit_scale.engine import collectives

log = logging.getLogger("esvit_scale")

PHASES = ("data_wait", "teacher_forward", "student_forward", "loss", "backward", "optimizer_step", "ema_update")


def teacher_autocast(device: torch.device, dtype: torch.dtype):
    """The teacher keeps fp32 weights; on a GPU it runs in the training precision under autocast."""
    on_gpu = device.type == "cuda" and dtype != torch.float32
    return torch.autocast("cuda", dtype=dtype, enabled=on_gpu)


class PhaseClock:
    """Seconds per phase since the last mark(); does nothing (no synchronisation) when disabled."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.sync = torch.cuda.synchronize if enabled and device.type == "cuda" else None
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter() if enabled else 0.0

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


class TrainStep:
    def __init__(self, parts, schedules, device: torch.device):
        self.engine, self.optimizer, self.teacher, self.loss_fn = parts.engine, parts.optimizer, parts.teacher, \
            parts.loss_fn
        self.sched = schedules
        self.kernels = parts.kernels          # what each fused op runs (the self-check's outcome)
        self.device, self.input_dtype = device, parts.input_dtype
        self.rank = collectives.rank()
        self.last_data_wait = 0.0

    def batches(self, loader: Iterable) -> Iterator:
        """The loader's batches, each with the seconds spent waiting for it kept in last_data_wait."""
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.last_data_wait = time.perf_counter() - t0
            yield batch

    def set_hyperparameters(self, step: int, freeze_last_layer: bool) -> None:
        """lr and weight decay of optimizer step `step` from the schedules."""
        from esvit_scale.engine.student import set_optimizer_hyperparameters
        set_optimizer_hyperparameters(self.optimizer, float(self.sched.lr[step]), float(self.sched.weight_decay[step]),
                                      freeze_last_layer=freeze_last_layer)

    def run(self, crops: list[torch.Tensor], epoch: int, step: int, boundary: bool, timing: bool = False
            ) -> tuple[dict[str, torch.Tensor], Optional[dict[str, float]]]:
        """One micro-batch: forward, loss, backward, engine step; at an accumulation boundary (the engine steps
        the optimizer there) also the EMA update with the momentum of optimizer step `step`. Returns the losses and,
        with timing, the seconds of each phase (data_wait: that of the batch handed out last by batches())."""
        clock = PhaseClock(self.device, timing)
        boxes = getattr(crops, "geometry", None)
        geometry = (boxes, [c.shape[-1] for c in crops]) if boxes is not None and self.loss_fn.monitor else None
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        clock.mark("data_wait")
        with teacher_autocast(self.device, self.input_dtype):
            teacher_out = self.teacher(crops[:2])
        clock.mark("teacher_forward")
        student_out = self.engine([c.to(self.input_dtype) for c in crops])
        clock.mark("student_forward")
        losses = self.loss_fn(student_out, teacher_out, float(self.sched.teacher_temp[epoch]), geometry)
        losses["loss"] = corrupt_loss(losses["loss"], self.rank, step + 1)
        clock.mark("loss")
        self.engine.backward(losses["loss"])
        clock.mark("backward")
        self.engine.step()
        clock.mark("optimizer_step")
        if boundary:
            self.teacher.update(float(self.sched.momentum[step]))
        clock.mark("ema_update")
        if not timing:
            return losses, None
        clock.seconds["data_wait"] += self.last_data_wait
        return losses, {p: clock.seconds[p] for p in PHASES}


def build_train_step(cfg, world_size: int, device: torch.device, steps_per_epoch: int = 1) -> TrainStep:
    """A fresh step of `cfg` (what the benchmarks time): the parts built from one seed (engine/build.py) and the
    schedules for the global batch of world_size ranks. Needs the process group (see
    esvit_scale.engine.distributed.init_distributed)."""
    from esvit_scale.engine.build import build_parts
    from esvit_scale.engine.student import batch_split
    from esvit_scale.schedules import build_schedules
    split = batch_split(cfg, world_size)
    parts = build_parts(cfg, split, device, rank=collectives.rank())
    return TrainStep(parts, build_schedules(cfg, split.global_batch, steps_per_epoch), device)
