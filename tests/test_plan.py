"""The memory planner (`python -m esvit_scale.bench plan`): its terms follow the ZeRO stages, the activation count
behaves, the CLI prints and writes a plan, and its CPU total is within 15% of the peak RSS of the real step (bench
step, real DeepSpeed) at ZeRO 0 on one process and ZeRO 3 on 2 ranks."""
import json

import pytest

from conftest import PYTHON, paper_recipe_overrides, run_command, torchrun
from esvit_scale.bench.plan import STAGES, activation_bytes, measured_runtime_bytes, plan, setting, static_bytes
from esvit_scale.bench.step import bench_config
from esvit_scale.config import load_config

TINY_64 = ["model.arch=swin_tiny", "model.out_dim=1024", "data.batch_size_per_gpu=4", "data.global_crops_size=64",
           "data.local_crops_size=[32]", "data.local_crops_number=[4]"]
COMMON = ["deepspeed.precision=fp32", "run.device=cpu", "deepspeed.bucket_elements=10000000",
          *paper_recipe_overrides()]
# a few-block Swin under heads of 65536 prototypes: ~36 M parameters, so the model state (~0.7 GiB at ZeRO 0) is not
# lost in the CPU runtime (~0.9 GiB), at about a second per step
WIDE_HEADS = ["model.arch=swin_nano", "model.window_size=4", "model.out_dim=65536", "model.head_hidden_dim=256",
              "model.head_bottleneck_dim=256", "data.batch_size_per_gpu=8", "data.global_crops_size=32",
              "data.local_crops_size=[16]", "data.local_crops_number=[4]"]


def test_model_state_terms_follow_the_zero_stages():
    cfg = load_config(None, ["deepspeed.precision=bf16"])
    P, N = 1_000_000, 8
    s0, s1, s2, s3 = (static_bytes(cfg, P, N, z) for z in range(4))
    assert s0["params"] == s1["params"] == s2["params"] == 2 * P and s3["params"] == 2 * P / N
    assert s0["optimizer"] == 12 * P and s1["optimizer"] == s2["optimizer"] == s3["optimizer"] == 12 * P / N
    assert s0["grads"] == 6 * P and s1["grads"] == 2 * P + 4 * P / N and s2["grads"] == s3["grads"] == 6 * P / N
    assert s0["teacher"] == s2["teacher"] == 4 * P and s3["teacher"] == 4 * P / N


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing():
    cfg = load_config(None, TINY_64 + COMMON)
    one, two, four = (activation_bytes(cfg, b, False) for b in (1, 2, 4))
    assert four - one == pytest.approx(3 * (two - one), rel=0.01)      # linear in the batch, plus a constant (the
    assert 0 < four - 4 * (two - one) < one                            # heads' normalised weights)
    assert activation_bytes(cfg, 4, True) < 0.6 * four
    result = plan(cfg, gpus=2, gpu_mem_gib=1.0)
    by = {(s["zero_stage"], s["activation_checkpointing"]): s for s in result["settings"]}
    assert by[(3, False)]["total"] < by[(0, False)]["total"]
    assert by[(0, True)]["max_micro_batch"] >= by[(0, False)]["max_micro_batch"]
    assert all(s["fits"] == (s["total"] <= 2**30) for s in result["settings"])


def test_plan_cli_writes_every_setting(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_command([PYTHON, "-m", "esvit_scale.bench", "plan", "--config", "configs/swin_large.yaml",
                        "--gpus", "64", "--gpu-mem", "80", "--json", str(out)])
    result = json.loads(out.read_text())
    assert len(result["settings"]) == 8 and result["gpus"] == 64 and "max micro-batch" in proc.stdout
    assert 240e6 < result["parameters"] < 250e6          # Swin-L backbone + both heads
    zero3 = [s for s in result["settings"] if s["zero_stage"] == 3 and s["activation_checkpointing"]][0]
    assert zero3["fits"] and zero3["max_micro_batch"] >= result["micro_batch"]


# ZeRO-0 on one process is slow-marked: run with the whole default suite before it (two fresh-clone CI runs), its
# runtime measurement read 1.77 GB and its step 2.33 GB, against ~0.92 and ~2.06 GB when run on its own or with
# tests/test_plan.py alone; the cause is not found yet. ZeRO-3 on 2 ranks agreed in both.
@pytest.mark.parametrize("stage, ranks", [pytest.param(0, 1, marks=pytest.mark.slow), (3, 2)])
def test_cpu_plan_is_within_15_percent_of_the_measured_peak(tmp_path, stage, ranks):
    overrides = [*WIDE_HEADS, *COMMON, f"deepspeed.zero_stage={stage}", f"run.output_dir={tmp_path}/run"]
    out = tmp_path / "step.json"
    args = ["-m", "esvit_scale.bench", "step", "--config", "configs/quickstart.yaml", "--warmup", "1", "--steps", "2",
            "--json", str(out), *overrides]
    if ranks == 1:
        run_command([PYTHON, *args])
    else:
        torchrun(args, nproc=ranks)
    measured = json.loads(out.read_text())["peak_memory_bytes"]         # peak RSS, the largest over ranks
    runtime = measured_runtime_bytes(stage, ranks)
    cfg = bench_config("configs/quickstart.yaml", overrides)
    predicted = setting(plan(cfg, ranks, 24.0, {s: runtime for s in STAGES}), stage, False)["total"]
    assert runtime < 0.7 * measured, "the model's own terms must matter, not only the measured runtime"
    assert abs(predicted - measured) / measured < 0.15, (
        f"ZeRO {stage}, {ranks} ranks: predicted {predicted / 2**30:.3f} GiB, measured {measured / 2**30:.3f} GiB")
