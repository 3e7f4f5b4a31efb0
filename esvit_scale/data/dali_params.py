"""Host-side random parameters of the DALI multi-crop pipeline, drawn exactly as the reference draws them.

The DALI graph itself is deterministic: every random choice of a crop (window, flip, rotation, colour jitter,
grayscale, blur, solarisation) is drawn here, in Python, with the same `random.Random(sample_seed(seed, epoch, index))`
and the same sequence of draws as `transforms.augment_crop`. So a sample gets the same crop windows, flips and
jitter factors from both loaders, whatever the number of threads, and after a mid-epoch resume.

The colour part of a crop (jitter in its random order, then grayscale) is folded into one affine map on RGB
in [0, 255]:   out = A @ x + b + v * (w . mean_rgb(crop))
The last term is the contrast adjustment, which blends with the mean luma of the image at that point of the
sequence (PIL / torchvision semantics); that mean is an affine function of the crop's mean colour, which the
graph measures. Hue is a rotation about the gray axis of RGB space (a linear approximation of PIL's HSV hue
shift: mean abs error ~4/255 at |hue| = 0.03, ~10/255 at the extreme 0.08; see docs/data.md).
"""
from __future__ import annotations

import math
import random

import numpy as np

from esvit_scale.data.multicrop import (CROP_RATIO, GRAYSCALE_PROB, JITTER_PROB,
                                        CropSpec)
from esvit_scale.data.transforms import draw_jitter, random_resized_box

LUMA = np.array([0.299, 0.587, 0.114])          # PIL's convert("L")
_EYE = np.eye(3)
_GRAY = np.outer(np.ones(3), LUMA)               # x -> luma(x) in every channel
_K = np.ones(3) / math.sqrt(3)                   # the gray axis
_K_CROSS = np.array([[0, -_K[2], _K[1]], [_K[2], 0, -_K[0]], [-_K[1], _K[0], 0]])
_K_OUTER = np.outer(_K, _K)

# Columns of one crop's parameter row (float32); the graph slices them by these offsets.
ROI = slice(0, 4)          # y0, x0, y1, x1 in input pixels; x0 > x1 means a horizontal flip
A = slice(4, 13)           # 3 x 3 row-major
B = slice(13, 16)
V = slice(16, 19)
W = slice(19, 22)
COLOUR = 22                # 1.0 when any colour op applies (otherwise A = I and the op is skipped)
BLUR = 23                  # 1.0 when the crop is blurred
SIGMA = 24
SOLARIZE = 25
ANGLE = 26                 # degrees, counter-clockwise; 0 when the spec has no rotation
NUM_PARAMS = 27


class ColourState:
    """x_out = A x + b + v (w . mean(x)), composed op by op."""

    def __init__(self):
        self.A, self.b = np.eye(3), np.zeros(3)
        self.v, self.w = np.zeros(3), np.zeros(3)
        self.touched = False

    def linear(self, M: np.ndarray, t: np.ndarray | None = None) -> None:
        self.A, self.b, self.v = M @ self.A, M @ self.b + (0 if t is None else t), M @ self.v
        self.touched = True

    def brightness(self, f: float) -> None:
        self.linear(f * _EYE)

    def saturation(self, f: float) -> None:
        self.linear(f * _EYE + (1 - f) * _GRAY)

    def grayscale(self) -> None:
        self.linear(_GRAY)

    def hue(self, h: float) -> None:
        """A rotation by h turns about the gray axis: the linear stand-in for PIL's HSV hue shift."""
        theta = 2 * math.pi * h
        c, s = math.cos(theta), math.sin(theta)
        self.linear(c * _EYE + s * _K_CROSS + (1 - c) * _K_OUTER)

    def contrast(self, c: float) -> None:
        # blend with the mean luma of the current image: m = (A^T g) . mean(x0) + g . b  (v is 0 here:
        # contrast occurs once per crop)
        assert not self.v.any(), "contrast composed twice"
        g_b = LUMA @ self.b
        self.v, self.w = (1 - c) * np.ones(3), self.A.T @ LUMA
        self.A, self.b = c * self.A, c * self.b + (1 - c) * g_b
        self.touched = True


def draw_crop(width: int, height: int, spec: CropSpec, rng: random.Random) -> np.ndarray:
    """One crop's parameter row, consuming `rng` exactly as transforms.augment_crop does."""
    row = np.zeros(NUM_PARAMS, np.float64)
    top, left, h, w = random_resized_box(width, height, spec.scale, CROP_RATIO, rng)
    flip = rng.random() < spec.flip_prob
    row[ROI] = (top, left + w, top + h, left) if flip else (top, left, top + h, left + w)
    if spec.rotation > 0:
        row[ANGLE] = rng.uniform(-spec.rotation, spec.rotation)
    colour = ColourState()
    if rng.random() < JITTER_PROB:
        factors, order = draw_jitter(rng)
        ops = [colour.brightness, colour.contrast, colour.saturation, colour.hue]
        for i in order:
            ops[i](factors[i])
    if rng.random() < GRAYSCALE_PROB:
        colour.grayscale()
    row[A], row[B] = colour.A.ravel(), colour.b
    row[V], row[W], row[COLOUR] = colour.v, colour.w, float(colour.touched)
    if rng.random() < spec.blur_prob:
        row[BLUR], row[SIGMA] = 1.0, rng.uniform(*spec.blur_sigma)
    if rng.random() < spec.solarize_prob:
        row[SOLARIZE] = 1.0
    return row


def draw_sample(width: int, height: int, specs: list[CropSpec], seed: int) -> np.ndarray:
    """(num_crops, NUM_PARAMS) float32 for one image of `width` x `height` pixels."""
    rng = random.Random(seed)
    return np.stack([draw_crop(width, height, spec, rng) for spec in specs]).astype(np.float32)


def blur_taps(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps of radius ceil(3 sigma); [1.0] for no blur (sigma <= 0)."""
    if sigma <= 0:
        return np.ones(1, np.float32)
    radius = math.ceil(3 * sigma)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-t * t / (2 * sigma * sigma))
    return (g / g.sum()).astype(np.float32)
