"""Evaluation at any size (eval/knn.py, eval/linear.py): the k-NN bank and the probe's features stay sharded over
the ranks as tensors; the distributed k-NN gives the single process's top-1 on real images (digits), and a bf16 bank
the fp32 bank's; the benchmarks of the index and of the k-NN run."""
import json

from conftest import PYTHON, run_command, torchrun


def test_sharded_knn_and_probe_give_the_single_process_results_on_digits(tmp_path):
    digits = tmp_path / "digits"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run_command([PYTHON, "tests/scripts/eval_on_digits.py", str(one), str(digits)], timeout=900)
    torchrun(["tests/scripts/eval_on_digits.py", str(two), str(digits)], timeout=900)
    single, sharded = json.loads(one.read_text()), json.loads(two.read_text())
    assert sharded["float32"] == single["float32"], (sharded, single)     # the same neighbours, merged
    assert sharded["bfloat16"] == single["bfloat16"]
    for k in ("10", "20"):                                                 # bf16 storage: within a vote or two
        assert abs(single["bfloat16"][k] - single["float32"][k]) <= 0.6, single
    assert single["float32"]["20"] > 80                                    # digits: far above chance at init
    assert abs(sharded["linear"] - single["linear"]) < 3 and sharded["linear"] > 80, (sharded, single)


def test_bench_index_reports_time_and_shared_memory(tmp_path):
    report = tmp_path / "index.json"
    run_command([PYTHON, "-m", "esvit_scale.bench", "index", "--files", "3000", "--classes", "30", "--folder",
                 str(tmp_path / "tree"), "--json", str(report)], env={"ESVIT_INDEX_DIR": str(tmp_path / "ix")})
    r = json.loads(report.read_text())
    assert r["files"] == 3000 and r["index_build_s"] > 0 and r["loaded"]["entries"] == 3000
    assert r["loaded"]["rank"]["RssAnon"] < 2 << 20 and r["projected_14M_index_bytes"] > r["index_bytes"]


def test_bench_knn_on_two_ranks_reports_memory_per_rank(tmp_path):
    report = tmp_path / "knn.json"
    torchrun(["-m", "esvit_scale.bench", "knn", "--bank", "20000", "--dim", "64", "--queries", "500", "--classes",
              "10", "--json", str(report)])
    r = json.loads(report.read_text())
    assert r["world_size"] == 2 and [x["shard_rows"] for x in r["ranks"]] == [10000, 10000]
    assert all(x["shard_bytes"] == 10000 * 64 * 2 for x in r["ranks"]) and r["top1"]["20"] > 50
