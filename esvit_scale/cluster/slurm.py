"""What a SLURM job tells its tasks: ranks, the rendezvous host and port, and the time left."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from typing import Optional

log = logging.getLogger(__name__)


def in_slurm_job(env=os.environ) -> bool:
    return "SLURM_JOB_ID" in env


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: 'gpu[01-03,07],cpu5' -> gpu01 gpu02 gpu03 gpu07 cpu5.
    Zero padding is kept; several bracket groups in one name ('r[1-2]n[1-2]') are expanded in order."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            expanded = [literal + n for n in _expand_ranges(ranges)] if ranges else [literal]
            names = [prefix + part for prefix in names for part in expanded]
        hosts += [n for n in names if n]
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [i for i in items + [current] if i]


def _expand_ranges(ranges: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not hi:
            out.append(lo)
            continue
        width = len(lo)
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def rendezvous_from_slurm(env=os.environ) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) for a job's tasks: the first host of the job's node list, and a port derived from
    the job id, its requeue count and slurm/launch.sh's attempt (a requeued or restarted job gets a new one while the
    old sockets may linger); the same formula as slurm/job.sh's."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("SLURM_JOB_NODELIST is not set: cannot tell the rendezvous host of this job; "
                           "set MASTER_ADDR (the first node's address) and MASTER_PORT")
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise RuntimeError(f"SLURM_JOB_NODELIST={nodelist!r} names no host; set MASTER_ADDR and MASTER_PORT")
    job, requeues = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    return hosts[0], 20000 + (job * 7 + requeues * 16) % 20000 + int(env.get("ESVIT_ATTEMPT", "0") or 0)


def slurm_node_count(env=os.environ) -> int:
    for key in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 1


def parse_time_left(text: str) -> Optional[float]:
    """squeue's %L ('[days-][hours:]minutes:seconds', 'UNLIMITED', 'INVALID') -> seconds, None without a limit."""
    text = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if not m:
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def job_end_time(env=os.environ) -> Optional[float]:
    """The time (time.time() scale) at which SLURM ends this job, or None outside SLURM or without a limit."""
    if not in_slurm_job(env):
        return None
    if env.get("SLURM_JOB_END_TIME", "").isdigit():           # set by newer SLURM versions
        return float(env["SLURM_JOB_END_TIME"])
    try:
        out = subprocess.run(["squeue", "-h", "-j", env["SLURM_JOB_ID"], "-o", "%L"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not read the job's time left from squeue (%s): run.exit_before_end_minutes is off", e)
        return None
    left = parse_time_left(out.splitlines()[0] if out.strip() else "")
    return None if left is None else time.time() + left


def stop_deadline(margin_minutes: float) -> Optional[float]:
    """When to save and exit before the SLURM job's time limit (None outside SLURM, without a limit, or off)."""
    if margin_minutes <= 0:
        return None
    end = job_end_time()
    if end is None:
        return None
    deadline = end - 60 * margin_minutes
    log.info("the job ends at %s: saving and exiting for a requeue at %s (run.exit_before_end_minutes=%g)",
             time.strftime("%H:%M:%S", time.localtime(end)), time.strftime("%H:%M:%S", time.localtime(deadline)),
             margin_minutes)
    return deadline
