"""`python -m esvit_scale.bench step`: the real engine's step timed on one process and under torchrun, with every
field of the report; the phases account for the step's time. No assertion on speed."""
import json

import pytest

from conftest import PYTHON, run_command, tiny_overrides, torchrun
from esvit_scale.step import PHASES

FIELDS = {
    "date", "command", "config", "overrides", "world_size", "device", "device_name", "threads", "arch", "zero_stage",
    "precision", "activation_checkpointing", "data", "batch_per_rank", "global_batch", "grad_accum_steps",
    "crop_sizes", "warmup_steps", "timed_steps", "step_s_median", "step_s_mean", "step_s_all", "images_per_s",
    "images_per_s_per_device", "flops_per_image", "flops_per_step_per_device", "flops_by_phase_per_device",
    "flops_by_crop_size_per_image", "flop_convention", "achieved_tflops_per_s_per_device",
    "peak_tflops_per_s_per_device", "peak_source", "mfu", "peak_memory_bytes", "peak_memory_gib",
    "peak_memory_source", "phase_s_mean", "phase_fraction", "phases_sum_over_step", "loss_first", "loss_last",
    "cpu_matmul_peak_tflops_per_s",
}


def _check(report: dict, world: int, batch: int) -> None:
    assert FIELDS <= set(report), FIELDS - set(report)
    assert report["world_size"] == world and report["global_batch"] == world * batch
    assert len(report["step_s_all"]) == report["timed_steps"] == 3
    assert set(report["phase_s_mean"]) == set(PHASES)
    assert report["phases_sum_over_step"] == pytest.approx(1.0, abs=0.10)
    assert report["images_per_s"] == pytest.approx(world * batch / report["step_s_median"])
    achieved = report["flops_per_step_per_device"] / report["step_s_median"]
    assert report["mfu"] == pytest.approx(achieved / (report["peak_tflops_per_s_per_device"] * 1e12))
    assert 0 < report["mfu"] < 1 and report["peak_memory_bytes"] > 2**20
    assert report["flops_per_image"] * batch == report["flops_per_step_per_device"]
    assert "2 x MAC" in report["flop_convention"] and "threads" in report["peak_source"]


def test_bench_step_one_process_synthetic(image_folder, tmp_path):
    out = tmp_path / "step.json"
    run_command([PYTHON, "-m", "esvit_scale.bench", "step", "--config", "configs/quickstart.yaml", "--warmup", "1",
                 "--steps", "3", "--json", str(out), *tiny_overrides(image_folder, tmp_path / "run")])
    report = json.loads(out.read_text())
    _check(report, world=1, batch=4)
    assert report["data"] == "synthetic" and report["zero_stage"] == 0


def test_bench_step_two_ranks_zero3_real_loader(image_folder, tmp_path):
    out = tmp_path / "step.json"
    torchrun(["-m", "esvit_scale.bench", "step", "--config", "configs/quickstart.yaml", "--warmup", "1",
              "--steps", "3", "--data", "loader", "--json", str(out),
              *tiny_overrides(image_folder, tmp_path / "run", **{"deepspeed.zero_stage": 3})])
    report = json.loads(out.read_text())
    _check(report, world=2, batch=4)
    assert report["data"] == "loader" and report["zero_stage"] == 3 and report["threads"] == 1
