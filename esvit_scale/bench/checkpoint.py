"""How long a checkpoint save stalls training, synchronous vs `run.async_checkpoint`, in one process.

  python -m esvit_scale.bench checkpoint --json out.json -- data.path=DIR model.arch=swin_tiny ...

Each mode builds the trainer from configs/quickstart.yaml + the overrides and saves `--saves` times: the stall is
the time save() keeps the training loop waiting; `background_s` the time the write then still takes (training
steps would run meanwhile; 0 when synchronous).
"""
from __future__ import annotations

import json
import tempfile
import time


def add_arguments(parser) -> None:
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("overrides", nargs="*", help="config overrides (section.key=value)")


def run(args) -> None:
    from esvit_scale.config import load_config
    from esvit_scale.trainer import Trainer
    result = {}
    for mode in ("sync", "async"):
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config("configs/quickstart.yaml", args.overrides + [
                f"run.output_dir={out}", f"run.async_checkpoint={mode == 'async'}", "run.keep_checkpoints=1"])
            trainer = Trainer(cfg)
            stalls, writes = [], []
            for i in range(args.saves):
                trainer.state.step = i + 1
                start = time.perf_counter()
                trainer.save()
                stalls.append(time.perf_counter() - start)
                start = time.perf_counter()            # in training, the steps until the next save overlap this
                trainer.store.finish()
                writes.append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in (trainer.store.root / f"step{args.saves:09d}").iterdir())
        result[mode] = {"stall_s": stalls, "background_s": writes, "checkpoint_mb": size / 2 ** 20}
        print(mode, json.dumps(result[mode]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
