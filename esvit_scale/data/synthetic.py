"""A generated labelled image folder (tests, benchmarks), deterministic and of any size.

A class is a colour family (a muted tint: red, yellow, green, cyan, blue, magenta). Everything else about an
image is random nuisance: a texture (stripes, checks, dots, rings, waves or blobs at a random frequency,
orientation and phase), its dark and light levels, the saturation, a blur and sensor noise. A network at
initialisation mostly sees the nuisance (texture, sharpness, noise), so its k-NN accuracy is modest; the EsViT
augmentations (crops, blur, colour jitter within a family) teach the network to ignore it in a few hundred
steps. Written as JPEGs under root/train/<class> and root/val/<class>.

Colour is the class on purpose: with grey images (class = texture) self-supervision latched onto per-image
grey levels or orientation, and the k-NN accuracy fell below that at initialisation.
"""
from __future__ import annotations

import colorsys
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

CLASSES = ("red", "yellow", "green", "cyan", "blue", "magenta")     # hue = index / 6
TEXTURES = ("stripes", "checks", "dots", "rings", "waves", "blobs")


def texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) mask in {0, 1} of a texture at a random frequency, orientation and phase."""
    y, x = np.mgrid[0:size, 0:size] / size
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    f = rng.uniform(3.0, 6.0)                      # cycles per image
    if kind == "stripes":
        field = np.sin(2 * np.pi * f * u + phase)
    elif kind == "checks":
        field = np.sin(2 * np.pi * f * u + phase) * np.sin(2 * np.pi * f * v)
    elif kind == "dots":
        field = np.cos(2 * np.pi * f * u + phase) + np.cos(2 * np.pi * f * v) - 1.2
    elif kind == "rings":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        field = np.sin(2 * np.pi * f * np.hypot(x - cx, y - cy) + phase)
    elif kind == "waves":
        field = np.sin(2 * np.pi * f * (u + 0.12 * np.sin(2 * np.pi * 2.5 * v)) + phase)
    elif kind == "blobs":
        low = rng.normal(size=(5, 5)).astype(np.float32)
        field = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC))
    else:
        raise ValueError(kind)
    return (field > 0).astype(np.float32)


def draw_image(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    hue = (class_index / len(CLASSES) + rng.uniform(-0.03, 0.03)) % 1.0
    saturation = rng.uniform(0.15, 0.35)
    light = np.array(colorsys.hsv_to_rgb(hue, saturation, rng.uniform(0.6, 1.0)))
    dark = np.array(colorsys.hsv_to_rgb(hue, saturation * rng.uniform(0.3, 1.0), rng.uniform(0.1, 0.4)))
    mask = texture(TEXTURES[rng.integers(len(TEXTURES))], size, rng)[..., None]
    img = Image.fromarray((255 * (dark + mask * (light - dark))).astype(np.uint8))
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 2.5))), dtype=np.float32)
    img = img + rng.normal(0, rng.uniform(0, 40), (size, size, 1))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_colour_folder(root: str | Path, train_per_class: int = 80, val_per_class: int = 20,
                       size: int = 96, seed: int = 0) -> Path:
    """Writes the folder once; a complete folder with the same parameters is reused. The folder is built
    beside root and moved into place, so an interrupted run leaves no half-written dataset behind."""
    root = Path(root)
    spec = dict(version=3, classes=CLASSES, train=train_per_class, val=val_per_class, size=size, seed=seed)
    marker = root / "dataset.json"
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return root
    log.info("generating a colour-family image folder in %s (%d classes)", root, len(CLASSES))
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, cls in enumerate(CLASSES):
            folder = partial / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split == "val", c, i])
                draw_image(c, size, rng).save(folder / f"{cls}_{i:04d}.jpg", quality=90)
    (partial / "dataset.json").write_text(json.dumps(spec))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root
