"""Data sources at scale (data/index.py, data/folder.py, data/shard.py, data/source.py): the folder index built once
and memory-mapped, tar shards written and read back, damaged shards reported and left out, and training from
shards: the same steps as from the folder, an exact resume after a kill, an elastic resume on fewer ranks."""
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, ROOT, _free_port, read_losses, run_command, tiny_overrides, torchrun

CONFIG = ["train.py", "--config", "configs/quickstart.yaml"]


@pytest.fixture(autouse=True)
def own_index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ESVIT_INDEX_DIR", str(tmp_path / "indexes"))


def settle(folder: Path) -> None:
    """Make every directory's mtime older than the index's settling time (as a data set's are)."""
    old = time.time() - 60
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        os.utime(d, (old, old))


@pytest.fixture
def tree(tmp_path) -> Path:
    """Two classes, a nested subfolder, a non-image, a hidden file."""
    root = tmp_path / "tree"
    for name in ["b/x2.jpg", "b/x1.png", "a/sub/z.jpg", "a/y.JPEG", "a/notes.txt", "a/.hidden.jpg"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    settle(root)
    return root


def test_the_index_lists_what_a_sorted_walk_finds_and_maps_it(tree):
    from esvit_scale.data.folder import index_folder
    source = index_folder(tree)
    assert source.classes == ["a", "b"] and len(source) == 4
    assert list(source.names) == ["a/sub/z.jpg", "a/y.JPEG", "b/x1.png", "b/x2.jpg"]
    assert source.labels.tolist() == [0, 0, 1, 1] and isinstance(source.labels, np.memmap)
    assert source.skipped == [str(tree / "a" / "notes.txt")]
    assert source.read(3) == b"b/x2.jpg" and source.name(0) == str(tree / "a" / "sub" / "z.jpg")
    assert not any(tree.rglob("*esvit*"))                    # nothing written into the data folder


def test_the_index_is_reused_until_a_directory_changes(tree, caplog):
    from esvit_scale.data.index import index_location, prepare_index
    location = prepare_index(tree)
    built = (location / "meta.json").stat().st_mtime_ns
    assert prepare_index(tree) == location and (location / "meta.json").stat().st_mtime_ns == built    # reused
    (tree / "b" / "x3.jpg").write_bytes(b"new")
    with caplog.at_level("INFO"):
        prepare_index(tree)
    assert f"{tree / 'b'} changed since it was indexed" in caplog.text
    from esvit_scale.data.folder import FolderSource
    assert len(FolderSource.open(tree)) == 5
    copy = tree.with_name("copy")
    shutil.copytree(tree, copy)
    settle(copy)
    assert index_location(copy) != location and len(FolderSource(prepare_index(copy))) == 5


def test_the_index_command_builds_ahead_and_then_says_it_is_current(tree):
    args = [PYTHON, "-m", "esvit_scale.data.index", str(tree)]
    env = {"ESVIT_INDEX_DIR": os.environ["ESVIT_INDEX_DIR"]}
    assert "indexed " in run_command(args, env=env).stderr
    assert "indexed already and unchanged" in run_command(args, env=env).stderr
    proc = run_command([PYTHON, "-m", "esvit_scale.data.index", str(tree / "missing")], env=env, check=False)
    assert proc.returncode == 2 and "image folder not found" in proc.stderr


def test_a_loaded_index_adds_no_private_memory_in_loader_workers(tmp_path):
    """20 000 entries read in the process and in two forked DataLoader workers: the names live in shared file
    pages (no Python object per image), so no worker grows by copy-on-read."""
    from esvit_scale.bench.index import make_tree, measure_loaded
    from esvit_scale.data.index import build_index
    root = tmp_path / "big"
    make_tree(root, 20_000, 100)
    settle(root)
    build_index(root)
    proc = run_command([PYTHON, "-c", "import json, sys; from esvit_scale.bench.index import measure_loaded; "
                        f"print(json.dumps(measure_loaded({str(root)!r})))"],
                       env={"ESVIT_INDEX_DIR": os.environ["ESVIT_INDEX_DIR"]})
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["entries"] == 20_000 and loaded["rank"]["RssAnon"] < 2 << 20, loaded
    assert all(w["RssAnon_growth"] < 1 << 20 for w in loaded["worker_growth_while_reading"]), loaded


# ------------------------------------------------------------------ shards


@pytest.fixture
def shards(image_folder, tmp_path) -> Path:
    from esvit_scale.data.shard import write_shards
    return write_shards(image_folder, tmp_path / "shards", shard_size=40_000)


def test_shards_hold_the_folder_in_its_order_as_webdataset_tars_with_dali_indexes(image_folder, shards):
    from esvit_scale.data.folder import index_folder
    from esvit_scale.data.source import open_source
    folder, source = index_folder(image_folder), open_source(shards)
    assert type(source).__name__ == "ShardSource" and len(source) == len(folder) and len(source.shards) > 2
    assert source.classes == folder.classes and source.labels.tolist() == folder.labels.tolist()
    assert all(source.read(i) == folder.read(i) for i in range(len(folder)))
    first = shards / source.shards[0]["name"]
    with tarfile.open(first) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.jpg", "000000000.cls"]
        assert tar.extractfile("000000000.cls").read() == str(int(folder.labels[0])).encode()
    idx = first.with_suffix(".idx").read_text().splitlines()
    assert idx[0] == f"v1.2 {source.shards[0]['samples']}"
    ext, offset, size, name = idx[1].split()[:4]
    assert (ext, name) == ("jpg", "000000000.jpg") and first.read_bytes()[int(offset):int(offset) + int(size)] == \
        folder.read(0)


def test_a_missing_or_truncated_shard_and_a_corrupt_sample_are_named_and_left_out(shards):
    from esvit_scale.config import DataConfig
    from esvit_scale.data.source import open_source
    from esvit_scale.data.torch_loader import TorchMultiCropLoader
    meta = json.loads((shards / "shards.json").read_text())["shards"]
    (shards / meta[1]["name"]).unlink()
    os.truncate(shards / meta[2]["name"], meta[2]["size"] // 2)
    source = open_source(shards)
    victim = int(np.flatnonzero(source.shard == 0)[1])
    with open(shards / meta[0]["name"], "r+b") as f:          # flip a byte inside sample `victim`
        f.seek(int(source.offset[victim]) + 50)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert [p.split(" (")[1].split(":")[0] for p in source.skipped] == ["missing", "truncated"]
    assert f"{meta[1]['samples']} of {meta[1]['samples']} samples left out" in source.skipped[0]
    lost = int((~np.array([source.available(i) for i in range(len(source))])).sum())
    assert meta[1]["samples"] < lost < meta[1]["samples"] + meta[2]["samples"]
    with pytest.raises(OSError, match="CRC-32"):
        source.read(victim)
    data = DataConfig(batch_size_per_gpu=4, num_workers=0, global_crops_size=32, local_crops_size=[16],
                      local_crops_number=[2])
    loader = TorchMultiCropLoader(source, data, seed=0)
    batches = sum(1 for _ in loader.epoch(0)) + sum(1 for _ in loader.epoch(1))
    assert batches == 2 * len(loader)                        # every batch full: the left-out samples replaced
    left_out = loader.skipped_files()
    assert left_out[:2] == source.skipped
    assert [f for f in left_out[2:] if f":{victim:09d} " in f]          # the corrupt sample, named (if drawn)
    assert all("CRC-32" in r or "truncated" in r for r in loader.unusable.values())


def test_training_from_shards_sees_the_folder_and_gives_its_losses(image_folder, shards, tmp_path):
    opts = {"run.max_steps": 4}
    folder_run, shard_run = tmp_path / "folder", tmp_path / "shard"
    run_command([PYTHON, *CONFIG, *tiny_overrides(image_folder, folder_run, **opts)])
    run_command([PYTHON, *CONFIG, *tiny_overrides(shards, shard_run, **opts)])
    assert read_losses(shard_run) == read_losses(folder_run)


def test_a_shard_run_killed_resumes_exactly_and_resumes_on_one_rank_with_the_same_global_batch(shards, tmp_path):
    """2 ranks from shards: SIGKILL of the whole job after step 5, the same command again gives the uninterrupted
    run's losses; then the run continues on 1 rank (deepspeed.global_batch_size keeps 8) as the 2-rank run does
    (drop-path off: its masks are drawn per rank, so they change with the split)."""
    opts = {"run.max_steps": 8, "run.checkpoint_every_steps": 2, "deepspeed.global_batch_size": 8,
            "model.drop_path_rate": 0.0}
    reference = tmp_path / "reference"
    torchrun([*CONFIG, *tiny_overrides(shards, reference, **{**opts, "run.max_steps": 10})])
    out = tmp_path / "run"
    args = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            *CONFIG, *tiny_overrides(shards, out, **opts)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "DS_ACCELERATOR": "cpu",
                                                         "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and len(read_losses(out)) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in [proc.pid, *map(int, workers)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    torchrun([*CONFIG, *tiny_overrides(shards, out, **opts)])
    expected = read_losses(reference)
    assert read_losses(out) == {s: expected[s] for s in range(1, 9)}
    run_command([PYTHON, *CONFIG, *tiny_overrides(shards, out, **{**opts, "run.max_steps": 10})])
    resumed = read_losses(out)
    assert sorted(resumed) == list(range(1, 11))
    for step in (9, 10):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def test_the_photographs_are_cut_into_disjoint_train_and_held_out_crops(tmp_path):
    from esvit_scale.data.folder import index_folder
    from esvit_scale.data.photos import PHOTOS, make_photos_folder
    root = make_photos_folder(tmp_path / "photos", size=96, train=4, val=2)
    train, val = index_folder(root / "train"), index_folder(root / "val")
    assert train.classes == val.classes == sorted(PHOTOS) and (len(train), len(val)) == (64, 32)
    from PIL import Image
    with Image.open(train.name(0)) as img:
        assert img.size == (96, 96) and img.mode == "RGB"
    assert make_photos_folder(tmp_path / "photos", size=96, train=4, val=2) == root        # reused as it is
