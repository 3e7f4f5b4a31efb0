"""What a SLURM job does when its training failed inside the allocation (lost rank 69, hang 70, a failed collective,
a task or node gone): the decision slurm/launch.sh --restarts asks for after each failed attempt.

    python -m esvit_scale.cluster.restarts --output-dir D --exit-code RC --attempt A --max-restarts M

prints shell assignments that launch.sh evaluates (action=restart|requeue|give_up, wait_s, srun_args, exclude,
reason) and records the decision in the run's events log. The policy:
- restarts used up (A >= M): give up; the job ends FAILED with one line naming the last failure.
- a host named as a suspect (by the heartbeats: a lost rank's host, or a rank stuck behind the others in a hang) in
  two failures of this job is left out, and so is one named once that SLURM reports down, drained or failing. When the run's global batch is fixed (deepspeed.global_batch_size) and the
  ranks left still divide it, training continues on the other nodes (srun --exclude, fewer nodes and tasks; the
  checkpoint resumes elastically). Otherwise the job is requeued with the host excluded (scontrol update
  ExcNodeList), for the scheduler to give it another node.
- otherwise: restart with a back-off of ESVIT_RESTART_BACKOFF_S x 2^A seconds (default 10, at most 300).
"""
from __future__ import annotations

import argparse
import os
import shlex
from collections import defaultdict
from pathlib import Path
from typing import Optional

from esvit_scale.events import EventLog, read_events

FAILURES = ("lost_rank", "hang")
MAX_BACKOFF_S = 300


def suspect_failures(events: list[dict], job: Optional[str]) -> dict[str, int]:
    """host -> in how many failed attempts of `job` the heartbeats named it (several ranks reporting the same lost
    peer in one attempt count once)."""
    seen: dict[str, set] = defaultdict(set)
    for e in events:
        if e["event"] not in FAILURES or (job is not None and e.get("attempt", {}).get("job") != job):
            continue
        attempt = tuple(sorted(e.get("attempt", {}).items()))
        for suspect in e.get("suspects", []):
            seen[suspect["host"]].add(attempt)
    return {host: len(attempts) for host, attempts in seen.items()}


def excluded_hosts(events: list[dict], job: Optional[str]) -> list[str]:
    """Hosts already left out by earlier decisions of this job."""
    hosts: list[str] = []
    for e in events:
        if e["event"] == "restart" and e.get("attempt", {}).get("job") == job:
            hosts += [h for h in e.get("exclude", []) if h not in hosts]
    return hosts


def unavailable(host: str) -> bool:
    """SLURM says the node is down, drained or failing (best effort: False when scontrol cannot tell)."""
    import subprocess
    try:
        out = subprocess.run(["scontrol", "show", "node", host, "-o"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    state = next((f.split("=", 1)[1] for f in out.split() if f.startswith("State=")), "")
    return any(word in state.upper() for word in ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING"))


def partition_nodes() -> Optional[int]:
    """Nodes of this job's partition that are not down or drained (None when sinfo cannot tell)."""
    import subprocess
    partition = os.environ.get("SLURM_JOB_PARTITION")
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t", *(["-p", partition] if partition else [])],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
    return sum(not any(w in state for w in ("down", "drain", "fail")) for state in states.values())


def global_batch_allows(config: dict, ranks: int) -> bool:
    """Whether `ranks` ranks can train the run's fixed global batch (deepspeed.global_batch_size)."""
    global_batch = (config.get("deepspeed") or {}).get("global_batch_size")
    micro = (config.get("data") or {}).get("batch_size_per_gpu")
    return bool(global_batch and micro and ranks > 0 and global_batch % (micro * ranks) == 0)


def decide(events: list[dict], exit_code: int, attempt: int, max_restarts: int, job: Optional[str], nodes: int,
           tasks_per_node: int, config: dict, backoff_s: float, is_down=unavailable,
           usable_nodes=partition_nodes) -> dict:
    last = last_failure(events, exit_code)
    if attempt >= max_restarts:
        return {"action": "give_up", "reason": f"{attempt} restarts used (ESVIT_MAX_RESTARTS={max_restarts}); the "
                                               f"last attempt {last}"}
    excluded = excluded_hosts(events, job)
    counts = suspect_failures(events, job)
    newly = sorted(h for h, n in counts.items() if h not in excluded and (n >= 2 or is_down(h)))
    decision = {"action": "restart", "wait_s": min(MAX_BACKOFF_S, backoff_s * 2 ** attempt), "exclude": excluded}
    if newly:
        exclude = excluded + newly
        left = nodes - len(exclude)
        named = ", ".join(f"{h} (in {counts[h]} failure{'s' if counts[h] > 1 else ''}"
                          f"{'' if counts[h] > 1 else ', and SLURM reports it unavailable'})" for h in newly)
        if left >= 1 and global_batch_allows(config, left * tasks_per_node):
            decision.update(exclude=exclude, reason=f"the last attempt {last}; leaving out {named}: continuing on "
                                                    f"{left} node(s), the global batch kept (elastic resume)",
                            srun_args=f"--exclude={','.join(exclude)} --nodes={left} "
                                      f"--ntasks={left * tasks_per_node}")
            return decision
        why = ("the job has no other node" if left < 1 else
               f"{left * tasks_per_node} ranks cannot keep the run's global batch (set deepspeed.global_batch_size to "
               "one they divide to allow continuing on fewer nodes)")
        usable = usable_nodes()
        if usable is None or usable - len(exclude) >= nodes:
            return {"action": "requeue", "exclude": exclude, "reason": f"the last attempt {last}; leaving out "
                                                                      f"{named}: requeueing the job with it excluded ({why})"}
        decision["reason"] = (f"the last attempt {last}; {named} should be left out, but {why} and the partition has "
                              f"no other node to replace it ({usable} usable): restarting on the same nodes")
        return decision
    if excluded:
        left = nodes - len(excluded)
        decision["srun_args"] = f"--exclude={','.join(excluded)} --nodes={left} --ntasks={left * tasks_per_node}"
    decision["reason"] = f"the last attempt {last}"
    return decision


def last_failure(events: list[dict], exit_code: int) -> str:
    """The failed attempt in words: its exit code and, when a rank recorded it, what ended it."""
    words = {69: "lost a rank", 70: "hung", 1: "failed", 137: "a task was killed"}
    text = f"exited {exit_code}" + (f" ({words[exit_code]})" if exit_code in words else "")
    for e in reversed(events):
        if e["event"] in ("start", "resume", "restart"):
            break
        if e["event"] in FAILURES + ("failed",):
            suspects = ", ".join(f"rank {s['rank']} (host {s['host']})" for s in e.get("suspects", []))
            return text + f": {e['event']}" + (f", suspects {suspects}" if suspects else "") + \
                (f", {e['error']}" if e.get("error") else "")
    return text


def _slurm_shape() -> tuple[int, int]:
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    tasks = int(os.environ.get("SLURM_NTASKS") or nodes)
    return nodes, int(per_node) if per_node.isdigit() else max(1, tasks // nodes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--exit-code", type=int, required=True)
    parser.add_argument("--attempt", type=int, required=True, help="restarts done so far in this allocation")
    parser.add_argument("--max-restarts", type=int, required=True)
    args = parser.parse_args(argv)
    import yaml
    out = Path(args.output_dir)
    config = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else {}
    events = read_events(out)
    nodes, per_node = _slurm_shape()
    decision = decide(events, args.exit_code, args.attempt, args.max_restarts, os.environ.get("SLURM_JOB_ID"),
                      nodes, per_node, config or {}, float(os.environ.get("ESVIT_RESTART_BACKOFF_S", "10")))
    EventLog(out, rank=-1).record("restart" if decision["action"] == "restart" else decision["action"],
                                  action=decision["reason"], exit_code=args.exit_code,
                                  **{k: v for k, v in decision.items() if k not in ("action", "reason")})
    for key, value in decision.items():
        value = ",".join(value) if isinstance(value, list) else value
        print(f"{key}={shlex.quote(str(value))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
