"""Before a run trains: each fused op it will use runs once against its PyTorch reference, on the device, in the
training dtype, on the shapes the config gives it; an op that fails falls back to its reference for the whole run.

    implementations = self_check(cfg, backbone, device, dtype, first_error=collectives.first_error)

What is checked (kernels.self_check): window attention forward and backward (the gradient of qkv and of the
relative-position bias table) for every distinct window layout of every stage at every crop size; the region
argmax (the match found must be a best match) and the matched cross-entropy with its gradient, for every student
crop size against the global crops. A difference beyond TOLERANCE of the reference's scale, an exception, or a
device the extension was not built for makes the op fall back on every rank (one warning naming the op, the device,
the shapes and the error). The result, per op, goes to the log and to summary.json (`kernels`).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
from torch import nn

from esvit_scale.ops import _ext
from esvit_scale.ops.region_matching import (matched_soft_cross_entropy_sum, matched_soft_cross_entropy_sum_reference,
                                             region_argmax)
from esvit_scale.ops.swin_attention import OUR_BLOCKS, window_layout
from esvit_scale.ops.window_attention import window_attention, window_attention_reference

log = logging.getLogger("esvit_scale.ops")

# largest |kernel - reference| allowed, relative to the largest |reference|; the reference runs in float32 (float64
# for float64) on the same rounded inputs, so this bounds the kernel's own error
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def self_check(cfg, backbone: nn.Module, device: torch.device, dtype: torch.dtype,
               first_error: Callable[[Optional[str]], Optional[str]] = lambda e: e, main: bool = True
               ) -> dict[str, str]:
    """Check each fused op the run will use; returns {op: the implementation it runs}. `first_error` agrees on one
    error across the ranks (engine.collectives.first_error), so that every rank falls back together; the `main`
    rank reports."""
    if device.type == "cuda" and _ext.cuda_available():
        runs, line = _ext.cuda_arch_in_build(device)
        if main:
            (log.info if runs else log.warning)("CUDA kernels: %s", line)
    cases = {"window_attention": lambda: _attention_cases(backbone, _crop_sizes(cfg), device, dtype),
             "region_matching": lambda: _region_cases(cfg, backbone, device, dtype)}
    for op, make in cases.items():
        if not _in_use(cfg, op, device, dtype):
            continue
        start, problem = time.perf_counter(), None
        try:
            for shapes, check in make():
                problem = check()
                if problem:
                    problem = f"{problem} at {shapes}"
                    break
        except Exception as e:             # noqa: BLE001 -- any failure of the kernel is a reason to fall back
            problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        problem = first_error(problem)
        if problem:
            _ext.fall_back(op, f"self-check failed: {problem}")
        if problem and main:
            log.warning("kernel self-check: op %s on %s (%s) failed: %s; it runs the PyTorch reference for this run",
                        op, _device_name(device), str(dtype).replace("torch.", ""), problem)
        elif main:
            log.info("kernel self-check: op %s passed on %s (%s) in %.2f s", op, _device_name(device),
                     str(dtype).replace("torch.", ""), time.perf_counter() - start)
    return {op: _ext.implementation(op, device, dtype) for op in _ext.OPS}


def _in_use(cfg, op: str, device: torch.device, dtype: torch.dtype) -> bool:
    if op == "region_matching" and not cfg.loss.region_loss:
        return False
    return not _ext.implementation(op, device, dtype).startswith("reference")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"cpu ({_ext.cpu_isa()})"


def _crop_sizes(cfg) -> list[int]:
    return sorted({cfg.data.global_crops_size, *cfg.data.local_crops_size}, reverse=True)


def _reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _error(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> Optional[str]:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return f"{what}: not finite"
    scale = want.abs().max().clamp_min(1e-6)
    error = float((got - want).abs().max() / scale)
    return f"{what}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}" if error > TOLERANCE[dtype] else None


def _attention_cases(backbone: nn.Module, crops: list[int], device, dtype):
    """One case per distinct (window layout, heads, channels) over every block and crop size."""
    seen = set()
    for stage, blocks in enumerate(backbone.blocks_by_stage()):
        for block in blocks:
            if not isinstance(block, OUR_BLOCKS):
                continue
            heads, dim = block.attn.num_heads, block.dim
            for crop in crops:
                side = backbone.token_grid(crop)[stage]
                key = (side, tuple(block.window_size), tuple(block.shift_size), heads, dim)
                if key in seen:
                    continue
                seen.add(key)
                shapes = (f"stage {stage}, {crop} px crop: {side}x{side} tokens, window {tuple(block.window_size)}, "
                          f"shift {tuple(block.shift_size)}, {heads} heads x {dim // heads}")
                yield shapes, lambda k=key, b=block: _check_attention(b, *k, device, dtype)


def _check_attention(block, side, window, shift, heads, dim, device, dtype) -> Optional[str]:
    gen = torch.Generator(device="cpu").manual_seed(side * 7919 + dim)
    _, _, region = window_layout(side, side, window, shift, device)
    n_windows = region.shape[0] if region is not None else (-(-side // window[0])) * (-(-side // window[1]))
    qkv = torch.randn(n_windows, window[0] * window[1], 3 * dim, generator=gen).to(device, dtype)
    table = (0.02 * torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, generator=gen)).to(device, dtype)
    rel_index = block.attn.relative_position_index.to(device)
    grad_out = torch.randn(n_windows, window[0] * window[1], dim, generator=gen).to(device, dtype)
    scale = (dim // heads) ** -0.5
    results = []
    for fused in (True, False):
        q = (qkv if fused else qkv.to(_reference_dtype(dtype))).detach().requires_grad_(True)
        t = (table if fused else table.to(_reference_dtype(dtype))).detach().requires_grad_(True)
        if fused:
            out = window_attention(q, t, rel_index, region, heads, scale, use_kernel=True)
        else:
            out = window_attention_reference(q, t, rel_index, region, heads, scale)
        out.backward(grad_out.to(out.dtype))
        results.append((out.detach(), q.grad, t.grad))
    (out, dq, dt), (out_ref, dq_ref, dt_ref) = results
    return (_error(out, out_ref, dtype, "forward") or _error(dq, dq_ref, dtype, "gradient of qkv")
            or _error(dt, dt_ref, dtype, "gradient of the bias table"))


def _region_cases(cfg, backbone: nn.Module, device, dtype):
    channels, prototypes = backbone.num_features, cfg.model.out_dim
    teacher_side = backbone.token_grid(cfg.data.global_crops_size)[-1]
    for crop in _crop_sizes(cfg):
        side = backbone.token_grid(crop)[-1]
        shapes = (f"student {crop} px crop: {side}x{side} tokens against 2 global crops of {teacher_side}x"
                  f"{teacher_side}, {channels} channels, K={prototypes}")
        yield shapes, lambda s=side * side, t=teacher_side ** 2: _check_region(s, t, channels, prototypes, cfg,
                                                                            device, dtype)


def _check_region(student_tokens, teacher_tokens, channels, prototypes, cfg, device, dtype) -> Optional[str]:
    gen = torch.Generator(device="cpu").manual_seed(student_tokens * 31 + teacher_tokens)
    images, ref = 2, _reference_dtype(dtype)
    student = torch.randn(images, student_tokens, channels, generator=gen).to(device, dtype)
    teacher = torch.randn(images, teacher_tokens, channels, generator=gen).to(device, dtype)
    index = region_argmax(student, teacher)
    similarity = torch.einsum("nsc,ntc->nst", nn.functional.normalize(student.to(ref), dim=-1),
                              nn.functional.normalize(teacher.to(ref), dim=-1))
    chosen = similarity.gather(2, index.long().unsqueeze(-1)).squeeze(-1)
    if (chosen < similarity.amax(dim=2) - 10 * TOLERANCE[dtype]).any():
        return "region argmax: a match that is not a best match"
    logits = torch.randn(images, student_tokens, prototypes, generator=gen).to(device, dtype)
    probs = torch.softmax(torch.randn(2, images, teacher_tokens, prototypes, generator=gen), dim=-1).to(device, dtype)
    matches = {0: index, 1: index.flip(0)}
    losses, grads = [], []
    for fused in (True, False):
        x = (logits if fused else logits.to(ref)).detach().requires_grad_(True)
        p = probs if fused else probs.to(ref)
        fn = matched_soft_cross_entropy_sum if fused else matched_soft_cross_entropy_sum_reference
        loss = fn(x, p, matches, cfg.loss.student_temp)
        loss.backward()
        losses.append(loss.detach().reshape(1))
        grads.append(x.grad)
    return (_error(losses[0], losses[1], dtype, "matched cross-entropy")
            or _error(grads[0], grads[1], dtype, "gradient of the matched cross-entropy"))
