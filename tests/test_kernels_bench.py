"""`python -m esvit_scale.bench kernels` end to end at small sizes: every case runs and the JSON holds what
docs/benchmarks.md reads from it. Times are not asserted (numbers go in benchmarks, not tests); memory is, where
it follows from the formulations: the consuming matched CE allocates and keeps nothing logits-sized."""
import json

import pytest

from conftest import PYTHON, run_command


@pytest.mark.usefixtures("kernels_on")
def test_kernel_benchmark_reports_every_case(tmp_path):
    out = tmp_path / "bench.json"
    run_command([PYTHON, "-m", "esvit_scale.bench", "kernels", "--K", "4096", "--ce-batch", "4", "--step-batch", "1",
                 "--batch", "1", "--rounds", "1", "--json", str(out)], env={"ESVIT_CPU_ISA": ""})
    report = json.loads(out.read_text())
    assert report["backends"] == {"window_attention": "cpu", "region_matching": "cpu"}
    assert report["cpu_fma_peak_gflops_per_thread"] > 0 and report["cpu_model"]
    assert "-m esvit_scale.bench kernels --K 4096" in report["command"] and report["date"].startswith("20")
    assert not list(tmp_path.glob("*.tmp*"))                # written under a temporary name, then renamed

    from esvit_scale import _C
    isas = list(_C.supported_cpu_isas())
    assert report["cpu_isa"] == isas[-1]                    # the best one, the others timed next to it
    assert set(report["cpu_fma_peak_gflops_per_thread_by_isa"]) == set(isas)
    others = isas[:-1]
    stages = report["window_attention"]
    assert [r["stage_map"] for r in stages] == [[56, 56], [28, 28], [14, 14], [7, 7]]
    for r in stages:
        assert set(r["ms"]) == {"fused", "reference", "block_timm", "block_timm_sdpa", "block_ours_fused",
                                "block_ours_reference", *(f"fused_{isa}" for isa in others)}
        assert r["speedup_vs_reference"] == pytest.approx(r["ms"]["reference"] / r["ms"]["fused"], rel=0.02)
        for isa in others:
            assert r["speedup_vs_reference_by_isa"][isa] == pytest.approx(
                r["ms"]["reference"] / r["ms"][f"fused_{isa}"], rel=0.02)
        assert r["fused_matmul_gflops_per_s"] == pytest.approx(r["fused_matmul_gflop"] / r["ms"]["fused"] * 1e3,
                                                               rel=0.02)

    ce = [r for r in report["region_matching"] if r["op"] == "matched_soft_cross_entropy"]
    assert [r["targets"] for r in ce] == [1, 2]
    for r in ce + [report["region_loss_step"]]:
        assert set(r["ms"]) == {"fused", "fused_keep", "reference"}
        assert r["retained_by_forward_mib"]["fused"] == 0 < r["retained_by_forward_mib"]["reference"]
        assert r["peak_mib"]["fused"] < r["peak_mib"]["reference"]
    assert ce[0]["peak_mib"]["fused"] < ce[0]["peak_mib"]["fused_keep"]     # no gradient allocated
