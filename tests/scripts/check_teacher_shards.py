"""Under torchrun at ZeRO-3: a checkpoint save never gathers the teacher (full_state_dict is made to fail during
it); each rank writes only its shard, and the shards put together equal the full teacher."""
import sys

import torch

from esvit_scale.checkpoint.files import load_file
from esvit_scale.checkpoint.restore import read_teacher_weights
from esvit_scale.config import load_config
from esvit_scale.trainer import Trainer

cfg = load_config("configs/quickstart.yaml", sys.argv[1:] + ["deepspeed.zero_stage=3"])
tr = Trainer(cfg)
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
crops = next(iter(tr.loader.epoch(0)))
tr.state.step = 3                                 # past lr = 0 at the first warmup step
tr.set_hyperparameters(epoch=1)
tr.train_step.run(crops, epoch=0, step=0, boundary=True)     # forward, backward, optimizer step, EMA


def refuse():
    raise AssertionError("the save gathered the whole teacher")


tr.parts.teacher.full_state_dict, full_state_dict = refuse, tr.parts.teacher.full_state_dict
path = tr.save()
tr.parts.teacher.full_state_dict = full_state_dict
assert not (path / "teacher.pt").exists()
mine = load_file(path / f"teacher_rank{rank}.pt")
total = sum(torch.Size(s).numel() for s in mine["shapes"])
held = sum(t.numel() for t in mine["shards"])
assert held <= total // world + len(mine["shapes"]), (held, total)   # 1/world of it, plus padding
full = full_state_dict()                          # collective: gathered one parameter at a time, for the check
put_together = read_teacher_weights(path)
assert full.keys() == put_together.keys()
for name, value in full.items():
    assert torch.equal(value, put_together[name]), name
print(f"rank {rank}: SHARDS OK, {held} of {total} teacher values written by this rank")
