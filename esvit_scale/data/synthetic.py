"""The quickstart's labelled image folder: shapes on textured backgrounds, generated deterministically.

Classes differ by the shape drawn (not by colour, position or size, which are random), so a network has
to learn shape to tell them apart. Written as JPEGs under root/train/<class> and root/val/<class>.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle", "cross", "ring", "stripes")


def _polygon(cx, cy, r, n, angle):
    return [(cx + r * np.cos(angle + 2 * np.pi * k / n), cy + r * np.sin(angle + 2 * np.pi * k / n))
            for k in range(n)]


def draw_image(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    # low-frequency coloured noise background
    low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    bg = Image.fromarray(low).resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(np.asarray(bg, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fg = tuple(int(c) for c in rng.integers(0, 256, 3))
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = (size * rng.uniform(0.35, 0.65) for _ in range(2))
    angle = rng.uniform(0, 2 * np.pi)
    width = max(2, int(r * 0.35))
    if cls == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif cls == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, angle), fill=fg)
    elif cls == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.3, 3, angle), fill=fg)
    elif cls == "cross":
        for a in (angle, angle + np.pi / 2):
            dx, dy = r * 1.2 * np.cos(a), r * 1.2 * np.sin(a)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fg, width=width)
    elif cls == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=width)
    elif cls == "stripes":
        for k in range(-2, 3):
            ox, oy = k * r * 0.5 * np.cos(angle + np.pi / 2), k * r * 0.5 * np.sin(angle + np.pi / 2)
            dx, dy = r * np.cos(angle), r * np.sin(angle)
            draw.line([cx + ox - dx, cy + oy - dy, cx + ox + dx, cy + oy + dy], fill=fg, width=max(1, width // 2))
    return img.filter(ImageFilter.GaussianBlur(0.5))


def make_quickstart_folder(root: str | Path, train_per_class: int = 80, val_per_class: int = 20,
                           size: int = 96, seed: int = 0) -> Path:
    """Writes the folder once; a complete folder with the same parameters is reused."""
    root = Path(root)
    spec = dict(classes=CLASSES, train=train_per_class, val=val_per_class, size=size, seed=seed)
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
