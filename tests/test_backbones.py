"""Backbone families (models/registry.py): every shipped config builds and its backbone round-trips through timm;
our SwinV2 attention path (fused op or reference) equals timm's SwinV2 forward and backward; SwinV2 tiny and base
train on 1 and 2 ranks at ZeRO 0 and 3, resume exactly, give the same losses with the kernel and the reference, and
export to a strict timm load with equal features."""
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, read_losses, run_command, tiny_overrides, torchrun
from esvit_scale.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
REAL_WEIGHTS_UP_TO = 100e6      # backbones up to Swin-B are built for real here; the larger on the meta device


def _timm_model(recipe, weights_file=None):
    import timm
    extra = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file))) if weights_file else {}
    return timm.create_model(recipe.name, **extra, **recipe.kwargs,
                             norm_layer=functools.partial(torch.nn.LayerNorm, eps=recipe.layer_norm_eps)).eval()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_builds_and_round_trips_through_timm(path, tmp_path):
    from safetensors.torch import load_file, save_file

    from esvit_scale.export import timm_export
    from esvit_scale.models.esvit import EsViT
    cfg = load_config(path, ["run.device=cpu"])
    with torch.device("meta"):
        model = EsViT(cfg, is_teacher=True)
    size = sum(p.numel() for p in model.backbone.parameters())
    if size > REAL_WEIGHTS_UP_TO:           # names and shapes against timm's model (export's own check)
        recipe, state = timm_export(cfg, model.state_dict())
        assert len(state) == len(model.backbone.timm_state_dict(model.backbone.state_dict()))
        return
    torch.manual_seed(0)
    teacher = EsViT(cfg, is_teacher=True).eval()
    with torch.no_grad():                    # SwinV2's post-norms start at zero: give every weight a value
        for p in teacher.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    recipe, state = timm_export(cfg, teacher.state_dict())
    save_file(state, str(tmp_path / "backbone.safetensors"))
    theirs = _timm_model(recipe, tmp_path / "backbone.safetensors")
    keys = theirs.load_state_dict(load_file(tmp_path / "backbone.safetensors"), strict=True)
    assert not keys.missing_keys and not keys.unexpected_keys
    side = _size_without_padding(teacher.backbone, cfg.data.global_crops_size)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = teacher.backbone(x)[1]
        want = theirs.forward_features(x).flatten(1, 2)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def _size_without_padding(backbone, start: int) -> int:
    """The smallest crop >= start whose every stage's map is a whole number of its blocks' windows: timm pads the
    others without masking the padded tokens, our path masks them (ops/swin_attention.py)."""
    windows = [stage[0].window_size[0] for stage in backbone.blocks_by_stage()]
    size = start
    while any(side % w for side, w in zip(backbone.token_grid(size), windows)):
        size += backbone.patch_size
    return size


def test_export_refuses_a_backbone_timm_would_build_differently():
    from esvit_scale.export import timm_export
    from esvit_scale.models.backbone import ExportError
    from esvit_scale.models.esvit import EsViT
    cfg = load_config(None, ["model.arch=swinv2_nano", "model.window_size=4", "data.global_crops_size=32",
                             "model.out_dim=16", "model.head_hidden_dim=16"])
    with torch.device("meta"):
        state = EsViT(cfg).state_dict()
    state.pop("backbone.swin.layers.1.blocks.0.attn.logit_scale")      # as if the family had no such parameter
    with pytest.raises(ExportError, match="1 parameters it has that ours lacks.*logit_scale"):
        timm_export(cfg, state)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_swinv2_attention_path_equals_timm_forward_and_backward(fused):
    """The whole swinv2_nano trunk (shifted windows, windows clamped to small maps) against timm's own
    SwinTransformerV2 with the same weights: features and every parameter's gradient, the position-bias MLP's
    included, to fp32 tolerance."""
    from esvit_scale import ops
    from esvit_scale.models.registry import build_backbone
    cfg = load_config(None, ["model.arch=swinv2_nano", "model.window_size=4", "run.device=cpu",
                             f"kernels.window_attention={str(fused).lower()}"])
    ops.configure(cfg.kernels)
    torch.manual_seed(0)
    ours = build_backbone(cfg.model, img_size=64, kernels=cfg.kernels).eval()       # maps 16, 8, 4, 2; windows 4, 4, 4, 2
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    theirs = _timm_model(ours.timm_recipe())
    theirs.load_state_dict(ours.timm_state_dict(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    a, b = ours.swin.forward_features(x), theirs.forward_features(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    timm_params = dict(theirs.named_parameters())
    cpb = 0
    for name, p in ours.named_parameters():
        want = timm_params[name[len("swin."):]].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6 + 1e-4 * float(want.abs().max()), msg=name)
        cpb += name.endswith("cpb_mlp.2.weight") and bool(p.grad.abs().sum() > 0)
    assert cpb == 5                # the bias table's gradient reaches the MLP of each of the 5 blocks


def test_swinv2_no_weight_decay_follows_timm():
    from esvit_scale.engine.student import parameter_groups
    from esvit_scale.models.esvit import EsViT
    cfg = load_config(None, ["model.arch=swinv2_nano", "model.window_size=4", "model.out_dim=16",
                             "model.head_hidden_dim=16"])
    model = EsViT(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for g in parameter_groups(model) if not g["apply_weight_decay"] for p in g["params"]}
    for name in model.backbone.swin.no_weight_decay():          # timm's own list
        assert f"backbone.swin.{name}" in undecayed
    assert "backbone.swin.layers.0.blocks.0.attn.qkv.weight" not in undecayed
    assert "backbone.swin.layers.0.blocks.0.attn.logit_scale" in undecayed        # 3-D, yet not decayed


V2_TRAIN = {"model.window_size": 4, "data.batch_size_per_gpu": 2, "run.max_steps": 3,
            "run.checkpoint_every_steps": 2, "run.keep_checkpoints": 5, "kernels.window_attention": "true"}


@pytest.mark.parametrize("arch, ranks, stage, precision", [("swinv2_base", 1, 0, "fp32"), ("swinv2_tiny", 2, 3, "bf16")])
def test_swinv2_trains_resumes_exactly_and_exports_to_timm(arch, ranks, stage, precision, image_folder, tmp_path):
    from safetensors.torch import load_file

    from esvit_scale.models.esvit import EsViT
    from esvit_scale.models.registry import build_backbone
    opts = {**V2_TRAIN, "model.arch": arch, "deepspeed.zero_stage": stage, "model.drop_path_rate": 0.0,
            "deepspeed.precision": precision}
    launch = (lambda args: torchrun(args, nproc=ranks, timeout=900)) if ranks > 1 else \
        (lambda args: run_command([PYTHON, *args], timeout=900))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(["train.py", "--config", "configs/quickstart.yaml", *tiny_overrides(image_folder, full, **opts)])
    uninterrupted = read_losses(full)
    assert sorted(uninterrupted) == [1, 2, 3]
    shutil.copytree(full / "checkpoints" / "step000000002", resumed / "checkpoints" / "step000000002")
    launch(["train.py", "--config", "configs/quickstart.yaml", *tiny_overrides(image_folder, resumed, **opts)])
    assert read_losses(resumed)[3] == pytest.approx(uninterrupted[3], rel=1e-6, abs=1e-7)
    if stage == 0:                # the reference attention instead of the kernel: the same losses
        reference = tmp_path / "reference"
        launch(["train.py", "--config", "configs/quickstart.yaml", *tiny_overrides(
            image_folder, reference, **{**opts, "kernels.window_attention": "false", "run.checkpoint_every_steps": 0})])
        for step, loss in read_losses(reference).items():
            assert loss == pytest.approx(uninterrupted[step], rel=1e-5), (step, loss, uninterrupted)

    out = tmp_path / "export"
    run_command([PYTHON, "-m", "esvit_scale.export", str(full / "checkpoints" / "step000000003"), str(out)])
    info = json.loads((out / "export.json").read_text())
    cfg = load_config(None, [f"model.arch={arch}", "model.window_size=4", "data.global_crops_size=32"])
    recipe = build_backbone(cfg.model, img_size=32).timm_recipe()
    assert (info["timm_model"], info["timm_kwargs"]) == (recipe.name, recipe.kwargs)
    theirs = _timm_model(recipe, out / "backbone_timm.safetensors")
    teacher = EsViT(_config_of(info), is_teacher=True).eval()
    teacher.load_state_dict(load_file(out / "teacher.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), teacher.backbone.swin.forward_features(x),
                                   rtol=1e-5, atol=1e-5)


def _config_of(info: dict):
    from esvit_scale import ops
    from esvit_scale.config import config_from_dict
    cfg = config_from_dict(info["config"])
    ops.configure(cfg.kernels)
    return cfg
