"""The run's events log, `<output_dir>/events.jsonl`: every fault met and what was done about it, one JSON line each.

    {"time": "2026-12-07T10:01:02Z", "unix": ..., "event": "nonfinite_loss", "rank": 0, "host": "gpu12", "step": 412,
     "action": "rewound to step400 and replayed", "steps_recomputed": 12, "attempt": {...}, ...details}

Written by whoever meets the event: the trainer's rank 0 (or the rank concerned: a hang, a lost peer), the restart
logic of slurm/launch.sh (cluster/restarts.py), so by several processes: each line is one append of one write(),
which POSIX keeps whole. `summary()` condenses the log for summary.json.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
ROUTINE = ("start", "resume", "finished")       # logged as information, not warnings
# what ended a process on purpose: a start after none of these means the previous attempt died without a word
ENDINGS = ("finished", "preempted", "lost_rank", "hang", "collective_failed", "gave_up", "failed")


def attempt() -> dict:
    """Which attempt of the run this process is: the SLURM job and its requeues, launch.sh's restarts inside the
    allocation, torchrun's restarts of its workers."""
    keys = {"job": "SLURM_JOB_ID", "requeue": "SLURM_RESTART_COUNT", "restart": "ESVIT_ATTEMPT",
            "torchrun_restart": "TORCHELASTIC_RESTART_COUNT"}
    return {k: os.environ[v] for k, v in keys.items() if os.environ.get(v)}


class EventLog:
    def __init__(self, output_dir: str | Path, rank: int = 0):
        self.path = Path(output_dir) / EVENTS_FILE
        self.rank, self.host = rank, socket.gethostname()

    def record(self, event: str, step: Optional[int] = None, action: str = "", **details) -> dict:
        """Append one event (any process, any rank); also logged as a warning. Never raises: a full disk must not
        turn the report of a fault into a second fault."""
        now = time.time()
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "unix": round(now, 3),
                 "event": event, "rank": self.rank, "host": self.host}
        if step is not None:
            entry["step"] = step
        entry.update(action=action, **details, attempt=attempt())
        level = logging.INFO if event in ROUTINE else logging.WARNING
        log.log(level, "event %s%s: %s%s", event, f" at step {step}" if step is not None else "", action,
                    "" if not details else " " + json.dumps(details, default=str)[:500])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(entry, default=str) + "\n").encode())
            finally:
                os.close(fd)
        except OSError as e:
            log.error("could not append to %s: %s", self.path, e)
        return entry


def read_events(output_dir: str | Path) -> list[dict]:
    """Every complete line of the log (a line cut short by a crash is left out)."""
    path = Path(output_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def previous_ending(events: list[dict]) -> Optional[str]:
    """How the last attempt before this one ended: its ending event, "unknown" when it started and logged no ending
    (killed outright, lost with its node), None when there was no attempt."""
    for e in reversed(events):
        if e["event"] in ENDINGS:
            return e["event"]
        if e["event"] in ("start", "resume"):
            return "unknown"
    return None


def summary(output_dir: str | Path) -> dict:
    """For summary.json: counts per kind, steps recomputed, batches skipped, and one line saying it all."""
    events = read_events(output_dir)
    counts = Counter(e["event"] for e in events if e["event"] not in ("start", "finished"))
    recomputed = sum(int(e.get("steps_recomputed") or 0) for e in events)
    skipped = sorted({e["step"] for e in events if e["event"] == "skipped_batch"})
    faults = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"
    line = (f"{sum(counts.values())} events ({faults}); {recomputed} steps recomputed; "
            f"{len(skipped)} batches skipped" + (f" (steps {', '.join(map(str, skipped))})" if skipped else ""))
    return {"line": line, "counts": dict(counts), "steps_recomputed": recomputed, "skipped_steps": skipped}
