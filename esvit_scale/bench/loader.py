"""DALI vs torch/PIL multi-crop loader throughput on the same JPEGs (images/s, speedup), from the folder and, with
`--sources folder,shards`, from tar shards of it (data/shard.py): the rows `<loader>@<source>`."""
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


def add_arguments(parser) -> None:
    parser.add_argument("--folder", default=None, help="JPEG folder; default: generate one in a temp dir")
    parser.add_argument("--num-images", type=int, default=200, help="images to generate (no --folder)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DALI CPU threads = torch DataLoader workers")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-number", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3,
                        help="timed epochs per loader (after one warm-up), alternating")
    parser.add_argument("--loaders", default="torch,dali",
                        help="comma-separated: torch, dali, dali_stock (DALI without the esvit_multi_crop plugin)")
    parser.add_argument("--sources", default="folder",
                        help="comma-separated: folder, shards (the folder written as tar shards first)")
    parser.add_argument("--shard-size", default="16MB", help="bytes per shard with --sources ...shards")
    parser.add_argument("--json", default=None, help="write the results here")


def _cpu_seconds() -> float:
    """CPU time of this process (all threads: DALI's) and of its reaped children (DataLoader workers)."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _time_epoch(loader, epoch: int) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch; the torch loader's workers end with the epoch."""
    import time
    t0, c0 = time.perf_counter(), _cpu_seconds()
    images = sum(crops[0].shape[0] for crops in loader.epoch(epoch))
    return images, time.perf_counter() - t0, _cpu_seconds() - c0


def _time_loaders(loaders: dict, epochs: int) -> dict:
    """One warm-up epoch each, then `epochs` timed epochs, alternating loaders epoch by epoch so that a
    change in the machine's load hits both alike."""
    for loader in loaders.values():
        _time_epoch(loader, 0)
    totals = {name: [0, 0.0, 0.0] for name in loaders}
    for e in range(1, epochs + 1):
        for name, loader in loaders.items():
            for k, v in enumerate(_time_epoch(loader, e)):
                totals[name][k] += v
    return {name: {"images": n, "seconds": round(s, 3), "images_per_s": round(n / s, 2),
                   "cpu_ms_per_image": round(1e3 * c / n, 2)}
            for name, (n, s, c) in totals.items()}


def run(args) -> dict:
    import os
    import platform
    import tempfile

    import torch

    from esvit_scale.bench.report import cpu_model, write_json
    from esvit_scale.config import DataConfig
    from esvit_scale.data.shard import parse_size, write_shards
    from esvit_scale.data.source import open_source, prepare_source

    load_start = os.getloadavg()[0]     # the machine is shared: report how busy it was
    tmp = None
    folder = args.folder
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="esvit_bench_jpegs_")
        folder = str(make_jpeg_folder(tmp.name, args.num_images))
    data = DataConfig(batch_size_per_gpu=args.batch_size, num_workers=args.workers,
                      global_crops_size=args.global_size, local_crops_size=[args.local_size],
                      local_crops_number=[args.local_number])
    source_names = args.sources.split(",")
    sources = {}
    for kind in source_names:
        if kind == "folder":
            prepare_source(folder)
            sources[kind] = open_source(folder)
        elif kind == "shards":
            shards = tempfile.TemporaryDirectory(prefix="esvit_bench_shards_")
            write_shards(folder, shards.name, parse_size(args.shard_size))
            sources[kind] = open_source(shards.name)
        else:
            raise SystemExit(f"unknown source {kind!r} (folder, shards)")
    index = next(iter(sources.values()))
    torch.set_num_threads(1)                  # the main process only collates/copies
    loaders = {}
    for kind, source in sources.items():
        for name in args.loaders.split(","):
            if name in ("dali", "dali_stock"):
                from esvit_scale.data.dali_loader import DaliMultiCropLoader
                loader = DaliMultiCropLoader(source, data, seed=0, device_id=None,
                                             plugin=False if name == "dali_stock" else None)
            elif name == "torch":
                from esvit_scale.data.torch_loader import TorchMultiCropLoader
                loader = TorchMultiCropLoader(source, data, seed=0, pin_memory=False)
            else:
                raise SystemExit(f"unknown loader {name!r} (torch, dali, dali_stock)")
            loaders[name if len(sources) == 1 else f"{name}@{kind}"] = loader
    results = _time_loaders(loaders, args.epochs)
    report = {
        "benchmark": "loader",
        "folder": folder if tmp is None else f"generated: {args.num_images} JPEGs of ~450x475",
        "num_images": len(index), "sources": source_names, "batch_size": args.batch_size,
        "workers_or_threads": args.workers,
        "crops": f"2 x {args.global_size} + {args.local_number} x {args.local_size}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}",
        "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "loaders": results,
    }
    dali = next((loader for name, loader in loaders.items() if name.split("@")[0] == "dali"), None)
    if dali is not None:
        report["dali_cpu_operators"] = "esvit_multi_crop plugin" if dali.plugin else "DALI stock"
    if "dali" in results and "torch" in results:
        report["speedup_vs_torch"] = round(results["dali"]["images_per_s"] / results["torch"]["images_per_s"], 2)
    print(f"{'loader':16s} {'images/s':>10s} {'images':>8s} {'seconds':>9s} {'CPU ms/image':>13s}")
    for name, r in results.items():
        print(f"{name:16s} {r['images_per_s']:10.2f} {r['images']:8d} {r['seconds']:9.2f} "
              f"{r['cpu_ms_per_image']:13.1f}")
    if "speedup_vs_torch" in report:
        print(f"speedup (dali / torch): {report['speedup_vs_torch']:.2f}x, DALI CPU operators: "
              f"{report['dali_cpu_operators']}   "
              f"(1-min load average {report['load_average_1min']['start']} -> {report['load_average_1min']['end']})")
    write_json(report, args.json)
    if tmp is not None:
        tmp.cleanup()
    if "shards" in sources:
        shards.cleanup()
    return report
