#!/usr/bin/env python
"""EsViT pretraining on DeepSpeed.

  python train.py --config configs/quickstart.yaml                  # the CPU quickstart (generates its data)
  python train.py --config configs/swin_tiny.yaml data.path=/data/imagenet/train run.output_dir=runs/t
  torchrun --nproc_per_node 8 train.py --config configs/swin_tiny.yaml data.path=... deepspeed.zero_stage=2

Configs: YAML files of sections (model, kernels, data, loss, optim, deepspeed, run, eval); every key has a
default (see esvit_scale/config.py). Overrides: any number of `section.key=value` arguments after the
options, values in YAML syntax (e.g. data.local_crops_size=[96,64] loss.region_loss=false). An unknown key
or a bad value stops the run before any work, naming the key and what is allowed.

Launching: one process needs no launcher (CPU or one GPU). For several processes use
`torchrun --nproc_per_node N [--nnodes M ...] train.py ...` (gloo on CPU, NCCL on GPU) or `srun` (the
SLURM rank variables are read). DeepSpeed's own launcher works too.

Resume: a run resumes by itself from the newest complete checkpoint in run.output_dir/checkpoints
(student, optimizer, teacher, centres, epoch, step, position in the epoch, RNG), so re-running the same
command continues it. SIGTERM or SIGUSR1 makes it save at the next step and exit with code 75 (during
start-up: exit 75 at once, nothing to save); so does the SLURM job's time limit (run.exit_before_end_minutes).
slurm/ has batch templates that requeue on 75, and slurm/README.md explains the exit codes.
run.init_from=<checkpoint folder> starts a new run from another run's weights (e.g. a view-only run
continued with loss.region_loss=true, the paper's W=14 recipe).
"""
from __future__ import annotations

from esvit_scale.cluster.signals import EXIT_PREEMPTED, StopRequest, record_exit_status

STOP = StopRequest().install() if __name__ == "__main__" else None     # before anything slow is imported

import argparse  # noqa: E402
import sys  # noqa: E402

from esvit_scale.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)
    from esvit_scale.engine.distributed import launched_rank_and_world, resolve_device
    from esvit_scale.engine.student import batch_split
    rank, world = launched_rank_and_world()
    try:
        cfg = load_config(args.config, args.overrides)
        batch_split(cfg, world)                  # the ranks divide the global batch, or nothing starts
        resolve_device(cfg.run.device)           # a job given GPUs that torch cannot see does not train on the CPU
    except ConfigError as e:
        return config_error(e, rank, STOP)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    from esvit_scale.trainer import train
    stop = STOP or StopRequest().install()
    try:
        summary = train(cfg, stop)
    except ConfigError as e:                     # found once the run's folder is read (another experiment's)
        return config_error(e, rank, stop)
    stop.finished()             # saved: a second signal must not kill the process while it shuts down
    import torch.distributed as dist
    if dist.is_initialized():   # in order, rather than by destructors while the interpreter shuts down
        dist.destroy_process_group()
    if summary["preempted"]:
        record_exit_status(EXIT_PREEMPTED, f"saved at step {summary['steps']}")
        return EXIT_PREEMPTED
    return 0


CONFIG_ERROR_GRACE_S = 20      # how long the other ranks wait for rank 0's line before exiting on their own


def config_error(e: ConfigError, rank: int, stop: StopRequest | None) -> int:
    """One line, from the first rank only (every rank finds the same error), and exit 2: nothing was done.

    The other ranks give rank 0 time to say why: a launcher (torchrun, srun --kill-on-bad-exit) that saw them
    exit first would stop rank 0 before its line was written. Stopped by the launcher, they still exit 2.
    """
    if rank == 0:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if stop is not None:
        stop.exit_quietly_on_signal(2)
    import time
    time.sleep(CONFIG_ERROR_GRACE_S)
    return 2


if __name__ == "__main__":
    code = main()
    import logging
    import os
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and closed. Skip the interpreter's teardown: a finished 2-rank run now and then died
    # there with SIGABRT ("terminate called without an active exception", a C++ thread object destroyed while
    # still running), so that torchrun and SLURM reported a run that had saved everything as failed.
    os._exit(code)
