"""python -m esvit_scale.export on a ZeRO-3 checkpoint: timm loads the backbone strictly from the file, and its
features equal our teacher backbone's; the consolidated student and teacher load strictly into our model."""
import functools
import json

import pytest
import torch

from conftest import PYTHON, run_command, tiny_overrides, torchrun

CONFIG = ["train.py", "--config", "configs/quickstart.yaml"]


def test_export_of_a_zero3_checkpoint_loads_in_timm_with_our_features(image_folder, tmp_path):
    import timm
    from safetensors.torch import load_file

    from esvit_scale import ops
    from esvit_scale.checkpoint.restore import read_teacher_weights
    from esvit_scale.config import config_from_dict
    from esvit_scale.models.esvit import EsViT
    run = tmp_path / "run"
    torchrun(CONFIG + tiny_overrides(image_folder, run, **{"deepspeed.zero_stage": 3, "run.max_steps": 2}))
    out = tmp_path / "export"
    run_command([PYTHON, "-m", "esvit_scale.export", str(run / "checkpoints" / "step000000002"), str(out)])
    info = json.loads((out / "export.json").read_text())
    assert info["step"] == 2 and info["config"]["deepspeed"]["zero_stage"] == 3

    model = timm.create_model(info["timm_model"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "backbone_timm.safetensors")),
                              norm_layer=functools.partial(torch.nn.LayerNorm, eps=info["layer_norm_eps"]),
                              **info["timm_kwargs"]).eval()
    keys = model.load_state_dict(load_file(out / "backbone_timm.safetensors"), strict=False)
    assert keys.missing_keys == [] and keys.unexpected_keys == []

    cfg = config_from_dict(info["config"])
    ops.configure(cfg.kernels)
    teacher, student = EsViT(cfg, is_teacher=True).eval(), EsViT(cfg).eval()
    teacher.load_state_dict(load_file(out / "teacher.safetensors"), strict=True)
    student.load_state_dict(load_file(out / "student.safetensors"), strict=True)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = teacher.backbone.swin.forward_features(x)
        theirs = model.forward_features(x)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    trained = read_teacher_weights(run / "checkpoints" / "step000000002")       # the ZeRO-3 shards put together
    for name, value in teacher.state_dict().items():
        if name in trained:
            assert torch.equal(value, trained[name]), name


def test_export_refuses_an_incomplete_checkpoint(tmp_path):
    (tmp_path / "step000000001").mkdir()
    proc = run_command([PYTHON, "-m", "esvit_scale.export", str(tmp_path / "step000000001"), str(tmp_path / "o")],
                       check=False)
    assert proc.returncode == 2 and "no COMPLETE marker" in proc.stderr
