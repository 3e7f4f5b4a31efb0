"""Where training images come from, behind one interface: an image folder (data/folder.py) or tar shards
(data/shard.py). The loaders, the sampler's order and the evaluation read an `ImageSource` and nothing else; a
third kind of source is one new file with the members below and one entry in SOURCES.

    prepare_source(path)          # one process: builds what the source needs (a folder's index), if anything
    source = open_source(path)    # every process: read-only, memory-mapped
    source = open_source_collectively(path)    # both, for a process group: rank 0 prepares, then every rank opens
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from esvit_scale.data.folder import FolderSource
from esvit_scale.data.shard import ShardSource


class ImageSource(Protocol):
    root: Path
    classes: list[str]
    labels: np.ndarray            # (N,) class of each sample
    names: Sequence[str]          # each sample's name in the original folder (relative)
    skipped: list[str]            # left out before any read: names that are not images, damaged shards

    def __len__(self) -> int: ...

    def name(self, i: int) -> str:
        """What a message calls sample i: its file, or its shard and key."""

    def read(self, i: int) -> bytes:
        """Sample i's encoded bytes; OSError when they cannot be read whole."""

    def available(self, i: int) -> bool:
        """False for a sample known to be unreadable without trying (its shard is missing or cut short)."""


SOURCES = [ShardSource, FolderSource]      # the first that accepts a path opens it


def source_type(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    for kind in SOURCES:
        if kind.accepts(path):
            return kind
    raise FileNotFoundError(f"{path} is neither an image folder nor a shard set (data/shard.py)")


def prepare_source(path: str | Path) -> None:
    source_type(path).prepare(Path(path))


def open_source(path: str | Path) -> ImageSource:
    return source_type(path).open(Path(path))


def open_source_collectively(path: str | Path) -> ImageSource:
    """Every rank of the process group (or the one process): rank 0 prepares, the others wait, all open."""
    from esvit_scale.engine import collectives
    error = None
    if collectives.rank() == 0:
        try:
            prepare_source(path)
        except (OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
    error = collectives.broadcast_object(error)       # every rank fails with rank 0's reason, none waits
    if error:
        raise FileNotFoundError(error)
    return open_source(path)

