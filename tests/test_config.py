from pathlib import Path

import pytest

from esvit_scale.config import ConfigError, load_config
from esvit_scale.engine.student import accumulation_steps, deepspeed_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.arch in ("swin_nano", "swin_tiny", "swin_small", "swin_base", "swin_large")


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


def test_global_batch_derives_accumulation():
    cfg = load_config(None, ["deepspeed.global_batch_size=512", "data.batch_size_per_gpu=32"])
    assert accumulation_steps(cfg, world_size=8) == 2
    with pytest.raises(ValueError, match="global_batch_size"):
        accumulation_steps(cfg, world_size=3)
