"""Training steps with the fused kernels on vs off, side by side in one process.

    python -m esvit_scale.bench train --config configs/digits_paper.yaml --json runs/bench_train.json

Builds the training step of the config twice from one seed (identical weights; esvit_scale.step, the step the
trainer runs: the DeepSpeed engine of the configured ZeRO stage and precision, the EMA teacher, the loss and the
schedules): `kernels.window_attention` and `kernels.region_matching` on, and both off (the pure-PyTorch references
on the same attention path). Each variant then runs steps on synthetic multi-crop batches of the config's shapes.
Rounds alternate the variants so that machine noise hits both alike; the time of a variant is the median over its
steps, and the per-round ratio (the two variants adjacent in time) is reported too. No data loading.
The first step's losses of both variants are reported as well: they must agree (same weights, same batch).
One process (world size 1).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from esvit_scale import ops
from esvit_scale.bench.report import write_json
from esvit_scale.config import Config, load_config
from esvit_scale.engine.distributed import init_distributed, resolve_device
from esvit_scale.step import TrainStep, build_train_step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # default: the quickstart's model with both loss terms, so that both kernels are in the step
    parser.add_argument("--config", default="configs/digits_paper.yaml")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of steps, alternating the variants")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")


class Variant:
    """The training step of one kernel setting; `step(crops)` is one optimizer step at the schedules' peak lr."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        ops.configure(cfg.kernels)
        self.train_step: TrainStep = build_train_step(cfg, world_size=1, device=device)
        self.steps = 0

    def step(self, crops: list[torch.Tensor]) -> dict[str, float]:
        ops.configure(self.cfg.kernels)        # the region-matching backend is process-wide
        at = min(self.cfg.optim.warmup_epochs, len(self.train_step.sched.lr) - 1)    # the peak lr
        self.train_step.set_hyperparameters(at, freeze_last_layer=False)
        losses, _ = self.train_step.run(crops, epoch=0, step=at, boundary=True)
        return {k: float(v.detach()) for k, v in losses.items()}


def synthetic_crops(cfg: Config, device: torch.device, seed: int) -> list[torch.Tensor]:
    """2 global crops, then the local crops of each size, as the loader hands them out (normalised images)."""
    d, gen = cfg.data, torch.Generator().manual_seed(seed)
    sizes = [d.global_crops_size] * 2
    for size, number in zip(d.local_crops_size, d.local_crops_number):
        sizes += [size] * number
    return [torch.randn(d.batch_size_per_gpu, 3, s, s, generator=gen).to(device) for s in sizes]


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    on = load_config(args.config, args.overrides + ["kernels.window_attention=true", "kernels.region_matching=true"])
    off = load_config(args.config, args.overrides + ["kernels.window_attention=false",
                                                     "kernels.region_matching=false"])
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("bench train runs in one process; use `bench step` under torchrun")
    device = init_distributed(resolve_device(on.run.device)).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load_before = [round(x, 2) for x in os.getloadavg()]
    variants = {"kernels_on": Variant(on, device), "kernels_off": Variant(off, device)}
    batch = on.data.batch_size_per_gpu
    first = {name: v.step(synthetic_crops(on, device, seed=0)) for name, v in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            for i in range(args.steps):
                crops = synthetic_crops(on, device, seed=1 + r * args.steps + i)
                sync()
                t0 = time.perf_counter()
                variants[name].step(crops)
                sync()
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    per_round = [statistics.median(times["kernels_off"][r * args.steps:(r + 1) * args.steps]) /
                 statistics.median(times["kernels_on"][r * args.steps:(r + 1) * args.steps]) for r in range(args.rounds)]
    report = {
        "config": args.config, "overrides": args.overrides, "device": str(device),
        "cpu": platform.processor() or "cpu", "threads": torch.get_num_threads(),
        "zero_stage": on.deepspeed.zero_stage, "precision": on.deepspeed.precision, "arch": on.model.arch, "window_size": on.model.window_size, "out_dim": on.model.out_dim,
        "batch": batch, "global_crops_size": on.data.global_crops_size,
        "local_crops": list(zip(on.data.local_crops_size, on.data.local_crops_number)),
        "rounds": args.rounds, "steps_per_round": args.steps,
        "ms_per_step": {k: round(v, 1) for k, v in ms.items()},
        "ms_per_step_all": {k: [round(1e3 * t, 1) for t in ts] for k, ts in times.items()},
        "images_per_s": {k: round(batch * 1e3 / v, 2) for k, v in ms.items()},
        "speedup_kernels_on": round(ms["kernels_off"] / ms["kernels_on"], 3),
        # off / on within each round (adjacent in time), median over rounds: robust to a drifting machine load
        "speedup_kernels_on_paired": round(statistics.median(per_round), 3),
        "rounds_kernels_on_faster": sum(x > 1 for x in per_round),
        "first_step_losses": first,
        "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{args.config} {' '.join(args.overrides)}: batch {batch}, {report['threads']} threads, "
          f"load average {report['load_average_before']} -> {report['load_average_after']}")
    for name in variants:
        print(f"  {name:<12} {ms[name]:8.1f} ms/step  {report['images_per_s'][name]:7.2f} images/s  "
              f"first-step loss {first[name]['loss']:.6f}")
    print(f"  kernels on / off speedup x{report['speedup_kernels_on']} (medians), "
          f"x{report['speedup_kernels_on_paired']} (median of per-round ratios; on faster in "
          f"{report['rounds_kernels_on_faster']} of {args.rounds} rounds)")
    write_json(report, args.json)
