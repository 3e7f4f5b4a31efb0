"""python -m esvit_scale.bench depth end to end on a few steps: both families train, every checkpoint is measured,
the JSON and the plot are written."""
import json

import pytest

from conftest import PYTHON, run_command


@pytest.mark.slow       # ~2 min: two 24-block models trained in bf16 on the CPU
def test_depth_bench_measures_both_families(image_folder, tmp_path):
    out = tmp_path / "depth"
    run_command([PYTHON, "-m", "esvit_scale.bench", "depth", "--data", str(image_folder), "--out", str(out),
                 "--steps", "2", "--every", "1", "--batch", "4", "--images", "4"], timeout=900)
    result = json.loads((out / "depth.json").read_text())
    assert set(result["runs"]) == {"V1", "V2"} and result["depths"] == [2, 2, 18, 2]
    for run in result["runs"].values():
        assert sorted(int(s) for s in run["by_step"]) == [0, 1, 2]
        assert all(len(m["amplitude"]) == 24 and m["finite"] for m in run["by_step"].values())
        assert run["steps_done"] == 2 and run["non_finite_steps"] == []
    assert (out / "depth.png").stat().st_size > 10_000
