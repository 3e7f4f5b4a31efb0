"""Unusable images are counted once and reported per epoch and in summary.json, by both loaders."""
import json
import shutil

import pytest

from conftest import PYTHON, run_command, tiny_overrides

CONFIG = ["train.py", "--config", "configs/quickstart.yaml"]


@pytest.fixture
def folder_with_bad_files(image_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    first_class = sorted(p for p in root.iterdir())[0]
    (first_class / "truncated.jpg").write_bytes((next(first_class.glob("*.jpg"))).read_bytes()[:200])
    (first_class / "empty.jpg").write_bytes(b"")
    (first_class / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_unusable_files_are_named_once_counted_per_epoch_and_in_the_summary(loader, folder_with_bad_files, tmp_path):
    out = tmp_path / loader
    proc = run_command([PYTHON, *CONFIG, *tiny_overrides(folder_with_bad_files, out, **{
        "data.loader": loader, "data.num_workers": 2, "data.batch_size_per_gpu": 8, "optim.epochs": 3})])
    summary = json.loads((out / "summary.json").read_text())
    names = sorted(p.rsplit("/", 1)[-1] for p in summary["data"]["left_out"])
    assert summary["data"]["files_left_out"] == 3 and names == ["empty.jpg", "notes.txt", "truncated.jpg"]
    assert summary["data"]["loader"] == {"torch": "torch", "dali": "DALI (CPU graph)"}[loader]
    assert summary["data"]["loader_fallbacks"] == []       # bad files are no reason to leave DALI
    err = proc.stderr
    for bad in ("truncated.jpg", "empty.jpg"):
        assert err.count(f"skipping unusable image") >= 2 and sum(
            bad in line and "skipping unusable image" in line for line in err.splitlines()) == 1, err[-3000:]
    per_epoch = [line for line in err.splitlines() if "files of the data left out so far" in line]
    assert len(per_epoch) == 3 and all("3 files" in line for line in per_epoch), per_epoch


def test_a_folder_of_only_broken_files_says_so(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    for i in range(12):
        (root / f"b{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    proc = run_command([PYTHON, *CONFIG, *tiny_overrides(root, tmp_path / "out", **{
        "data.batch_size_per_gpu": 2, "run.max_steps": 1})], check=False)
    assert proc.returncode != 0
    assert f"no usable image in {root}: all 12 image files are unusable" in proc.stderr
