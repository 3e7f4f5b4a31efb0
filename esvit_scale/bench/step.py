"""Throughput of the real training step: images/s, achieved TFLOP/s, MFU, peak memory and the phase split.

    python -m esvit_scale.bench step --config configs/swin_tiny.yaml data.batch_size_per_gpu=4 --json runs/step.json
    torchrun --nproc_per_node 2 -m esvit_scale.bench step --config configs/quickstart.yaml --json runs/step2.json

The step is esvit_scale.step's, the one the trainer runs: the DeepSpeed engine at the configured ZeRO stage and
precision, the EMA teacher, the loss and its schedules. Each timed step is one optimizer step of one micro-batch
(gradient accumulation 1, whatever the config says: a step of N micro-batches only adds N-1 of the same) on
synthetic crops of the config's sizes, made beforehand (`--data synthetic`, the default), or on batches of the
real loader (`--data loader`: data.path, or the generated quickstart folder). Warm-up steps first (allocations,
JIT builds, caches), then timed steps, each device-synchronised at its phase edges.

Reported per device: achieved model TFLOP/s (FLOPs counted by esvit_scale.bench.flops, FLOP = 2 x MAC) and MFU
against the peak of esvit_scale.bench.peak (GPU: datasheet table; CPU: a matmul measured now at the same thread
count on every rank at once, reported too). Peak memory: the process's peak RSS on the CPU (getrusage, includes
the Python runtime and libraries), torch.cuda.max_memory_allocated on a GPU; the largest over ranks.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from esvit_scale.bench.report import write_json
from esvit_scale.config import Config, load_config
from esvit_scale.engine import collectives
from esvit_scale.step import PHASES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--json", help="write the results here (rank 0)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--data", choices=("synthetic", "loader"), default="synthetic")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: as the trainer sets them, run.cpu_threads)")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")


def bench_config(path: str, overrides: list[str]) -> Config:
    return load_config(path, [*overrides, "deepspeed.grad_accum_steps=1", "deepspeed.global_batch_size=null"])


def synthetic_batches(cfg: Config, n: int, seed: int = 0):
    """n distinct batches of normalised-image-like crops in loader order (2 global, then the local crops)."""
    from esvit_scale.bench.flops import crop_sizes
    gen = torch.Generator().manual_seed(seed)
    b = cfg.data.batch_size_per_gpu
    return [[torch.randn(b, 3, s, s, generator=gen) for s in crop_sizes(cfg)] for _ in range(n)]


def loader_batches(cfg: Config, rank: int, world_size: int, device: torch.device):
    """Batches of the real loader, epoch after epoch."""
    from esvit_scale.data.build import build_loader
    from esvit_scale.data.source import open_source_collectively
    from esvit_scale.data.digits import quickstart_paths
    loader = build_loader(cfg.data, open_source_collectively(quickstart_paths(cfg)[0]), rank, world_size, cfg.run.seed,
                          device.type)
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process (getrusage)"


def run(args) -> None:
    from esvit_scale import ops
    from esvit_scale.bench.flops import CONVENTION, step_flops
    from esvit_scale.bench.peak import device_peak
    from esvit_scale.engine.distributed import init_distributed, resolve_device, set_cpu_threads
    from esvit_scale.step import build_train_step
    from esvit_scale.trainer import setup_logging

    cfg = bench_config(args.config, args.overrides)
    info = init_distributed(resolve_device(cfg.run.device))
    setup_logging(info.rank)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif info.device.type == "cpu":     # as the trainer sets them, counting the loader's workers when it runs
        set_cpu_threads(cfg.run.cpu_threads, cfg.data.num_workers if args.data == "loader" else 0)
    ops.configure(cfg.kernels)
    world, device = info.world_size, info.device
    if cfg.run.output_dir and args.data == "loader" and info.is_main:
        os.makedirs(cfg.run.output_dir, exist_ok=True)

    step = build_train_step(cfg, world, device)
    n = args.warmup + args.steps
    batches = iter(synthetic_batches(cfg, n, seed=info.rank) if args.data == "synthetic" else
                   loader_batches(cfg, info.rank, world, device))
    at = min(cfg.optim.warmup_epochs, len(step.sched.lr) - 1)      # the peak lr: a step like most of a run
    step.set_hyperparameters(at, freeze_last_layer=False)
    step_s, phases, losses = [], {p: [] for p in PHASES}, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, crops in enumerate(step.batches(batches)):
        timed = i >= args.warmup
        t0 = time.perf_counter() - step.last_data_wait           # the step began when it asked for its batch
        out, split = step.run(crops, epoch=0, step=at, boundary=True, timing=timed)
        if timed:
            step_s.append(time.perf_counter() - t0)
            for p in PHASES:
                phases[p].append(split[p])
        losses.append(float(out["loss"].detach()))
        if i + 1 == n:
            break

    flops = step_flops(cfg)
    peak = device_peak(device, cfg.deepspeed.precision)
    peak_flops = float(collectives.mean_over_ranks(torch.tensor([peak["peak_flops"]], dtype=torch.float64)))   # measured on all ranks at once
    memory, memory_source = peak_memory(device)
    memory = int(collectives.max_over_ranks(torch.tensor([memory], dtype=torch.float64)))
    # means over ranks, step by step (the collectives keep the ranks' steps in lockstep; where a rank waits differs,
    # so the per-phase maxima would not add up to a step)
    step_s = collectives.mean_over_ranks(torch.tensor(step_s, dtype=torch.float64)).tolist()
    phase_mean = {p: statistics.fmean(collectives.mean_over_ranks(torch.tensor(ts, dtype=torch.float64)).tolist())
                  for p, ts in phases.items()}
    median = statistics.median(step_s)
    achieved = flops.total / median
    report = {
        "config": args.config, "overrides": args.overrides, "world_size": world, "device": str(device),
        "device_name": peak["device_name"], "threads": torch.get_num_threads(), "kernels": step.kernels,
        "arch": cfg.model.arch, "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
        "activation_checkpointing": cfg.model.activation_checkpointing, "data": args.data,
        "batch_per_rank": cfg.data.batch_size_per_gpu, "global_batch": cfg.data.batch_size_per_gpu * world,
        "grad_accum_steps": 1, "crop_sizes": {"global": cfg.data.global_crops_size,
                                              "local": dict(zip(cfg.data.local_crops_size,
                                                                cfg.data.local_crops_number))},
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "step_s_median": median, "step_s_mean": statistics.fmean(step_s), "step_s_all": step_s,
        "images_per_s": cfg.data.batch_size_per_gpu * world / median,
        "images_per_s_per_device": cfg.data.batch_size_per_gpu / median,
        "flops_per_image": flops.per_image, "flops_per_step_per_device": flops.total,
        "flops_by_phase_per_device": {"teacher_forward": flops.teacher_forward,
                                      "student_forward": flops.student_forward, "loss": flops.loss,
                                      "backward": flops.backward},
        "flops_by_crop_size_per_image": flops.by_crop_size, "flop_convention": CONVENTION,
        "achieved_tflops_per_s_per_device": achieved / 1e12,
        "peak_tflops_per_s_per_device": peak_flops / 1e12, "peak_source": peak["source"],
        "mfu": achieved / peak_flops,
        "peak_memory_bytes": memory, "peak_memory_gib": memory / 2**30, "peak_memory_source": memory_source,
        "phase_s_mean": phase_mean,
        "phase_fraction": {p: t / statistics.fmean(step_s) for p, t in phase_mean.items()},
        "phases_sum_over_step": sum(phase_mean.values()) / statistics.fmean(step_s),
        "loss_first": losses[0], "loss_last": losses[-1],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cpu":
        report["cpu_matmul_peak_tflops_per_s"] = peak_flops / 1e12
    if info.is_main:
        _print(report)
        write_json(report, args.json)
    collectives.barrier()


def _print(r: dict) -> None:
    print(f"{r['config']} {' '.join(r['overrides'])}: {r['arch']}, ZeRO {r['zero_stage']}, {r['precision']}, "
          f"{r['world_size']} x {r['device']} ({r['device_name']}, {r['threads']} threads), batch {r['batch_per_rank']}"
          f" per rank")
    print(f"  {r['images_per_s']:.2f} images/s, step {r['step_s_median']:.3f} s (median of {r['timed_steps']}), "
          f"{r['flops_per_image'] / 1e9:.2f} GFLOP per image ({r['flop_convention'].split(';')[0]})")
    print(f"  {r['achieved_tflops_per_s_per_device']:.4f} TFLOP/s per device, peak "
          f"{r['peak_tflops_per_s_per_device']:.4f} ({r['peak_source']}): MFU {100 * r['mfu']:.1f}%")
    print(f"  peak memory {r['peak_memory_gib']:.2f} GiB per device ({r['peak_memory_source']})")
    print("  phases: " + ", ".join(f"{p} {100 * f:.1f}%" for p, f in r["phase_fraction"].items())
          + f" (sum {100 * r['phases_sum_over_step']:.1f}% of the step)")
