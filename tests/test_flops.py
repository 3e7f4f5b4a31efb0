"""FLOPs counted from the model (esvit_scale/bench/flops.py): the published Swin-T figure, the step's structure, and
our fused operators counted like the references they replace."""
import pytest
import torch

from esvit_scale import ops
from esvit_scale.bench.flops import backbone_flops, counter, crop_sizes, step_flops
from esvit_scale.config import load_config

TINY = ["model.arch=swin_nano", "model.window_size=4", "model.out_dim=128", "model.head_hidden_dim=64",
        "model.head_bottleneck_dim=32", "data.batch_size_per_gpu=2", "data.global_crops_size=32",
        "data.local_crops_size=[16,24]", "data.local_crops_number=[2,1]", "run.device=cpu"]


def test_swin_tiny_forward_at_224_is_the_published_4_5_g_multiply_adds():
    macs = backbone_flops(load_config("configs/swin_tiny.yaml"), 224) / 2     # FLOP = 2 x MAC
    assert macs == pytest.approx(4.5e9, rel=0.05)
    macs_large = backbone_flops(load_config("configs/swin_large.yaml"), 224) / 2
    assert macs_large == pytest.approx(34.5e9, rel=0.05)                         # Swin-L's published 34.5 G


def test_step_flops_add_up_over_crops_and_phases():
    cfg = load_config("configs/swin_tiny.yaml", ["data.batch_size_per_gpu=4", "data.local_crops_size=[96,64]",
                                                 "data.local_crops_number=[6,2]"])
    f = step_flops(cfg)
    assert set(f.by_crop_size) == {224, 96, 64}                   # every local-crop size counted
    assert f.student_forward == 4 * sum(f.by_crop_size[s] for s in crop_sizes(cfg))
    assert f.teacher_forward == 4 * 2 * f.by_crop_size[224]
    assert 1.9 < f.backward / f.student_forward <= 2.0       # both gradients of every product but the first layer's
    assert f.loss > 0                                        # the region matching's similarity products
    assert f.total == f.teacher_forward + f.student_forward + f.loss + f.backward
    assert f.per_image == pytest.approx(f.total / 4)
    assert "2 x MAC" in f.to_dict()["convention"]
    # activation checkpointing recomputes, it adds no model FLOPs
    ckpt = step_flops(load_config("configs/swin_tiny.yaml", ["data.batch_size_per_gpu=4",
                                                             "data.local_crops_size=[96,64]",
                                                             "data.local_crops_number=[6,2]",
                                                             "model.activation_checkpointing=true"]))
    assert ckpt.total == f.total


def _real_step_flops(kernels_on: bool) -> tuple[dict[str, int], set[str]]:
    """Count one step on real CPU tensors with the fused ops on or off, by phase."""
    from esvit_scale.losses.esvit_loss import EsViTLoss
    from esvit_scale.models.esvit import EsViT
    cfg = load_config(None, TINY + [f"kernels.window_attention={kernels_on}", f"kernels.region_matching={kernels_on}"])
    ops.configure(cfg.kernels)
    torch.manual_seed(0)
    student, teacher = EsViT(cfg), EsViT(cfg, is_teacher=True).requires_grad_(False)
    loss_fn = EsViTLoss(cfg.loss, cfg.model.out_dim)
    crops = [torch.randn(2, 3, s, s) for s in crop_sizes(cfg)]
    counts, seen = {}, set()
    for phase in ("teacher_forward", "student_forward", "loss", "backward"):
        with counter() as c:
            if phase == "teacher_forward":
                with torch.no_grad():
                    t_out = teacher(crops[:2])
            elif phase == "student_forward":
                s_out = student(crops)
            elif phase == "loss":
                loss = loss_fn(s_out, t_out, 0.04)["loss"]
            else:
                loss.backward()
        counts[phase] = c.get_total_flops()
        seen |= {str(op) for op in c.get_flop_counts()["Global"]}
    return counts, seen


@pytest.mark.usefixtures("kernels_on")
def test_fused_operators_count_like_their_references_and_like_the_meta_count():
    fused, fused_ops = _real_step_flops(True)
    reference, _ = _real_step_flops(False)
    assert {"esvit.window_attention_forward", "esvit.window_attention_backward", "esvit.region_argmax"} <= fused_ops
    assert fused == reference
    meta = step_flops(load_config(None, TINY))
    assert fused == {"teacher_forward": meta.teacher_forward, "student_forward": meta.student_forward,
                     "loss": meta.loss, "backward": meta.backward}
