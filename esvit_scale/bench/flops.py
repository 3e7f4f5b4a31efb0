"""Model FLOPs of an EsViT training step, counted by torch's FLOP counter on the model itself (not a formula).

    flops = step_flops(cfg)       # per micro-batch of cfg.data.batch_size_per_gpu images
    flops.per_image, flops.teacher_forward, flops.student_forward, flops.loss, flops.backward, flops.by_crop_size

Convention: FLOP = 2 x MAC (one multiply-add counts 2); only matrix products are counted (torch's counter counts
mm/bmm/addmm/conv/attention, not element-wise work), as in the published Swin figures (Swin-T at 224 px: 4.5 G
multiply-adds per forward). The optimizer and the EMA update (element-wise) count nothing. Model FLOPs: activation
checkpointing's recomputation and the fused backward's recomputed attention scores are not counted (MFU convention).

The step runs on the meta device (shapes only: any model size, no memory, no time), where every op takes its
pure-PyTorch reference path. Our fused kernels are torch operators (esvit::...) with formulas registered here
(KERNEL_FLOPS, passed to the counter), so a step counted on real tensors with the kernels on gives the same count
(tests/test_flops.py checks both).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from esvit_scale.config import Config

CONVENTION = "FLOP = 2 x MAC; matrix products only (torch.utils.flop_counter), model FLOPs (no recomputation)"


def _window_attention_forward_flops(qkv_shape, table_shape, rel_shape, region_shape, num_heads, scale,
                                    out_shape=None) -> int:
    """q k^T and attn v: 2 x (B_ H N N D) multiply-adds, as the reference's two batched matmuls count."""
    windows, n, c3 = qkv_shape
    return 2 * 2 * windows * n * n * (c3 // 3)


def _window_attention_backward_flops(grad_shape, qkv_shape, *args, out_shape=None) -> int:
    """Twice the forward: the gradients of both products w.r.t. both inputs (autograd's count of the reference;
    the kernel also recomputes q k^T, hardware work that is not model FLOPs)."""
    return 2 * _window_attention_forward_flops(qkv_shape, None, None, None, None, None)


def _region_argmax_flops(student_shape, teacher_shape, out_shape=None) -> int:
    """Cosine similarity of every student token with every teacher token: (N, Ls, C) x (N, C, Lt)."""
    n, ls, c = student_shape
    return 2 * n * ls * teacher_shape[1] * c


def kernel_flop_formulas() -> dict:
    """{our operator: FLOP formula} for FlopCounterMode(custom_mapping=...). The matched cross-entropy has no
    matrix product (its reference neither), so it is not listed."""
    import esvit_scale.ops.region_matching  # noqa: F401  (registers the operators)
    import esvit_scale.ops.window_attention  # noqa: F401
    ops = torch.ops.esvit
    return {ops.window_attention_forward: _window_attention_forward_flops,
            ops.window_attention_backward: _window_attention_backward_flops,
            ops.region_argmax: _region_argmax_flops}


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=kernel_flop_formulas())


@dataclass
class StepFlops:
    """FLOPs of one micro-batch of `batch` images, by phase; by_crop_size: the student's forward FLOPs per image
    of one crop of each size (backbone + heads)."""
    batch: int
    teacher_forward: int
    student_forward: int
    loss: int
    backward: int
    by_crop_size: dict[int, int]

    @property
    def total(self) -> int:
        return self.teacher_forward + self.student_forward + self.loss + self.backward

    @property
    def per_image(self) -> float:
        return self.total / self.batch

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total, "per_image": self.per_image,
                "convention": CONVENTION}


def crop_sizes(cfg: Config) -> list[int]:
    """The size of every crop of a batch, in loader order: 2 global crops, then the local crops of each size."""
    sizes = [cfg.data.global_crops_size] * 2
    for size, number in zip(cfg.data.local_crops_size, cfg.data.local_crops_number):
        sizes += [size] * number
    return sizes


def _model_flops_config(cfg: Config) -> Config:
    """cfg without activation checkpointing (recomputation is not model FLOPs)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation_checkpointing=False))


def step_flops(cfg: Config, batch: int | None = None) -> StepFlops:
    """Count one step of `batch` images (default: data.batch_size_per_gpu) on the meta device. The global random
    generators are left as they were (a resumed run must draw what the uninterrupted one drew)."""
    with torch.random.fork_rng(devices=[]):
        return _step_flops(cfg, batch)


def _step_flops(cfg: Config, batch: int | None) -> StepFlops:
    from esvit_scale.losses.esvit_loss import EsViTLoss
    from esvit_scale.models.esvit import EsViT

    cfg = _model_flops_config(cfg)
    batch = batch or cfg.data.batch_size_per_gpu
    meta = torch.device("meta")
    with meta:      # only the construction: window layouts are made on the CPU, then moved
        student, teacher = EsViT(cfg), EsViT(cfg, is_teacher=True).requires_grad_(False)
        loss_fn = EsViTLoss(cfg.loss, cfg.model.out_dim)
    crops = [torch.randn(batch, 3, s, s, device=meta) for s in crop_sizes(cfg)]
    phases = {}
    with counter() as c:
        with torch.no_grad():
            teacher_out = teacher(crops[:2])
    phases["teacher_forward"] = c.get_total_flops()
    with counter() as c:
        student_out = student(crops)
    phases["student_forward"] = c.get_total_flops()
    with counter() as c:
        loss = loss_fn(student_out, teacher_out, cfg.loss.teacher_temp)["loss"]
    phases["loss"] = c.get_total_flops()
    with counter() as c:
        loss.backward()
    phases["backward"] = c.get_total_flops()

    by_size = {}
    for size in sorted(set(crop_sizes(cfg))):      # per image, counted on two (a batch-normalised head needs two)
        with counter() as c, torch.no_grad():
            student([torch.randn(2, 3, size, size, device=meta)])
        by_size[size] = c.get_total_flops() // 2
    return StepFlops(batch=batch, by_crop_size=by_size, **phases)


def backbone_flops(cfg: Config, size: int) -> int:
    """FLOPs of the backbone's forward pass over one size x size image (Swin-T, 224: 2 x 4.5 G)."""
    from esvit_scale.models.registry import build_backbone
    meta = torch.device("meta")
    with meta:
        backbone = build_backbone(cfg.model, img_size=size, kernels=cfg.kernels)
    with counter() as c, torch.no_grad():
        backbone(torch.randn(1, 3, size, size, device=meta))
    return c.get_total_flops()
