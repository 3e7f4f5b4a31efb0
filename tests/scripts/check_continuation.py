"""A region-loss run initialised from a view-only checkpoint: old weights kept exactly, the new region head
equal in student and teacher, position carried on; then it trains with a finite region loss."""
import sys
from pathlib import Path

import torch

from esvit_scale.config import load_config
from esvit_scale.checkpoint.restore import read_student_weights
from esvit_scale.trainer import Trainer

source = Path(sys.argv[1])
cfg = load_config("configs/quickstart.yaml", sys.argv[2:] + [f"run.init_from={source}", "loss.region_loss=true"])
tr = Trainer(cfg)
student_ckpt = read_student_weights(source)
teacher_ckpt = torch.load(source / "teacher.pt", weights_only=True)
student = dict(tr.parts.engine.module.named_parameters())
teacher = dict(tr.parts.teacher.module.named_parameters())
assert student_ckpt.keys() == teacher_ckpt.keys() and len(student_ckpt) > 10
for name, value in student_ckpt.items():
    assert torch.equal(student[name].detach(), value), name
    assert torch.equal(teacher[name].detach(), teacher_ckpt[name]), name
new = [n for n in student if n not in student_ckpt]
assert new and all(n.startswith("region_head.") for n in new)
for n in new:
    assert torch.equal(student[n].detach(), teacher[n].detach()), n
assert tr.state.step == 2, tr.state
summary = tr.train()
assert summary["steps"] == 4 and summary["loss_final"] is not None
print("continuation OK", summary)
