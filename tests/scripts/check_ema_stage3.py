"""Under torchrun at ZeRO-3: one training step, then teacher == m * teacher_before + (1 - m) * student,
with every parameter of both models partitioned (no rank holds a full copy during the update)."""
import sys

import deepspeed
import torch

from esvit_scale.config import load_config
from esvit_scale.trainer import Trainer

cfg = load_config("configs/quickstart.yaml", sys.argv[1:] + ["deepspeed.zero_stage=3"])
tr = Trainer(cfg)
world = torch.distributed.get_world_size()
for t, s in zip(tr.parts.teacher.teacher_params, tr.parts.teacher.student_params):
    assert t.ds_tensor.numel() == s.ds_tensor.numel() == -(-t.ds_numel // world), "shards do not line up"
    assert t.data.numel() == 0, "teacher parameter is not partitioned"

before = tr.parts.teacher.full_state_dict()
crops = next(iter(tr.loader.epoch(0)))
tr.state.step = 3                               # past lr = 0 at the first warmup step
tr.set_hyperparameters(epoch=1)                 # past the last-layer freeze: every parameter moves
tr.train_step.run(crops, epoch=0, step=tr.state.step, boundary=False)   # the EMA update below instead
m = 0.75
tr.parts.teacher.update(m)
assert all(t.data.numel() == 0 for t in tr.parts.teacher.teacher_params), "the update gathered parameters"
after = tr.parts.teacher.full_state_dict()
student = {}
for name, p in tr.parts.engine.module.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        student[name] = p.data.detach().clone()
moved = 0
for name in before:
    expected = m * before[name] + (1 - m) * student[name]
    torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    moved += int(not torch.equal(before[name], student[name]))
assert moved > len(before) // 2, f"only {moved} student parameters changed in the step"
print(f"rank {torch.distributed.get_rank()}: EMA OK over {len(before)} parameters ({moved} moved)")
