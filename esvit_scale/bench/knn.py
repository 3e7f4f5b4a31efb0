"""The distributed k-NN (eval/knn.py) on a synthetic bank: seconds and memory per rank.

  torchrun --nproc_per_node 2 -m esvit_scale.bench knn --bank 1281167 --dim 768 --queries 10000 --json J

Every rank makes its shard of a bank of `--bank` L2-normalised features (`--classes` clusters, stored as --dtype,
bf16 by default) and its share of the queries, then classifies every query against the whole bank (queries
all-gathered, the k nearest of each shard merged). Reported per rank: the shard's bytes, the process's resident
memory before the bank and at its peak (what the classification adds must stay within the shard plus a chunk), the
seconds, and the top-1 of the synthetic task (a sanity value, not a benchmark of features).
"""
from __future__ import annotations

import resource
import time

import torch
import torch.nn.functional as F

BLOCK = 4096


def add_arguments(parser) -> None:
    parser.add_argument("--bank", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="how the bank is stored")
    parser.add_argument("--json", help="write the report here")


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def _features(n: int, dim: int, centres: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype, seed: int):
    """n cluster-structured unit vectors, made a block at a time (no fp32 copy of the whole bank)."""
    out = torch.empty(n, dim, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, BLOCK):
        rows = labels[start:start + BLOCK]
        block = centres[rows] + 3.0 * torch.randn(len(rows), dim, generator=g) / dim ** 0.5
        out[start:start + BLOCK] = F.normalize(block, dim=1).to(dtype)
    return out


def run(args) -> None:
    from esvit_scale.bench.report import cpu_model, write_json
    from esvit_scale.engine import collectives
    from esvit_scale.engine.distributed import init_distributed
    from esvit_scale.eval.knn import knn_classify_sharded
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    centres = F.normalize(torch.randn(args.classes, args.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    base = _rss()
    g = torch.Generator().manual_seed(1 + rank)
    shard_n = len(range(rank, args.bank, world))
    bank_labels = torch.randint(args.classes, (shard_n,), generator=g)
    bank = _features(shard_n, args.dim, centres, bank_labels, dtype, seed=100 + rank)
    query_labels = torch.randint(args.classes, (len(range(rank, args.queries, world)),), generator=g)
    queries = _features(len(query_labels), args.dim, centres, query_labels, dtype, seed=200 + rank)
    with_bank = _rss()
    collectives.barrier()
    started = time.time()
    top1 = knn_classify_sharded(bank, bank_labels, queries, query_labels, args.k, num_classes=args.classes)
    seconds = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shard_bytes = bank.numel() * bank.element_size()
    mine = {"rank": rank, "shard_rows": shard_n, "shard_bytes": shard_bytes, "rss_before_bank": base,
            "rss_with_bank": with_bank, "peak_rss": peak, "peak_over_shard_and_baseline": peak - base - shard_bytes,
            "seconds": round(seconds, 1)}
    ranks = collectives.all_gather_object(mine)
    if rank == 0:
        report = {"benchmark": "knn", "bank": args.bank, "dim": args.dim, "queries": args.queries,
                  "classes": args.classes, "dtype": args.dtype, "world_size": world, "cpu": cpu_model(),
                  "threads_per_rank": torch.get_num_threads(), "top1": {str(k): v for k, v in top1.items()},
                  "ranks": ranks}
        for r in ranks:
            print(f"rank {r['rank']}: shard {r['shard_rows']} x {args.dim} {args.dtype} = {r['shard_bytes'] / 2**30:.2f} "
                  f"GiB; resident {r['rss_before_bank'] / 2**30:.2f} GiB before it, peak {r['peak_rss'] / 2**30:.2f} "
                  f"GiB (+{r['peak_over_shard_and_baseline'] / 2**30:.2f} GiB over shard and baseline); "
                  f"{r['seconds']} s")
        print(f"top-1 of the synthetic task: {report['top1']}")
        write_json(report, args.json)
    collectives.barrier()
