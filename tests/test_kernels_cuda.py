"""CUDA kernels of esvit_scale._C against the references (fp32, fp16, bf16). Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import get_relative_position_index

from esvit_scale.ops import _ext
from esvit_scale.ops.region_matching import (
    matched_soft_cross_entropy, matched_soft_cross_entropy_reference, matched_soft_cross_entropy_sum,
    matched_soft_cross_entropy_sum_reference, region_argmax, region_argmax_reference)
from esvit_scale.ops.swin_attention import window_layout
from esvit_scale.ops.window_attention import window_attention, window_attention_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = {torch.float32: dict(atol=2e-4, rtol=1e-3), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=8e-2, rtol=5e-2)}


@pytest.fixture(autouse=True)
def cuda_build():
    assert _ext.cuda_available(), "esvit_scale._C was built without CUDA (needs nvcc and a CUDA torch)"
    _ext.configure()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("side,ws,shift,heads,dim", [(56, 7, 3, 3, 96), (24, 7, 3, 6, 192), (3, 7, 0, 24, 768),
                                                     (28, 14, 7, 4, 128), (5, 3, 1, 2, 32)])
def test_window_attention_cuda_matches_reference(dtype, side, ws, shift, heads, dim):
    dev = torch.device("cuda")
    _, _, region = window_layout(side, side, (ws, ws), (shift, shift), dev)
    nW = (-(-side // ws)) ** 2
    gen = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(2 * nW, ws * ws, 3 * dim, device=dev, generator=gen).to(dtype).requires_grad_()
    table = torch.randn((2 * ws - 1) ** 2, heads, device=dev, generator=gen).requires_grad_()
    rel = get_relative_position_index(ws, ws).to(dev)
    assert _ext.backend("window_attention", qkv) == "cuda"
    scale = (dim // heads) ** -0.5
    out = window_attention(qkv, table, rel, region, heads, scale)
    # the reference in fp32 on the same (rounded) inputs
    q32, t32 = qkv.detach().float().requires_grad_(), table.detach().clone().requires_grad_()
    ref = window_attention_reference(q32, t32, rel, region, heads, scale)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    grad = torch.randn(out.shape, device=dev, generator=gen)
    dq, dt = torch.autograd.grad(out, (qkv, table), grad.to(dtype))
    rq, rt = torch.autograd.grad(ref, (q32, t32), grad)
    torch.testing.assert_close(dq.float(), rq, **TOL[dtype])
    torch.testing.assert_close(dt, rt, atol=TOL[dtype]["atol"] * 20, rtol=TOL[dtype]["rtol"] * 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_region_matching_cuda_matches_reference(dtype):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    fs = torch.randn(4, 9, 768, device=dev, generator=gen)
    ft = torch.randn(4, 49, 768, device=dev, generator=gen)
    index = region_argmax(fs.to(dtype), ft.to(dtype))
    assert torch.equal(index, region_argmax_reference(fs.to(dtype), ft.to(dtype)))
    logits = (3 * torch.randn(4, 9, 65536, device=dev, generator=gen)).to(dtype).requires_grad_()
    probs = torch.softmax(torch.randn(4, 49, 65536, device=dev, generator=gen) / 0.07, dim=-1)
    loss = matched_soft_cross_entropy(logits, probs, index, 0.1)
    l32 = logits.detach().float().requires_grad_()
    ref = matched_soft_cross_entropy_reference(l32, probs, index, 0.1)
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    g, = torch.autograd.grad(loss.sum(), logits)
    r, = torch.autograd.grad(ref.sum(), l32)
    torch.testing.assert_close(g.float(), r, atol=TOL[dtype]["atol"] * 1e-2, rtol=TOL[dtype]["rtol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("consume", [False, True])
def test_matched_ce_sum_cuda_two_targets(dtype, consume):
    """One student crop against both teacher crops in one call; consume_logits writes the gradient in place."""
    dev, gen = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(3)
    leaf = (3 * torch.randn(4, 9, 65536, device=dev, generator=gen)).requires_grad_()
    probs = torch.softmax(torch.randn(2, 4, 49, 65536, device=dev, generator=gen) / 0.07, dim=-1)
    matches = {g: torch.randint(0, 49, (4, 9), device=dev, generator=gen) for g in (0, 1)}
    loss = matched_soft_cross_entropy_sum((leaf * 1.0).to(dtype), probs, matches, 0.1, consume_logits=consume)
    ref = matched_soft_cross_entropy_sum_reference(leaf, probs, matches, 0.1)
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    g, = torch.autograd.grad(loss * 0.5, leaf)
    r, = torch.autograd.grad(ref * 0.5, leaf)
    torch.testing.assert_close(g, r, atol=TOL[dtype]["atol"] * 1e-2, rtol=TOL[dtype]["rtol"])
