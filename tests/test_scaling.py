"""The scaling model (esvit_scale/bench/scaling.py): properties a wrong formula would break, and the CLI on a real
`bench step` report of the tiny model. Nothing here depends on how fast this machine is."""
import json

import pytest

from conftest import PYTHON, run_command, tiny_overrides, torchrun
from esvit_scale.bench.scaling import (DEFAULT_GPUS, Compute, Network, communication_bytes, pass_seconds,
                                       predict)

COMPUTE = Compute(step_s=0.5, backward_s=0.3, batch=32, source="test")
PARAMS = 50_000_000                      # of the order of Swin-T + EsViT heads


def curve(stage=2, inter_gbps=100.0, overlap=0.5, compute=COMPUTE, params=PARAMS):
    net = Network(inter_gbps)
    return [predict(compute, stage, params, 2, net, n, overlap) for n in DEFAULT_GPUS]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("bw", [10.0, 100.0, 400.0, 3200.0])
def test_efficiency_is_at_most_one_and_never_rises_with_gpus(stage, bw):
    effs = [p["efficiency"] for p in curve(stage, bw)]
    assert effs[0] == pytest.approx(1.0)
    assert all(0 < e <= 1.0 + 1e-12 for e in effs)
    assert all(b <= a + 1e-12 for a, b in zip(effs, effs[1:])), effs


def test_low_bandwidth_efficiency_falls_across_nodes():
    effs = {p["gpus"]: p["efficiency"] for p in curve(2, 10.0, overlap=0.0)}
    assert effs[16] < effs[8] and effs[512] < effs[16] < 0.9
    # 64 nodes: 2 passes of 2 bytes x PARAMS, 7/8 of it over NVLink, 63/64 of it through each node's 10 Gb/s
    comm = 2 * 2 * PARAMS * (7 / 8 / 450e9 + 63 / 64 / (10e9 / 8))
    assert effs[512] == pytest.approx(COMPUTE.step_s / (COMPUTE.step_s + comm))


def test_zero3_communicates_more_than_zero2_and_zero1_as_much_as_zero0():
    by_stage = {s: sum(communication_bytes(s, PARAMS, 2).values()) for s in range(4)}
    assert by_stage[0] == by_stage[1] == by_stage[2] == 2 * 2 * PARAMS
    assert by_stage[3] > by_stage[2]
    for a, b in zip(curve(2, overlap=0.0), curve(3, overlap=0.0)):
        assert b["comm_s"] >= a["comm_s"] and b["images_per_s"] <= a["images_per_s"]
        if a["gpus"] > 1:
            assert b["comm_s"] > a["comm_s"]


def test_the_ema_teacher_communicates_nothing_at_stages_0_to_2_and_only_its_forward_gather_at_3():
    for stage in (0, 1, 2):
        terms = communication_bytes(stage, PARAMS, 2)
        assert terms["teacher_forward"] == 0 and terms["ema_update"] == 0
    terms = communication_bytes(3, PARAMS, 2)
    assert terms["ema_update"] == 0 and terms["teacher_forward"] == 4 * PARAMS      # fp32 teacher, one all-gather


def test_more_bandwidth_never_lowers_throughput():
    for stage in range(4):
        rates = [[p["images_per_s"] for p in curve(stage, bw)] for bw in (50.0, 100.0, 200.0, 400.0, 1e5)]
        for slow, fast in zip(rates, rates[1:]):
            assert all(f >= s for s, f in zip(slow, fast))
    nvlink = [predict(COMPUTE, 2, PARAMS, 2, Network(100.0, intra), 8, 0.0)["images_per_s"] for intra in (50, 450)]
    assert nvlink[1] > nvlink[0]


def test_overlap_hides_communication_but_never_more_than_the_backward():
    none, half, full = (curve(3, 100.0, overlap=f) for f in (0.0, 0.5, 1.0))
    for a, b, c in zip(none, half, full):
        assert a["step_s"] >= b["step_s"] >= c["step_s"]
        assert c["step_s"] >= COMPUTE.step_s and c["exposed_comm_s"] >= c["comm_s"] - COMPUTE.backward_s - 1e-12


def test_one_gpu_communicates_nothing_and_a_pass_is_hierarchical():
    assert pass_seconds(1e9, 1, Network(100.0)) == 0
    within = pass_seconds(1e9, 8, Network(100.0, 450.0))
    assert within == pytest.approx(1e9 * 7 / 8 / 450e9)                 # NVLink only
    across = pass_seconds(1e9, 16, Network(100.0, 450.0))
    assert across == pytest.approx(within + 1e9 / 2 / (100e9 / 8))      # + half the data over the node's network
    assert predict(COMPUTE, 3, PARAMS, 2, Network(100.0), 64, 0.5)["global_batch"] == 64 * 32


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="ZeRO stage 4"):
        communication_bytes(4, PARAMS, 2)
    with pytest.raises(ValueError, match="--overlap"):
        predict(COMPUTE, 2, PARAMS, 2, Network(100.0), 8, 1.5)


@pytest.fixture(scope="module")
def step_json(image_folder, tmp_path_factory):
    """A real one-process `bench step` report of the tiny model."""
    out = tmp_path_factory.mktemp("scaling") / "step.json"
    run_command([PYTHON, "-m", "esvit_scale.bench", "step", "--config", "configs/quickstart.yaml", "--warmup", "1",
                 "--steps", "2", "--json", str(out), *tiny_overrides(image_folder, out.parent / "run")])
    return out


def test_cli_writes_png_and_json_and_one_gpu_equals_the_measured_rate(step_json, tmp_path):
    png, out = tmp_path / "scaling.png", tmp_path / "scaling.json"
    run_command([PYTHON, "-m", "esvit_scale.bench", "scaling", "--step-json", str(step_json), "--stages", "2", "3",
                 "--png", str(png), "--json", str(out)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    result = json.loads(out.read_text())
    report = json.loads(step_json.read_text())
    preds = result["predictions"]
    assert len(preds) == 2 * 3 * len(DEFAULT_GPUS) and not result["predicted_compute"]
    assert result["parameters"] > 0 and result["dtype_bytes"] == 4            # fp32 (tiny_overrides)
    for p in preds:
        assert p["global_batch"] == p["gpus"] * report["batch_per_rank"]
        if p["gpus"] == 1:
            assert p["images_per_s"] == pytest.approx(report["images_per_s"], rel=1e-9)
    assert result["measured"] == []


def test_cli_predicts_gpu_compute_from_the_counted_flops(step_json, tmp_path):
    out = tmp_path / "gpu.json"
    run_command([PYTHON, "-m", "esvit_scale.bench", "scaling", "--step-json", str(step_json), "--gpu", "H100",
                 "--precision", "bf16", "--mfu", "0.5", "--batch-per-gpu", "64", "--measured", str(step_json),
                 "--json", str(out)])
    result = json.loads(out.read_text())
    report = json.loads(step_json.read_text())
    assert result["predicted_compute"] and "predicted" in result["compute"]["source"]
    assert result["compute"]["step_s"] == pytest.approx(report["flops_per_image"] * 64 / (989e12 * 0.5))
    assert result["dtype_bytes"] == 2 and result["measured"][0]["efficiency"] == pytest.approx(1.0)
    proc = run_command([PYTHON, "-m", "esvit_scale.bench", "scaling", "--step-json", str(step_json), "--gpu", "TPU"],
                       check=False)
    assert proc.returncode != 0 and "not in esvit_scale/bench/peak.py" in proc.stderr


def test_allreduce_bench_reports_the_bus_bandwidth_of_two_ranks(tmp_path):
    """The within-node rate for --intra-gbytes: a real gloo all-reduce between 2 ranks; 1 rank is refused."""
    out = tmp_path / "ar.json"
    torchrun(["-m", "esvit_scale.bench", "allreduce", "--mbytes", "4", "--iters", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo" and result["bytes"] == 4_000_000
    assert result["busbw_gbytes_s"] == pytest.approx(result["algbw_gbytes_s"], rel=1e-9)   # 2 (N-1)/N = 1 at N = 2
    assert result["busbw_gbytes_s"] == pytest.approx(4e6 / result["seconds_median"] / 1e9)
    proc = run_command([PYTHON, "-m", "esvit_scale.bench", "allreduce"], check=False)
    assert proc.returncode != 0 and "needs at least 2 ranks" in proc.stderr
