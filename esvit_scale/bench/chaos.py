"""A real training job under a seeded random schedule of faults, compared step by step with the same job run
without them.

  python -m esvit_scale.bench chaos --config C --faults N --seed S [--ranks R] [--slurm] --json J [overrides ...]

The job is `torchrun --max-restarts` (or, with --slurm, slurm/cpu_smoke.sbatch on the SLURM cluster this machine
reaches) training C with the overrides, checkpointing every 2 steps. Faults, one every few steps:
  kill_rank          kill -9 of one rank                      the job: the survivors name it (exit 69), it restarts
  lost_node          kill -9 of the launcher and every rank   torchrun: the bench relaunches it, as a requeue would
                     (the node is gone)                       SLURM: launch.sh restarts inside the allocation
  sigterm, sigusr1   the signal to one rank                   the ranks save and exit 75, the job goes on
  preempt            (SLURM) USR1 to the batch shell          saved, requeued, resumed
  damage_checkpoint  truncate or flip a byte of a file of the newest checkpoint (an older complete one exists),
                     then kill -9 of one rank                 the restart skips it, resumes from the older one
  disk_full          (root) the checkpoints' tmpfs filled     the save fails, is recorded, training goes on
                     until a save fails, then freed
  stall              a rank stops before a step (ESVIT_FAULT_STALL)   the hang watchdog ends the attempt (70)
  nan, spike         a non-finite or 100x loss at a step, once       rewind and replay: transient
  nan_persistent, spike_persistent   the same at every replay        rewind, the batch is skipped
Under torchrun the bench plays the scheduler only where the launcher itself is gone (lost_node); every other fault
must be recovered by the job. Then it runs the job once more without faults (the persistent faults' steps listed in
skipped_steps.json, as the chaos run will have skipped them) and reports: faults injected and survived (each found
in events.jsonl), relaunches, steps recomputed, skipped batches, wall-time overhead, and missing, duplicated and
unequal steps, which must all be 0: the per-step losses must be bitwise equal.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("kill_rank", "lost_node", "sigterm", "sigusr1", "damage_checkpoint", "disk_full", "stall", "nan",
         "nan_persistent", "spike", "spike_persistent")
SLURM_ONLY = ("preempt",)
IN_PROCESS = ("stall", "nan", "nan_persistent", "spike", "spike_persistent")      # ESVIT_FAULT_* at launch
PERSISTENT = ("nan_persistent", "spike_persistent")
# the event each fault must leave in events.jsonl (esvit_scale/events.py)
EXPECTED = {"kill_rank": "lost_rank", "lost_node": "resume", "sigterm": "preempted", "sigusr1": "preempted",
            "preempt": "preempted", "damage_checkpoint": "checkpoint_damaged", "disk_full": "save_failed",
            "stall": "hang", "nan": "transient", "nan_persistent": "skipped_batch", "spike": "transient",
            "spike_persistent": "skipped_batch"}
CHECKPOINT_EVERY, FIRST_FAULT_STEP, GAP = 2, 12, 3
CHAOS_RUN = {"run.checkpoint_every_steps": CHECKPOINT_EVERY, "run.keep_checkpoints": 3, "run.log_every_steps": 1,
             "run.hang_timeout_minutes": 0.3, "run.dist_timeout_minutes": 1, "run.spike_factor": 3,
             "run.straggler_every_steps": 0, "eval.knn_at_end": "false", "eval.linear_at_end": "false",
             "run.exit_before_end_minutes": 0}


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--faults", type=int, default=20, help="how many faults to inject")
    parser.add_argument("--seed", type=int, default=0, help="seed of the schedule (kinds, steps, ranks)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--slurm", action="store_true", help="run the job with slurm/cpu_smoke.sbatch")
    parser.add_argument("--kinds", help=f"comma-separated kinds to draw from (default: all that apply): "
                                        f"{', '.join(KINDS + SLURM_ONLY)}")
    parser.add_argument("--schedule", help="comma-separated kinds in this order instead of a random draw")
    parser.add_argument("--work-dir", help="where both runs go (default: a temporary folder, removed)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")


@dataclass
class Fault:
    kind: str
    step: int                        # injected once the run has logged this step (in-process: at this step)
    rank: int = 0
    detail: str = ""
    injected_s: Optional[float] = None      # seconds after the chaos job started
    event: Optional[dict] = None            # what the job recorded about it
    _unix: float = field(default=0.0, repr=False)


def make_schedule(kinds: list[str], n: int, seed: int, ranks: int) -> list[Fault]:
    """n faults, every kind once before any repeats, at distinct steps GAP apart from FIRST_FAULT_STEP on (by then
    two checkpoints are complete and the spike detector has its history)."""
    rng = random.Random(seed)
    pool: list[str] = []
    while len(pool) < n:
        shuffled = list(kinds)
        rng.shuffle(shuffled)
        pool += shuffled
    return [Fault(kind, FIRST_FAULT_STEP + GAP * i + rng.randrange(GAP - 1), rank=rng.randrange(ranks))
            for i, kind in enumerate(pool[:n])]


def fault_environment(faults: list[Fault], state_dir: Path) -> dict[str, str]:
    """ESVIT_FAULT_* for the in-process faults (cluster/faults.py), fired once per run through `state_dir`."""
    entries: dict[str, list[str]] = {"ESVIT_FAULT_STALL": [], "ESVIT_FAULT_NAN": [], "ESVIT_FAULT_SPIKE": []}
    for f in faults:
        suffix = ":persistent" if f.kind in PERSISTENT else ""
        if f.kind == "stall":
            entries["ESVIT_FAULT_STALL"].append(f"{f.rank}:{f.step}")
        elif f.kind.startswith("nan"):
            entries["ESVIT_FAULT_NAN"].append(f"{f.rank}:{f.step}{suffix}")
        elif f.kind.startswith("spike"):
            entries["ESVIT_FAULT_SPIKE"].append(f"{f.step}{suffix}")
    return {k: ",".join(v) for k, v in entries.items() if v} | {"ESVIT_FAULT_STATE_DIR": str(state_dir)}


# ----------------------------------------------------------------------------------------- the run's files

def step_records(out: Path) -> list[dict]:
    """The records of metrics.jsonl that are a step's: its loss, or a skipped batch (a line cut short is left out)."""
    path = out / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec or rec.get("skipped_batch"):
            records.append(rec)
    return records


def logged_steps(out: Path) -> dict[int, list]:
    """step -> every loss ("skipped" for a skipped batch) metrics.jsonl holds for it."""
    steps: dict[int, list] = {}
    for rec in step_records(out):
        steps.setdefault(rec["step"], []).append(rec.get("loss", "skipped"))
    return steps


def progress(out: Path) -> tuple[int, float]:
    """(the last step logged, when the record was written)."""
    last = step_records(out)[-1:] or [{"step": 0, "time": 0.0}]
    return last[0]["step"], last[0].get("time", 0.0)


def last_start(out: Path) -> float:
    from esvit_scale.events import read_events
    return max([e["unix"] for e in read_events(out) if e["event"] in ("start", "resume")], default=0.0)


def complete_checkpoints(out: Path) -> list[Path]:
    return sorted(p.parent for p in (out / "checkpoints").glob("step*/COMPLETE")
                  if not (p.parent / "REJECTED").exists())


def _processes() -> list[tuple[int, int, list[str], dict[str, str]]]:
    """(pid, parent pid, command line, environment) of every process this user may read."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in v)
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(entry.name), ppid, [c.decode(errors="replace") for c in cmdline if c], environ))
    return found


# ----------------------------------------------------------------------------------------- launchers

class TorchrunJob:
    """`torchrun --max-restarts` in a session of its own: it restarts its workers itself."""
    launcher = "torchrun"

    def __init__(self, config: str, overrides: list[str], env: dict, ranks: int, log: Path, max_restarts: int):
        self.train_args = ["--config", config, *overrides]
        self.env, self.ranks, self.log = env, ranks, log
        self.max_restarts, self.proc, self.relaunches = max_restarts, None, 0

    def launch(self) -> None:
        from esvit_scale.engine.distributed import free_port
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.ranks),
                "--max-restarts", str(self.max_restarts), "--monitor-interval", "1",
                "--master_port", str(free_port()), "train.py", *self.train_args]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def trainers(self) -> dict[int, int]:
        """rank -> pid of the workers running now."""
        return {int(env.get("RANK", -1)): pid for pid, ppid, _, env in _processes() if ppid == self.proc.pid}

    def ended(self) -> Optional[int]:
        return self.proc.poll()

    def lose_node(self) -> None:
        pids = [self.proc.pid, *self.trainers().values()]
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        self.proc.wait()

    def after_lost_node(self) -> None:
        self.relaunches += 1            # the scheduler's part: a requeue
        self.launch()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.lose_node()


class SlurmJob:
    """slurm/cpu_smoke.sbatch: slurm/launch.sh restarts failed attempts inside the allocation and requeues on 75."""
    launcher = "slurm"
    ENDED = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")

    def __init__(self, config: str, overrides: list[str], env: dict, ranks: int, log: Path, max_restarts: int):
        self.overrides, self.ranks, self.log = overrides, ranks, log
        self.env = {**env, "ESVIT_CONFIG": config, "ESVIT_MAX_RESTARTS": str(max_restarts),
                    "ESVIT_RESTART_BACKOFF_S": "1", "ESVIT_TASK_WAIT_S": "60"}
        self.job_id, self.relaunches = "", 0

    def launch(self) -> None:
        proc = subprocess.run(["sbatch", "--parsable", f"--ntasks={self.ranks}", f"--output={self.log}",
                               "--open-mode=append", "slurm/cpu_smoke.sbatch", *self.overrides],
                              cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        self.job_id = proc.stdout.strip().split(";")[0]

    def _mine(self) -> list[tuple[int, int, list[str], dict[str, str]]]:
        return [p for p in _processes() if p[3].get("SLURM_JOB_ID") == self.job_id]

    def trainers(self) -> dict[int, int]:
        mine = self._mine()
        pids = {p[0] for p in mine}
        return {int(env["SLURM_PROCID"]): pid for pid, ppid, cmd, env in mine
                if "train.py" in cmd and ppid not in pids and "SLURM_PROCID" in env}

    def info(self) -> dict[str, str]:
        text = subprocess.run(["scontrol", "show", "job", "-o", self.job_id], capture_output=True, text=True).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def ended(self) -> Optional[int]:
        state = self.info().get("JobState", "")
        return None if state not in self.ENDED else (0 if state == "COMPLETED" else 1)

    def requeues(self) -> int:
        return int(self.info().get("Restarts", "0") or 0)

    def lose_node(self) -> None:
        for pid, _, cmd, _ in self._mine():
            if cmd and (os.path.basename(cmd[0]) == "srun" or "train.py" in cmd):
                _kill(pid, signal.SIGKILL)

    def after_lost_node(self) -> None:
        pass                            # launch.sh restarts training inside the allocation

    def preempt(self) -> None:
        subprocess.run(["scancel", "--signal=USR1", "--batch", self.job_id], check=True)

    def stop(self) -> None:
        if self.job_id and self.ended() is None:
            subprocess.run(["scancel", self.job_id], check=False)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------------------- faults from outside

class Disk:
    """The checkpoints folder on a tmpfs of its own, so that it can be filled (needs root and mount)."""

    def __init__(self, folder: Path, size: str = "600M"):
        self.folder, self.ballast = folder, folder / ".ballast"
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        self.mounted = proc.returncode == 0
        self.why_not = proc.stderr.strip()

    def fill(self) -> None:
        chunk = b"\0" * (1 << 22)
        with open(self.ballast, "wb") as f:
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:
                pass

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


def damage_newest(out: Path, rng: random.Random) -> Optional[str]:
    """Truncate or flip a byte of one file of the newest complete checkpoint, if an older complete one exists."""
    complete = complete_checkpoints(out)
    if len(complete) < 2:
        return None
    folder = complete[-1]
    files = sorted(json.loads((folder / "COMPLETE").read_text())["files"])
    victim = folder / rng.choice(files)
    size = victim.stat().st_size
    if rng.random() < 0.5:
        os.truncate(victim, size // 2)
        return f"truncated {victim.relative_to(out)} to {size // 2} bytes"
    offset = rng.randrange(size)
    with open(victim, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    return f"flipped byte {offset} of {victim.relative_to(out)}"


def wait_until(what: str, ready, job, timeout: float = 600.0, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if job.ended() is not None:
            raise RuntimeError(f"the job ended (status {job.ended()}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def training_at(out: Path, step: int) -> bool:
    """The run has logged `step` and is training now: its newest record is newer than its newest (re)start."""
    last, when = progress(out)
    return last >= step and when > last_start(out)


def inject(fault: Fault, job, out: Path, disk: Optional[Disk], rng: random.Random, t0: float) -> None:
    """Wait for the fault's step, then cause it. A fault set at launch fires by itself in its step: it is noted
    once the step before is done (a stalled step is never logged before the hang ends the attempt)."""
    if fault.kind in IN_PROCESS:
        wait_until(f"step {fault.step - 1} ({fault.kind} next)", lambda: training_at(out, fault.step - 1), job)
        fault._unix = time.time()
        fault.injected_s = fault._unix - t0
        return
    wait_until(f"step {fault.step} ({fault.kind})", lambda: training_at(out, fault.step), job)
    wait_until("the trainers", lambda: len(job.trainers()) == job.ranks, job)
    fault._unix = time.time()
    fault.injected_s = fault._unix - t0
    trainers = job.trainers()
    if fault.kind == "kill_rank":
        _kill(trainers[fault.rank], signal.SIGKILL)
    elif fault.kind in ("sigterm", "sigusr1"):
        _kill(trainers[fault.rank], signal.SIGTERM if fault.kind == "sigterm" else signal.SIGUSR1)
    elif fault.kind == "preempt":
        job.preempt()
    elif fault.kind == "lost_node":
        job.lose_node()
        job.after_lost_node()
    elif fault.kind == "damage_checkpoint":
        fault.detail = damage_newest(out, rng) or "no older complete checkpoint: nothing damaged"
        _kill(trainers[fault.rank], signal.SIGKILL)
    elif fault.kind == "disk_full":
        disk.fill()
        try:
            wait_until("a failed save", lambda: _events_since(out, "save_failed", fault._unix), job, timeout=120)
        finally:
            disk.free()


def _events_since(out: Path, kind: str, since: float) -> list[dict]:
    from esvit_scale.events import read_events
    return [e for e in read_events(out) if e["event"] == kind and e["unix"] >= since - 1]


def match_events(faults: list[Fault], out: Path) -> None:
    """Each fault gets the first event of its expected kind, not already taken, recorded after it (and at its step,
    for the faults of a step)."""
    from esvit_scale.events import read_events
    taken: set[int] = set()
    events = read_events(out)
    for f in faults:
        for i, e in enumerate(events):
            if i in taken or e["event"] != EXPECTED[f.kind] or e["unix"] < f._unix - 1:
                continue
            if f.kind in IN_PROCESS and "step" in e and e["step"] != f.step:
                continue
            if f.kind == "lost_node" and e.get("previous_ending") != "unknown":
                continue
            f.event = {k: e.get(k) for k in ("event", "time", "step", "rank", "host", "action")}
            taken.add(i)
            break


# ----------------------------------------------------------------------------------------- the benchmark

def compare(chaos: dict[int, list], reference: dict[int, list], total: int, skipped: set[int]) -> dict:
    missing = [s for s in range(1, total + 1) if s not in chaos]
    duplicated = [s for s, v in chaos.items() if len(v) > 1]
    unequal = [s for s in range(1, total + 1) if s in chaos and chaos[s][:1] != reference.get(s, [None])[:1]]
    wrong_skips = sorted({s for s, v in chaos.items() if v == ["skipped"]} ^ skipped)
    return {"missing_steps": missing, "duplicated_steps": duplicated, "unequal_steps": unequal,
            "unexpected_skips": wrong_skips}


def run(args) -> None:
    from esvit_scale.bench.report import cpu_model, write_json
    from esvit_scale.config import load_config
    from esvit_scale.events import summary
    kinds = [k.strip() for k in (args.schedule or args.kinds or "").split(",") if k.strip()] or \
        list(KINDS) + (list(SLURM_ONLY) if args.slurm else [])
    unknown = sorted(set(kinds) - set(KINDS + SLURM_ONLY))
    if unknown:
        raise SystemExit(f"bench chaos: unknown fault kinds {unknown} (known: {', '.join(KINDS + SLURM_ONLY)})")
    if "preempt" in kinds and not args.slurm:
        raise SystemExit("bench chaos: preempt is a SLURM fault (--slurm)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="esvit_chaos_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    disk = Disk(work / "chaos" / "checkpoints") if "disk_full" in kinds else None
    if disk is not None and not disk.mounted:
        print(f"bench chaos: disk_full left out: cannot mount a tmpfs here ({disk.why_not})", flush=True)
        kinds = [k for k in kinds if k != "disk_full"]
    rng = random.Random(args.seed)
    faults = ([Fault(k, FIRST_FAULT_STEP + GAP * i, rank=rng.randrange(args.ranks)) for i, k in enumerate(kinds)]
              if args.schedule else make_schedule(kinds, args.faults, args.seed, args.ranks))
    total = faults[-1].step + 3 * GAP
    persistent = sorted(f.step for f in faults if f.kind in PERSISTENT)
    settings = {**CHAOS_RUN, "run.max_steps": total, "optim.epochs": max(3, total), "run.max_rewinds": len(persistent) + 1}
    cfg = load_config(args.config, args.overrides + [f"{k}={v}" for k, v in settings.items()])
    print(f"bench chaos: {len(faults)} faults over {total} steps, {args.ranks} ranks, "
          f"{'SLURM' if args.slurm else 'torchrun'}, ZeRO {cfg.deepspeed.zero_stage}, async saves "
          f"{cfg.run.async_checkpoint}: {', '.join(f'{f.kind}@{f.step}' for f in faults)}", flush=True)

    def overrides(out: Path) -> list[str]:
        return [*args.overrides, *[f"{k}={v}" for k, v in settings.items()], f"run.output_dir={out}"]

    base_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if not cfg.run.device == "cuda":
        base_env.setdefault("DS_ACCELERATOR", "cpu")
    reference = work / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    if persistent:                          # the chaos run will have skipped these: so does the reference
        (reference / "skipped_steps.json").write_text(json.dumps({str(s): {"reason": "bench chaos"} for s in persistent}))
    t = time.time()
    ref = TorchrunJob(args.config, overrides(reference), base_env, args.ranks, work / "reference.log", max_restarts=0)
    ref.launch()
    if ref.proc.wait() != 0:
        raise SystemExit(f"bench chaos: the reference run failed; see {work / 'reference.log'}")
    reference_wall = time.time() - t

    out = work / "chaos"
    env = {**base_env, **fault_environment(faults, work / "fired"), "ESVIT_OUTPUT_DIR": str(out)}
    job_type = SlurmJob if args.slurm else TorchrunJob
    job = job_type(args.config, overrides(out), env, args.ranks, work / "chaos.log", max_restarts=len(faults) + 5)
    t0 = time.time()
    error = None
    try:
        job.launch()
        for fault in faults:
            inject(fault, job, out, disk, rng, t0)
            print(f"  {fault.injected_s:7.1f} s  {fault.kind:<18} step {fault.step:<4} rank {fault.rank} "
                  f"{fault.detail}", flush=True)
        wait_until("the end of the run", lambda: job.ended() is not None, job, timeout=1800)
    except RuntimeError as e:
        error = str(e)
    finally:
        status = job.ended()
        requeues = job.requeues() if args.slurm else None
        job.stop()
        if disk is not None:
            disk.free()
            disk.unmount()
    chaos_wall = time.time() - t0
    match_events(faults, out)
    chaos_steps, reference_steps = logged_steps(out), logged_steps(reference)
    result = compare(chaos_steps, reference_steps, total, set(persistent))
    events = summary(out)
    survived = [f for f in faults if f.event is not None]
    report = {
        "config": args.config, "overrides": args.overrides, "launcher": job.launcher, "ranks": args.ranks,
        "zero_stage": cfg.deepspeed.zero_stage, "async_checkpoint": cfg.run.async_checkpoint, "seed": args.seed,
        "cpu": cpu_model(), "steps": total, "job_status": status, "error": error,
        "faults_injected": sum(f.injected_s is not None for f in faults), "faults_survived": len(survived),
        "relaunches": job.relaunches, "slurm_requeues": requeues, "steps_recomputed": events["steps_recomputed"],
        "skipped_steps": events["skipped_steps"], "reference_wall_s": round(reference_wall, 1),
        "chaos_wall_s": round(chaos_wall, 1), "wall_overhead": round(chaos_wall / reference_wall - 1, 3),
        **{k: v for k, v in result.items()}, "events": events,
        "faults": [{k: v for k, v in asdict(f).items() if not k.startswith("_")} for f in faults],
        "work_dir": str(work)}
    report["passed"] = (status == 0 and error is None and len(survived) == len(faults) and
                        not any(result.values()) and report["relaunches"] == sum(f.kind == "lost_node" and
                                                                                    not args.slurm for f in faults))
    write_json(report, args.json)
    print(f"bench chaos: {'PASSED' if report['passed'] else 'FAILED'}: {report['faults_survived']}/{len(faults)} "
          f"faults survived, {report['relaunches']} relaunches, {report['steps_recomputed']} steps recomputed, "
          f"skipped {report['skipped_steps']}, wall time +{100 * report['wall_overhead']:.0f}% "
          f"({chaos_wall:.0f} s vs {reference_wall:.0f} s); missing {result['missing_steps']}, duplicated "
          f"{result['duplicated_steps']}, unequal {result['unequal_steps']}, unexpected skips "
          f"{result['unexpected_skips']}" + (f"; error: {error}" if error else ""), flush=True)
    for f in faults:
        if f.event is None:
            print(f"  not in events.jsonl: {f.kind} at step {f.step} (rank {f.rank}) {f.detail}", flush=True)
    if not args.work_dir and report["passed"]:
        shutil.rmtree(work, ignore_errors=True)
    if not report["passed"]:
        raise SystemExit(1)
