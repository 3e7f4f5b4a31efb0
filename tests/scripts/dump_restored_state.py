"""Resume a run (Trainer start-up only, no step) and write what it restored, in full fp32, to the file argv[1]:
student parameters, AdamW moments (exp_avg, exp_avg_sq) and step, teacher, centres and the training position.
Works at every ZeRO stage and world size (parameters and moments are gathered one at a time), so the
same dump of a checkpoint under its own layout and under another one can be compared.

  [torchrun --nproc_per_node 2] tests/scripts/dump_restored_state.py OUT.pt section.key=value ...
"""
import os
import sys

import torch
import torch.distributed as dist
import deepspeed
from deepspeed.utils import safe_get_full_optimizer_state

from esvit_scale.config import load_config
from esvit_scale.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config("configs/quickstart.yaml", overrides)
assert cfg.deepspeed.precision == "fp32", "the dump compares fp32 runs"
tr = Trainer(cfg)
assert tr.state.step > 0, "nothing was resumed"


if hasattr(tr.parts.optimizer, "_lazy_init_hp_params_optimizer_state"):
    tr.parts.optimizer._lazy_init_hp_params_optimizer_state()   # ZeRO 1-2 link parameters to it only at the first step


def adam_state(p, key):
    """None for a parameter without optimizer state (frozen, e.g. the last layer in epoch 0)."""
    value = safe_get_full_optimizer_state(p, key) if p.requires_grad else None
    if value is None and key in tr.parts.optimizer.state.get(p, {}):   # ZeRO-0: the torch optimizer's own tensors
        value = tr.parts.optimizer.state[p][key]
    return None if value is None else value.detach().float().cpu().clone()


def weights(p):
    """The full fp32 parameter (fp32 runs: the module's copy is the master copy)."""
    with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
        return p.data.detach().float().cpu().clone()


def adam_step(p):
    opt = getattr(tr.parts.optimizer, "optimizer", tr.parts.optimizer)
    states = [s for s in opt.state.values() if "step" in s]
    return float(states[0]["step"])


student, exp_avg, exp_avg_sq = {}, {}, {}
for name, p in tr.parts.engine.module.named_parameters():
    student[name] = weights(p)
    exp_avg[name], exp_avg_sq[name] = adam_state(p, "exp_avg"), adam_state(p, "exp_avg_sq")
state = {"student": student, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
         "adam_step": adam_step(next(tr.parts.engine.module.parameters())),
         "teacher": {k: v.float().cpu() for k, v in tr.parts.teacher.full_state_dict().items()},
         "centres": {k: v.float().cpu() for k, v in tr.parts.loss_fn.state_dict().items()},
         "position": [tr.state.epoch, tr.state.step]}
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save(state, out)
print("DUMPED", out, flush=True)
sys.stderr.flush()
os._exit(0)          # as train.py: the interpreter's teardown now and then aborts in a C++ destructor
