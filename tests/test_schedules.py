import math

import numpy as np
import pytest
import torch

from esvit_scale.config import load_config
from esvit_scale.engine.student import parameter_groups, set_optimizer_hyperparameters
from esvit_scale.models.esvit import EsViT
from esvit_scale.schedules import build_schedules, cosine_schedule, teacher_temp_schedule


def test_cosine_with_warmup_endpoints_and_shape():
    s = cosine_schedule(1.0, 0.1, epochs=10, iters_per_epoch=5, warmup_epochs=2)
    assert len(s) == 50
    assert s[0] == 0.0 and np.allclose(np.diff(s[:10]), 0.1)          # linear warmup 0 -> 1
    assert s[10] == pytest.approx(1.0)                                   # peak after warmup
    assert np.all(np.diff(s[10:]) <= 1e-12) and s[-1] == pytest.approx(0.1, abs=2e-3)
    mid = 10 + 20
    assert s[mid] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 20 / 40)))


def test_teacher_temperature_warmup_then_constant():
    t = teacher_temp_schedule(0.04, 0.07, warmup_epochs=30, epochs=300)
    assert len(t) == 300 and t[0] == pytest.approx(0.04) and t[29] == pytest.approx(0.07)
    assert np.all(t[30:] == 0.07) and np.all(np.diff(t[:30]) > 0)


def test_paper_schedules_scale_lr_by_global_batch():
    cfg = load_config(None, [])
    s = build_schedules(cfg, global_batch=512, steps_per_epoch=100)
    assert s.lr.max() == pytest.approx(5e-4 * 2, rel=1e-6)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4, abs=1e-4)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == pytest.approx(1.0, abs=1e-6)
    assert len(s.lr) == len(s.momentum) == 300 * 100 and len(s.teacher_temp) == 300


def test_no_weight_decay_on_biases_and_1d_and_last_layer_freeze():
    cfg = load_config(None, ["model.arch=swin_nano", "model.out_dim=64", "model.head_hidden_dim=32",
                             "model.head_bottleneck_dim=16", "data.global_crops_size=32"])
    model = EsViT(cfg)
    groups = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            if g["apply_weight_decay"]:
                assert p.ndim > 1 and not n.endswith(".bias") and not n.endswith("weight_g"), n
            else:
                assert p.ndim <= 1 or n.endswith("weight_g"), n
            assert g["is_last_layer"] == (".last_layer." in n)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups, lr=0.0)
    set_optimizer_hyperparameters(opt, lr=0.1, weight_decay=0.3, freeze_last_layer=True)
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else 0.1)
        assert g["weight_decay"] == (0.3 if g["apply_weight_decay"] else 0.0)
    set_optimizer_hyperparameters(opt, lr=0.1, weight_decay=0.3, freeze_last_layer=False)
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
