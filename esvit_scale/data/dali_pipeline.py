"""The DALI multi-crop graph: decode each image once, then per crop: a bicubic resized crop of the window
(flipped by swapping the window's x ends), a rotation where configured, the composed colour map, a Gaussian
blur, solarisation, and normalisation to CHW float32.

On the CPU, when the plugin is available (dali_plugin), all per-crop steps run in one operator,
`fn.esvit_multi_crop` (csrc/multicrop_op.cc), ~5x cheaper than the stock operators below, which remain the
GPU graph and the CPU fallback (and the CPU graph when crops are rotated: the operator does not rotate).

All randomness comes in through the external source (see dali_params); the graph holds none. Ops run only on
the samples that need them (DALI conditionals split the batch): the colour map on crops with jitter or
grayscale, the blur on the crops drawn for it, solarisation on the crops drawn for it. The blur's window
follows sigma (radius ceil(3 sigma)), not a fixed 23 taps.

`@pipeline_def(enable_conditionals=True)` needs its function in a source file, hence this module.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from esvit_scale.data import dali_params as P
from esvit_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, CropSpec

MEAN_255 = [255.0 * m for m in IMAGENET_MEAN]
STD_255 = [255.0 * s for s in IMAGENET_STD]


def _colour(crop, prm, c: int, gpu: bool):
    """out = A x + b + v (w . mean(x)), rounded and saturated to uint8."""
    a = fn.reshape(prm[c, P.A], shape=[3, 3])
    mean = fn.reductions.mean(crop, axes=[0, 1], dtype=types.FLOAT)           # (3,) mean colour
    w, v = prm[c, P.W], prm[c, P.V]
    if gpu:
        # argument inputs must live on the host: add the data-dependent contrast term on the device instead
        s = fn.reductions.sum(mean * w.gpu())
        out = fn.coord_transform(crop, M=a, T=prm[c, P.B], dtype=types.FLOAT)
        out = out + fn.reshape(v.gpu() * s, shape=[1, 1, 3]) + 0.5
        return fn.cast(dmath.clamp(out, 0.0, 255.0), dtype=types.UINT8)
    s = fn.reductions.sum(mean * w)
    return fn.coord_transform(crop, M=a, T=prm[c, P.B] + v * s, dtype=types.UINT8)


def _solarize(x):
    """PIL ImageOps.solarize(threshold=128): invert the pixels >= 128 (255 - x == x ^ 255 for uint8)."""
    return x ^ (fn.cast(x >= SOLARIZE_THRESHOLD, dtype=types.UINT8) * types.Constant(255, dtype=types.UINT8))


def _blur(crop, kernel, sigma, gpu: bool):
    """Separable Gaussian blur, radius ceil(3 sigma), edge pixels repeated (as PIL's blur does).

    On the CPU, two 1-D `fn.filter` passes with the host-computed taps (DALI's CPU gaussian_blur is several
    times slower); on the GPU, `fn.gaussian_blur` with the same sigma (its default radius is ceil(3 sigma)).
    """
    if gpu:
        return fn.gaussian_blur(crop, sigma=sigma)
    crop = fn.filter(crop, fn.reshape(kernel, shape=[1, -1]), border="clamp")
    return fn.filter(crop, fn.reshape(kernel, shape=[-1, 1]), border="clamp")


PLUGIN_COLUMNS = [P.ROI.start, P.A.start, P.B.start, P.V.start, P.W.start, P.COLOUR, P.BLUR, P.SIGMA, P.SOLARIZE]


@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(specs: list[CropSpec], gpu: bool, source, plugin: bool = False):
    """`source()` returns (encoded images, params) with `plugin` (CPU only), else (encoded images, params,
    blur taps of crop 0, ..., of crop n-1), batch-wise."""
    if plugin and not gpu:
        encoded, prm = fn.external_source(source=source, num_outputs=2, batch=True, parallel=False,
                                          dtype=[types.UINT8, types.FLOAT])
        image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)
        crops = fn.esvit_multi_crop(image, prm, sizes=[s.size for s in specs], columns=PLUGIN_COLUMNS,
                                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        return tuple(crops) if isinstance(crops, (list, tuple)) else (crops,)
    inputs = fn.external_source(source=source, num_outputs=2 + len(specs), batch=True, parallel=False,
                                dtype=[types.UINT8, types.FLOAT] + [types.FLOAT] * len(specs))
    encoded, prm, kernels = inputs[0], inputs[1], inputs[2:]
    image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                              adjust_orientation=False)     # PIL (the reference) ignores EXIF orientation
    outputs = []
    for c, spec in enumerate(specs):
        crop = fn.resize(image, size=[spec.size, spec.size], roi_start=prm[c, 0:2], roi_end=prm[c, 2:4],
                         interp_type=types.INTERP_CUBIC, antialias=True)
        if spec.rotation > 0:           # DALI and PIL agree: counter-clockwise on screen for a positive angle
            crop = fn.rotate(crop, angle=prm[c, P.ANGLE], keep_size=True, fill_value=0,
                             interp_type=types.INTERP_LINEAR)
        if prm[c, P.COLOUR] > 0.5:
            crop = _colour(crop, prm, c, gpu)
        if spec.blur_prob >= 1:                     # no split/merge where every sample is blurred
            crop = _blur(crop, kernels[c], prm[c, P.SIGMA], gpu)
        elif spec.blur_prob > 0:
            if prm[c, P.BLUR] > 0.5:
                crop = _blur(crop, kernels[c], prm[c, P.SIGMA], gpu)
        if spec.solarize_prob > 0:
            if prm[c, P.SOLARIZE] > 0.5:
                crop = _solarize(crop)
        outputs.append(fn.crop_mirror_normalize(crop, mean=MEAN_255, std=STD_255, dtype=types.FLOAT,
                                                output_layout="CHW"))
    return tuple(outputs)
