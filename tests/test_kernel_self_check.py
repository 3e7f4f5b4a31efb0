"""The kernel self-check (esvit_scale/ops/self_check.py): a kernel that returns wrong numbers on this machine
(ESVIT_FAULT_KERNEL corrupts its output) is caught before the first step, every rank falls back to the reference
with one warning, and the run trains with exactly the losses of a run told to use the references."""
import json

import pytest

from conftest import read_losses, tiny_overrides, torchrun

CONFIG = ["train.py", "--config", "configs/quickstart.yaml"]
OPTS = {"kernels.window_attention": "true", "kernels.region_matching": "true", "loss.region_loss": "true",
        "model.drop_path_rate": 0.0, "run.max_steps": 2}


@pytest.fixture(scope="module")
def reference_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    torchrun([*CONFIG, *tiny_overrides(image_folder, out, **OPTS, **{"kernels.force_reference": "true"})])
    return out


@pytest.mark.parametrize("op", ["window_attention", pytest.param("region_matching", marks=pytest.mark.slow)])
def test_a_kernel_giving_wrong_numbers_falls_back_warns_once_and_the_run_trains(op, image_folder, reference_run,
                                                                                tmp_path):
    out = tmp_path / "run"
    proc = torchrun([*CONFIG, *tiny_overrides(image_folder, out, **OPTS)], env={"ESVIT_FAULT_KERNEL": op})
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "kernel self-check: op" in line
                and "failed" in line]
    assert len(warnings) == 1 and op in warnings[0] and "relative error" in warnings[0], warnings
    assert "stage 0" in warnings[0] or "student" in warnings[0]         # it names the shapes
    kernels = json.loads((out / "summary.json").read_text())["kernels"]
    other = ({"window_attention", "region_matching"} - {op}).pop()
    assert kernels[op].startswith("reference (self-check failed") and kernels[other].startswith("cpu")
    want = read_losses(reference_run)                  # the references' numbers (the other op's kernel: to 1e-5)
    assert read_losses(out) == pytest.approx(want, rel=1e-5) and len(want) == 2


def test_without_a_fault_the_self_check_passes_and_the_summary_names_the_kernels(image_folder, tmp_path):
    from conftest import PYTHON, run_command
    out = tmp_path / "run"
    proc = run_command([PYTHON, *CONFIG, *tiny_overrides(image_folder, out, **OPTS)])
    assert "kernel self-check: op window_attention passed" in proc.stderr
    assert "kernel self-check: op region_matching passed" in proc.stderr
    kernels = json.loads((out / "summary.json").read_text())["kernels"]
    assert kernels["window_attention"].startswith("cpu (") and kernels["region_matching"] == "cpu"
