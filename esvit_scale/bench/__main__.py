"""Benchmarks: `python -m esvit_scale.bench {kernels,loader,train,step,plan,checkpoint,scaling,allreduce,chaos,index,
knn,depth} --json PATH`.

Each subcommand lives in its own module of this package, exposing `add_arguments(parser)` and `run(args)`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "kernels": "esvit_scale.bench.kernels",   # fused ops vs reference (and timm) at Swin-T shapes
    "loader": "esvit_scale.bench.loader",     # DALI vs torch/PIL multi-crop loader
    "train": "esvit_scale.bench.train",       # training steps, kernels on vs off
    "step": "esvit_scale.bench.step",         # the real step: images/s, MFU, memory, phase split
    "plan": "esvit_scale.bench.plan",         # memory per device by ZeRO stage; what fits
    "checkpoint": "esvit_scale.bench.checkpoint",   # training stall per save, synchronous vs asynchronous
    "allreduce": "esvit_scale.bench.allreduce",     # the bus bandwidth of collectives between this node's ranks
    "scaling": "esvit_scale.bench.scaling",   # images/s and efficiency, 1-512 GPUs: predicted, and a sweep's points
    "chaos": "esvit_scale.bench.chaos",       # a real job under random faults vs the same job without: exact recovery
    "index": "esvit_scale.bench.index",       # a folder index at ImageNet size: build time, memory loaded
    "knn": "esvit_scale.bench.knn",           # the distributed k-NN on a synthetic bank: seconds, memory per rank
    "depth": "esvit_scale.bench.depth",       # Swin V1 vs V2 blocks at a large preset's depth: activation amplitudes
    "gpu_check": "esvit_scale.bench.gpu_check",     # everything GPU-related, one script (--dry: on the CPU, tiny)
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m esvit_scale.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in (argv if argv is not None else sys.argv[1:]) if a in SUBCOMMANDS), None)
    for name, module in SUBCOMMANDS.items():
        # import only the subcommand asked for: one benchmark's missing dependency must not break another
        mod = importlib.import_module(module) if name == chosen else None
        p = sub.add_parser(name, help=f"see {module}")
        if mod is not None:
            mod.add_arguments(p)
    args = parser.parse_args(argv)
    from esvit_scale.config import ConfigError
    try:
        importlib.import_module(SUBCOMMANDS[args.command]).run(args)
    except ConfigError as e:             # a bad key or value, a device that cannot be had: one line, exit 2
        sys.stderr.write(f"config error: {e}\n")
        sys.exit(2)
    if "torch" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():    # a benchmark of several ranks: leave as train.py does
            import logging
            import os
            dist.destroy_process_group()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)        # the interpreter's teardown now and then aborts in a C++ thread's destructor


if __name__ == "__main__":
    main()
