"""Region matching kernels (CPU, esvit_scale._C) against the pure-PyTorch references of the region loss."""
from __future__ import annotations

import pytest
import torch

from esvit_scale.ops import _ext
from esvit_scale.ops.region_matching import (
    _MatchedSoftCrossEntropy, _teacher_rows, consumable_chunks, matched_soft_cross_entropy,
    matched_soft_cross_entropy_reference,
    matched_soft_cross_entropy_sum, matched_soft_cross_entropy_sum_reference, region_argmax, region_argmax_reference)


pytestmark = pytest.mark.usefixtures("kernels_on")


SHAPES = [(2, 49, 49, 96), (3, 9, 49, 64), (1, 1, 1, 8), (4, 7, 5, 3), (2, 1, 49, 768)]   # N, Ls, Lt, C


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_region_argmax_matches_reference(shape):
    N, Ls, Lt, C = shape
    gen = torch.Generator().manual_seed(sum(shape))
    student, teacher = torch.randn(N, Ls, C, generator=gen), torch.randn(N, Lt, C, generator=gen)
    teacher = teacher * torch.rand(N, Lt, 1, generator=gen) * 10       # norms differ: cosine, not dot product
    index = region_argmax(student, teacher)
    assert index.dtype == torch.int64 and index.shape == (N, Ls)
    assert torch.equal(index, region_argmax_reference(student, teacher))


def test_region_argmax_uses_cosine_and_first_maximum():
    teacher = torch.tensor([[[1.0, 0.0], [100.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])   # tokens 0 and 2 tie in cosine
    student = torch.tensor([[[3.0, 0.0], [0.0, 0.0], [1.0, 0.01]]])
    index = region_argmax(student, teacher)
    assert index.tolist() == [[0, 0, 1]]
    assert torch.equal(index, region_argmax_reference(student, teacher))


def test_region_argmax_double_and_no_grad():
    student = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 6, 16, dtype=torch.float64)
    index = region_argmax(student, teacher)
    assert not index.requires_grad
    assert torch.equal(index, region_argmax_reference(student, teacher))


CE_SHAPES = [(2, 49, 49, 1000), (3, 9, 49, 4097), (1, 1, 1, 1), (2, 3, 2, 7)]   # N, Ls, Lt, K


def ce_inputs(N, Ls, Lt, K, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, Ls, K, generator=gen, dtype=dtype) * 3).requires_grad_()
    probs = torch.softmax(torch.randn(N, Lt, K, generator=gen, dtype=dtype) / 0.07, dim=-1)
    index = torch.randint(0, Lt, (N, Ls), generator=gen)
    return logits, probs, index, gen


@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("temp", [0.1, 1.0])
def test_matched_ce_matches_reference(shape, temp):
    logits, probs, index, gen = ce_inputs(*shape, seed=sum(shape))
    loss = matched_soft_cross_entropy(logits, probs, index, temp)
    ref = matched_soft_cross_entropy_reference(logits, probs, index, temp)
    assert loss.shape == (shape[0],) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    weights = torch.rand(shape[0], generator=gen)
    grad, = torch.autograd.grad((loss * weights).sum(), logits)
    grad_ref, = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-4)


def test_matched_ce_unnormalised_target_and_gradcheck():
    """Teacher rows need not sum to 1 (the formula keeps sum(p_t)); double-precision gradcheck."""
    logits, probs, index, _ = ce_inputs(2, 3, 4, 6, dtype=torch.float64)
    probs = probs * torch.rand(2, 4, 1, dtype=torch.float64)
    torch.testing.assert_close(matched_soft_cross_entropy(logits, probs, index, 0.3),
                               (matched_soft_cross_entropy_reference(logits, probs, index, 0.3)).double(),
                               atol=1e-6, rtol=1e-6)
    rows = _teacher_rows(index, 4).unsqueeze(0)
    assert torch.autograd.gradcheck(lambda s: _MatchedSoftCrossEntropy.apply(s.view(-1, 6), probs.view(-1, 6), rows,
                                                                             0.3), (logits,))


def test_matched_ce_reads_the_matched_teacher_row():
    logits, probs, index, _ = ce_inputs(1, 2, 3, 5)
    probs = probs.detach().clone()
    base = matched_soft_cross_entropy(logits, probs, torch.tensor([[0, 0]]), 0.1)
    probs[0, 2] = torch.tensor([1.0, 0, 0, 0, 0])          # an unmatched row changes nothing
    torch.testing.assert_close(matched_soft_cross_entropy(logits, probs, torch.tensor([[0, 0]]), 0.1), base)
    other = matched_soft_cross_entropy(logits, probs, torch.tensor([[2, 2]]), 0.1)
    expected = -(torch.log_softmax(logits[0, :, :] / 0.1, dim=-1)[:, 0]).mean()
    torch.testing.assert_close(other[0], expected)


def test_matched_ce_bad_index_raises():
    logits, probs, index, _ = ce_inputs(1, 2, 3, 5)
    with pytest.raises(RuntimeError, match="out of range"):
        matched_soft_cross_entropy(logits, probs, torch.tensor([[0, 3]]), 0.1)
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        matched_soft_cross_entropy(logits, probs[:, :, :4], index, 0.1)


def sum_inputs(N, Ls, Lt, K, targets, dtype=torch.float32, seed=0):
    """Student logits, teacher probs (2, N, Lt, K) and one (N, Ls) match per teacher crop in `targets`."""
    logits, _, _, gen = ce_inputs(N, Ls, Lt, K, dtype, seed)
    probs = torch.softmax(torch.randn(2, N, Lt, K, generator=gen, dtype=dtype) / 0.07, dim=-1)
    return logits, probs, {g: torch.randint(0, Lt, (N, Ls), generator=gen) for g in targets}


@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("targets", [(0, 1), (1,)], ids=["local-crop", "global-crop"])
@pytest.mark.parametrize("consume", [False, True])
def test_matched_ce_sum_matches_reference(shape, targets, consume):
    leaf, probs, matches = sum_inputs(*shape, targets, seed=sum(shape))
    logits = leaf * 1.0                                    # a fresh non-leaf, like the region head's output
    ref = matched_soft_cross_entropy_sum_reference(leaf, probs, matches, 0.1)
    grad_ref, = torch.autograd.grad(ref * 0.37, leaf)
    loss = matched_soft_cross_entropy_sum(logits, probs, matches, 0.1, consume_logits=consume)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # K = 1: the exact gradient is 0; the kernel's is the fp32 rounding of s / T - lse (~1e-7 |s| / T) per target
    atol = 1e-6 if shape[-1] > 1 else 1e-4
    if consume:   # the gradient already sits in the logits' storage: nothing logits-sized was allocated
        torch.testing.assert_close(logits.detach() * 0.37, grad_ref, atol=atol, rtol=1e-4)
    grad, = torch.autograd.grad(loss * 0.37, leaf)
    torch.testing.assert_close(grad, grad_ref, atol=atol, rtol=1e-4)


def test_matched_ce_sum_never_consumes_a_leaf_or_without_autograd():
    leaf, probs, matches = sum_inputs(2, 3, 4, 9, (0, 1))
    before = leaf.detach().clone()
    matched_soft_cross_entropy_sum(leaf, probs, matches, 0.1, consume_logits=True).backward()
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():
        logits = leaf * 1.0
        loss = matched_soft_cross_entropy_sum(logits, probs, matches, 0.1, consume_logits=True)
    assert torch.equal(logits, before)
    torch.testing.assert_close(loss, matched_soft_cross_entropy_sum_reference(before, probs, matches, 0.1))


def test_matched_ce_sum_consumed_graph_refuses_a_second_backward():
    leaf, probs, matches = sum_inputs(2, 3, 4, 9, (0, 1))
    loss = matched_soft_cross_entropy_sum(leaf * 1.0, probs, matches, 0.1, consume_logits=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def head_output_and_crops(n_crops, N, Ls, K, seed=0):
    """A region head's output for n_crops crops of N images (a Linear's output, as in EsViT.forward), its
    parameters, and per crop a teacher-probability tensor and matches."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(8, K)
    x = torch.randn(n_crops * N, Ls, 8, generator=gen)
    probs = torch.softmax(torch.randn(2, N, Ls, K, generator=gen) / 0.07, dim=-1)
    matches = [{g: torch.randint(0, Ls, (N, Ls), generator=gen) for g in (0, 1) if g != c} for c in range(n_crops)]
    return head, x, probs, matches


def test_consumable_chunks_hand_on_consumed_gradients_without_a_copy():
    head, x, probs, matches = head_output_and_crops(3, 2, 5, 32)
    results = []
    for consume in (True, False):
        out = head(x)
        seen = {}
        out.register_hook(lambda g: seen.update(shares_storage=g.data_ptr() == out.data_ptr()))
        crops = consumable_chunks(out, 3) if consume else list(out.chunk(3))
        loss = sum(matched_soft_cross_entropy_sum(c, probs, m, 0.1, consume_logits=consume)
                   for c, m in zip(crops, matches))
        results.append((loss.detach(), torch.autograd.grad(loss, list(head.parameters())), seen["shares_storage"]))
    (loss, grads, shared), (ref_loss, ref_grads, ref_shared) = results
    assert shared and not ref_shared          # the consumed gradient reached the head in the output's own storage
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_consumable_chunks_concatenate_other_gradients_like_chunk():
    head, x, probs, matches = head_output_and_crops(3, 2, 5, 16, seed=1)
    results = []
    for split in (consumable_chunks, lambda t, n: list(t.chunk(n))):
        out = head(x)
        crops = split(out, 3)
        assert all(torch.equal(a, b) for a, b in zip(crops, out.chunk(3)))
        # reference loss (separate gradient tensors) on two of the three crops: the third gets no gradient
        loss = sum(matched_soft_cross_entropy_sum_reference(c, probs, m, 0.1) for c, m in zip(crops[:2], matches))
        results.append(torch.autograd.grad(loss, out))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert results[0][0][4:].abs().sum() == 0
    with torch.no_grad():
        assert all(c.grad_fn is None for c in consumable_chunks(head(x), 3))


def test_matched_ce_sum_gradcheck_double():
    leaf, probs, matches = sum_inputs(2, 3, 4, 6, (0, 1), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: matched_soft_cross_entropy_sum(s, probs, matches, 0.3), (leaf,))


def test_region_matching_disabled_uses_reference():
    _ext.configure(region_matching=False)
    logits, probs, index, _ = ce_inputs(1, 2, 3, 5)
    assert _ext.backend("region_matching", logits) == "reference"
    loss = matched_soft_cross_entropy(logits, probs, index, 0.1)
    assert loss.grad_fn is not None and "MatchedSoftCrossEntropy" not in type(loss.grad_fn).__name__
