"""The bandwidth collectives achieve between this node's ranks: what `bench scaling --intra-gbytes` asks for.

    torchrun --nproc_per_node 2 -m esvit_scale.bench allreduce [--mbytes 64] [--iters 10] [--json PATH]

Times all-reduces of an fp32 tensor of --mbytes over every rank (gloo on the CPU, NCCL on GPUs) after two warm-up
calls and reports the bus bandwidth, nccl-tests' definition: busbw = (S / t) x 2 (N - 1) / N. An all-reduce is two
ring passes (reduce-scatter + all-gather), so busbw is the per-rank, per-direction rate of one pass, the B_intra of
the scaling model (esvit_scale/bench/scaling.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mbytes", type=float, default=64.0, help="size of the all-reduced tensor, MB")
    parser.add_argument("--iters", type=int, default=10, help="timed all-reduces")
    parser.add_argument("--json", help="write the result here (rank 0)")


def run(args) -> None:
    import torch
    import torch.distributed as dist

    from esvit_scale.engine.distributed import init_distributed, resolve_device
    info = init_distributed(resolve_device("auto"))
    if info.world_size < 2:
        raise SystemExit("bench allreduce needs at least 2 ranks: torchrun --nproc_per_node 2 -m esvit_scale.bench "
                         "allreduce")
    numel = int(args.mbytes * 1e6 / 4)
    x = torch.ones(numel, dtype=torch.float32, device=info.device)
    for _ in range(2):
        dist.all_reduce(x)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(args.iters):
        sync()
        start = time.perf_counter()
        dist.all_reduce(x)
        sync()
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    n, nbytes = info.world_size, numel * 4
    result = {"world_size": n, "backend": dist.get_backend(), "bytes": nbytes, "iters": args.iters,
              "seconds_median": t, "algbw_gbytes_s": nbytes / t / 1e9,
              "busbw_gbytes_s": nbytes / t * 2 * (n - 1) / n / 1e9}
    if info.is_main:
        print(f"all-reduce of {nbytes / 1e6:.0f} MB over {n} ranks ({result['backend']}): median {t * 1e3:.1f} ms, "
              f"bus bandwidth {result['busbw_gbytes_s']:.2f} GB/s (bench scaling --intra-gbytes)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    dist.destroy_process_group()
