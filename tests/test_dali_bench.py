"""The loader benchmark runs both loaders and writes the JSON the docs quote (tiny sizes; no timing asserts)."""
from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from esvit_scale.bench import loader as bench  # noqa: E402


def test_generated_folder_is_jpegs_of_the_asked_size(tmp_path):
    root = bench.make_jpeg_folder(tmp_path, num_images=6, size=(200, 100), num_classes=2, seed=0)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 6 and len({f.parent for f in files}) == 2
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and 180 <= img.width <= 220 and 90 <= img.height <= 110


def test_loader_benchmark_reports_both_loaders(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "loader.json"
    args = parser.parse_args(["--num-images", "12", "--batch-size", "4", "--workers", "1", "--global-size", "32",
                              "--local-size", "16", "--local-number", "2", "--epochs", "1", "--json", str(out),
                              "--loaders", "torch,dali,dali_stock"])
    bench.run(args)
    report = json.loads(out.read_text())
    assert set(report["loaders"]) == {"torch", "dali", "dali_stock"}
    assert report["dali_cpu_operators"] in ("esvit_multi_crop plugin", "DALI stock")
    for r in report["loaders"].values():
        assert r["images"] == 12 and r["images_per_s"] > 0      # 3 batches of 4 per timed epoch
    assert report["speedup_vs_torch"] == pytest.approx(
        report["loaders"]["dali"]["images_per_s"] / report["loaders"]["torch"]["images_per_s"], rel=0.02)
    assert report["crops"] == "2 x 32 + 2 x 16"
