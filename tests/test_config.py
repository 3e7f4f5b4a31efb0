from pathlib import Path

import pytest

from esvit_scale.config import ConfigError, load_config
from esvit_scale.engine.student import batch_split, deepspeed_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.arch.startswith(("swin_", "swinv2_"))     # builds: tests/test_backbones.py


def test_overrides_apply_with_yaml_values():
    cfg = load_config(None, ["data.local_crops_size=[96,64]", "data.local_crops_number=[6,2]",
                             "loss.region_loss=false", "optim.base_lr=1e-3", "deepspeed.zero_stage=3"])
    assert cfg.data.local_crops_size == [96, 64] and cfg.num_local_crops == 8
    assert cfg.loss.region_loss is False and cfg.optim.base_lr == 1e-3 and cfg.deepspeed.zero_stage == 3


@pytest.mark.parametrize("override, words", [
    (["model.depthz=[2,2]"], ["unknown key 'model.depthz'", "depths"]),
    (["modle.arch=swin_tiny"], ["unknown key 'modle'", "model"]),
    (["deepspeed.precision=fp8"], ["deepspeed.precision", "fp32, fp16, bf16"]),
    (["deepspeed.zero_stage=4"], ["deepspeed.zero_stage", "0, 1, 2, 3"]),
    (["data.batch_size_per_gpu=abc"], ["data.batch_size_per_gpu", "integer"]),
    (["loss.region_loss=3"], ["loss.region_loss", "true or false"]),
    (["data.local_crops_number=[8,2]"], ["data.local_crops_number", "one entry per size"]),
    (["data.global_crops_scale=[0.9,0.4]"], ["data.global_crops_scale"]),
    (["model.arch=vit"], ["model.arch", "swin_tiny"]),
    (["optim.epochs"], ["section.key=value"]),
    # geometry: every image the backbone sees is a whole number of patches, and heads divide each stage's width
    (["data.global_crops_size=30"], ["data.global_crops_size", "model.patch_size=4", "28 or 32"]),
    (["data.local_crops_size=[96,30]", "data.local_crops_number=[6,2]"], ["data.local_crops_size[1]", "30 px"]),
    (["model.patch_size=5"], ["data.global_crops_size", "model.patch_size=5"]),
    (["eval.image_size=226"], ["eval.image_size", "226 px"]),
    (["model.num_heads=[3,6,12]"], ["model.num_heads", "one entry per stage"]),
    (["model.embed_dim=100"], ["model.num_heads", "stage 0 has 100 channels"]),
    (["model.depths=[2,0,6,2]"], ["model.depths", ">= 1"]),
    (["model.drop_path_rate=1.5"], ["model.drop_path_rate"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for w in words:
        assert w in str(e.value)


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_deepspeed_dict_comes_from_the_yaml():
    cfg = load_config(None, ["deepspeed.zero_stage=2", "deepspeed.precision=bf16", "deepspeed.grad_accum_steps=4",
                             "optim.clip_grad=3.0", "data.batch_size_per_gpu=32"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_batch_size"] == 32 * 4 * 4 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 3.0
    assert "reduce_bucket_size" not in ds["zero_optimization"]           # DeepSpeed's defaults unless set
    small = deepspeed_config(load_config(None, ["deepspeed.zero_stage=3", "deepspeed.bucket_elements=1000"]), 2)
    assert small["zero_optimization"]["reduce_bucket_size"] == small["zero_optimization"]["stage3_max_live_parameters"]


def test_global_batch_derives_accumulation():
    cfg = load_config(None, ["deepspeed.global_batch_size=512", "data.batch_size_per_gpu=32"])
    split = batch_split(cfg, world_size=8)
    assert (split.accumulation, split.global_batch) == (2, 512)
    with pytest.raises(ConfigError, match=r"deepspeed.global_batch_size: 512 is not a multiple of .* 32 x 3 = 96.*"
                                          r"1, 2, 4, 8, 16"):
        batch_split(cfg, world_size=3)


@pytest.mark.parametrize("key, value", [
    ("optim.min_lr", -1), ("optim.base_lr", 0), ("optim.warmup_epochs", -1), ("optim.freeze_last_layer", -1),
    ("optim.weight_decay", -0.1), ("optim.weight_decay_end", -0.1), ("optim.clip_grad", -1),
    ("optim.momentum_teacher", 1.5), ("loss.student_temp", 0), ("loss.teacher_temp", 0),
    ("loss.warmup_teacher_temp", -0.1), ("loss.warmup_teacher_temp_epochs", -1), ("loss.pair_factor", 0),
    ("loss.center_momentum", 1), ("run.max_steps", -1), ("run.checkpoint_every_steps", -1), ("run.stop_epoch", -1),
    ("eval.knn_every_epochs", -1), ("eval.knn_temperature", 0), ("eval.resize_size", 0),
    ("data.num_workers", -1), ("deepspeed.global_batch_size", 0),
])
def test_each_range_check_names_its_own_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert str(e.value).startswith(f"{key}: "), str(e.value)
    assert str(value) in str(e.value) or str(float(value)) in str(e.value)


@pytest.mark.parametrize("size", [32, 36, 44, 64, 100])
def test_every_size_validation_accepts_runs_through_the_backbone(size):
    """The constraint is exactly the patch embedding's: odd grids (36 px -> 9x9) pad per stage, windows larger
    than the map pad too; nothing else fails. Checked at 4 stages, window 7 (the W=7 configs) on swin_nano."""
    import torch
    from esvit_scale.models.swin import SwinBackbone
    cfg = load_config(None, ["model.arch=swin_nano", "model.window_size=7", f"data.global_crops_size={size}",
                             f"data.local_crops_size=[{size // 2 // 4 * 4}]", "kernels.window_attention=false"])
    backbone = SwinBackbone(cfg.model, img_size=cfg.data.global_crops_size, kernels=cfg.kernels)
    with torch.no_grad():
        for s in (cfg.data.global_crops_size, *cfg.data.local_crops_size):
            view, region = backbone(torch.randn(1, 3, s, s))
            side = s // 4
            for _ in range(3):
                side = -(-side // 2)
            assert view.shape == (1, 256) and region.shape == (1, side * side, 256)


def test_train_cli_stops_on_a_bad_crop_size_before_the_output_folder_is_made(tmp_path):
    from conftest import PYTHON, run_command
    proc = run_command([PYTHON, "train.py", "--config", "configs/quickstart.yaml", "data.global_crops_size=30",
                        f"run.output_dir={tmp_path}/x"], check=False)
    assert proc.returncode == 2
    assert "data.global_crops_size: 30 px is not a multiple of model.patch_size=4" in proc.stderr
    assert not (tmp_path / "x").exists()
