"""An image folder: `root/<class>/<image>` (labels from the sorted class names) or a flat folder (label 0)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class ImageIndex:
    root: Path
    paths: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[str]          # files that are not images by their name

    def __len__(self) -> int:
        return len(self.paths)


def index_folder(root: str | Path) -> ImageIndex:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, d) for d in class_dirs] if class_dirs else [("", root)]
    paths, labels, skipped = [], [], []
    for label, (_, folder) in enumerate(groups):
        for p in sorted(folder.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(p))
                labels.append(label)
            else:
                skipped.append(str(p))
    if skipped:
        log.warning("%s: skipping %d files that are not images: %s", root, len(skipped),
                    ", ".join(Path(s).name for s in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return ImageIndex(root, paths, labels, [name for name, _ in groups], skipped)
