"""The completion marker: a checkpoint is complete once COMPLETE exists, and it lists every file with its size
and CRC-32, so that a missing, truncated or altered file is found before anything is loaded.

COMPLETE (JSON): {"step": int, "layout": {...how the run was split...}, "files": {name: {"size", "crc32"}}}.
Checksums are computed in parallel: rank r reads every world_size-th file (collective functions).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Optional

from esvit_scale.engine import collectives

COMPLETE = "COMPLETE"
CHUNK = 1 << 23


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _shared_listing(folder: Path) -> list[str]:
    """Rank 0's sorted list of the files in `folder`, given to every rank."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) \
        if collectives.rank() == 0 else None
    return collectives.broadcast_object(names)


def describe_files(folder: Path) -> dict[str, dict]:
    """Collective: {relative name: {"size", "crc32"}} of every file under `folder` (COMPLETE excluded)."""
    rank, world = collectives.rank(), collectives.world_size()
    names = [n for n in _shared_listing(folder) if n != COMPLETE]
    mine = {n: {"size": (folder / n).stat().st_size, "crc32": crc32(folder / n)} for n in names[rank::world]}
    return collectives.merged_dicts(mine)


def write_marker(folder: Path, step: int, layout: dict, files: dict[str, dict]) -> None:
    tmp = folder / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"step": step, "layout": layout, "files": dict(sorted(files.items()))}, indent=1))
    os.replace(tmp, folder / COMPLETE)


def read_marker(folder: Path) -> Optional[dict]:
    """The marker's content, or None without one (an unfinished checkpoint). A legacy marker has no "files"."""
    path = folder / COMPLETE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {"damaged": f"{path}: {e}"}


def find_problems(folder: Path, marker: dict) -> list[str]:
    """Collective: what is wrong with the files of a complete checkpoint ([] if it verifies)."""
    if "damaged" in marker:
        return [f"its marker {marker['damaged']} is not readable"]
    rank, world = collectives.rank(), collectives.world_size()
    expected = marker.get("files", {})
    names = sorted(expected)
    problems = {}
    for name in names[rank::world]:
        path, want = folder / name, expected[name]
        if not path.is_file():
            problems[name] = f"{path} is missing"
        elif path.stat().st_size != want["size"]:
            problems[name] = f"{path} has {path.stat().st_size} bytes, {want['size']} were written (truncated?)"
        elif crc32(path) != want["crc32"]:
            problems[name] = f"{path} does not match its checksum (altered or corrupted)"
    return [v for _, v in sorted(collectives.merged_dicts(problems).items())]
