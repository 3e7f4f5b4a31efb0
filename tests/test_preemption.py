"""Stop signals, the time limit, lost and hung ranks, under torchrun with 2 real DeepSpeed ranks on the CPU.

Every run goes through slurm/launch.sh, as a job script would: its exit status is what the job reads
(75: preempted, saved). Signals go to the launcher (torchrun) or to one rank."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, _free_port, read_losses, tiny_overrides

CONFIG = ["train.py", "--config", "configs/quickstart.yaml"]
LONG = {"run.max_steps": 100000, "optim.epochs": 100000, "run.checkpoint_every_steps": 0,
        "run.straggler_every_steps": 1}


def launch(image_folder, out: Path, env: dict | None = None, **opts) -> subprocess.Popen:
    """launch.sh torchrun (2 ranks) train.py, stdout+stderr to out/../<name>.log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    args = ["bash", "slurm/launch.sh", PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), *CONFIG, *tiny_overrides(image_folder, out, **opts)]
    return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **(env or {})})


def log_of(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


def wait_for_steps(proc: subprocess.Popen, out: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and len(read_losses(out)) >= steps:
            return
        assert proc.poll() is None, f"the run ended before step {steps}:\n{log_of(out)[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no step {steps} within {timeout} s:\n{log_of(out)[-4000:]}")


def torchrun_pid(launcher: subprocess.Popen) -> int:
    out = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def worker_pid(torchrun: int, rank: int) -> int:
    for pid in subprocess.run(["pgrep", "-P", str(torchrun)], capture_output=True, text=True).stdout.split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun}")


def processes_of(out: Path) -> list[str]:
    """Processes still running whose command line names this run's output folder (workers left behind)."""
    return subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()


def complete_checkpoints(out: Path) -> list[str]:
    return sorted(p.parent.name for p in (out / "checkpoints").glob("*/COMPLETE"))


@pytest.mark.parametrize("target, sig", [("launcher", signal.SIGTERM), ("launcher", signal.SIGUSR1),
                                         ("rank1", signal.SIGTERM)])
def test_a_signal_to_torchrun_or_one_rank_saves_once_and_reads_as_preempted(target, sig, image_folder, tmp_path):
    out = tmp_path / "run"
    proc = launch(image_folder, out, **LONG)
    wait_for_steps(proc, out, 2)
    torchrun = torchrun_pid(proc)
    os.kill(torchrun if target == "launcher" else worker_pid(torchrun, 1), sig)
    assert proc.wait(timeout=300) == 75, log_of(out)[-4000:]
    stopped_at = json.loads((out / "summary.json").read_text())["steps"]
    assert complete_checkpoints(out) == [f"step{stopped_at:09d}"]          # one checkpoint, at the stop
    assert processes_of(out) == [], "a worker was left running"
    assert sorted(read_losses(out)) == list(range(1, stopped_at + 1))
    slow = [json.loads(line)["stragglers"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "stragglers" in line]                        # per-rank step times gathered at every step
    assert len(slow) == stopped_at and all(s["slowest_rank"] in (0, 1) and s["slowest_s"] > 0 for s in slow)
    assert "step times (own work before the first collective" in log_of(out)


def test_the_time_limit_stops_every_rank_at_the_same_step_and_reads_as_preempted(image_folder, tmp_path):
    """A job whose end time has come (SLURM_JOB_END_TIME: the variable newer SLURM sets; tests/test_slurm.py
    covers the squeue path on a real job) stops after its first step with a checkpoint, without any signal."""
    out = tmp_path / "run"
    proc = launch(image_folder, out, env={"SLURM_JOB_ID": "1", "SLURM_JOB_END_TIME": str(int(time.time()))},
                  **LONG, **{"run.exit_before_end_minutes": 1})
    assert proc.wait(timeout=300) == 75, log_of(out)[-4000:]
    text = log_of(out)
    assert text.count("stop requested (here: the job's time limit is near") == 1     # rank 0 read it ...
    assert text.count("saving at step 1 and exiting with 75") == 2         # ... both ranks stopped at step 1
    assert complete_checkpoints(out) == ["step000000001"]


def test_a_killed_rank_is_named_by_the_survivor_which_exits(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = launch(image_folder, out, **LONG, **{"run.dist_timeout_minutes": 1})
    wait_for_steps(proc, out, 2)
    os.kill(worker_pid(torchrun_pid(proc), 1), signal.SIGKILL)
    rc = proc.wait(timeout=120)                    # the collective timeout (1 min) bounds it; no hang
    text = log_of(out)
    assert rc != 0 and rc != 75
    assert "rank 0: a collective failed" in text and "rank 1 (host" in text and "stopped responding" in text, \
        text[-4000:]
    assert processes_of(out) == []


def test_the_hang_watchdog_dumps_the_stacks_and_exits_non_zero(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = launch(image_folder, out, env={"ESVIT_FAULT_STALL": "1:3"}, **LONG,
                  **{"run.hang_timeout_minutes": 0.2, "run.dist_timeout_minutes": 10})
    rc = proc.wait(timeout=300)
    text = log_of(out)
    assert rc not in (0, 75), text[-4000:]
    assert "hang watchdog: rank 1" in text and "completed no training step in 0.20 min" in text
    assert f"Python stacks of rank 1, every thread (also in {out / 'hang_stacks_rank1.txt'}):" in text
    stacks = (out / "hang_stacks_rank1.txt").read_text()  # the ranks' dumps interleave in the shared log
    assert "in stall_if_injected" in stacks                # the stalled rank's stack shows where it is stuck
    assert sorted(read_losses(out)) == [1, 2]
    assert processes_of(out) == []


def test_a_signal_in_any_start_up_phase_exits_75_at_once_and_loses_nothing(image_folder, tmp_path):
    """One process: SIGUSR1 1.5 s after launch (imports), SIGTERM while the resume is loading and while the k-NN at
    initialisation runs (the main thread held there by a test pause): each exits 75 with nothing written, and the
    run then resumes from its checkpoint."""
    out = tmp_path / "run"
    opts = {"run.max_steps": 4, "run.checkpoint_every_steps": 2, "eval.knn_at_end": "true",
            "eval.train_path": str(image_folder), "eval.val_path": str(image_folder.parent / "val"),
            "eval.knn_k": "[5]", "eval.image_size": 32, "eval.resize_size": 36}
    args = [PYTHON, *CONFIG, *tiny_overrides(image_folder, out, **opts)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    subprocess.run(args + ["run.max_steps=2", "eval.knn_at_end=false"], cwd=ROOT, env=env, check=True,
                   capture_output=True)          # (so that the resumed run still has its k-NN at initialisation)
    assert complete_checkpoints(out) == ["step000000002"]

    def interrupted(sig, pause: str | None) -> str:
        proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                env={**env, "ESVIT_FAULT_PAUSE": f"{pause}:120"} if pause else env)
        if pause:
            for line in proc.stderr:
                if f"at {pause} (test fault)" in line:
                    break
        else:
            time.sleep(1.5)
        proc.send_signal(sig)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 75, err[-3000:]
        return err

    assert "SIGUSR1 during start-up" in interrupted(signal.SIGUSR1, None)
    assert "SIGTERM during start-up" in interrupted(signal.SIGTERM, "resume")
    assert "SIGTERM during start-up" in interrupted(signal.SIGTERM, "knn_init")
    assert complete_checkpoints(out) == ["step000000002"] and sorted(read_losses(out)) == [1, 2]

    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step000000002'}" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "knn_top1" in summary
