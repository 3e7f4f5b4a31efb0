import torch

from esvit_scale.config import load_config
from esvit_scale.models.esvit import EsViT
from esvit_scale.models.swin import SwinBackbone


def tiny_cfg(*extra):
    return load_config(None, ["model.arch=swin_nano", "model.window_size=4", "model.out_dim=64",
                              "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
                              "data.global_crops_size=64", *extra])


def test_outputs_for_several_crop_sizes_one_pass_per_size():
    cfg = tiny_cfg()
    model = EsViT(cfg)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    B = 2
    crops = [torch.randn(B, 3, 64, 64)] * 2 + [torch.randn(B, 3, 32, 32)] * 3 + [torch.randn(B, 3, 48, 48)] * 2
    out = model(crops)
    assert [tuple(s) for s in calls] == [(2 * B, 3, 64, 64), (3 * B, 3, 32, 32), (2 * B, 3, 48, 48)]
    C = model.backbone.num_features
    tokens = [4, 4, 1, 1, 1, 4, 4]        # 64 px -> 2x2 last-stage tokens, 32 -> 1x1, 48 -> 2x2 (rounded up)
    assert [tuple(v.shape) for v in out.view_logits] == [(B, 64)] * 7
    assert [tuple(r.shape) for r in out.region_logits] == [(B, L, 64) for L in tokens]
    assert [tuple(f.shape) for f in out.region_features] == [(B, L, C) for L in tokens]
    # the view feature is the mean of the region tokens
    view, region = model.backbone(crops[0])
    torch.testing.assert_close(view, region.mean(1))


def test_view_only_model_has_no_region_head_and_teacher_no_drop_path():
    cfg = tiny_cfg("loss.region_loss=false", "model.drop_path_rate=0.3")
    student, teacher = EsViT(cfg), EsViT(cfg, is_teacher=True)
    assert student.region_head is None and student(
        [torch.randn(1, 3, 64, 64)] * 2).region_logits is None
    assert [n for n, _ in student.named_parameters()] == [n for n, _ in teacher.named_parameters()]
    drop = lambda m: [x.drop_prob for x in m.modules() if type(x).__name__ == "DropPath"]  # noqa: E731
    assert drop(student) and max(drop(student)) > 0 and drop(teacher) == []


def test_presets_match_the_paper_sizes():
    from esvit_scale.models.swin import SwinBackbone
    for arch, millions, dim in [("swin_tiny", 27.5, 768), ("swin_base", 86.7, 1024)]:
        cfg = load_config(None, [f"model.arch={arch}"])
        bb = SwinBackbone(cfg.model, 224)
        n = sum(p.numel() for p in bb.parameters()) / 1e6
        assert abs(n - millions) / millions < 0.02 and bb.num_features == dim, (arch, n)


def test_head_batchnorm_normalises_over_the_batch_and_leaves_the_keys_alone_when_off():
    from esvit_scale.models.heads import ProjectionHead
    plain, bn = ProjectionHead(8, 16, 32, 4), ProjectionHead(8, 16, 32, 4, batchnorm=True)
    assert [k for k in plain.state_dict()] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                               "mlp.4.weight", "mlp.4.bias", "last_layer.weight_v",
                                               "last_layer.weight_g"]
    x = torch.randn(6, 5, 8) + 10.0                       # a large part common to every token of the batch
    hidden = bn.mlp[1](bn.mlp[0](x))                       # after the first batch-normalised layer
    assert hidden.flatten(0, 1).mean(0).abs().max() < 1e-4 and bn.mlp[1].running_mean is None
    bn.eval()                                              # the teacher: still the batch's own statistics
    torch.testing.assert_close(bn.mlp[1](bn.mlp[0](x)), hidden)


def test_backbone_layer_norm_is_torchs_without_a_gpu_and_says_so(caplog):
    """apex's FusedLayerNorm is chosen only on a GPU with apex importable (not installable here); on the CPU the
    backbone holds torch LayerNorms and the log names the choice and why."""
    import logging

    from esvit_scale.models import swin
    swin._logged.clear()
    cfg = load_config(None, ["model.arch=swin_nano", "model.window_size=4", "data.global_crops_size=32",
                             "data.local_crops_size=[16]", "run.device=cpu"])
    with caplog.at_level(logging.INFO, logger="esvit_scale"):
        backbone = SwinBackbone(cfg.model, img_size=32, kernels=cfg.kernels, on_gpu=False)
    norms = [m for m in backbone.modules() if "LayerNorm" in type(m).__name__]
    assert norms and all(type(m) is torch.nn.LayerNorm for m in norms)
    assert "backbone LayerNorm: torch LayerNorm (apex is for GPUs only)" in caplog.text
    caplog.clear()
    swin._logged.clear()
    with caplog.at_level(logging.INFO, logger="esvit_scale"):   # a GPU run that says no to apex
        SwinBackbone(cfg.model, img_size=32, kernels=load_config(None, ["kernels.apex_layer_norm=false"]).kernels,
                     on_gpu=True)
    assert "torch LayerNorm (kernels.apex_layer_norm=false)" in caplog.text
    try:
        import apex.normalization  # noqa: F401
    except ImportError:            # a GPU run that would take apex, here where it is not installed: torch's, logged
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="esvit_scale"):
            backbone = SwinBackbone(cfg.model, img_size=32, kernels=cfg.kernels, on_gpu=True)
        assert "torch LayerNorm (apex not importable)" in caplog.text
        assert any(type(m) is torch.nn.LayerNorm for m in backbone.modules())


def test_the_region_head_has_its_own_batchnorm_switch_and_why():
    """A batch-normalised head's output does not see how far apart its input tokens are (docs/training.md, "The region
    term"): tokens drawn 100x closer together give outputs as far apart as before. A plain head's outputs draw together
    with them."""
    from esvit_scale.models.heads import ProjectionHead, TokenBatchNorm
    cfg = load_config("configs/quickstart.yaml", ["model.head_batchnorm=true", "model.region_head_batchnorm=false"])
    model = EsViT(cfg)
    assert any(isinstance(m, TokenBatchNorm) for m in model.view_head.modules())
    assert not any(isinstance(m, TokenBatchNorm) for m in model.region_head.modules())
    follows = EsViT(load_config("configs/quickstart.yaml", ["model.head_batchnorm=true",
                                                            "model.region_head_batchnorm=null"]))
    assert any(isinstance(m, TokenBatchNorm) for m in follows.region_head.modules())

    torch.manual_seed(0)
    common, spread = torch.randn(1, 1, 32), torch.randn(4, 9, 32)
    for batchnorm in (True, False):
        head = ProjectionHead(32, 64, 48, 16, batchnorm=batchnorm)
        apart, close = (head(common + s * spread).flatten(0, 1).std(0).mean() for s in (1.0, 0.01))
        assert (abs(close / apart - 1) < 0.05) if batchnorm else (close < 0.05 * apart)
