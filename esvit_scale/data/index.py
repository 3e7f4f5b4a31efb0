"""The index of an image folder, built once by one process and memory-mapped by every rank and loader worker.

    python -m esvit_scale.data.index FOLDER [--index-dir DIR] [--force]     # ahead of a run (training builds it too)

A folder of N images is indexed in one pass (`os.scandir`, one directory read per directory: no stat of the files)
into a few files that every process maps read-only:
    meta.json       root, class names, how many, the non-image names met, and every directory walked with its mtime
    names.bin       every image's path relative to the root, UTF-8, back to back
    offsets.npy     int64 (N + 1,): where each name starts in names.bin
    labels.npy      int16/int32 (N,): the class of each image
A loaded index holds no Python object per image: a rank and each of its DataLoader workers share the mapped pages
(no copy-on-read growth over an epoch), at ~40 bytes per image for ImageNet's names (docs/performance.md).

Where: `$ESVIT_INDEX_DIR` (default ~/.cache/esvit_scale/index), under a name made from the folder's absolute path
(nothing is written into the data folder, which is often read-only or shared). It is reused (by a requeued job too,
and by every job on that folder) while every directory it walked has the same mtime: adding, removing or renaming a
file or a class folder changes its directory's mtime, and the index is built again; a file's content is not part of
the index.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FORMAT = 1
MAX_SKIPPED_LISTED = 1000          # non-image names kept by name in meta.json (all are counted)
SETTLE_S = 2.0                     # directory mtimes this recent at the scan are not trusted to mark a change


class StringTable(Sequence[str]):
    """N strings stored back to back (names.bin + offsets.npy), memory-mapped; table[i] decodes one."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def load(cls, folder: Path, stem: str = "names") -> "StringTable":
        offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        size = int(offsets[-1])
        blob = np.memmap(folder / f"{stem}.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        return cls(blob, offsets)

    @staticmethod
    def write(folder: Path, strings: Sequence[str], stem: str = "names") -> None:
        encoded = [s.encode() for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        with open(folder / f"{stem}.bin", "wb") as f:
            for e in encoded:
                f.write(e)
        np.save(folder / "offsets.npy", offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self.blob[int(self.offsets[i]):int(self.offsets[i + 1])]).decode()

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


def index_location(root: Path) -> Path:
    """Where the index of `root` lives: $ESVIT_INDEX_DIR/<name>-<hash of its absolute path>."""
    root = root.resolve()
    cache = Path(os.environ.get("ESVIT_INDEX_DIR", Path.home() / ".cache" / "esvit_scale" / "index"))
    return cache / f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:16]}"


def _walk(folder: Path, dirs: dict[str, int], root: Path) -> Iterator[os.DirEntry]:
    """Every file under `folder` (no stat per file), recording each directory's mtime."""
    dirs[os.path.relpath(folder, root)] = os.stat(folder).st_mtime_ns
    with os.scandir(folder) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            yield from _walk(Path(entry.path), dirs, root)
        elif entry.is_file(follow_symlinks=True) and not entry.name.startswith("."):
            yield entry


def scan(root: Path, progress_every: float = 10.0) -> dict:
    """One pass over `root`: classes (its sorted subfolders, not hidden; none: one class ""), every image's
    relative name and label (sorted by name within a class, as sorted(Path.rglob) would), the non-images, the mtimes."""
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    groups = class_dirs or [""]
    names, labels, skipped, dirs = [], [], [], {}
    last_report, started = time.time(), time.time()
    for label, group in enumerate(groups):
        found = []
        for entry in _walk(root / group if group else root, dirs, root):
            rel = os.path.relpath(entry.path, root)
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(rel)
            else:
                skipped.append(rel)
        found.sort()
        names += found
        labels += [label] * len(found)
        if time.time() - last_report > progress_every:
            last_report = time.time()
            log.info("indexing %s: %d of %d class folders, %d images so far (%.0f s)", root, label + 1, len(groups),
                     len(names), last_report - started)
    dirs.setdefault(".", os.stat(root).st_mtime_ns)       # a new class folder changes the root
    return {"classes": groups, "names": names, "labels": labels, "skipped": sorted(skipped), "dirs": dirs}


def build_index(root: str | Path, location: Optional[Path] = None) -> Path:
    """Index `root` into `location` (default: index_location) atomically: written beside it and renamed, so that
    processes building at once leave one whole index, and a killed build leaves none."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    location = location or index_location(root)
    started = time.time()
    found = scan(root)
    # a directory changed within the clock's granularity of the scan could change again unseen: not to be trusted
    settled = max(found["dirs"].values()) < (started - SETTLE_S) * 1e9
    if not found["names"]:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    partial = location.with_name(f"{location.name}.partial{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    StringTable.write(partial, found["names"])
    label_type = np.int16 if len(found["classes"]) < 2 ** 15 else np.int32
    np.save(partial / "labels.npy", np.asarray(found["labels"], dtype=label_type))
    meta = {"format": FORMAT, "root": str(root), "count": len(found["names"]), "classes": found["classes"],
            "skipped": found["skipped"][:MAX_SKIPPED_LISTED], "skipped_count": len(found["skipped"]),
            "dirs": found["dirs"], "settled": settled, "seconds": round(time.time() - started, 2)}
    (partial / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(location, ignore_errors=True)
    try:
        os.replace(partial, location)
    except OSError:                    # another process put its (equal) index there in the meantime
        shutil.rmtree(partial, ignore_errors=True)
        return location
    log.info("indexed %s: %d images in %d classes, %d other files, in %.1f s -> %s", root, meta["count"],
             len(meta["classes"]), meta["skipped_count"], meta["seconds"], location)
    return location


def stale(location: Path, root: Path) -> Optional[str]:
    """Why the index at `location` cannot serve `root` (missing, another format or folder, a directory changed), or
    None."""
    try:
        meta = json.loads((location / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "no index"
    if meta.get("format") != FORMAT:
        return f"index format {meta.get('format')} (this version reads {FORMAT})"
    if Path(meta["root"]) != root.resolve():
        return f"it indexes {meta['root']}"
    if not meta.get("settled"):
        return "the folder was changing while it was indexed"
    for rel, mtime in meta["dirs"].items():
        try:
            if os.stat(root / rel).st_mtime_ns != mtime:
                return f"{root / rel} changed since it was indexed"
        except OSError:
            return f"{root / rel} is gone"
    return None


def prepare_index(root: str | Path) -> Path:
    """The usable index of `root`, built (again) if missing or stale. One process should call it (the others then
    only read: `load_index`)."""
    root = Path(root).resolve()
    location = index_location(root)
    why = stale(location, root)
    if why is not None:
        if why != "no index":
            log.info("indexing %s again: %s", root, why)
        build_index(root, location)
    return location


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esvit_scale.data.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--force", action="store_true", help="build it even if a usable one exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(args.folder).resolve()
    try:
        location = index_location(root)
        if args.force or stale(location, root) is not None:
            build_index(root, location)
        else:
            log.info("%s is indexed already and unchanged: %s", root, location)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
