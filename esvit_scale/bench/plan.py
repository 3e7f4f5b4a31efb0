"""Memory plan: bytes per device of a config at each ZeRO stage, with and without activation checkpointing, what
fits, and the largest micro-batch that fits.

    python -m esvit_scale.bench plan --config configs/swin_large.yaml --gpus 64 --gpu-mem 80 [--json PATH]

Terms per device, P = student parameters, N = devices, w = bytes of the training dtype (2 for bf16/fp16, 4 fp32):
    params      w P, / N at ZeRO-3                     the student's working copy
    grads       w P, / N from ZeRO-2; mixed precision adds fp32 gradients 4 P, / N from ZeRO-1
    optimizer   Adam's two fp32 moments 8 P, + fp32 master weights 4 P in mixed precision; / N from ZeRO-1
    teacher     fp32 4 P, / N at ZeRO-3 (the EMA teacher is partitioned like the student, esvit_scale/engine)
    buckets     DeepSpeed's communication buffers: min(P, bucket) w from ZeRO-2, + the live gathered parameters at
                ZeRO-3 (min(P, max live) w)
    activations what the student's forward keeps for backward at the micro-batch (counted exactly: the step runs on
                the meta device with a saved-tensor hook that adds up every tensor autograd keeps), with activation
                checkpointing the stage inputs kept plus one block recomputed at a time
    runtime     CPU: the process's resident size before any model (Python, torch, DeepSpeed), measured; GPU: 0
                (max_memory_allocated does not see the CUDA context, ~0.5-1 GiB more)
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from esvit_scale.config import Config, load_config

STAGES = (0, 1, 2, 3)
DS_DEFAULT_BUCKET = int(5e8)          # DeepSpeed's reduce_bucket_size
DS_DEFAULT_LIVE = int(1e9)            # stage3_max_live_parameters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/swin_tiny.yaml")
    parser.add_argument("--gpus", type=int, default=8, help="devices the run is spread over")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one device, GiB")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: add this process's measured runtime (Python, torch, DeepSpeed) to every plan")
    parser.add_argument("--json", help="write the plan here")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")


def parameter_count(cfg: Config) -> int:
    from esvit_scale.models.esvit import EsViT
    with torch.device("meta"):
        return sum(p.numel() for p in EsViT(cfg).parameters() if p.requires_grad)


def activation_bytes(cfg: Config, batch: int, checkpointing: bool) -> int:
    """Bytes autograd keeps from the student's forward and the loss for backward, at `batch` images, counted on
    the meta device in the training dtype; with checkpointing, plus the largest block recomputed in backward."""
    from esvit_scale.bench.flops import crop_sizes
    from esvit_scale.losses.esvit_loss import EsViTLoss
    from esvit_scale.models.esvit import EsViT
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.deepspeed.precision]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation_checkpointing=checkpointing))
    meta = torch.device("meta")
    with meta:
        student = EsViT(cfg).to(dtype)
        teacher = EsViT(cfg, is_teacher=True).requires_grad_(False)
        loss_fn = EsViTLoss(cfg.loss, cfg.model.out_dim)
    crops = [torch.randn(batch, 3, s, s, device=meta, dtype=dtype) for s in crop_sizes(cfg)]
    with torch.no_grad():
        teacher_out = teacher([c.float() for c in crops[:2]])
    with torch.random.fork_rng(devices=[]):
        _, kept = saved_bytes(lambda: loss_fn(student(crops), teacher_out, cfg.loss.teacher_temp))
    if checkpointing:
        kept += _largest_block_bytes(cfg, batch, dtype)
    return kept


def _largest_block_bytes(cfg: Config, batch: int, dtype: torch.dtype) -> int:
    """Saved tensors of the most expensive block at the global crop size (what one recomputation holds)."""
    from esvit_scale.models.swin import SwinBackbone
    meta = torch.device("meta")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation_checkpointing=False))
    with meta:
        swin = SwinBackbone(cfg.model, img_size=cfg.data.global_crops_size, kernels=cfg.kernels).swin.to(dtype)
    x = swin.patch_embed(torch.randn(2 * batch, 3, cfg.data.global_crops_size, cfg.data.global_crops_size,
                                     device=meta, dtype=dtype))
    largest = 0
    for stage in swin.layers:
        x = stage.downsample(x)
        for block in stage.blocks:
            x, kept = saved_bytes(lambda: block(x.detach().requires_grad_()))
            largest = max(largest, kept)
    return largest


def saved_bytes(fn):
    """(fn(), bytes of the tensors autograd saved for backward while running it), parameters (and views of them)
    excluded: they are counted as model state. Each tensor once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)):
            seen.setdefault(id(t), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def runtime_bytes() -> int:
    """Resident size of this process now (after importing torch and DeepSpeed, before any model)."""
    import deepspeed  # noqa: F401
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def static_bytes(cfg: Config, params: int, gpus: int, stage: int) -> dict[str, float]:
    """The model-state terms of the module docstring, bytes per device."""
    w = 4 if cfg.deepspeed.precision == "fp32" else 2
    mixed = w == 2
    n = gpus
    bucket = cfg.deepspeed.bucket_elements or DS_DEFAULT_BUCKET
    live = cfg.deepspeed.bucket_elements or DS_DEFAULT_LIVE
    return {
        "params": w * params / (n if stage == 3 else 1),
        "grads": w * params / (n if stage >= 2 else 1) + (4 * params / (n if stage >= 1 else 1) if mixed else 0),
        "optimizer": (8 + (4 if mixed else 0)) * params / (n if stage >= 1 else 1),
        "teacher": 4 * params / (n if stage == 3 else 1),
        "buckets": (w * min(params, bucket) if stage >= 2 else 0) + (w * min(params, live) if stage == 3 else 0),
    }


def plan(cfg: Config, gpus: int, gpu_mem_gib: float, runtime: int = 0) -> dict:
    params = parameter_count(cfg)
    batch = cfg.data.batch_size_per_gpu
    act = {ck: activation_bytes(cfg, batch, ck) for ck in (False, True)}
    act_per_image = {ck: activation_bytes(cfg, 1, ck) for ck in (False, True)}
    budget = gpu_mem_gib * 2**30
    settings = []
    for stage in STAGES:
        static = static_bytes(cfg, params, gpus, stage)
        for ck in (False, True):
            total = sum(static.values()) + act[ck] + runtime
            free = budget - sum(static.values()) - runtime
            # activations grow linearly in the batch: the per-image figure, with the batch-1 constant removed
            per_image = max(act[ck] - act_per_image[ck], 1) / max(batch - 1, 1) if batch > 1 else act_per_image[ck]
            base = act_per_image[ck] - per_image
            max_batch = int((free - base) // per_image) if free > base else 0
            settings.append({"zero_stage": stage, "activation_checkpointing": ck, **static,
                             "activations": act[ck], "runtime": runtime, "total": total, "fits": total <= budget,
                             "max_micro_batch": max(max_batch, 0)})
    return {"config_arch": cfg.model.arch, "parameters": params, "gpus": gpus, "gpu_mem_gib": gpu_mem_gib,
            "micro_batch": batch, "precision": cfg.deepspeed.precision, "settings": settings}


def run(args) -> None:
    cfg = load_config(args.config, args.overrides)
    runtime = runtime_bytes() if args.device == "cpu" else 0
    result = plan(cfg, args.gpus, args.gpu_mem, runtime)
    gib = 2**30
    print(f"{args.config}: {result['config_arch']}, {result['parameters'] / 1e6:.1f} M parameters, "
          f"{cfg.deepspeed.precision}, micro-batch {result['micro_batch']}, {args.gpus} devices of {args.gpu_mem} GiB")
    print(f"{'ZeRO':>4} {'ckpt':>5} {'params':>7} {'grads':>7} {'optim':>7} {'teacher':>7} {'buckets':>7} "
          f"{'activ':>7} {'total':>7}  fits  max micro-batch   (GiB per device)")
    for s in result["settings"]:
        print(f"{s['zero_stage']:>4} {str(s['activation_checkpointing']):>5} " + " ".join(
            f"{s[k] / gib:7.2f}" for k in ("params", "grads", "optimizer", "teacher", "buckets", "activations",
                                            "total")) + f"  {'yes' if s['fits'] else 'no ':>4}  {s['max_micro_batch']}")
    from esvit_scale.bench.report import write_json
    write_json({"config": args.config, "overrides": args.overrides, **result}, args.json)
