"""Checkpoints under real 2-rank DeepSpeed runs: integrity (damaged checkpoints are skipped), safe loading (pickle
payloads refused, never run), a layout change that cannot be honoured stops, NaN stops name a checkpoint that
resumes, a full disk fails cleanly, and logs hold one record per step after a resume."""
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import PYTHON, read_losses, run_command, tiny_overrides, torchrun

CONFIG = ["train.py", "--config", "configs/quickstart.yaml"]
OPTS = {"run.max_steps": 3, "run.checkpoint_every_steps": 1, "run.keep_checkpoints": 5}


def tag(step: int) -> str:
    return f"step{step:09d}"


@pytest.fixture(scope="module")
def finished_run(image_folder, tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-0 run of 3 steps with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("finished") / "run"
    torchrun(CONFIG + tiny_overrides(image_folder, out, **OPTS))
    assert sorted(read_losses(out)) == [1, 2, 3]
    return out


def copy_run(finished_run, dest, upto: int):
    """The run as a crash right after checkpoint `upto` left it (later checkpoints gone)."""
    shutil.copytree(finished_run / "checkpoints", dest / "checkpoints")
    for step in range(upto + 1, 4):
        shutil.rmtree(dest / "checkpoints" / tag(step))
    return dest


def reseal(folder, name):
    """Rewrite the manifest entry of `name` as a forger would, so that only safe loading stands in the way."""
    from esvit_scale.checkpoint.manifest import crc32
    marker = json.loads((folder / "COMPLETE").read_text())
    marker["files"][name] = {"size": (folder / name).stat().st_size, "crc32": crc32(folder / name)}
    (folder / "COMPLETE").write_text(json.dumps(marker))


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# ------------------------------------------------------------------ integrity

def _damage(folder, how):
    if how == "missing marker":
        (folder / "COMPLETE").unlink()
        return folder.name
    name = {"truncated teacher": "teacher.pt", "truncated model states": "mp_rank_00_model_states.pt",
            "missing client state": "client_state.pt"}[how]
    if how.startswith("truncated"):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    else:
        (folder / name).unlink()
    return str(folder / name)


@pytest.mark.parametrize("how", ["truncated teacher", "truncated model states", "missing client state",
                                 "missing marker"])
def test_damaged_newest_checkpoint_is_skipped_and_the_previous_one_resumes(how, finished_run, image_folder,
                                                                           tmp_path):
    out = copy_run(finished_run, tmp_path / "run", upto=3)
    named = _damage(out / "checkpoints" / tag(3), how)
    proc = torchrun(CONFIG + tiny_overrides(image_folder, out, **{**OPTS, "run.max_steps": 4}))
    assert named in proc.stderr, proc.stderr[-3000:]
    assert ("skipping checkpoint" if how != "missing marker" else "ignoring unfinished checkpoints") in proc.stderr
    assert f"resuming from {out / 'checkpoints' / tag(2)}" in proc.stderr
    resumed, uninterrupted = read_losses(out), read_losses(finished_run)
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == pytest.approx(uninterrupted[3], rel=1e-6, abs=1e-7)
    assert (out / "checkpoints" / tag(3) / "COMPLETE").is_file()       # written again, whole


def test_no_usable_checkpoint_stops_the_run_with_a_message(finished_run, image_folder, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", upto=2)
    for step in (1, 2):
        _damage(out / "checkpoints" / tag(step), "truncated teacher")
    proc = torchrun(CONFIG + tiny_overrides(image_folder, out, **OPTS), check=False)
    assert proc.returncode != 0
    assert "no usable checkpoint" in proc.stderr and "teacher.pt" in proc.stderr
    assert not (out / "metrics.jsonl").exists()                        # nothing trained


# ------------------------------------------------------------------ safe loading

@pytest.mark.parametrize("name", ["client_state.pt", "rank0.pt", "mp_rank_00_model_states.pt",
                                  pytest.param("teacher.pt", marks=pytest.mark.slow)])
def test_pickle_payload_in_a_checkpoint_is_refused_not_run(name, finished_run, image_folder, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", upto=2)
    folder, proof = out / "checkpoints" / tag(2), tmp_path / "payload_ran"
    torch.save({"module": Payload(proof)}, folder / name)
    reseal(folder, name)
    proc = torchrun(CONFIG + tiny_overrides(image_folder, out, **OPTS), check=False)
    assert proc.returncode != 0
    assert f"refusing to load {folder / name}" in proc.stderr and "Nothing was executed" in proc.stderr
    assert not proof.exists()


def test_pickle_payload_reached_through_init_from_is_refused(finished_run, image_folder, tmp_path):
    source = copy_run(finished_run, tmp_path / "source", upto=2) / "checkpoints" / tag(2)
    proof = tmp_path / "payload_ran"
    torch.save({"module": Payload(proof)}, source / "mp_rank_00_model_states.pt")
    reseal(source, "mp_rank_00_model_states.pt")
    proc = run_command([PYTHON, *CONFIG, *tiny_overrides(image_folder, tmp_path / "new", **{
        "run.init_from": str(source), "run.max_steps": 3})], check=False)
    assert proc.returncode != 0 and "refusing to load" in proc.stderr and not proof.exists()


def test_zero_checkpoint_consolidation_loads_safely(image_folder, tmp_path):
    """DeepSpeed's own offline consolidation (zero_to_fp32) runs inside safe_torch_load: a payload in a ZeRO-2
    optimizer shard is refused; the genuine shards consolidate to the student."""
    from esvit_scale.checkpoint import CheckpointError
    from esvit_scale.checkpoint.restore import read_student_weights
    out = tmp_path / "z2"
    torchrun(CONFIG + tiny_overrides(image_folder, out, **{"deepspeed.zero_stage": 2, "run.max_steps": 1}))
    folder = out / "checkpoints" / tag(1)
    weights = read_student_weights(folder)
    assert len(weights) > 10 and all(torch.isfinite(w).all() for w in weights.values())
    proof = tmp_path / "payload_ran"
    shard = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(proof)}, shard)
    with pytest.raises(CheckpointError, match="refusing to load .*zero_pp_rank_1"):
        read_student_weights(folder)
    assert not proof.exists()


# ------------------------------------------------------------------ layout

def test_resume_at_another_world_size_stops_with_a_message(finished_run, image_folder, tmp_path):
    out = copy_run(finished_run, tmp_path / "run", upto=2)
    proc = run_command([PYTHON, *CONFIG, *tiny_overrides(image_folder, out, **OPTS)], check=False)
    assert proc.returncode != 0
    assert "cannot resume" in proc.stderr and "world_size 2 -> 1" in proc.stderr
    assert "global_batch 8 -> 4" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


def test_layout_check_stops_what_cannot_be_honoured():
    from pathlib import Path

    from esvit_scale.checkpoint import CheckpointError
    from esvit_scale.checkpoint.restore import check_layout
    saved = {"world_size": 2, "zero_stage": 2, "micro_batch": 4, "accumulation": 1, "global_batch": 8,
             "precision": "fp32"}
    assert check_layout(Path("x"), saved, dict(saved)) == "same"
    assert check_layout(Path("x"), saved, {**saved, "zero_stage": 3}) == "universal"
    assert check_layout(Path("x"), saved, {**saved, "world_size": 1, "accumulation": 2}) == "universal"
    with pytest.raises(CheckpointError, match="zero_stage 2 -> 0"):
        check_layout(Path("x"), saved, {**saved, "zero_stage": 0})
    with pytest.raises(CheckpointError, match="precision fp32 -> bf16"):
        check_layout(Path("x"), saved, {**saved, "precision": "bf16"})
    with pytest.raises(CheckpointError, match="global_batch 8 -> 16"):
        check_layout(Path("x"), saved, {**saved, "micro_batch": 8, "global_batch": 16})


SLOW = pytest.mark.slow        # the default suite keeps one case of each path


def case(name, stages, ranks, zero_init=False, slow=False):
    return pytest.param(stages, ranks, zero_init, id=name, marks=[SLOW] if slow else [])


@pytest.mark.parametrize("stages, ranks, zero_init", [
    case("z0_2to1", (0, 0), (2, 1)), case("z0_1to2", (0, 0), (1, 2), slow=True),
    case("z2_2to1", (2, 2), (2, 1), slow=True), case("z2_1to2", (2, 2), (1, 2), slow=True),
    case("z3_2to1", (3, 3), (2, 1), slow=True), case("z3_1to2", (3, 3), (1, 2)), case("z2to3_2ranks", (2, 3), (2, 2), slow=True),
    case("z3to2_2to1", (3, 2), (2, 1), slow=True),
    case("z3to2_2to1_zero_init", (3, 2), (2, 1), zero_init=True)])          # built partitioned by zero.Init
def test_resume_on_another_world_size_or_stage_gives_the_losses_of_the_same_global_batch(stages, ranks, image_folder,
                                                                                       zero_init, tmp_path):
    """Global batch 8 as 2 ranks x 1 micro-batch or 1 rank x 2 accumulated ones (drop-path off): the same samples
    per step and the centres moved once per step, so the resumed losses are those of the uninterrupted run. At
    ZeRO 1-3 (and across them) through a universal copy made next to the checkpoint, which stays as it was. What
    the new layout restores (student, AdamW moments, teacher, centres, position) equals what the writing layout
    restores from the same checkpoint."""
    from esvit_scale.checkpoint.manifest import find_problems, read_marker
    opts = {"deepspeed.global_batch_size": 8, "model.drop_path_rate": 0.0, "run.max_steps": 4,
            "run.checkpoint_every_steps": 2, "run.keep_checkpoints": 5, "deepspeed.zero_init": str(zero_init).lower()}

    def run(nproc, out, stage):
        args = CONFIG + tiny_overrides(image_folder, out, **opts, **{"deepspeed.zero_stage": stage})
        return torchrun(args) if nproc == 2 else run_command([PYTHON, *args])

    before, after = ranks
    run(before, tmp_path / "full", stages[0])
    uninterrupted = read_losses(tmp_path / "full")
    resumed, reference = tmp_path / "resumed", tmp_path / "reference"
    for out in (resumed, reference):
        shutil.copytree(tmp_path / "full" / "checkpoints" / tag(2), out / "checkpoints" / tag(2))
    original = dump_restored_state(before, reference, stages[0], opts, image_folder)
    converted = dump_restored_state(after, resumed, stages[1], opts, image_folder)
    assert_same_state(converted, original)
    proc = run(after, resumed, stages[1])
    assert f"written by {before} ranks" in proc.stderr and "the same global batch of 8" in proc.stderr
    losses = read_losses(resumed)
    assert sorted(losses) == [3, 4]
    for step in (3, 4):
        assert losses[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), (step, losses, uninterrupted)
    original = resumed / "checkpoints" / tag(2)
    assert find_problems(original, read_marker(original)) == []
    assert (resumed / "checkpoints" / (tag(2) + "_universal")).is_dir() == (stages[1] > 0)


def dump_restored_state(nproc, out, stage, opts, image_folder):
    """What a run restores from its checkpoint (no step taken), gathered to full fp32 tensors."""
    args = ["tests/scripts/dump_restored_state.py", str(out / "state.pt")]
    args += tiny_overrides(image_folder, out, **opts, **{"deepspeed.zero_stage": stage})
    torchrun(args) if nproc == 2 else run_command([PYTHON, *args])
    return torch.load(out / "state.pt", weights_only=True)


def assert_same_state(got, want):
    """Student, AdamW moments and step, teacher, centres and position equal, to fp32 tolerance."""
    assert got["position"] == want["position"] and got["adam_step"] == want["adam_step"]
    for part in ("student", "exp_avg", "exp_avg_sq", "teacher", "centres"):
        assert got[part].keys() == want[part].keys(), part
        held = [n for n, v in want[part].items() if v is not None]
        assert held and [n for n, v in got[part].items() if v is not None] == held, part
        for name in held:
            torch.testing.assert_close(got[part][name], want[part][name], rtol=1e-6, atol=1e-7, msg=f"{part} {name}")
    assert any(v.abs().sum() > 0 for v in want["exp_avg"].values() if v is not None)   # a real optimizer state


def test_centres_move_once_per_optimizer_step_over_the_accumulated_batch():
    from esvit_scale.config import LossConfig
    from esvit_scale.losses.esvit_loss import EsViTLoss
    from esvit_scale.models.esvit import MultiCropOutput
    g = torch.Generator().manual_seed(0)

    def outputs(b):
        return MultiCropOutput(view_logits=[torch.randn(b, 8, generator=g) for _ in range(2)],
                               region_logits=[torch.randn(b, 3, 8, generator=g) for _ in range(2)],
                               region_features=None)

    first, second = outputs(4), outputs(4)
    both = MultiCropOutput([torch.cat([a, b]) for a, b in zip(first.view_logits, second.view_logits)],
                           [torch.cat([a, b]) for a, b in zip(first.region_logits, second.region_logits)], None)
    split = EsViTLoss(LossConfig(center_momentum=0.9), 8, accumulation=2)
    whole = EsViTLoss(LossConfig(center_momentum=0.9), 8)
    split.update_centers(first)
    assert torch.count_nonzero(split.view_center) == 0                 # not before the step's last micro-batch
    split.update_centers(second)
    whole.update_centers(both)
    torch.testing.assert_close(split.view_center, whole.view_center)
    torch.testing.assert_close(split.region_center, whole.region_center)


# ------------------------------------------------------------------ logs after a resume

def test_resumed_run_logs_each_step_once_in_jsonl_and_tensorboard(finished_run, image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = copy_run(finished_run, tmp_path / "run", upto=2)           # the crashed run had logged step 3 too
    shutil.copy(finished_run / "metrics.jsonl", out / "metrics.jsonl")
    shutil.copytree(finished_run / "tensorboard", out / "tensorboard")
    torchrun(CONFIG + tiny_overrides(image_folder, out, **{**OPTS, "run.max_steps": 4}))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert logged[2][1] == pytest.approx(read_losses(out)[3])


# ------------------------------------------------------------------ NaN stops and failed saves

def test_nan_stop_names_a_checkpoint_that_resumes_without_nan(image_folder, tmp_path):
    """Without rewinds (run.max_rewinds=0; tests/test_recovery.py has them): the loss of step N tests the weights of
    step N-1, so the checkpoint of N-1 is marked REJECTED, and the one the message names resumes, with a sane
    learning rate, to finite losses."""
    import re
    out = tmp_path / "run"
    opts = {"run.max_steps": 12, "run.checkpoint_every_steps": 1, "run.keep_checkpoints": 1, "run.max_rewinds": 0}
    proc = torchrun(CONFIG + tiny_overrides(image_folder, out, **opts, **{"optim.base_lr": 1e6}), check=False)
    assert proc.returncode != 0
    found = re.search(r"loss is not finite at epoch \d+, step (\d+) .*Last complete checkpoint: (\S+)\.", proc.stderr)
    assert found, proc.stderr[-3000:]
    nan_step, named = int(found.group(1)), found.group(2)
    assert named.endswith(tag(nan_step - 2)), (nan_step, named)      # not the checkpoint the NaN loss tested
    assert (out / "checkpoints" / tag(nan_step - 1) / "REJECTED").is_file()
    proc = torchrun(CONFIG + tiny_overrides(image_folder, out, **{**opts, "run.max_steps": nan_step + 2}))
    assert f"resuming from {named}" in proc.stderr
    losses = read_losses(out)
    assert all(losses[s] == losses[s] and abs(losses[s]) < 1e3 for s in range(nan_step - 1, nan_step + 3)), losses


@pytest.fixture
def small_disk(tmp_path, request):
    """A tmpfs with room for one checkpoint of the tiny model (~23 MB) and part of the next one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("small_disk, full_at", [("32M", "mp_rank_00_model_states.pt"), ("40M", "teacher.pt")],
                         indirect=["small_disk"], ids=["deepspeed_file", "our_file"])
def test_save_onto_a_full_disk_names_the_file_and_enospc_and_the_previous_checkpoint_resumes(
        small_disk, full_at, image_folder, tmp_path):
    out = small_disk / "run"
    opts = {"run.max_steps": 2, "run.checkpoint_every_steps": 1, "run.keep_checkpoints": 1}
    proc = torchrun(CONFIG + tiny_overrides(image_folder, out, **opts), check=False)
    assert proc.returncode != 0
    assert (f"[Errno 28] No space left on device (writing checkpoint file {out / 'checkpoints' / tag(2) / full_at})"
            in proc.stderr), proc.stderr[-3000:]
    assert "partial folder was removed" in proc.stderr
    assert not (out / "checkpoints" / tag(2)).exists()
    assert (out / "checkpoints" / tag(1) / "COMPLETE").is_file()
    subprocess.run(["mount", "-o", "remount,size=200M", str(small_disk)], check=True)
    proc = torchrun(CONFIG + tiny_overrides(image_folder, out, **opts))
    assert f"resuming from {out / 'checkpoints' / tag(1)}" in proc.stderr
    assert sorted(read_losses(out)) == [1, 2]


@pytest.mark.parametrize("small_disk", ["45M"], indirect=True)
def test_universal_copy_onto_a_full_disk_stops_with_enospc_and_leaves_the_checkpoint(small_disk, image_folder,
                                                                                       tmp_path):
    """Room for the ZeRO-2 checkpoint (~29 MB) but not for its universal copy: a resume at 1 rank stops on every
    rank with ENOSPC and the copy's name, removes the partial copy, and resumes once there is room."""
    from esvit_scale.checkpoint.manifest import find_problems, read_marker
    out = small_disk / "run"
    opts = {"deepspeed.global_batch_size": 8, "deepspeed.zero_stage": 2, "run.max_steps": 2,
            "run.checkpoint_every_steps": 2, "run.keep_checkpoints": 1}
    torchrun(CONFIG + tiny_overrides(image_folder, out, **opts))
    resume = [PYTHON, *CONFIG, *tiny_overrides(image_folder, out, **{**opts, "run.max_steps": 3})]
    proc = run_command(resume, check=False)
    copy = out / "checkpoints" / (tag(2) + "_universal")
    assert proc.returncode != 0
    assert f"could not write {copy}" in proc.stderr and "ENOSPC" in proc.stderr, proc.stderr[-3000:]
    assert not copy.exists()
    original = out / "checkpoints" / tag(2)
    assert find_problems(original, read_marker(original)) == []
    subprocess.run(["mount", "-o", "remount,size=200M", str(small_disk)], check=True)
    run_command(resume)
    assert sorted(read_losses(out)) == [1, 2, 3]


def test_zero3_save_writes_teacher_shards_without_gathering(image_folder, tmp_path):
    proc = torchrun(["tests/scripts/check_teacher_shards.py", *tiny_overrides(image_folder, tmp_path)])
    assert proc.stdout.count("SHARDS OK") == 2


# ------------------------------------------------------------------ asynchronous save

def test_async_checkpoints_resume_to_the_losses_of_synchronous_ones(finished_run, image_folder, tmp_path):
    out = tmp_path / "async"
    torchrun(CONFIG + tiny_overrides(image_folder, out, **OPTS, **{"run.async_checkpoint": "true"}))
    assert read_losses(out) == pytest.approx(read_losses(finished_run), rel=1e-6)     # training is not touched
    for step in (2, 3):                       # the last one is completed before the run ends
        assert (out / "checkpoints" / tag(step) / "COMPLETE").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / tag(2), resumed / "checkpoints" / tag(2))
    torchrun(CONFIG + tiny_overrides(image_folder, resumed, **OPTS, **{"run.async_checkpoint": "true"}))
    assert read_losses(resumed)[3] == pytest.approx(read_losses(finished_run)[3], rel=1e-6, abs=1e-7)


def test_kill_during_async_saves_leaves_a_usable_checkpoint(image_folder, tmp_path):
    """SIGKILL at whatever moment after the first checkpoint completed: every checkpoint with a marker verifies,
    and the run resumes from the newest and logs each step once."""
    import signal
    import time

    from conftest import ROOT
    from esvit_scale.checkpoint.manifest import find_problems, read_marker
    out = tmp_path / "run"
    args = [PYTHON, *CONFIG, *tiny_overrides(image_folder, out, **{
        "run.max_steps": 8, "run.checkpoint_every_steps": 1, "run.keep_checkpoints": 2,
        "run.async_checkpoint": "true", "eval.knn_at_end": "false"})]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 300
    while not list(out.glob("checkpoints/*/COMPLETE")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    complete = sorted(p.parent for p in out.glob("checkpoints/*/COMPLETE"))
    assert complete
    for folder in complete:
        assert find_problems(folder, read_marker(folder)) == [], folder
    done = run_command(args)
    assert f"resuming from {complete[-1]}" in done.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
