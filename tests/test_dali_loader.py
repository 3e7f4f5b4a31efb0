"""The DALI multi-crop loader on real JPEG folders, CPU pipeline (GPU test skipped without CUDA)."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from esvit_scale.bench.loader import make_jpeg_folder, natural_image  # noqa: E402
from esvit_scale.config import DataConfig  # noqa: E402
from esvit_scale.data import dali_params as P  # noqa: E402
from esvit_scale.data.dali_loader import DaliMultiCropLoader  # noqa: E402
from esvit_scale.data.folder import index_folder  # noqa: E402
from esvit_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, crop_specs  # noqa: E402
from esvit_scale.data.sampler import sample_seed  # noqa: E402
from esvit_scale.data.transforms import multi_crop  # noqa: E402

SMALL = dict(global_crops_size=64, local_crops_size=[32, 24], local_crops_number=[3, 2], num_workers=2)


def small_cfg(batch=4, **kw) -> DataConfig:
    return DataConfig(batch_size_per_gpu=batch, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), num_images=26, size=(150, 160), seed=1)


def run_epoch(loader, epoch=0, start_batch=0):
    """[(crops, BatchRecord)] for one epoch."""
    out = []
    for crops in loader.epoch(epoch, start_batch):
        out.append((crops, loader.last_batch))
    return out


def to_uint8_like(t: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: (B,3,S,S) in [0, 255]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (t * std + mean) * 255


def test_shapes_dtypes_ranges_default_crops(jpegs):
    cfg = DataConfig(batch_size_per_gpu=4, num_workers=2)        # 2 x 224 + 8 x 96
    loader = DaliMultiCropLoader(index_folder(jpegs), cfg, seed=3)
    assert len(loader) == 26 // 4
    batches = run_epoch(loader)
    assert len(batches) == len(loader)
    lo = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    for crops, _ in batches:
        assert [tuple(c.shape) for c in crops] == [(4, 3, 224, 224)] * 2 + [(4, 3, 96, 96)] * 8
        for c in crops:
            assert c.dtype == torch.float32 and c.device.type == "cpu"
            assert torch.isfinite(c).all()
            assert (c >= lo - 1e-4).all() and (c <= hi + 1e-4).all()
            assert c.std() > 0.05                                 # not blank


def test_several_local_sizes_in_crop_order(jpegs):
    loader = DaliMultiCropLoader(index_folder(jpegs), small_cfg(), seed=0)
    crops, rec = run_epoch(loader)[0]
    assert [c.shape[-1] for c in crops] == [64, 64, 32, 32, 32, 24, 24]
    assert len(rec.params) == 4 and rec.params[0].shape == (7, P.NUM_PARAMS)


def test_matches_the_pil_reference_for_the_same_sample(jpegs):
    """Same seeds, same windows, flips, blur and solarisation as transforms.multi_crop; colour up to the
    documented hue approximation and end-only clamping; the same crop geometry handed out (boxes, flips)."""
    cfg = small_cfg()
    index = index_folder(jpegs)
    loader = DaliMultiCropLoader(index, cfg, seed=5)
    specs = crop_specs(cfg)
    plain, coloured = [], []
    for crops, rec in run_epoch(loader, epoch=2)[:3]:
        for k, (i, j) in enumerate(zip(rec.requested, rec.used)):
            ref, geometry = multi_crop(Image.open(index.paths[j]).convert("RGB"), specs, sample_seed(5, 2, int(i)))
            assert torch.equal(crops.geometry[k], geometry), (crops.geometry[k], geometry)
            for c in range(len(specs)):
                err = float((crops[c][k] - ref[c]).abs().mean())
                (coloured if rec.params[k][c, P.COLOUR] else plain).append(err)
    assert plain and coloured
    # normalised units: 0.02 is about 1/255 of a pixel value
    assert np.mean(plain) < 0.03 and max(plain) < 0.08, plain
    assert np.mean(coloured) < 0.2 and max(coloured) < 0.6, (np.mean(coloured), max(coloured))


@pytest.mark.parametrize("op,factor,tol", [("brightness", 1.3, 1.0), ("brightness", 0.7, 1.0),
                                          ("contrast", 0.65, 1.0), ("contrast", 1.35, 1.0),
                                          ("saturation", 1.2, 1.0), ("saturation", 0.8, 1.0),
                                          ("hue", 0.03, 6.0), ("hue", -0.1, 14.0)])
def test_colour_ops_against_torchvision_on_pil(op, factor, tol):
    """The composed affine colour map vs torchvision's PIL ops (mean abs error in 0..255 units); hue is the
    documented linear approximation."""
    import torchvision.transforms.functional as TF
    img = natural_image(np.random.default_rng(0), 96, 80)
    x = np.asarray(img, np.float64)
    ref = np.asarray(getattr(TF, f"adjust_{op}")(img, factor), np.float64)
    state = P.ColourState()
    getattr(state, op)(factor)
    ours = np.clip(np.rint(x @ state.A.T + state.b + state.v * (state.w @ x.reshape(-1, 3).mean(0))), 0, 255)
    assert np.abs(ours - ref).mean() < tol


def test_grayscale_and_composition_order():
    """Composed without intermediate clamping: exact while no step saturates (factors chosen so)."""
    img = natural_image(np.random.default_rng(1), 64, 64)
    x = np.asarray(img, np.float64)
    import torchvision.transforms.functional as TF
    ref = np.asarray(TF.rgb_to_grayscale(TF.adjust_contrast(TF.adjust_brightness(img, 0.9), 0.7),
                                         num_output_channels=3), np.float64)
    state = P.ColourState()
    state.brightness(0.9)
    state.contrast(0.7)
    state.grayscale()
    ours = np.clip(x @ state.A.T + state.b + state.v * (state.w @ x.reshape(-1, 3).mean(0)), 0, 255)
    assert np.abs(ours - ref).mean() < 1.5


def test_crop_windows_flips_and_per_crop_probabilities(tmp_path):
    root = make_jpeg_folder(tmp_path, num_images=40, size=(120, 90), seed=2)
    cfg = small_cfg(batch=8)
    loader = DaliMultiCropLoader(index_folder(root), cfg, seed=7)
    specs = crop_specs(cfg)
    rows = []                          # (crop, area fraction, aspect, flip, colour, blur, sigma, solarize)
    for epoch in range(3):
        for _, rec in run_epoch(loader, epoch):
            for (w, h), prm in zip(rec.sizes, rec.params):
                for c, p in enumerate(prm):
                    y0, x0, y1, x1 = p[P.ROI]
                    cw, ch = abs(x1 - x0), y1 - y0
                    rows.append((c, cw * ch / (w * h), cw / ch, x0 > x1, p[P.COLOUR], p[P.BLUR], p[P.SIGMA],
                                 p[P.SOLARIZE]))
    rows = np.array(rows, dtype=np.float64)
    for c, spec in enumerate(specs):
        r = rows[rows[:, 0] == c]
        lo, hi = spec.scale
        # integer rounding of the window moves the area by at most a pixel row and column
        slack = (120 + 90 + 1) / (120 * 90)
        assert (r[:, 1] >= lo - slack).all() and (r[:, 1] <= hi + slack).all(), (c, r[:, 1].min(), r[:, 1].max())
        assert (r[:, 2] >= 0.75 * 0.9).all() and (r[:, 2] <= 4 / 3 * 1.1).all()
    n = len(rows)
    assert 0.4 < rows[:, 3].mean() < 0.6, rows[:, 3].mean()                 # flips, p 0.5 (n = 840)
    assert 0.78 < rows[:, 4].mean() < 0.9                                   # jitter 0.8 or gray 0.2: 0.84
    assert (rows[rows[:, 0] == 0, 5] == 1).all()                            # global 1: always blurred
    assert 0.0 < rows[rows[:, 0] == 1, 5].mean() < 0.3                      # global 2: p 0.1
    assert 0.35 < rows[rows[:, 0] >= 2, 5].mean() < 0.65                    # locals: p 0.5
    sig = rows[rows[:, 5] == 1, 6]
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    assert (rows[rows[:, 0] != 1, 7] == 0).all()                            # solarise: global 2 only
    assert 0.05 < rows[rows[:, 0] == 1, 7].mean() < 0.4, n                  # p 0.2 of 120


def _constant_folder(root, value, n=24):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (80 + i, 70), (value, value, value)).save(root / f"c{i:03d}.jpg", quality=95)
    return root


def test_solarisation_only_on_the_second_global_crop_pixels(tmp_path):
    """Gray 230 images: jitter keeps them >= 138, solarised they fall to <= 117."""
    loader = DaliMultiCropLoader(index_folder(_constant_folder(tmp_path / "c", 230)), small_cfg(batch=8), seed=1)
    solarised, seen = [], 0
    for epoch in range(3):
        for crops, rec in run_epoch(loader, epoch):
            for c, crop in enumerate(crops):
                dark = to_uint8_like(crop).mean(dim=(1, 2, 3)) < 128
                flags = torch.tensor([bool(p[c, P.SOLARIZE]) for p in rec.params])
                assert torch.equal(dark, flags), (c, dark, flags)
                if c == 1:
                    solarised += dark.tolist()
                else:
                    assert not dark.any()
                seen += 1
    assert 0.05 < np.mean(solarised) < 0.45, np.mean(solarised)


def test_flips_follow_the_drawn_flag_on_pixels(tmp_path):
    """A left-to-right gray ramp: a flipped crop gets darker to the right."""
    root = tmp_path / "ramp"
    root.mkdir()
    ramp = np.tile(np.linspace(20, 235, 200).astype(np.uint8)[None, :, None], (150, 1, 3))
    for i in range(16):
        Image.fromarray(ramp).save(root / f"r{i:02d}.png")
    loader = DaliMultiCropLoader(index_folder(root), small_cfg(batch=8), seed=4)
    flips = []
    for epoch in range(2):
        for crops, rec in run_epoch(loader, epoch):
            for c, crop in enumerate(crops):
                x = to_uint8_like(crop).mean(dim=(1, 2))            # (B, S): column means
                for k, p in enumerate(rec.params):
                    if p[c, P.SOLARIZE]:
                        continue
                    left, right = float(x[k, :3].mean()), float(x[k, -3:].mean())
                    if abs(left - right) < 2:                     # saturated by brightness jitter
                        continue
                    flipped = bool(p[c, P.ROI][1] > p[c, P.ROI][3])
                    assert (left > right) == flipped
                    flips.append(flipped)
    assert len(flips) > 150 and 0.35 < np.mean(flips) < 0.65


def test_sharding_is_disjoint_and_complete_and_resume_repeats_nothing(jpegs):
    index = index_folder(jpegs)
    cfg = small_cfg(batch=3)
    seen = []
    for rank in range(2):
        loader = DaliMultiCropLoader(index, cfg, rank=rank, world_size=2, seed=11)
        full = run_epoch(loader, epoch=1)
        ids = np.concatenate([rec.requested for _, rec in full])
        seen.append(ids)
        # resume mid-epoch: exactly the remaining batches, bit-identical crops
        resumed = run_epoch(loader, epoch=1, start_batch=2)
        assert len(resumed) == len(full) - 2
        for (a, ra), (b, rb) in zip(full[2:], resumed):
            assert np.array_equal(ra.requested, rb.requested)
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        before = np.concatenate([rec.requested for _, rec in full[:2]])
        after = np.concatenate([rec.requested for _, rec in resumed])
        assert not set(before) & set(after)
    assert not set(seen[0]) & set(seen[1])
    kept = len(DaliMultiCropLoader(index, cfg, rank=0, world_size=2, seed=11)) * 3 * 2
    assert len(np.unique(np.concatenate(seen))) == kept == 24      # 26 images, drop-last to 4 x 3 x 2
    # another epoch is another order
    other = np.concatenate([rec.requested for _, rec in run_epoch(
        DaliMultiCropLoader(index, cfg, rank=0, world_size=2, seed=11), epoch=2)])
    assert not np.array_equal(other, seen[0])


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_bad_inputs_are_handled_or_skipped_and_logged(tmp_path, caplog):
    rng = np.random.default_rng(0)
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(10):
        _save(natural_image(rng, 140, 120), root / f"good{i}.jpg", quality=90)
    good = (root / "good0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    body = bytearray(good)
    body[700:2700] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (root / "corrupt.jpg").write_bytes(bytes(body))
    (root / "text_named.jpg").write_bytes(b"this is not an image\n" * 10)
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    img = natural_image(rng, 140, 120)
    handled = {
        "photo.png": lambda p: _save(img, p),
        "rgba.png": lambda p: _save(img.convert("RGBA"), p),
        "gray.jpg": lambda p: _save(img.convert("L"), p, quality=90),
        "cmyk.jpg": lambda p: _save(img.convert("CMYK"), p, quality=90),
        "tiny.jpg": lambda p: _save(img.resize((9, 7)), p, quality=90),
    }
    for name, save in handled.items():
        save(root / name)

    index = index_folder(root)
    assert [p.endswith("notes.txt") for p in index.skipped] == [True]
    caplog.set_level(logging.WARNING)
    cfg = DataConfig(batch_size_per_gpu=4, num_workers=2, global_crops_size=64, local_crops_size=[32],
                     local_crops_number=[2])
    loader = DaliMultiCropLoader(index, cfg, seed=0)
    used = set()
    for epoch in range(3):            # every file is read at least once (19 images, 4 batches of 4)
        for crops, rec in run_epoch(loader, epoch):
            assert [tuple(c.shape) for c in crops] == [(4, 3, 64, 64)] * 2 + [(4, 3, 32, 32)] * 2
            assert all(torch.isfinite(c).all() for c in crops)
            used |= {index.paths[j] for j in rec.used}
    skipped = {p.split("/")[-1] for p in loader.skipped_files()}
    assert {"truncated.jpg", "text_named.jpg", "empty.jpg", "notes.txt"} <= skipped
    assert skipped <= {"truncated.jpg", "text_named.jpg", "empty.jpg", "notes.txt", "corrupt.jpg"}
    used_names = {p.split("/")[-1] for p in used}
    assert set(handled) <= used_names, set(handled) - used_names     # decoded, not skipped
    assert not used_names & skipped
    logged = caplog.text
    for name in skipped - {"notes.txt"}:
        assert name in logged


def test_corrupt_jpeg_body_is_found_by_a_probe_and_the_epoch_goes_on(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "corrupt"
    root.mkdir()
    for i in range(8):
        _save(natural_image(rng, 140, 120), root / f"g{i}.jpg", quality=90)
    good = bytearray((root / "g0.jpg").read_bytes())
    good[600:2600] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (root / "g3.jpg").write_bytes(bytes(good))           # header and end marker intact, body garbage
    loader = DaliMultiCropLoader(index_folder(root), small_cfg(batch=4), seed=0)
    for epoch in range(2):
        batches = run_epoch(loader, epoch)
        assert len(batches) == 2
    bad = [p for p in loader.skipped_files() if p.endswith("g3.jpg")]
    assert bad, "the corrupt JPEG was neither decoded nor skipped"


def test_a_folder_without_usable_images_fails_at_startup_naming_it(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"nope")
    (root / "b.png").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no usable image in .*junk"):
        DaliMultiCropLoader(index_folder(root), small_cfg(batch=1))


@pytest.mark.gpu
def test_gpu_pipeline_returns_cuda_tensors(jpegs):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = DataConfig(batch_size_per_gpu=4, num_workers=2)
    loader = DaliMultiCropLoader(index_folder(jpegs), cfg, seed=0, device_id=0)
    crops, rec = run_epoch(loader)[0]
    assert all(c.is_cuda and c.dtype == torch.float32 for c in crops)
    assert [tuple(c.shape) for c in crops] == [(4, 3, 224, 224)] * 2 + [(4, 3, 96, 96)] * 8
    cpu = DaliMultiCropLoader(index_folder(jpegs), cfg, seed=0)
    ref, _ = run_epoch(cpu)[0]
    for g, c in zip(crops, ref):
        assert float((g.cpu() - c).abs().mean()) < 0.1


def test_gaussian_taps_cover_three_sigma():
    taps = P.blur_taps(1.05)
    assert len(taps) == 2 * math.ceil(3 * 1.05) + 1 and abs(taps.sum() - 1) < 1e-6
    assert len(P.blur_taps(2.0)) == 13 and P.blur_taps(0).tolist() == [1.0]


def test_yielded_tensors_stay_valid_after_later_batches(jpegs):
    """The crops are zero-copy views of DALI buffers: later iterations must not overwrite them."""
    loader = DaliMultiCropLoader(index_folder(jpegs), small_cfg(batch=3), seed=2)
    it = loader.epoch(0)
    first = next(it)
    snapshot = [c.clone() for c in first]
    rest = list(it)
    assert len(rest) == len(loader) - 1
    assert all(torch.equal(a, b) for a, b in zip(first, snapshot))
    assert not torch.equal(first[0], rest[0][0])


def test_rotation_matches_the_pil_reference(tmp_path):
    """data.rotation_degrees: the same angles, turned the same way, by both loaders (the plugin does not rotate, so
    the stock operators run). Tolerance as for the uncoloured crops, plus bilinear resampling differences."""
    cfg = small_cfg(rotation_degrees=30.0, hflip_prob=0.0)
    root = make_jpeg_folder(tmp_path, num_images=8, size=(96, 96), seed=4)
    index = index_folder(root)
    loader = DaliMultiCropLoader(index, cfg, seed=2)
    assert not loader.plugin
    specs = crop_specs(cfg)
    crops, rec = run_epoch(loader)[0]
    errs, angles = [], []
    for k, (i, j) in enumerate(zip(rec.requested, rec.used)):
        ref, geometry = multi_crop(Image.open(index.paths[j]).convert("RGB"), specs, sample_seed(2, 0, int(i)))
        torch.testing.assert_close(crops.geometry[k], geometry)          # the angles too
        for c in range(len(specs)):
            angles.append(float(rec.params[k][c, P.ANGLE]))
            if not rec.params[k][c, P.COLOUR]:
                errs.append(float((crops[c][k] - ref[c]).abs().mean()))
    assert max(abs(a) for a in angles) > 10 and all(abs(a) <= 30 for a in angles)
    assert errs and np.mean(errs) < 0.06 and max(errs) < 0.15, errs


def _loader_cfg(**extra) -> DataConfig:
    return DataConfig(loader="dali", batch_size_per_gpu=4, num_workers=1, global_crops_size=32,
                      local_crops_size=[16], local_crops_number=[2], **extra)


def test_the_start_up_check_passes_and_leaves_the_batches_as_they_were(jpegs):
    """One batch is pulled and dropped before training: epoch 0 then yields what an unchecked loader yields."""
    from esvit_scale.data.build import build_loader
    checked = build_loader(_loader_cfg(), index_folder(jpegs), 0, 1, 7, "cpu")
    assert checked.kind == "DALI (CPU graph)" and checked.fallbacks == []
    plain = DaliMultiCropLoader(index_folder(jpegs), _loader_cfg(), seed=7)
    for a, b in zip(next(iter(checked.epoch(0))), next(iter(plain.epoch(0)))):
        assert torch.equal(a, b)


def test_a_dali_loader_failing_its_check_falls_back_to_torch_or_stops_when_told(jpegs, monkeypatch, caplog):
    from esvit_scale.data.build import build_loader
    monkeypatch.setenv("ESVIT_FAULT_LOADER", "dali_cpu")
    with caplog.at_level(logging.WARNING):
        loader = build_loader(_loader_cfg(), index_folder(jpegs), 0, 1, 7, "cpu")
    assert loader.kind == "torch" and len(loader.fallbacks) == 1
    assert "DALI (CPU graph) failed its start-up check" in loader.fallbacks[0] and "using torch" in caplog.text
    assert [c.shape[-1] for c in next(iter(loader.epoch(0)))] == [32, 32, 16, 16]
    with pytest.raises(RuntimeError, match=r"DALI \(CPU graph\) failed its start-up check.*data.fallback=none"):
        build_loader(_loader_cfg(fallback="none"), index_folder(jpegs), 0, 1, 7, "cpu")
