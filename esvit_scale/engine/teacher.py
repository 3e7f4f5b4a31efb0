"""The EMA teacher, at every ZeRO stage.

Stages 0-2 keep the full student parameters on every rank, so the teacher is a plain module. At stage 3
the teacher is partitioned exactly like the student (a parameter-only ZeRO-3 engine over the same
architecture and world size), so that rank r's shard of teacher parameter i lines up with rank r's shard
of student parameter i: the EMA update is then purely local, and nothing is gathered.
The teacher keeps fp32 weights whatever the training precision (an EMA step of 1e-3 would vanish in bf16).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from esvit_scale.engine.student import deepspeed_config


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a parameter: its ZeRO-3 shard, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class TeacherEMA:
    def __init__(self, teacher: nn.Module, student_engine, cfg, world_size: int):
        teacher.requires_grad_(False)
        self.partitioned = cfg.deepspeed.zero_stage == 3
        if self.partitioned:
            import deepspeed
            config = deepspeed_config(cfg, world_size)
            config.update(bf16={"enabled": False}, fp16={"enabled": False}, gradient_clipping=0.0)
            self.engine, *_ = deepspeed.initialize(model=teacher, config=config)
            self.module = self.engine.module
        else:
            self.engine = None
            self.module = teacher.to(student_engine.device)
        self.module.eval()
        t_named = list(self.module.named_parameters())
        s_named = list(student_engine.module.named_parameters())
        if [n for n, _ in t_named] != [n for n, _ in s_named]:
            raise RuntimeError("teacher and student parameters differ: they must share one architecture")
        self.names = [n for n, _ in t_named]
        self.teacher_params = [p for _, p in t_named]
        self.student_params = [p for _, p in s_named]

    @torch.no_grad()
    def copy_from_student(self) -> None:
        for t, s in zip(self.teacher_params, self.student_params):
            _local(t).copy_(_local(s))

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, shard by shard."""
        teacher = [_local(t) for t in self.teacher_params]
        student = [_local(s).to(torch.float32) for s in self.student_params]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    @torch.no_grad()
    def __call__(self, crops):
        return (self.engine or self.module)(crops)

    # ------------------------------------------------------------------ full weights, one parameter at a time

    def _gathered(self, p):
        if self.partitioned:
            import deepspeed
            return deepspeed.zero.GatheredParameters([p])
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full teacher on the CPU (collective at stage 3: every rank must call it)."""
        state = {}
        for name, p in zip(self.names, self.teacher_params):
            with self._gathered(p):
                state[name] = p.data.detach().to("cpu", copy=True)
        return state

    # ------------------------------------------------------------------ this rank's shards (ZeRO-3: nothing gathered)

    def local_state(self) -> dict:
        """This rank's piece of every parameter and the full shapes: at ZeRO-3 rank r holds elements
        [r * n, (r + 1) * n) of each flattened parameter (n = ceil(numel / world size), the last piece padded)."""
        params = self.teacher_params
        return {"names": list(self.names), "shapes": [list(getattr(p, "ds_shape", p.shape)) for p in params],
                "shards": [_local(p).detach().to("cpu", copy=True) for p in params]}

    @torch.no_grad()
    def load_local_state(self, state: dict) -> None:
        if state["names"] != self.names:
            raise KeyError("the teacher shard's parameters are not this model's")
        for p, shard in zip(self.teacher_params, state["shards"]):
            _local(p).copy_(shard)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"teacher state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, p in zip(self.names, self.teacher_params):
            full = state[name].to(torch.float32)
            if self.partitioned:       # copy this rank's slice of the flattened parameter into its shard
                shard = p.ds_tensor
                start = shard.numel() * torch.distributed.get_rank()
                piece = full.flatten()[start:start + shard.numel()]
                shard.zero_()
                shard[:piece.numel()].copy_(piece)
            else:
                p.data.copy_(full)
