"""The esvit_multi_crop DALI operator (CPU plugin) against Pillow, numpy and DALI's stock operators."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from esvit_scale.bench.loader import make_jpeg_folder, natural_image  # noqa: E402
from esvit_scale.config import DataConfig  # noqa: E402
from esvit_scale.data import dali_params as P  # noqa: E402
from esvit_scale.data import dali_plugin  # noqa: E402
from esvit_scale.data.dali_loader import DaliMultiCropLoader  # noqa: E402
from esvit_scale.data.folder import index_folder  # noqa: E402

pytestmark = pytest.mark.skipif(not dali_plugin.available(), reason="the DALI plugin could not be built here")


def run_op(images: list[np.ndarray], rows: list[np.ndarray], sizes: list[int]) -> list[np.ndarray]:
    """The operator on HWC uint8 images and (num_crops, NUM_PARAMS) rows; outputs in 0..255 units, HWC."""
    from nvidia.dali import fn, pipeline_def

    from esvit_scale.data.dali_pipeline import PLUGIN_COLUMNS

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        p = fn.external_source(source=lambda: [r.astype(np.float32) for r in rows], batch=True)
        out = fn.esvit_multi_crop(x, p, sizes=sizes, columns=PLUGIN_COLUMNS, mean=[0.0] * 3, std=[1 / 255] * 3)
        return tuple(out) if isinstance(out, list) else out
    p = pipe()
    p.build()
    return [[np.array(t).transpose(1, 2, 0) for t in out] for out in p.run()]


def row(top, left, h, w, flip=False) -> np.ndarray:
    r = np.zeros(P.NUM_PARAMS)
    r[P.ROI] = (top, left + w, top + h, left) if flip else (top, left, top + h, left + w)
    r[P.A] = np.eye(3).ravel()
    return r


@pytest.mark.parametrize("window,size,flip", [((10, 5, 150, 230), 64, False), ((0, 0, 200, 240), 96, True),
                                              ((30, 5, 60, 90), 96, False), ((5, 7, 33, 21), 24, True),
                                              ((3, 4, 220, 120), 64, False), ((0, 0, 240, 200), 240, False)])
def test_resized_crop_is_pillows_bicubic(window, size, flip):
    """Pillow's taps and rounding: PIL crop + resize(BICUBIC) + flip up to one level on a few pixels. Where the
    window is taller than wide, Pillow 13 may run the vertical pass first (rounding to uint8 in between); the
    operator always runs the horizontal one first, so there a fifth of the pixels differ by one level (two at
    most)."""
    img = natural_image(np.random.default_rng(0), 240, 250)      # 240 wide, 250 high
    top, left, h, w = window
    [[ours]] = run_op([np.asarray(img)], [row(*window, flip=flip)[None]], [size])
    ref = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    ref = np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref, np.float32)
    diff = np.abs(ours - ref)
    if h <= w:
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    else:
        assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_colour_blur_solarise_follow_their_formulas():
    """A window resized 1:1 (no resampling), then colour map, blur and solarisation against numpy, rounding to
    uint8 after each step as the stock graph does."""
    img = np.asarray(natural_image(np.random.default_rng(1), 40, 40))
    r = row(0, 0, 40, 40)
    state = P.ColourState()
    state.brightness(1.2)
    state.contrast(0.7)
    state.hue(0.05)
    r[P.A], r[P.B], r[P.V], r[P.W], r[P.COLOUR] = state.A.ravel(), state.b, state.v, state.w, 1
    r[P.BLUR], r[P.SIGMA], r[P.SOLARIZE] = 1, 1.3, 1
    r = r.astype(np.float32)
    [[ours]] = run_op([img], [r[None]], [40])

    x = img.astype(np.float64)
    A, b, v, w = (r[s].astype(np.float64) for s in (P.A, P.B, P.V, P.W))
    x = np.clip(np.floor(x @ A.reshape(3, 3).T + b + v * (w @ x.reshape(-1, 3).mean(0)) + 0.5), 0, 255)
    taps = P.blur_taps(float(r[P.SIGMA])).astype(np.float64)
    rad = len(taps) // 2
    for axis in (1, 0):                       # horizontal, then vertical; edges repeated
        pad = np.pad(x, [(rad, rad) if a == axis else (0, 0) for a in range(3)], mode="edge")
        x = sum(t * np.take(pad, np.arange(k, k + 40), axis=axis) for k, t in enumerate(taps))
        x = np.clip(np.floor(x + 0.5), 0, 255)
    x = np.where(x >= 128, 255 - x, x)
    diff = np.abs(ours - x)
    assert diff.max() <= 1.0 + 1e-3 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_plugin_and_stock_operators_agree(tmp_path):
    """Same batches through the plugin and through DALI's stock CPU operators (the GPU graph's twin and the
    fallback): the same augmentation up to the resamplers' rounding."""
    root = make_jpeg_folder(tmp_path, num_images=8, size=(160, 150), seed=4)
    cfg = DataConfig(batch_size_per_gpu=4, num_workers=2, global_crops_size=64, local_crops_size=[32],
                     local_crops_number=[3])
    runs = {}
    for plugin in (True, False):
        loader = DaliMultiCropLoader(index_folder(root), cfg, seed=3, plugin=plugin)
        assert loader.plugin is plugin
        runs[plugin] = [[c.clone() for c in crops] for crops in loader.epoch(1)]
    for a, b in zip(runs[True], runs[False]):
        for x, y in zip(a, b):
            d = (x - y).abs()
            assert float(d.mean()) < 0.015 and float(d.max()) < 0.3, (float(d.mean()), float(d.max()))


def test_bad_parameter_rows_are_refused():
    img = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(RuntimeError, match="one row per crop"):
        run_op([img], [np.zeros((2, P.NUM_PARAMS))], [8])
