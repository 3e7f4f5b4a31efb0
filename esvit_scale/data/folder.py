"""An image folder as a data source: `root/<class>/<image>` (labels from the sorted class names) or a flat folder
(label 0), read through its memory-mapped index (data/index.py): no Python object per image in any process."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from esvit_scale.data.index import IMAGE_EXTENSIONS, StringTable, index_location, prepare_index  # noqa: F401

log = logging.getLogger(__name__)


class FolderSource:
    """data.source.ImageSource over a folder's index."""

    def __init__(self, location: Path):
        meta = json.loads((location / "meta.json").read_text())
        self.root = Path(meta["root"])
        self.classes: list[str] = meta["classes"]
        self.skipped = [str(self.root / s) for s in meta["skipped"]]
        self.names = StringTable.load(location)
        self.labels = np.load(location / "labels.npy", mmap_mode="r")
        self.paths: Sequence[str] = _Paths(self)
        self._root = str(self.root)

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return os.path.join(self._root, self.names[i])

    def read(self, i: int) -> bytes:
        with open(self.name(i), "rb") as f:
            return f.read()

    def available(self, i: int) -> bool:
        return True                    # a file can always be tried

    # ---- as data.source registers it
    @staticmethod
    def accepts(path: Path) -> bool:
        return path.is_dir()

    @staticmethod
    def prepare(path: Path) -> None:
        location = prepare_index(path)
        meta = json.loads((location / "meta.json").read_text())
        if meta["skipped_count"]:
            log.warning("%s: skipping %d files that are not images: %s", path, meta["skipped_count"],
                        ", ".join(Path(s).name for s in meta["skipped"][:10]) + (" ..." if meta["skipped_count"] > 10
                                                                                else ""))

    @classmethod
    def open(cls, path: Path) -> "FolderSource":
        return cls(index_location(path.resolve()))


class _Paths(Sequence[str]):
    """Every image's path, made on demand."""

    def __init__(self, source: FolderSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.source.name(j) for j in range(*i.indices(len(self)))]
        return self.source.name(i if i >= 0 else i + len(self))


def index_folder(root: str | Path) -> FolderSource:
    """The folder's source in one process: indexed if it is not (or changed), then opened."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    FolderSource.prepare(root)
    return FolderSource.open(root)
