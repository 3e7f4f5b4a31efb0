"""The one training step (esvit_scale/step.py) as the trainer runs it: the phase split in the training log."""
import json

import pytest

from conftest import PYTHON, run_command, tiny_overrides
from esvit_scale.step import PHASES

CONFIG = ["train.py", "--config", "configs/quickstart.yaml"]


def test_training_logs_the_phase_split_of_the_logged_steps(image_folder, tmp_path):
    out = tmp_path / "run"
    run_command([PYTHON, *CONFIG, *tiny_overrides(image_folder, out, **{
        "run.max_steps": 4, "run.log_every_steps": 2, "deepspeed.grad_accum_steps": 2})])
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert sorted(records) == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    for r in records.values():           # MFU of every step: images/s x counted FLOPs per image / measured peak
        assert 0 < r["mfu"] < 1
        assert r["tflops_per_s"] * 1e12 == pytest.approx(r["images_per_s"] * summary["flops_per_image"], rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops_per_s"] * 1e12 / summary["peak_flops_per_device"], rel=1e-6)
    for step in (1, 3):                   # not logged: not timed, nothing synchronised
        assert "step_s" not in records[step] and not any(k.startswith("phase_s/") for k in records[step])
    for step in (2, 4):
        r = records[step]
        phases = {p: r[f"phase_s/{p}"] for p in PHASES}
        assert all(t >= 0 for t in phases.values()) and phases["backward"] > 0 and phases["student_forward"] > 0
        assert sum(phases.values()) == pytest.approx(r["step_s"], rel=1e-9)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((out / "tensorboard").glob("events.out.tfevents.*")))).Reload()
    assert {f"train/phase_s/{p}" for p in PHASES} | {"train/mfu", "train/tflops_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/phase_s/backward")] == [2, 4]
