"""`make gpu-check-dry`: the GPU validation script end to end on this CPU with tiny shapes, so that the script itself
is not what breaks on the day a GPU is lent. Every part is in the report; the ones that need a GPU say so."""
import json

from conftest import PYTHON, run_command
from esvit_scale.bench.gpu_check import parts


def test_the_dry_run_runs_every_cpu_part_and_reports_every_part(tmp_path):
    out = tmp_path / "gpu"
    proc = run_command([PYTHON, "-m", "esvit_scale.bench", "gpu_check", "--dry", "--out", str(out)], timeout=1200)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["dry"], proc.stdout[-3000:]
    assert list(report["parts"]) == [p.name for p in parts(True, out)]
    for name, part in report["parts"].items():
        assert part["status"] in ("passed", "skipped"), (name, part)
        assert (part["status"] == "skipped") == (name in ("build", "cuda_tests") or "compile_on" in name
                                                 or name.startswith("step_") and "step_swin_tiny_" not in name), name
        if part["status"] == "skipped":
            assert part["reason"] == "no GPU"
    step = report["parts"]["step_swin_tiny_kernels_on_compile_off"]["result"]
    assert step["images_per_s"] > 0 and step["kernels"]["window_attention"].startswith("cpu")
    assert report["parts"]["step_swin_tiny_kernels_off_compile_off"]["result"]["kernels"]["window_attention"] \
        .startswith("reference")
    assert report["parts"]["kernels_swin_base"]["result"]["window_attention"][0]["heads"] == 4
    assert report["parts"]["kernels_swinv2_tiny"]["result"]["arch"] == "swinv2_tiny"
    train = report["parts"]["train"]["result"]
    assert train["steps"] == 12 and train["events"]["counts"].get("resume") == 1       # killed, then resumed
    assert set(report["parts"]["knn"]["result"]["knn_top1"]) >= {"10", "20"}
