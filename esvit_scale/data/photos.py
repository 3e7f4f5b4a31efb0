"""A small labelled set of real photographs that needs no download: the natural images scikit-image ships.

Sixteen photographs and textures of `skimage.data` (astronaut, coffee, chelsea the cat, rocket, camera man, coins,
moon, brick, grass, gravel, the Hubble deep field, immunohistochemistry, retina, a printed page, text, a clock), each
one class. Each is cut into square crops of `size` pixels at seeded random places: training crops from the first
three quarters of the photograph (along its longer side), held-out crops from the last quarter, so no training crop
shares a pixel with a held-out one. Written as RGB JPEGs under root/train/<photo> and root/val/<photo>.

    python -m esvit_scale.data.photos OUT_DIR [--size 96] [--train 64] [--val 16]

As a classification task it is small and artificial (which photograph is this piece from?); its pixels are real, with
real local structure at the crop sizes of training (>= 96 px: a Swin's last stage holds >= 3 x 3 tokens), which is
what the region-matching term is about, where the 8 x 8 digits give it 2 x 2 tokens of upsampled blur.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "brick", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "retina", "page", "text", "clock")
TRAIN_FRACTION = 0.75


def photograph(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one of scikit-image's bundled images."""
    import skimage.data
    image = getattr(skimage.data, name)()
    if image.dtype != np.uint8:
        image = (255 * (image > 0)).astype(np.uint8) if image.dtype == bool else image.astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _crops(image: np.ndarray, region: tuple[slice, slice], size: int, count: int, rng: np.random.Generator):
    sub = image[region]
    h, w = sub.shape[:2]
    if h < size or w < size:
        raise ValueError(f"a {h}x{w} region cannot hold {size} px crops")
    for _ in range(count):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        yield sub[y:y + size, x:x + size]


def make_photos_folder(root: str | Path, size: int = 96, train: int = 64, val: int = 16, seed: int = 0) -> Path:
    """Writes the folder once; a complete folder of the same parameters is reused. Built beside root and moved into
    place, so an interrupted run leaves no half-written data set behind."""
    root = Path(root)
    spec = dict(source="skimage.data", photos=list(PHOTOS), size=size, train=train, val=val, seed=seed,
                train_fraction=TRAIN_FRACTION, version=1)
    marker = root / "dataset.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        image = photograph(name)
        h, w = image.shape[:2]
        if w >= h:             # cut along the longer side: training part first, held-out part last
            cut = int(w * TRAIN_FRACTION)
            parts = {"train": (slice(None), slice(0, cut)), "val": (slice(None), slice(cut, None))}
        else:
            cut = int(h * TRAIN_FRACTION)
            parts = {"train": (slice(0, cut), slice(None)), "val": (slice(cut, None), slice(None))}
        for split, count in (("train", train), ("val", val)):
            folder = partial / split / name
            folder.mkdir(parents=True)
            for i, crop in enumerate(_crops(image, parts[split], size, count, rng)):
                Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{name}_{i:04d}.jpg", quality=95)
    (partial / "dataset.json").write_text(json.dumps(spec, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    log.info("wrote %d photographs as %d px crops to %s (%d train, %d val each)", len(PHOTOS), size, root, train, val)
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esvit_scale.data.photos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--size", type=int, default=96, help="crop side in pixels (default 96)")
    parser.add_argument("--train", type=int, default=64, help="training crops per photograph")
    parser.add_argument("--val", type=int, default=16, help="held-out crops per photograph")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_photos_folder(args.out, args.size, args.train, args.val, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
