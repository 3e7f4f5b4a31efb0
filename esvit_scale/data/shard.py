"""Tar shards: an image folder written as a few large files, and read back sample by sample.

    python -m esvit_scale.data.shard FOLDER OUT [--shard-size 512MB]

writes OUT/shard-000000.tar ... in webdataset form (each sample `<key>.<ext>` + `<key>.cls`, its label as text; the
key is the sample's index), beside each tar DALI's index of it (`.idx`, as `wds2idx` makes, for
`fn.readers.webdataset` and other webdataset readers), and the set's own index, memory-mapped by readers:
    shards.json     the folder written, classes, count, every shard's name, size and samples
    names.bin, offsets.npy    each sample's name in the folder (for messages)
    labels.npy, shard.npy, offset.npy, size.npy, crc32.npy    per sample: class, shard, byte range, CRC-32
Samples keep the folder index's order, so sample i of the shards is image i of the folder: the sampler's stream,
exact resume and elastic resume are the same as from the folder, and a run from shards sees the same images in the
same steps as a run from the folder.

Reading (ShardSource) is by byte range (pread), in the sampler's order: few files to open, no metadata operation
per image. DALI's own `fn.readers.webdataset` reads a shard front to back in its own order (contiguous ranges per
rank, a shuffle buffer), which would give up the exact per-step sample stream and elastic resume; the loaders
feed the bytes they read to the same DALI graph as from a folder instead. A missing or truncated shard is found
when the set is opened (its unreadable samples are named and counted, and left out); a corrupt image inside a
shard by its CRC-32 or by the decoder.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from esvit_scale.data.index import StringTable

log = logging.getLogger(__name__)

SET_FILE = "shards.json"
FORMAT = 1
PER_SAMPLE = ("labels", "shard", "offset", "size", "crc32")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 1GB, 100000000)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


def write_shards(folder: str | Path, out: str | Path, shard_size: int = 512 << 20, progress_every: float = 10.0
                 ) -> Path:
    """Every image of `folder` (its index order) into tar shards of about `shard_size` bytes under `out`."""
    from esvit_scale.data.folder import index_folder
    source = index_folder(folder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(source)
    arrays = {"labels": np.asarray(source.labels, dtype=source.labels.dtype), "shard": np.zeros(n, np.int32),
              "offset": np.zeros(n, np.int64), "size": np.zeros(n, np.int64), "crc32": np.zeros(n, np.uint32)}
    shards: list[dict] = []
    tar = None
    started = last = time.time()

    def close_shard():
        if tar is not None:
            tar.close()
            shards[-1]["size"] = (out / shards[-1]["name"]).stat().st_size
            idx_lines = shards[-1].pop("_idx")
            (out / shards[-1]["name"]).with_suffix(".idx").write_text(
                f"v1.2 {len(idx_lines)}\n" + "".join(line + "\n" for line in idx_lines))

    for i in range(n):
        if tar is None or tar.offset >= shard_size:
            close_shard()
            name = f"shard-{len(shards):06d}.tar"
            shards.append({"name": name, "samples": 0, "_idx": []})
            tar = tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT)
        data = source.read(i)
        key = f"{i:09d}"
        ext = os.path.splitext(source.names[i])[1].lower().lstrip(".") or "jpg"
        members = [(f"{key}.{ext}", data), (f"{key}.cls", str(int(source.labels[i])).encode())]
        entries = []
        for member, payload in members:
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            data_at = tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT, tar.encoding, tar.errors))
            tar.addfile(info, io.BytesIO(payload))
            entries.append(f"{member.split('.', 1)[1]} {data_at} {info.size} {member}")
            if member.endswith(ext):
                arrays["offset"][i], arrays["size"][i] = data_at, info.size
        arrays["shard"][i], arrays["crc32"][i] = len(shards) - 1, zlib.crc32(data)
        shards[-1]["samples"] += 1
        shards[-1]["_idx"].append(" ".join(entries))
        if time.time() - last > progress_every:
            last = time.time()
            log.info("sharding %s: %d of %d images, %d shards (%.0f s)", source.root, i + 1, n, len(shards),
                     last - started)
    close_shard()
    StringTable.write(out, list(source.names))
    for key, array in arrays.items():
        np.save(out / f"{key}.npy", array)
    (out / SET_FILE).write_text(json.dumps({
        "format": FORMAT, "folder": str(source.root), "count": n, "classes": source.classes, "shards": shards}, indent=1))
    log.info("wrote %d images of %s as %d shards (%.1f GB) to %s in %.0f s", n, source.root, len(shards),
             sum(s["size"] for s in shards) / 1e9, out, time.time() - started)
    return out


class ShardSource:
    """data.source.ImageSource over a shard set written by write_shards."""

    def __init__(self, root: Path):
        root = Path(root)
        meta = json.loads((root / SET_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{root / SET_FILE}: shard set format {meta.get('format')} (this version reads {FORMAT})")
        self.root, self.classes, self.shards = root, meta["classes"], meta["shards"]
        self.names = StringTable.load(root)
        for key in PER_SAMPLE:                 # self.labels, self.shard, self.offset, self.size, self.crc32
            setattr(self, key, np.load(root / f"{key}.npy", mmap_mode="r"))
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self.skipped, self.unreadable = self._check_shards()

    def _check_shards(self) -> tuple[list[str], Optional[np.ndarray]]:
        """Missing or truncated shards, named; a mask of the samples they take away (None: every shard whole)."""
        problems, lost = [], None
        for s, shard in enumerate(self.shards):
            path = self.root / shard["name"]
            try:
                size = path.stat().st_size
            except OSError:
                size = -1
            if size >= shard["size"]:
                continue
            mine = self.shard == s
            gone = mine & (self.offset + self.size > max(size, 0))
            lost = gone if lost is None else lost | gone
            what = "missing" if size < 0 else f"truncated ({size} of {shard['size']} bytes)"
            problems.append(f"{path} ({what}: {int(gone.sum())} of {int(mine.sum())} samples left out)")
            log.warning("shard %s is %s: %d of its %d samples are left out", path, what, int(gone.sum()),
                        int(mine.sum()))
        return problems, lost

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return f"{self.root / self.shards[int(self.shard[i])]['name']}:{int(i):09d} ({self.names[i]})"

    def available(self, i: int) -> bool:
        return self.unreadable is None or not self.unreadable[i]

    def read(self, i: int) -> bytes:
        """Sample i's bytes; OSError if its shard cannot give them whole, or they do not match their CRC-32."""
        s, offset, size = int(self.shard[i]), int(self.offset[i]), int(self.size[i])
        data = os.pread(self._fd(s), size, offset)
        if len(data) != size:
            raise OSError(f"truncated shard ({len(data)} of {size} bytes)")
        if zlib.crc32(data) != int(self.crc32[i]):
            raise OSError("corrupt in its shard (CRC-32 mismatch)")
        return data

    def _fd(self, s: int) -> int:
        if os.getpid() != self._pid:           # a forked loader worker: descriptors of its own
            self._fds, self._pid = {}, os.getpid()
        if s not in self._fds:
            self._fds[s] = os.open(self.root / self.shards[s]["name"], os.O_RDONLY)
        return self._fds[s]

    # ---- as data.source registers it
    @staticmethod
    def accepts(path: Path) -> bool:
        return (path / SET_FILE).is_file()

    @staticmethod
    def prepare(path: Path) -> None:
        pass                                   # written whole by write_shards: nothing to build

    @classmethod
    def open(cls, path: Path) -> "ShardSource":
        return cls(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esvit_scale.data.shard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="an image folder (root/<class>/<image>, or flat)")
    parser.add_argument("out", help="where the shards go (a new or empty folder)")
    parser.add_argument("--shard-size", type=parse_size, default="512MB", help="bytes per shard (default 512MB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_shards(args.folder, args.out, args.shard_size)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
