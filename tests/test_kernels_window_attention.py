"""Fused window attention (CPU kernel of esvit_scale._C) against its pure-PyTorch reference, and our attention
path in timm's Swin blocks (geometry, masking of padded tokens, checkpoints, dispatch)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, get_relative_position_index

from esvit_scale.ops import _ext
from esvit_scale.ops.swin_attention import EsvitSwinBlock, install_window_attention, window_layout
from esvit_scale.ops.window_attention import _FusedWindowAttention, window_attention, window_attention_reference


pytestmark = pytest.mark.usefixtures("kernels_on")


def random_region(nW: int, N: int, shift: bool, pad: bool, gen: torch.Generator) -> torch.Tensor | None:
    """(nW, N) int32: shift-region labels in 0..3 and -1 for padded tokens (each window keeps a real token)."""
    if not (shift or pad):
        return None
    region = torch.randint(0, 4 if shift else 1, (nW, N), generator=gen, dtype=torch.int32)
    if pad:
        padded = torch.rand(nW, N, generator=gen) < 0.4
        padded[:, 0] = False
        region[padded] = -1
    return region


def make_inputs(batch, nW, wh, ww, H, D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = wh * ww
    qkv = torch.randn(batch * nW, N, 3 * H * D, generator=gen, dtype=dtype).requires_grad_()
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), H, generator=gen, dtype=dtype).requires_grad_()
    return qkv, table, get_relative_position_index(wh, ww), gen


# batch, nW, window (h, w), heads, head dim: odd window counts, 1-token windows, non-square windows, W=14
# head dim 24: read in place by the AVX2 path (8 lanes), copied into padded tiles by the AVX-512 one (16 lanes)
SHAPES = [(2, 4, (7, 7), 3, 32), (1, 3, (7, 7), 6, 32), (3, 5, (3, 3), 2, 16), (2, 1, (1, 1), 4, 8),
          (1, 2, (2, 3), 1, 5), (1, 1, (14, 14), 2, 32), (5, 1, (7, 7), 24, 32), (2, 3, (4, 5), 2, 24)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("shift,pad", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_reference_forward_and_grads(shape, shift, pad, cpu_isa):
    batch, nW, (wh, ww), H, D = shape
    qkv, table, rel, gen = make_inputs(batch, nW, wh, ww, H, D, seed=hash((shape, shift, pad)) % 1000)
    region = random_region(nW, wh * ww, shift, pad, gen)
    scale = D ** -0.5
    out = _FusedWindowAttention.apply(qkv, table, rel, region, H, scale)
    ref = window_attention_reference(qkv, table, rel, region, H, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    grad = torch.randn(out.shape, generator=gen)
    dq, dt = torch.autograd.grad(out, (qkv, table), grad)
    rq, rt = torch.autograd.grad(ref, (qkv, table), grad)
    torch.testing.assert_close(dq, rq, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(dt, rt, atol=2e-4, rtol=1e-4)   # the table sums over every window
    if wh * ww > 1:  # one key: the softmax is constant, the bias gets no gradient
        assert dt.abs().sum() > 0


@pytest.mark.parametrize("shift,pad", [(False, False), (True, True)])
@pytest.mark.parametrize("head_dim", [3, 8])   # 8: a multiple of the float64 vector width, read in place
def test_gradcheck_double(shift, pad, head_dim, cpu_isa):
    qkv, table, rel, gen = make_inputs(1, 2, 2, 2, 2, head_dim, dtype=torch.float64, seed=3)
    region = random_region(2, 4, shift, pad, gen)
    assert torch.autograd.gradcheck(lambda q, t: _FusedWindowAttention.apply(q, t, rel, region, 2, 0.6),
                                    (qkv, table), fast_mode=True)


def test_padded_keys_get_no_weight(cpu_isa):
    """Changing a padded token's q/k/v changes no real token's output; real keys do change it."""
    qkv, table, rel, gen = make_inputs(1, 1, 3, 3, 2, 8)
    region = torch.zeros(1, 9, dtype=torch.int32)
    region[0, 5:] = -1
    out = window_attention(qkv, table, rel, region, 2, 0.3)
    changed = qkv.detach().clone()
    changed[:, 6] += 5.0
    torch.testing.assert_close(window_attention(changed, table, rel, region, 2, 0.3)[:, :5], out[:, :5])
    changed = qkv.detach().clone()
    changed[:, 1] += 5.0
    assert not torch.allclose(window_attention(changed, table, rel, region, 2, 0.3)[:, :5], out[:, :5])


def test_bad_inputs_raise_clear_errors():
    qkv, table, rel, _ = make_inputs(1, 1, 2, 2, 2, 4)
    with pytest.raises(RuntimeError, match="num_heads"):
        _FusedWindowAttention.apply(qkv, table, rel, None, 5, 1.0)
    with pytest.raises(RuntimeError, match="rel_index"):
        _FusedWindowAttention.apply(qkv, table, rel[:3], None, 2, 1.0)
    with pytest.raises(RuntimeError, match="multiple of nW"):
        _FusedWindowAttention.apply(qkv, table, rel, torch.zeros(2, 4, dtype=torch.int32), 2, 1.0)
    with pytest.raises(RuntimeError, match=r"rel_index values must lie in \[0, "):
        _FusedWindowAttention.apply(qkv, table, rel + table.shape[0], None, 2, 1.0)   # past the table's end


def timm_partition(x, ws, shift):
    """timm's roll + pad + window_partition of a (B, H, W, C) map -> (B*nW, N, C)."""
    from timm.models.swin_transformer import window_partition
    x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h, pad_w = (-x.shape[1]) % ws[0], (-x.shape[2]) % ws[1]
    x = torch.nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return window_partition(x, ws).reshape(-1, ws[0] * ws[1], x.shape[-1])


@pytest.mark.parametrize("H,W,ws,shift", [(56, 56, (7, 7), (3, 3)), (24, 24, (7, 7), (3, 3)), (6, 6, (7, 7), (3, 3)),
                                          (3, 3, (7, 7), (0, 0)), (10, 13, (4, 4), (2, 2)), (5, 9, (3, 3), (0, 0))])
def test_window_layout_matches_timm_geometry_and_shift_mask(H, W, ws, shift):
    gather, scatter, region = window_layout(H, W, ws, shift, torch.device("cpu"))
    ids = torch.arange(1, H * W + 1, dtype=torch.float64).view(1, H, W, 1)     # token id + 1, 0 = padding
    expected = timm_partition(ids, ws, shift).view(-1).long() - 1              # -1 where timm pads
    got = torch.where(gather < H * W, gather, torch.full_like(gather, -1))
    assert torch.equal(got, expected)
    assert torch.equal(gather[scatter], torch.arange(H * W))                  # scatter inverts gather
    if region is None:
        assert not any(shift) and H % ws[0] == 0 and W % ws[1] == 0
        return
    assert torch.equal(region.view(-1) < 0, expected < 0)                     # padded tokens marked
    block = SwinTransformerBlock(8, (H, W), num_heads=1, window_size=ws, shift_size=shift, always_partition=True,
                                 dynamic_mask=True)
    timm_mask = block.get_attn_mask(torch.zeros(1, H + (-H) % ws[0], W + (-W) % ws[1], 1))
    if timm_mask is None:
        assert (region[region >= 0] == region[region >= 0][0]).all()
        return
    real = region >= 0
    ours = (region.unsqueeze(2) != region.unsqueeze(1)) & real.unsqueeze(2) & real.unsqueeze(1)
    theirs = (timm_mask != 0) & real.unsqueeze(2) & real.unsqueeze(1)
    assert torch.equal(ours, theirs)


def tiny_swin(**kw):
    torch.manual_seed(0)
    model = SwinTransformer(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                            num_classes=0, strict_img_size=False, drop_path_rate=0.0, **kw)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def test_installed_path_equals_timm_without_padding_and_keeps_state_dict():
    timm_model = tiny_swin()
    ours = copy.deepcopy(timm_model)
    assert install_window_attention(ours, fused=True) == 4
    assert list(ours.state_dict()) == list(timm_model.state_dict())
    assert all(isinstance(m, EsvitSwinBlock) for m in ours.layers[0].blocks)
    ours.load_state_dict(timm_model.state_dict())                              # checkpoints load both ways
    x = torch.randn(2, 3, 64, 64)                                             # 16x16 and 8x8 maps: no padding
    torch.testing.assert_close(ours.forward_features(x), timm_model.forward_features(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [40, 8])
def test_fused_and_reference_paths_agree_on_any_crop(size, cpu_isa):
    """Kernels on vs off: same outputs and gradients (40 px: maps 10x10 -> padded 12x12 with shift, then 5x5 -> 8x8)."""
    fused, ref = tiny_swin(), tiny_swin()
    install_window_attention(fused, fused=True)
    install_window_attention(ref, fused=False)
    x = torch.randn(2, 3, size, size)
    out_f, out_r = fused.forward_features(x), ref.forward_features(x)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-4)
    out_f.square().sum().backward()
    out_r.square().sum().backward()
    for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_padded_tokens_are_masked_in_a_block():
    """A 3x3 map in a 7x7 window: our block attends over the 9 real tokens only (timm lets the padding in)."""
    torch.manual_seed(0)
    block = SwinTransformerBlock(8, (7, 7), num_heads=2, window_size=7, dynamic_mask=True)
    torch.nn.init.normal_(block.attn.relative_position_bias_table)
    timm_out = block._attn(x := torch.randn(1, 3, 3, 8))
    install_window_attention(block, fused=True)
    ours = block._attn(x)
    # expected: plain attention over the 9 tokens with the 7x7 table's bias at their positions
    attn = block.attn
    pos = torch.tensor([r * 7 + c for r in range(3) for c in range(3)])
    rel = attn.relative_position_index[pos][:, pos]
    qkv = attn.qkv(x.view(1, 9, 8))
    expected = attn.proj(window_attention_reference(qkv, attn.relative_position_bias_table, rel, None, 2, attn.scale))
    torch.testing.assert_close(ours.view(1, 9, 8), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(timm_out, ours, atol=1e-3)


def test_gradient_checkpointing_gives_same_grads():
    plain, ckpt = tiny_swin(), tiny_swin()
    for m in (plain, ckpt):
        install_window_attention(m, fused=True)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 40, 40)
    plain.forward_features(x).sum().backward()
    ckpt.forward_features(x).sum().backward()
    for pa, pb in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_dispatch_config_and_single_log(caplog):
    qkv, table, rel, _ = make_inputs(1, 1, 2, 2, 1, 4)
    with caplog.at_level(logging.INFO, logger="esvit_scale.ops"):
        assert _ext.backend("window_attention", qkv) == "cpu"
        assert _ext.backend("window_attention", qkv) == "cpu"
        assert _ext.backend("window_attention", qkv.half()) == "reference"     # no CPU fp16 kernel
        _ext.configure(window_attention=True, force_reference=True)
        assert _ext.backend("window_attention", qkv) == "reference"
        _ext.configure(window_attention=False)
        assert _ext.backend("window_attention", qkv) == "reference"
        assert _ext.backend("region_matching", qkv) == "cpu"
    lines = [r.getMessage() for r in caplog.records]
    assert sum(f"window_attention uses the cpu implementation ({_ext.cpu_isa()})" in m for m in lines) == 1
    assert any("disabled by config" in m for m in lines)


def test_cpu_instruction_sets_agree_and_bad_names_are_refused(monkeypatch):
    """Every instruction set this CPU has gives the same results to fp32 rounding; a name the CPU or the build
    lacks is refused with the ones available, from the API and from the config."""
    from esvit_scale import ops
    from esvit_scale.config import KernelConfig
    from esvit_scale.ops._ext import extension
    qkv, table, rel, gen = make_inputs(2, 4, 7, 7, 6, 32, seed=5)
    region = random_region(4, 49, True, True, gen)
    results = {}
    for isa in extension().supported_cpu_isas():
        _ext.set_cpu_isa(isa)
        assert _ext.cpu_isa() == isa
        out = _FusedWindowAttention.apply(qkv, table, rel, region, 6, 32 ** -0.5)
        results[isa] = (out, *torch.autograd.grad(out.square().sum(), (qkv, table)))
    _ext.set_cpu_isa()
    first = next(iter(results.values()))
    for other in results.values():
        for a, b in zip(first, other):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="'avx1024' is not available here; expected auto or one of: "):
        _ext.set_cpu_isa("avx1024")
    missing = [n for n in ("avx2", "avx512", "generic") if n not in extension().supported_cpu_isas()]
    with pytest.raises(ValueError, match=f"kernels.cpu_isa='{missing[0]}'"):
        ops.configure(KernelConfig(cpu_isa=missing[0]))
    monkeypatch.delenv("ESVIT_CPU_ISA", raising=False)
    ops.configure(KernelConfig())
    assert _ext.cpu_isa() == extension().supported_cpu_isas()[-1]     # auto: the best one


def test_nan_in_q_reaches_the_output_of_its_window_only(cpu_isa):
    """The kernels' exp and log keep NaN (a NaN loss must stop the run, not vanish in a clamp)."""
    qkv, table, rel, _ = make_inputs(2, 1, 7, 7, 2, 32)
    bad = qkv.detach().clone()
    bad[0, 3, 5] = float("nan")                                    # window 0, token 3, head 0's q
    out = _FusedWindowAttention.apply(bad, table, rel, None, 2, 0.2)
    assert out[0, 3, :32].isnan().all() and not out[1].isnan().any()
