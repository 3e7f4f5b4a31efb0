"""The batch templates against a real SLURM (slurm/local_cluster.sh start; .ci/run starts it): 2 CPU tasks of
train.py under srun, real signals, real requeues."""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, read_losses, run_command, tiny_overrides, torchrun

CONFIG = ["train.py", "--config", "configs/quickstart.yaml"]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        state = ""
    if not re.search(r"idle|mix|alloc", state):
        message = "no SLURM cluster answers: run `slurm/local_cluster.sh start` (as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def submit(out: Path, overrides: list[str], *sbatch_options: str, env: dict | None = None) -> str:
    log = f"--output={out.parent / out.name}.slurm.log"             # appended to: every run of a requeued job
    proc = subprocess.run(["sbatch", "--parsable", "--open-mode=append", log, *sbatch_options,
                           "slurm/cpu_smoke.sbatch", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "ESVIT_OUTPUT_DIR": str(out), **(env or {})}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def job_log(out: Path) -> str:
    path = out.parent / f"{out.name}.slurm.log"
    return path.read_text() if path.is_file() else ""


def wait_until(what: str, predicate, out: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{job_log(out)[-5000:]}")


def wait_ended(job_id: str, out: Path, timeout: float = 420) -> dict[str, str]:
    ended = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_until(f"job {job_id} to end", lambda: job(job_id).get("JobState") in ended, out, timeout)
    return job(job_id)


def test_cpu_smoke_job_trains_with_two_tasks_writes_checkpoints_and_finishes(image_folder, tmp_path):
    out = tmp_path / "smoke"
    job_id = submit(out, tiny_overrides(image_folder, out, **{"run.max_steps": 4,
                                                              "run.checkpoint_every_steps": 2}))
    info = wait_ended(job_id, out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", job_log(out)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2 and not summary["preempted"]
    assert {p.parent.name for p in (out / "checkpoints").glob("*/COMPLETE")} == {"step000000002", "step000000004"}


@pytest.mark.slow     # one preemption is in the default suite (the killed-then-stalled job), twice is not
def test_pre_timeout_signal_twice_saves_requeues_and_resumes_to_the_losses_of_an_uninterrupted_run(
        image_folder, tmp_path):
    opts = {"run.max_steps": 60, "optim.epochs": 12, "run.checkpoint_every_steps": 0}
    reference = tmp_path / "reference"
    torchrun(CONFIG + tiny_overrides(image_folder, reference, **opts))
    expected = read_losses(reference)

    out = tmp_path / "job"
    job_id = submit(out, tiny_overrides(image_folder, out, **opts))
    wait_until("step 3", lambda: (out / "metrics.jsonl").is_file() and len(read_losses(out)) >= 3, out)
    # Two pre-timeout signals in a row, both while this run is still going: the run saves and exits within a second
    # of the first, and SLURM hands a signal sent while the job waits for its requeue to the next run.
    for _ in range(2):
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    info = wait_ended(job_id, out)
    text = job_log(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-5000:]
    assert text.count("requeueing job") == 1 and "[launch] USR1 received" in text
    stopped = re.findall(r"saving at step (\d+) and exiting with 75", text)
    assert len(set(stopped)) == 1, stopped                 # every rank stopped at one step, which was saved once
    assert f"resuming from {out / 'checkpoints' / f'step{int(stopped[0]):09d}'}" in text

    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 61))                   # every step once: nothing lost, nothing repeated
    losses = read_losses(out)
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), (step, losses[step], loss)
    assert json.loads((out / "summary.json").read_text())["steps"] == 60


def test_a_killed_rank_then_a_stalled_rank_then_a_preemption_the_job_completes_with_the_losses_of_an_undisturbed_run(
        image_folder, tmp_path):
    """`bench chaos --slurm`: kill -9 of one task (the other names it, exit 69; launch.sh restarts training inside the
    allocation), a stalled task (the hang watchdog, exit 70; restarted again), then USR1 to the batch shell (saved,
    requeued, resumed). No resubmission; every step's loss bitwise equal to a run without the faults."""
    report = tmp_path / "chaos.json"
    proc = run_command([PYTHON, "-m", "esvit_scale.bench", "chaos", "--slurm", "--schedule", "kill_rank,stall,preempt",
                        "--work-dir", str(tmp_path / "work"), "--json", str(report),
                        *tiny_overrides(image_folder, tmp_path / "unused")], timeout=1500, check=False)
    result = json.loads(report.read_text()) if report.is_file() else {}
    assert result.get("passed"), proc.stdout[-4000:] + proc.stderr[-2000:]
    assert result["job_status"] == 0 and result["slurm_requeues"] == 1 and result["relaunches"] == 0
    assert [f["event"]["event"] for f in result["faults"]] == ["lost_rank", "hang", "preempted"]
    log = (tmp_path / "work" / "chaos.log").read_text()
    assert log.count("restarting in") == 2 and "requeueing job" in log


def test_a_job_requeues_itself_with_a_failing_host_excluded(tmp_path):
    """slurm/requeue_excluding.sh, as launch.sh runs it for a node named in two failures: SLURM changes the excluded
    nodes of pending jobs only, so a helper job sets them once the job is back in the queue, and releases it. On this
    one-node cluster the job then waits (no node left), which is how the exclusion shows."""
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n[ \"${{SLURM_RESTART_COUNT:-0}}\" = 0 ] || exit 0\n"
                      f"{ROOT}/slurm/requeue_excluding.sh \"$SLURM_JOB_ID\" \"$SLURMD_NODENAME\"\nsleep 60\n")
    out = tmp_path / "requeue"
    proc = subprocess.run(["sbatch", "--parsable", "--requeue", f"--output={out}.slurm.log", str(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    try:
        wait_until("the exclusion", lambda: job(job_id).get("ExcNodeList") not in (None, "(null)") and
                   job(job_id).get("Reason") != "job_requeued_in_held_state", out, timeout=120)
        info = job(job_id)
        assert info["JobState"] == "PENDING" and info["Restarts"] == "1", info
        node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True).stdout.strip()
        assert info["ExcNodeList"] == node, info
        assert "helper job excludes" in job_log(out)
    finally:
        subprocess.run(["scancel", job_id], check=False)


def test_a_signal_during_start_up_requeues_and_the_restarted_job_finishes(image_folder, tmp_path):
    out = tmp_path / "startup"
    job_id = submit(out, tiny_overrides(image_folder, out, **{"run.max_steps": 3}),
                    env={"ESVIT_FAULT_PAUSE": "build:10"})        # both tasks wait 10 s in the model build
    wait_until("the start-up pause", lambda: job_log(out).count("pausing 10 s at build") == 2, out)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    info = wait_ended(job_id, out)
    text = job_log(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-5000:]
    assert text.count("SIGUSR1 during start-up: nothing to save yet") == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_job_killed_at_its_time_limit_is_resumed_by_the_next_submission(image_folder, tmp_path):
    out = tmp_path / "limit"
    long_run = {"run.max_steps": 100000, "optim.epochs": 100000, "run.checkpoint_every_steps": 5,
                "run.keep_checkpoints": 3, "run.exit_before_end_minutes": 0}
    job_id = submit(out, tiny_overrides(image_folder, out, **long_run), "--time=1", "--no-requeue")
    info = wait_ended(job_id, out, timeout=300)
    assert info["JobState"] in ("TIMEOUT", "COMPLETED", "FAILED", "CANCELLED"), info
    complete = sorted(p.parent.name for p in (out / "checkpoints").glob("*/COMPLETE"))
    assert complete, job_log(out)[-4000:]
    newest = int(complete[-1].removeprefix("step"))

    job_id = submit(out, tiny_overrides(image_folder, out, **{**long_run, "run.max_steps": newest + 3}))
    info = wait_ended(job_id, out)
    assert info["JobState"] == "COMPLETED", job_log(out)[-4000:]
    assert f"resuming from {out / 'checkpoints' / complete[-1]}" in job_log(out)
    assert json.loads((out / "summary.json").read_text())["steps"] == newest + 3


def test_throughput_sweep_array_writes_one_report_per_count_and_the_gather_plots_them(image_folder, tmp_path):
    sweep = tmp_path / "sweep"
    log = tmp_path / "sweep-%a.slurm.log"
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", "--array=1,2%1", "--ntasks=2", "--ntasks-per-node=2",
         "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00", "slurm/throughput_sweep.sbatch",
         "configs/quickstart.yaml", "--warmup", "1", "--steps", "2", *tiny_overrides(image_folder, tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "ESVIT_SWEEP_UNIT": "tasks", "ESVIT_SWEEP_DIR": str(sweep), "ESVIT_PYTHON": PYTHON})
    assert proc.returncode == 0, proc.stderr
    array_id = proc.stdout.strip().split(";")[0]

    def logs() -> str:
        return "\n".join(p.read_text() for p in sorted(tmp_path.glob("sweep-*.slurm.log")))

    def states() -> list[str]:
        text = subprocess.run(["scontrol", "show", "job", "-o", array_id], capture_output=True, text=True).stdout
        return re.findall(r"JobState=(\S+)", text)

    ended = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY")
    deadline = time.monotonic() + 600
    while not (len(states()) == 2 and all(s in ended for s in states())):
        assert time.monotonic() < deadline, f"the sweep's elements did not end: {states()}\n{logs()[-5000:]}"
        time.sleep(1)
    assert states() == ["COMPLETED", "COMPLETED"], logs()[-5000:]
    reports = {p.name: json.loads(p.read_text()) for p in sweep.glob("*.json")}
    assert set(reports) == {"n1.json", "n2.json"}, logs()[-5000:]
    assert reports["n1.json"]["world_size"] == 1 and reports["n2.json"]["world_size"] == 2
    assert all(r["global_batch"] == 4 * r["world_size"] and r["timed_steps"] == 2 for r in reports.values())

    png, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    run_command([PYTHON, "-m", "esvit_scale.bench", "scaling", "--sweep", str(sweep), "--gpus", "1", "2", "4",
                 "--png", str(png), "--json", str(out)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert [m["gpus"] for m in result["measured"]] == [1, 2]
    assert result["base_report"] == str(sweep / "n1.json")
    assert result["measured"][0]["efficiency"] == pytest.approx(1.0)
    one = [p for p in result["predictions"] if p["gpus"] == 1]
    assert one and all(p["images_per_s"] == pytest.approx(reports["n1.json"]["images_per_s"]) for p in one)
