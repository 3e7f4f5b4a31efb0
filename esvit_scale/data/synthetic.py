"""The quickstart's labelled image folder: textures, generated deterministically.

A class is a texture pattern (stripes, checks, dots, rings, waves, blobs) filling the image; frequency,
orientation, phase and the two grey levels are random per image, so a network must learn the pattern.
Written as JPEGs under root/train/<class> and root/val/<class>.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CLASSES = ("stripes", "checks", "dots", "rings", "waves", "blobs")


def pattern(cls: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) mask in {0, 1} of the class's texture."""
    y, x = np.mgrid[0:size, 0:size] / size
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    f = rng.uniform(3.0, 6.0)                      # cycles per image
    if cls == "stripes":
        field = np.sin(2 * np.pi * f * u + phase)
    elif cls == "checks":
        field = np.sin(2 * np.pi * f * u + phase) * np.sin(2 * np.pi * f * v)
    elif cls == "dots":
        field = np.cos(2 * np.pi * f * u + phase) + np.cos(2 * np.pi * f * v) - 1.2
    elif cls == "rings":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        field = np.sin(2 * np.pi * f * np.hypot(x - cx, y - cy) + phase)
    elif cls == "waves":
        field = np.sin(2 * np.pi * f * (u + 0.12 * np.sin(2 * np.pi * 2.5 * v)) + phase)
    elif cls == "blobs":
        low = rng.normal(size=(5, 5)).astype(np.float32)
        field = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC))
    else:
        raise ValueError(cls)
    return (field > 0).astype(np.float32)


def draw_image(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Grey levels only: colour would let self-supervision tell images apart without seeing the pattern."""
    dark, light = sorted(rng.uniform(0, 255, 2))
    light = max(light, dark + 80)
    mask = pattern(cls, size, rng)
    img = dark + mask * (light - dark) + rng.normal(0, 10, (size, size))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB")


def make_quickstart_folder(root: str | Path, train_per_class: int = 80, val_per_class: int = 20,
                           size: int = 96, seed: int = 0) -> Path:
    """Writes the folder once; a complete folder with the same parameters is reused."""
    root = Path(root)
    spec = dict(version=2, classes=CLASSES, train=train_per_class, val=val_per_class, size=size, seed=seed)
    marker = root / "dataset.json"
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return root
    log.info("generating the quickstart image folder in %s (%d classes)", root, len(CLASSES))
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split == "val", c, i])
                draw_image(cls, size, rng).save(folder / f"{cls}_{i:04d}.jpg", quality=90)
    marker.write_text(json.dumps(spec))
    return root
