"""The teacher's k-NN (fp32 and bf16 bank) and linear probe on scikit-learn's digits, at initialisation, written to
argv[1] as JSON by rank 0; one process or under torchrun (the bank and the features sharded over the ranks).

  [torchrun --nproc_per_node 2] tests/scripts/eval_on_digits.py OUT.json DIGITS_DIR
"""
import json
import os
import sys

import torch

from esvit_scale.config import load_config
from esvit_scale.data.digits import make_digits_folder
from esvit_scale.engine import collectives
from esvit_scale.engine.distributed import init_distributed
from esvit_scale.eval.knn import knn_eval
from esvit_scale.eval.linear import block_features_fn, linear_eval
from esvit_scale.models.esvit import EsViT

out, root = sys.argv[1], sys.argv[2]
init_distributed("cpu")
if collectives.rank() == 0:
    make_digits_folder(root)
collectives.barrier()
cfg = load_config("configs/quickstart.yaml")
torch.manual_seed(0)
teacher = EsViT(cfg, is_teacher=True).eval()
train, val, size = f"{root}/train", f"{root}/val", cfg.eval.image_size
view = lambda x: teacher.backbone(x)[0]       # noqa: E731
result = {dtype: knn_eval(view, train, val, [10, 20], 0.07, cfg.eval.resize_size, size, torch.device("cpu"),
                          storage_dtype=getattr(torch, dtype)) for dtype in ("float32", "bfloat16")}
result["linear"] = linear_eval(block_features_fn(teacher.backbone, cfg.eval.linear_blocks), train, val,
                               cfg.eval.resize_size, size, torch.device("cpu"), epochs=30)
if collectives.rank() == 0:
    with open(out, "w") as f:
        json.dump(result, f)
print("EVAL DONE", flush=True)
sys.stdout.flush()
os._exit(0)
