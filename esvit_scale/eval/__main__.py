"""Evaluation of a checkpoint's teacher backbone.

  python -m esvit_scale.eval knn --checkpoint RUN/checkpoints/<tag> --train TRAIN --val VAL
  python -m esvit_scale.eval linear --checkpoint RUN/checkpoints/<tag> --train TRAIN --val VAL
  torchrun --nproc_per_node 8 -m esvit_scale.eval knn ...      # at ImageNet size: the bank sharded over the ranks

TRAIN and VAL: image folders or shard sets (data/shard.py). Under torchrun every rank embeds its share, and the k-NN
bank and the probe's features stay sharded (eval/knn.py, eval/linear.py); rank 0 prints and writes the result.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from esvit_scale import ops
from esvit_scale.checkpoint import COMPLETE, CheckpointError, load_file
from esvit_scale.checkpoint.restore import read_teacher_weights
from esvit_scale.config import config_from_dict
from esvit_scale.eval.knn import knn_eval
from esvit_scale.eval.linear import block_features_fn, linear_eval
from esvit_scale.models.esvit import EsViT


def load_teacher(checkpoint: Path) -> tuple[EsViT, object]:
    if not (checkpoint / COMPLETE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint folder (no {COMPLETE} marker)")
    cfg = config_from_dict(load_file(checkpoint / "client_state.pt")["config"])
    ops.configure(cfg.kernels)
    teacher = EsViT(cfg, is_teacher=True)
    teacher.load_state_dict(read_teacher_weights(checkpoint))
    return teacher.eval(), cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esvit_scale.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    knn = sub.add_parser("knn", help="weighted k-NN top-1 of the teacher's view features")
    linear = sub.add_parser("linear", help="linear probe top-1 on the teacher's last blocks (frozen)")
    for p in (knn, linear):
        p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder (…/checkpoints/<tag>)")
        p.add_argument("--train", required=True, help="labelled image folder to fit on (k-NN: the neighbours)")
        p.add_argument("--val", required=True, help="labelled image folder to classify")
        p.add_argument("--image-size", type=int, default=None, help="default: the run's eval.image_size")
        p.add_argument("--resize-size", type=int, default=None, help="default: the run's eval.resize_size")
        p.add_argument("--json", type=Path, help="write the result here")
    knn.add_argument("--k", type=int, nargs="+", default=None, help="default: the run's eval.knn_k")
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="how the bank is stored (default: the run's eval.knn_dtype)")
    linear.add_argument("--blocks", type=int, default=None, help="default: the run's eval.linear_blocks")
    linear.add_argument("--epochs", type=int, default=None, help="default: the run's eval.linear_epochs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        teacher, cfg = load_teacher(args.checkpoint)
    except (FileNotFoundError, RuntimeError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:           # under torchrun: one process group, shards per rank
        from esvit_scale.engine.distributed import init_distributed
        device = init_distributed(device.type).device
    teacher.to(device)
    resize, crop = args.resize_size or cfg.eval.resize_size, args.image_size or cfg.eval.image_size
    out: dict = {"checkpoint": str(args.checkpoint)}
    if args.command == "knn":
        from esvit_scale.eval.during_training import STORAGE
        result = knn_eval(lambda x: teacher.backbone(x)[0], args.train, args.val, args.k or cfg.eval.knn_k,
                          args.temperature, resize, crop, device, storage_dtype=STORAGE[args.dtype or cfg.eval.knn_dtype])
        out["knn_top1"] = {str(k): v for k, v in result.items()}
    else:
        features = block_features_fn(teacher.backbone, args.blocks or cfg.eval.linear_blocks)
        out["linear_top1"] = linear_eval(features, args.train, args.val, resize, crop, device,
                                         epochs=args.epochs or cfg.eval.linear_epochs)
    from esvit_scale.engine import collectives
    if collectives.rank() == 0:
        print(json.dumps(out))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
