"""A small real labelled image folder that needs no download: scikit-learn's bundled handwritten digits.

1797 scans of handwritten digits (UCI optdigits: 8x8 grey levels 0-16, 43 writers) written as RGB JPEGs of `size`
pixels (bicubic upsampling) under root/train/<digit> and root/val/<digit>: a stratified 1437 / 360 split with a
fixed seed. `python -m esvit_scale.data.digits OUT_DIR` writes it (docs/training.md runs on it).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

VAL_FRACTION = 0.2


def make_digits_folder(root: str | Path, size: int = 64, seed: int = 0) -> Path:
    """Writes the folder once; a complete folder with the same parameters is reused. Built beside root and moved
    into place, so an interrupted run leaves no half-written dataset behind."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    spec = dict(source="sklearn.datasets.load_digits", version=1, size=size, seed=seed, val_fraction=VAL_FRACTION)
    marker = root / "dataset.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)     # (1797, 8, 8) grey levels
    train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=VAL_FRACTION, random_state=seed,
                                          stratify=digits.target)
    log.info("writing scikit-learn's digits as %d px JPEGs to %s (%d train, %d val)", size, root, len(train_idx),
             len(val_idx))
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in sorted(indices):
            folder = partial / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(folder / f"digit_{i:04d}.jpg", quality=95)
    (partial / "dataset.json").write_text(json.dumps(spec))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 2:
        sys.exit("usage: python -m esvit_scale.data.digits OUT_DIR    (writes OUT_DIR/train and OUT_DIR/val)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(make_digits_folder(sys.argv[1]))


def quickstart_paths(cfg) -> tuple[str, str, str]:
    """(train folder, k-NN train folder, k-NN val folder); without data.path, the quickstart's real images:
    scikit-learn's digits written once to <output_dir>/quickstart_data."""
    if cfg.data.path is not None:
        return cfg.data.path, cfg.eval.train_path or cfg.data.path, cfg.eval.val_path
    from esvit_scale.engine import collectives
    root = Path(cfg.run.output_dir) / "quickstart_data"
    if collectives.rank() == 0:
        make_digits_folder(root)
    collectives.barrier()
    return str(root / "train"), cfg.eval.train_path or str(root / "train"), cfg.eval.val_path or str(root / "val")
