"""Restarts inside the allocation: the planner's decisions (esvit_scale/cluster/restarts.py) from a run's events log,
and slurm/launch.sh --restarts running real failing commands again."""
import json
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT
from esvit_scale.cluster.restarts import decide, suspect_failures


def failure(kind: str, restart: int, host: str, rank: int = 1, job: str = "42") -> dict:
    return {"event": kind, "unix": float(restart), "rank": 0, "host": "h0",
            "suspects": [{"rank": rank, "host": host}], "attempt": {"job": job, "restart": str(restart)}}


CONFIG = {"data": {"batch_size_per_gpu": 4}, "deepspeed": {"global_batch_size": 96}}


def plan(events, attempt=1, config=CONFIG, nodes=4, per_node=8, is_down=lambda host: False, usable=16):
    return decide(events, exit_code=69, attempt=attempt, max_restarts=3, job="42", nodes=nodes,
                  tasks_per_node=per_node, config=config, backoff_s=10, is_down=is_down, usable_nodes=lambda: usable)


def test_a_host_counts_once_per_failed_attempt_and_only_in_its_own_job():
    events = [failure("lost_rank", 0, "n3"), {**failure("lost_rank", 0, "n3"), "rank": 2},   # two survivors
              failure("hang", 1, "n3"), failure("lost_rank", 2, "n5"), failure("lost_rank", 3, "n5", job="7")]
    assert suspect_failures(events, "42") == {"n3": 2, "n5": 1}


def test_first_failure_restarts_after_a_growing_back_off():
    first = plan([failure("lost_rank", 0, "n3")], attempt=0)
    assert first["action"] == "restart" and first["wait_s"] == 10 and "srun_args" not in first
    assert "lost_rank, suspects rank 1 (host n3)" in first["reason"]
    assert plan([failure("lost_rank", 0, "n3")], attempt=2)["wait_s"] == 40


def test_a_host_named_twice_is_left_out_and_training_continues_on_fewer_nodes_when_the_global_batch_allows():
    events = [failure("lost_rank", 0, "n3"), failure("hang", 1, "n3")]
    d = plan(events)                                           # 3 nodes x 8 ranks x 4 = 96: the global batch holds
    assert d["action"] == "restart" and d["exclude"] == ["n3"]
    assert d["srun_args"] == "--exclude=n3 --nodes=3 --ntasks=24" and "elastic resume" in d["reason"]
    later = plan(events + [{"event": "restart", "attempt": {"job": "42"}, "exclude": ["n3"]},
                           failure("lost_rank", 2, "n1")], attempt=2)
    assert later["srun_args"] == "--exclude=n3 --nodes=3 --ntasks=24"    # still left out


def test_without_a_fixed_global_batch_the_job_is_requeued_with_the_host_excluded():
    events = [failure("lost_rank", 0, "n3"), failure("lost_rank", 1, "n3")]
    d = plan(events, config={"data": {"batch_size_per_gpu": 4}, "deepspeed": {"global_batch_size": None}})
    assert d["action"] == "requeue" and d["exclude"] == ["n3"] and "deepspeed.global_batch_size" in d["reason"]
    assert plan(events, nodes=1)["action"] == "requeue"                   # no other node to continue on


def test_with_no_node_to_replace_it_the_job_restarts_on_the_same_nodes_and_says_so():
    events = [failure("lost_rank", 0, "vm"), failure("hang", 1, "vm")]
    d = plan(events, nodes=1, usable=1)                     # a one-node cluster: requeueing without it never runs
    assert d["action"] == "restart" and d["exclude"] == [] and "srun_args" not in d
    assert "vm (in 2 failures) should be left out, but the job has no other node and the partition has no other" \
           in d["reason"]


def test_a_host_slurm_reports_down_is_left_out_at_its_first_failure():
    d = plan([failure("lost_rank", 0, "n3")], attempt=0, is_down=lambda host: host == "n3")
    assert d["exclude"] == ["n3"] and "SLURM reports it unavailable" in d["reason"]


def test_restarts_used_up_give_up_with_one_line_naming_the_last_failure():
    d = plan([failure("hang", 2, "n3")], attempt=3)
    assert d["action"] == "give_up"
    assert d["reason"].startswith("3 restarts used (ESVIT_MAX_RESTARTS=3); the last attempt exited 69")


def launch(tmp_path, command: str, restarts: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    return subprocess.run(["bash", "slurm/launch.sh", "--restarts", str(restarts), "bash", "-c", command],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "ESVIT_PYTHON": PYTHON,
                               "ESVIT_OUTPUT_DIR": str(out), "ESVIT_RESTART_BACKOFF_S": "0.1", "MASTER_PORT": "31000",
                               **(env or {})})


def test_launch_restarts_a_failed_attempt_with_a_new_port_and_records_why(tmp_path):
    proc = launch(tmp_path, 'echo "$ESVIT_ATTEMPT $MASTER_PORT" >> ' + str(tmp_path / "attempts") +
                  '; [ "$ESVIT_ATTEMPT" -ge 1 ] || exit 69')
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "attempts").read_text().split("\n")[:2] == ["0 31000", "1 31001"]
    assert "the last attempt exited 69 (lost a rank): restarting in 0.1 s (restart 1 of 2)" in proc.stderr
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["restart"] and events[0]["exit_code"] == 69


@pytest.mark.parametrize("code", [2, 75])
def test_launch_does_not_restart_a_config_error_or_a_preempted_run(tmp_path, code):
    proc = launch(tmp_path, f"exit {code}")
    assert proc.returncode == code and "restarting" not in proc.stderr


def test_launch_gives_up_when_the_restarts_are_used_up(tmp_path):
    proc = launch(tmp_path, "exit 70", restarts=2)
    assert proc.returncode == 70
    assert proc.stderr.count("restarting in") == 2
    assert "[launch] giving up: 2 restarts used (ESVIT_MAX_RESTARTS=2); the last attempt exited 70 (hung)" in \
        proc.stderr
