"""Benchmarks: `python -m esvit_scale.bench {kernels,loader,train} --json PATH`.

Each subcommand lives in its own module of this package, exposing `add_arguments(parser)` and `run(args)`.
"""
from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "kernels": "esvit_scale.bench.kernels",   # fused ops vs reference (and timm) at Swin-T shapes
    "loader": "esvit_scale.bench.loader",     # DALI vs torch/PIL multi-crop loader
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m esvit_scale.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0]))
    args = parser.parse_args(argv)
    importlib.import_module(SUBCOMMANDS[args.command]).run(args)


if __name__ == "__main__":
    main()
