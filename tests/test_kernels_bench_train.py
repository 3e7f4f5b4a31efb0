"""The training-step benchmark (kernels on vs off) at tiny sizes, in its own process (it starts DeepSpeed): both
variants start from the same weights and batch, so their first losses agree; no timing asserts."""
from __future__ import annotations

import json

import pytest

from conftest import PYTHON, paper_recipe_overrides, run_command

pytestmark = pytest.mark.usefixtures("kernels_on")

TINY = ["model.arch=swin_nano", "model.window_size=4", "model.out_dim=128", "model.head_hidden_dim=64",
        "model.head_bottleneck_dim=32", "data.batch_size_per_gpu=4", "data.global_crops_size=32",
        "data.local_crops_size=[16]", "data.local_crops_number=[2]", "run.device=cpu", *paper_recipe_overrides()]


def test_train_benchmark_runs_both_variants_from_the_same_start(tmp_path):
    out = tmp_path / "train.json"
    run_command([PYTHON, "-m", "esvit_scale.bench", "train", "--config", "configs/quickstart.yaml", "--rounds", "2",
                 "--steps", "1", "--json", str(out), *TINY])
    report = json.loads(out.read_text())
    on, off = report["first_step_losses"]["kernels_on"], report["first_step_losses"]["kernels_off"]
    for key in ("loss", "view_loss", "region_loss"):
        assert on[key] == pytest.approx(off[key], rel=1e-5, abs=1e-6), key
    assert report["zero_stage"] == 0 and report["precision"] == "fp32"   # the config's engine, DeepSpeed's
    assert report["batch"] == 4 and report["local_crops"] == [[16, 2]]
    assert {k: len(v) for k, v in report["ms_per_step_all"].items()} == {"kernels_on": 2, "kernels_off": 2}
