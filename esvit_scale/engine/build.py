"""Building what a run trains and checkpoints, from the config: nothing here loads a checkpoint.

    student, teacher = build_models(cfg, world_size, whole)      # the modules, from one seed
    (run.init_from loads full weights into them here: checkpoint/restore.initialise_from)
    parts = assemble(cfg, student, teacher, loss_fn, split, device, copy_teacher=...)

`Parts` is what the checkpoints save and load (checkpoint/store.py, checkpoint/restore.py) and what the training
step runs (step.py).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from esvit_scale.engine.student import BatchSplit

log = logging.getLogger("esvit_scale")


@dataclass
class Parts:
    engine: object                   # the student under DeepSpeed
    optimizer: object
    teacher: object                  # engine.teacher.TeacherEMA
    loss_fn: torch.nn.Module         # losses.esvit_loss.EsViTLoss: its centres are state too
    kernels: dict = field(default_factory=dict)     # the implementation each fused op runs (ops/self_check.py)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the student engine trains in (its inputs are cast to it)."""
        engine = self.engine
        return (torch.bfloat16 if engine.bfloat16_enabled() else
                torch.float16 if engine.fp16_enabled() else torch.float32)


def build_models(cfg, world_size: int, whole: bool = False):
    """(student, teacher) from one seed, so every rank starts from the same weights; built partitioned at ZeRO-3
    with deepspeed.zero_init (engine.student.model_init_context) unless `whole` (init_from loads full tensors)."""
    from esvit_scale.engine.student import model_init_context
    from esvit_scale.models.esvit import EsViT
    torch.manual_seed(cfg.run.seed)
    with contextlib.nullcontext() if whole else model_init_context(cfg, world_size):
        student = EsViT(cfg)
    with contextlib.nullcontext() if whole else model_init_context(cfg, world_size, teacher=True):
        teacher = EsViT(cfg, is_teacher=True)
    if cfg.model.compile:       # compiled on their first forward (and again for each new crop shape)
        student.compile_parts()
        teacher.compile_parts()
        log.info("model.compile: backbone and heads of student and teacher compiled with torch.compile (inductor)")
    return student, teacher


def build_loss(cfg, split: BatchSplit) -> torch.nn.Module:
    from esvit_scale.losses.esvit_loss import EsViTLoss
    return EsViTLoss(cfg.loss, cfg.model.out_dim, accumulation=split.accumulation)


def assemble(cfg, student, teacher, loss_fn, split: BatchSplit, device: torch.device, copy_teacher: bool,
             rank: int = 0) -> Parts:
    """The student under DeepSpeed (its checkpoint files read and written safely), the EMA teacher beside it (a copy
    of the student when `copy_teacher`), the loss on the device. Seeds this rank's stream of random draws (drop
    path) afterwards: a resume replaces it with the saved one."""
    from esvit_scale.checkpoint.files import use_safe_checkpoint_engine
    from esvit_scale.engine.student import build_student_engine
    from esvit_scale.engine.teacher import TeacherEMA
    engine, optimizer = build_student_engine(cfg, student, split.world_size)
    use_safe_checkpoint_engine(engine)
    ema = TeacherEMA(teacher, engine, cfg, split.world_size)
    if copy_teacher:
        ema.copy_from_student()
    parts = Parts(engine, optimizer, ema, loss_fn.to(device))
    parts.kernels = check_kernels(cfg, parts, device)
    torch.manual_seed(cfg.run.seed + 1000 * rank)       # drop-path draws differ per rank
    return parts


def check_kernels(cfg, parts: Parts, device: torch.device) -> dict[str, str]:
    """Each fused op in use against its reference, before any step (kernels.self_check); an op that fails falls back
    to its reference on every rank. Returns {op: the implementation it runs}."""
    from esvit_scale.engine import collectives
    from esvit_scale.ops import _ext
    from esvit_scale.ops.self_check import self_check
    device = torch.device(device)
    if not cfg.kernels.self_check:
        return {op: _ext.implementation(op, device, parts.input_dtype) for op in _ext.OPS}
    return self_check(cfg, parts.teacher.module.backbone, device, parts.input_dtype, collectives.first_error,
                      main=collectives.rank() == 0)


def build_parts(cfg, split: BatchSplit, device: torch.device, rank: int = 0) -> Parts:
    """Fresh parts: the teacher starts equal to the student."""
    student, teacher = build_models(cfg, split.world_size)
    return assemble(cfg, student, teacher, build_loss(cfg, split), split, device, copy_teacher=True, rank=rank)
