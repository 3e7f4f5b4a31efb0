"""The per-iteration schedules of the paper: lr, weight decay, teacher momentum, teacher temperature."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esvit_scale.config import Config


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """One value per iteration: linear warmup from warmup_start to base, then cosine from base to final."""
    warmup_iters = warmup_epochs * iters_per_epoch
    total = epochs * iters_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_iters, endpoint=False) if warmup_iters else np.array([])
    t = np.arange(total - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """One value per epoch: linear from warmup_temp to temp over warmup_epochs, then constant."""
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp)])


@dataclass
class Schedules:
    lr: np.ndarray                 # per optimizer step
    weight_decay: np.ndarray       # per optimizer step
    momentum: np.ndarray           # per optimizer step
    teacher_temp: np.ndarray       # per epoch
    steps_per_epoch: int


def build_schedules(cfg: Config, global_batch: int, steps_per_epoch: int) -> Schedules:
    o, l = cfg.optim, cfg.loss
    peak_lr = o.base_lr * global_batch / 256.0            # linear scaling rule
    return Schedules(
        lr=cosine_schedule(peak_lr, o.min_lr, o.epochs, steps_per_epoch, warmup_epochs=o.warmup_epochs),
        weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, steps_per_epoch),
        momentum=cosine_schedule(o.momentum_teacher, 1.0, o.epochs, steps_per_epoch),
        teacher_temp=teacher_temp_schedule(l.warmup_teacher_temp, l.teacher_temp, l.warmup_teacher_temp_epochs,
                                           o.epochs),
        steps_per_epoch=steps_per_epoch)
