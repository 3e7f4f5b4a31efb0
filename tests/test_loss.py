"""The EsViT loss against a straightforward per-pair reference written here, loop by loop."""
import pytest
import torch
import torch.nn.functional as F

from esvit_scale.config import LossConfig
from esvit_scale.losses.esvit_loss import EsViTLoss
from esvit_scale.models.esvit import MultiCropOutput
from esvit_scale.ops import _ext
from esvit_scale.ops.region_matching import consumable_chunks


def make_outputs(B, K, C, token_counts, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return MultiCropOutput(view_logits=[r(B, K) for _ in token_counts],
                           region_logits=[r(B, L, K) for L in token_counts],
                           region_features=[r(B, L, C) for L in token_counts])


def reference_loss(student, teacher, view_center, region_center, tau_t, tau_s=0.1, factor=0.5, region=True):
    """Image by image, pair by pair, token by token."""
    B = student.view_logits[0].shape[0]
    per_image = []
    for b in range(B):
        pairs = []
        for g in range(2):
            pt = F.softmax((teacher.view_logits[g][b] - view_center[0]) / tau_t, dim=-1)
            for v in range(len(student.view_logits)):
                if v == g:
                    continue
                lv = -(pt * F.log_softmax(student.view_logits[v][b] / tau_s, dim=-1)).sum()
                lr = torch.tensor(0.0)
                if region:
                    fs, ft = student.region_features[v][b], teacher.region_features[g][b]
                    terms = []
                    for i in range(fs.shape[0]):
                        sims = torch.stack([F.cosine_similarity(fs[i], ft[j], dim=0) for j in range(ft.shape[0])])
                        j = int(sims.argmax())
                        ptr = F.softmax((teacher.region_logits[g][b, j] - region_center[0]) / tau_t, dim=-1)
                        terms.append(-(ptr * F.log_softmax(student.region_logits[v][b, i] / tau_s, dim=-1)).sum())
                    lr = torch.stack(terms).mean()
                pairs.append(factor * (lv + lr))
        per_image.append(torch.stack(pairs).mean())
    return torch.stack(per_image).mean(), len(pairs)


@pytest.mark.parametrize("tokens, n_pairs", [
    ([16, 16, 4, 4, 4, 4, 4, 4, 4, 4], 18),          # 2 + 8 crops: 18 pairs
    ([16, 16, 4, 4, 4, 1, 1], 12),                   # two local sizes (official code: one only)
])
def test_loss_matches_per_pair_reference(tokens, n_pairs):
    B, K, C = 3, 32, 8
    student, teacher = make_outputs(B, K, C, tokens, 0), make_outputs(B, K, C, tokens[:2], 1)
    fn = EsViTLoss(LossConfig(), K)
    fn.view_center.normal_()
    fn.region_center.normal_()
    vc, rc = fn.view_center.clone(), fn.region_center.clone()
    out = fn(student, teacher, teacher_temp=0.05)
    ref, pairs = reference_loss(student, teacher, vc, rc, 0.05)
    assert pairs == n_pairs
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-5)


def test_view_only_switch_and_pair_factor():
    tokens = [9, 9, 1, 1, 1, 1]
    student, teacher = make_outputs(2, 16, 4, tokens, 2), make_outputs(2, 16, 4, tokens[:2], 3)
    fn = EsViTLoss(LossConfig(region_loss=False, pair_factor=1.0), 16)
    out = fn(student, teacher, teacher_temp=0.04)
    ref, _ = reference_loss(student, teacher, torch.zeros(1, 16), torch.zeros(1, 16), 0.04, factor=1.0, region=False)
    torch.testing.assert_close(out["loss"], ref)
    assert "region_loss" not in out and set(out) == {"loss", "view_loss"}


def test_centres_are_separate_emas_of_teacher_means():
    tokens = [4, 4, 1, 1]
    student, teacher = make_outputs(2, 8, 4, tokens, 4), make_outputs(2, 8, 4, tokens[:2], 5)
    fn = EsViTLoss(LossConfig(center_momentum=0.9), 8)
    fn(student, teacher, teacher_temp=0.04)
    view_mean = torch.cat(teacher.view_logits).mean(0, keepdim=True)
    region_mean = torch.cat([z.flatten(0, 1) for z in teacher.region_logits]).mean(0, keepdim=True)
    torch.testing.assert_close(fn.view_center, 0.1 * view_mean)
    torch.testing.assert_close(fn.region_center, 0.1 * region_mean)


def test_gradient_reaches_student_only():
    tokens = [4, 4, 1, 1]
    student, teacher = make_outputs(2, 8, 4, tokens, 6), make_outputs(2, 8, 4, tokens[:2], 7)
    for t in student.view_logits + student.region_logits + teacher.view_logits + teacher.region_logits:
        t.requires_grad_(True)
    EsViTLoss(LossConfig(), 8)(student, teacher, 0.04)["loss"].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in student.view_logits + student.region_logits)
    assert all(t.grad is None for t in teacher.view_logits + teacher.region_logits)


@pytest.mark.usefixtures("kernels_on")
def test_fused_region_term_gives_the_reference_loss_and_gradients():
    """Kernels on: the region term consumes the student's region logits, chunks of one head output per crop
    size as in EsViT.forward; the loss and every gradient equal the reference formulation's."""
    tokens = [16, 16, 4, 4, 4, 1]
    student, teacher = make_outputs(2, 32, 8, tokens, 8), make_outputs(2, 32, 8, tokens[:2], 9)
    leaves = student.view_logits + student.region_logits
    for t in leaves:
        t.requires_grad_(True)
    results = []
    for force_reference in (False, True):
        _ext.configure(force_reference=force_reference)
        region = []
        for L in dict.fromkeys(tokens):                    # one head output per crop size, chunked per crop
            members = [z for z in student.region_logits if z.shape[1] == L]
            region += consumable_chunks(torch.cat(members) * 1.0, len(members))
        head_out = MultiCropOutput([z * 1.0 for z in student.view_logits], region, student.region_features)
        loss = EsViTLoss(LossConfig(), 32)(head_out, teacher, 0.04)["loss"]
        results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    (fused, fused_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
