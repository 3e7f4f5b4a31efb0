"""A folder index at ImageNet size: how long one process takes to build it, and how much memory it holds loaded.

  python -m esvit_scale.bench index --files 1281167 --json J [--classes 1000] [--folder DIR]

Makes (or reuses) a tree of N empty files named as ImageNet's (`n01440764/n01440764_10026.JPEG`) in `--classes`
class folders, builds its index in this process (data/index.py: one pass, no stat per file), then, in a fresh
process, loads it and reads every entry's name and label, as an epoch does, and reports the resident memory the
index added (VmRSS, of which file-backed: the mapped index pages, shared between processes) in that process and
in a DataLoader worker forked from it that reads every entry again; with the sizes projected to 14 M images
(ImageNet-22k) from the bytes per image.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT_TO = 14_000_000


def add_arguments(parser) -> None:
    parser.add_argument("--files", type=int, default=1_281_167)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--folder", help="where the tree goes (default: runs/bench_index_tree; reused if complete)")
    parser.add_argument("--cold", action="store_true", help="drop the kernel's caches before indexing (root only)")
    parser.add_argument("--json", help="write the report here")


def make_tree(root: Path, files: int, classes: int) -> None:
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == f"{files} {classes}":
        return
    started = time.time()
    for c in range(classes):
        wnid = f"n{1440764 + 1000 * c:08d}"
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(c, files, classes):
            open(folder / f"{wnid}_{10026 + j:05d}.JPEG", "wb").close()
        if c % 100 == 99:
            print(f"  made {c + 1} of {classes} class folders ({time.time() - started:.0f} s)", flush=True)
    marker.write_text(f"{files} {classes}")


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def measure_loaded(folder: str) -> dict:
    """In this (fresh) process: the index loaded and every entry read; then the same in a DataLoader worker."""
    import torch  # noqa: F401  (a rank has torch loaded before it opens its data: not the index's memory)
    from torch.utils.data import DataLoader, Dataset

    from esvit_scale.data.source import open_source
    before = _status()
    source = open_source(folder)
    started = time.time()
    total = labels = 0
    for i in range(len(source)):
        total += len(source.names[i])
        labels += int(source.labels[i])
    read_s = time.time() - started
    after = _status()

    class Touch(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, w):
            start = _status()
            n = sum(len(source.names[i]) for i in range(w, len(source), 2))
            end = _status()
            return {"entries": n, **{f"{k}_growth": end[k] - start[k] for k in start}}

    workers = list(DataLoader(Touch(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
    return {"entries": len(source), "name_bytes": total, "read_every_entry_s": round(read_s, 2),
            "rank": {k: after[k] - before[k] for k in after},
            "worker_growth_while_reading": [{k: int(v) for k, v in w.items() if k.endswith("growth")}
                                            for w in workers]}


def run(args) -> None:
    from esvit_scale.bench.report import cpu_model, write_json
    from esvit_scale.data.index import build_index, index_location
    root = Path(args.folder or "runs/bench_index_tree").resolve()
    print(f"bench index: a tree of {args.files} empty files in {args.classes} class folders at {root}", flush=True)
    started = time.time()
    make_tree(root, args.files, args.classes)
    made_s = time.time() - started
    cold = False
    if args.cold:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            cold = True
        except OSError as e:
            print(f"bench index: cannot drop the caches ({e}): timing a warm index", flush=True)
    started = time.time()
    location = build_index(root)
    index_s = time.time() - started
    index_bytes = sum(f.stat().st_size for f in index_location(root).iterdir())
    child = subprocess.run([sys.executable, "-c", "import json, sys; from esvit_scale.bench.index import "
                            "measure_loaded; print(json.dumps(measure_loaded(sys.argv[1])))", str(root)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__)
                                                                                              .resolve().parents[2])})
    if child.returncode != 0:
        raise SystemExit(f"bench index: measuring the loaded index failed:\n{child.stderr[-3000:]}")
    loaded = json.loads(child.stdout.strip().splitlines()[-1])
    per_image = index_bytes / args.files
    report = {"benchmark": "index", "files": args.files, "classes": args.classes, "cpu": cpu_model(),
              "tree_made_s": round(made_s, 1), "index_build_s": round(index_s, 2), "cold_cache": cold,
              "index_dir": str(location),
              "index_bytes": index_bytes, "index_bytes_per_image": round(per_image, 1), "loaded": loaded,
              "projected_14M_index_bytes": int(per_image * PROJECT_TO)}
    rank = loaded["rank"]
    print(f"indexed {args.files} files in {index_s:.1f} s (one process, {'cold' if cold else 'warm'} cache); index {index_bytes / 2**20:.1f} MiB "
          f"({per_image:.1f} B per image; 14 M images: {per_image * PROJECT_TO / 2**20:.0f} MiB)")
    print(f"loaded and every entry read ({loaded['read_every_entry_s']} s): resident +{rank['VmRSS'] / 2**20:.1f} MiB "
          f"(file-backed, shared: +{rank['RssFile'] / 2**20:.1f} MiB; anonymous: +{rank['RssAnon'] / 2**20:.1f} MiB); "
          f"a DataLoader worker reading every entry grows by "
          f"{max(w['RssAnon_growth'] for w in loaded['worker_growth_while_reading']) / 2**20:.1f} MiB anonymous")
    write_json(report, args.json)
