"""DALI vs torch/PIL multi-crop loader throughput on the same JPEG folder (images/s, speedup)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields, soft blobs and fine noise: compresses and decodes like a photo."""
    sw, sh = max(width // 8, 2), max(height // 8, 2)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32) * 8
    small = np.full((sh, sw, 3), 128, np.float32)
    for ch in range(3):
        for _ in range(3):
            fx, fy = rng.uniform(0.002, 0.03, size=2)
            small[..., ch] += rng.uniform(20, 50) * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6.3))
    for _ in range(int(rng.integers(3, 8))):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 120)
        small += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, size=3)
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(img, np.int16) + rng.integers(-8, 9, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_jpeg_folder(root: str | Path, num_images: int = 200, size: tuple[int, int] = (450, 475),
                     num_classes: int = 4, seed: int = 0, quality: int = 90) -> Path:
    """`root/class_k/img_i.jpg`, images of about `size` (width, height) pixels, +-10% per image."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = root / f"class_{i % num_classes}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(s * rng.uniform(0.9, 1.1)) for s in size)
        natural_image(rng, w, h).save(folder / f"img_{i:05d}.jpg", quality=quality)
    return root
