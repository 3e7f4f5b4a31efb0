"""Memory plan: bytes per device of a config at each ZeRO stage, with and without activation checkpointing, what
fits, and the largest micro-batch that fits.

    python -m esvit_scale.bench plan --config configs/swin_large.yaml --gpus 64 --gpu-mem 80 [--json PATH]
    python -m esvit_scale.bench plan --config configs/quickstart.yaml --gpus 2 --gpu-mem 24 --device cpu

Terms per device, P = student parameters, N = devices, w = bytes of the training dtype (2 for bf16/fp16, 4 fp32),
B = DeepSpeed's bucket (deepspeed.bucket_elements, else its defaults: reduce 5e8, live 1e9, prefetch 5e7 elements):
    params      w P, / N at ZeRO-3                     the student's working copy
    grads       w P, / N from ZeRO-2 (ZeRO-3: the flat gradient partition); mixed precision adds fp32 gradients
                4 P, / N from ZeRO-1
    optimizer   Adam's two fp32 moments 8 P, / N from ZeRO-1, + fp32 master weights 4 P / N in mixed precision
                (ZeRO 0: 4 P) and at ZeRO-1/2 in fp32 too (DeepSpeed clones the flat partition there; ZeRO-3 in fp32
                steps the partition itself)
    teacher     fp32 4 P, / N at ZeRO-3 (the EMA teacher is partitioned like the student, esvit_scale/engine)
    buckets     DeepSpeed's buffers: the reduce bucket w min(P, B) from ZeRO-2; at ZeRO-3 also the gathered
                parameters, live w min(P, B) and prefetched w min(P, B)
    activations what the student's forward and the loss keep for backward at the micro-batch (counted exactly: the
                step runs on the meta device with a saved-tensor hook that adds up every tensor autograd keeps), plus
                the teacher's outputs (held through the student's step); with activation checkpointing the stage
                inputs kept plus one block recomputed at a time
    heap        CPU, ZeRO-3 only: every rank materialises each full parameter in turn (gathered for the teacher
                forward, the student forward and backward, then released); these pieces (< 32 MiB) come from glibc's
                heap, which keeps the freed chunks, so the heap grows by about one full student and teacher,
                w P + 4 P (measured, as peak RSS with and without MALLOC_MMAP_THRESHOLD_=131072, which makes glibc
                return them: 0.33 GiB for Swin-T's 40.6 M parameters in fp32 on 2 ranks; this term: 0.30 GiB)
    runtime     CPU: the peak resident size of the real step (bench step) on a model of negligible size at the same
                ZeRO stage and rank count (<= 2), measured: Python, torch, timm, DeepSpeed's engine and communication,
                our kernels (~0.86 GiB at ZeRO 0 on 1 rank, ~0.93 GiB at ZeRO 3 on 2 ranks); GPU: 0
                (max_memory_allocated does not see the CUDA context, ~0.5-1 GiB more)
The CPU total is checked against the peak RSS that `bench step` measures (tests/test_plan.py, docs/performance.md).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from esvit_scale.config import Config, load_config

STAGES = (0, 1, 2, 3)
DS_DEFAULT_BUCKET = int(5e8)          # DeepSpeed's reduce_bucket_size
DS_DEFAULT_LIVE = int(1e9)            # stage3_max_live_parameters
DS_DEFAULT_PREFETCH = int(5e7)        # stage3_prefetch_bucket_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/swin_tiny.yaml")
    parser.add_argument("--gpus", type=int, default=8, help="devices the run is spread over")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one device, GiB")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: plan CPU processes: add the measured runtime (a real step of a negligible model, "
                             "~80 s) and glibc's heap term")
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
    kept += _storage_bytes(teacher_out)
    if checkpointing:
        kept += _largest_block_bytes(cfg, batch, dtype)
    return kept


def _storage_bytes(out) -> int:
    """Bytes of the distinct storages behind the tensors of a model output (lists, tuples, dataclasses)."""
    tensors, todo = {}, [out]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            tensors[id(x.untyped_storage())] = x.untyped_storage().nbytes()
        elif isinstance(x, (list, tuple)):
            todo += list(x)
        elif dataclasses.is_dataclass(x):
            todo += [getattr(x, f.name) for f in dataclasses.fields(x)]
    return sum(tensors.values())


def _largest_block_bytes(cfg: Config, batch: int, dtype: torch.dtype) -> int:
    """Saved tensors of the most expensive block at the global crop size (what one recomputation holds)."""
    from esvit_scale.models.registry import build_backbone
    meta = torch.device("meta")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation_checkpointing=False))
    with meta:
        backbone = build_backbone(cfg.model, img_size=cfg.data.global_crops_size, kernels=cfg.kernels).to(dtype)
    blocks = {id(b) for stage in backbone.blocks_by_stage() for b in stage}
    x = torch.randn(2 * batch, 3, cfg.data.global_crops_size, cfg.data.global_crops_size, device=meta, dtype=dtype)
    largest = 0
    for module in backbone.modules_in_order():
        if id(module) in blocks:
            x, kept = saved_bytes(lambda: module(x.detach().requires_grad_()))
            largest = max(largest, kept)
        else:
            x = module(x)
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


def static_bytes(cfg: Config, params: int, gpus: int, stage: int, device: str = "gpu") -> dict[str, float]:
    """The model-state terms of the module docstring, bytes per device (`heap` only on the CPU)."""
    w = 4 if cfg.deepspeed.precision == "fp32" else 2
    mixed = w == 2
    n, P = gpus, params
    bucket = min(P, cfg.deepspeed.bucket_elements or DS_DEFAULT_BUCKET)
    live = min(P, cfg.deepspeed.bucket_elements or DS_DEFAULT_LIVE)
    prefetch = min(P, cfg.deepspeed.bucket_elements or DS_DEFAULT_PREFETCH)
    master = 4 * P / (n if stage >= 1 else 1) if (mixed or stage in (1, 2)) else 0
    gathered = w * (live + prefetch) if stage == 3 else 0
    return {
        "params": w * P / (n if stage == 3 else 1),
        "grads": w * P / (n if stage >= 2 else 1) + (4 * P / (n if stage >= 1 else 1) if mixed else 0),
        "optimizer": 8 * P / (n if stage >= 1 else 1) + master,
        "teacher": 4 * P / (n if stage == 3 else 1),
        "buckets": (w * bucket if stage >= 2 else 0) + gathered,
        "heap": (w + 4) * P if stage == 3 and device == "cpu" else 0,
    }


def measured_runtime_bytes(stage: int, ranks: int) -> int:
    """Peak RSS of `bench step` on a model of negligible size (swin_nano with 16-wide heads, one 32 px image, a few
    thousand parameters) at this ZeRO stage on `ranks` processes (torchrun when > 1): what the CPU process holds
    besides the plan's tensors."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from esvit_scale.engine.distributed import free_port
    overrides = ["model.arch=swin_nano", "model.window_size=4", "model.out_dim=16", "model.head_hidden_dim=16",
                 "model.head_bottleneck_dim=16", "data.batch_size_per_gpu=1", "data.global_crops_size=32",
                 "data.local_crops_size=[16]", "data.local_crops_number=[2]", "deepspeed.precision=fp32",
                 "run.device=cpu", f"deepspeed.zero_stage={stage}"]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    peaks = []
    for _ in range(2):       # the smaller of two: once, in a fresh clone, one run read 1.66 GiB against the usual 0.86
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "runtime.json")
            # the paper's objective (both loss terms, both kernels loaded), not the small-data quickstart recipe
            cmd = [*launcher, "-m", "esvit_scale.bench", "step", "--config", "configs/digits_paper.yaml", "--warmup",
                   "1", "--steps", "1", "--json", out, *overrides, f"run.output_dir={tmp}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
            if proc.returncode != 0:
                raise RuntimeError(f"measuring the CPU runtime failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
            with open(out) as f:
                peaks.append(int(json.load(f)["peak_memory_bytes"]))
    return min(peaks)


def cpu_runtime(gpus: int) -> dict[int, int]:
    """The measured runtime term per ZeRO stage: stage 0's run serves stages 0-2, stage 3 has its own."""
    ranks = min(gpus, 2)
    zero0, zero3 = measured_runtime_bytes(0, ranks), measured_runtime_bytes(3, ranks)
    return {0: zero0, 1: zero0, 2: zero0, 3: zero3}


def plan(cfg: Config, gpus: int, gpu_mem_gib: float, runtime: dict[int, int] | None = None) -> dict:
    """The plan of every (ZeRO stage, checkpointing) setting. runtime: bytes per ZeRO stage of the CPU runtime
    (cpu_runtime); given, the plan is for CPU processes (adds the heap term), else for GPUs."""
    params = parameter_count(cfg)
    batch = cfg.data.batch_size_per_gpu
    device = "gpu" if runtime is None else "cpu"
    act = {ck: activation_bytes(cfg, batch, ck) for ck in (False, True)}
    act_per_image = {ck: activation_bytes(cfg, 1, ck) for ck in (False, True)}
    budget = gpu_mem_gib * 2**30
    settings = []
    for stage in STAGES:
        static = static_bytes(cfg, params, gpus, stage, device)
        rt = 0 if runtime is None else runtime[stage]
        for ck in (False, True):
            total = sum(static.values()) + act[ck] + rt
            free = budget - sum(static.values()) - rt
            # activations grow linearly in the batch: the per-image figure, with the batch-1 constant removed
            per_image = max(act[ck] - act_per_image[ck], 1) / max(batch - 1, 1) if batch > 1 else act_per_image[ck]
            base = act_per_image[ck] - per_image
            max_batch = int((free - base) // per_image) if free > base else 0
            settings.append({"zero_stage": stage, "activation_checkpointing": ck, **static,
                             "activations": act[ck], "runtime": rt, "total": total, "fits": total <= budget,
                             "max_micro_batch": max(max_batch, 0)})
    return {"config_arch": cfg.model.arch, "parameters": params, "gpus": gpus, "gpu_mem_gib": gpu_mem_gib,
            "micro_batch": batch, "precision": cfg.deepspeed.precision, "device": device, "settings": settings}


def setting(result: dict, zero_stage: int, activation_checkpointing: bool) -> dict:
    return next(s for s in result["settings"] if s["zero_stage"] == zero_stage
                and s["activation_checkpointing"] == activation_checkpointing)


def run(args) -> None:
    cfg = load_config(args.config, args.overrides)
    runtime = cpu_runtime(args.gpus) if args.device == "cpu" else None
    result = plan(cfg, args.gpus, args.gpu_mem, runtime)
    gib = 2**30
    print(f"{args.config}: {result['config_arch']}, {result['parameters'] / 1e6:.1f} M parameters, "
          f"{cfg.deepspeed.precision}, micro-batch {result['micro_batch']}, {args.gpus} devices of {args.gpu_mem} GiB")
    terms = ("params", "grads", "optimizer", "teacher", "buckets", "activations", "heap", "runtime", "total")
    print(f"{'ZeRO':>4} {'ckpt':>5} " + " ".join(f"{t[:7]:>7}" for t in terms)
          + "  fits  max micro-batch   (GiB per device)")
    for s in result["settings"]:
        print(f"{s['zero_stage']:>4} {str(s['activation_checkpointing']):>5} " + " ".join(
            f"{s[k] / gib:7.2f}" for k in terms) + f"  {'yes' if s['fits'] else 'no ':>4}  {s['max_micro_batch']}")
    from esvit_scale.bench.report import write_json
    write_json({"config": args.config, "overrides": args.overrides, **result}, args.json)
