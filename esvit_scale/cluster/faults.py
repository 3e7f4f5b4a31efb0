"""Test-only faults, switched on by environment variables, so that tests and `bench chaos` can put a real process into
the states that operations must survive. Without the variables every function here returns at once.

    ESVIT_FAULT_PAUSE="PHASE:SECONDS"           sleep that long when the process reaches PHASE (start-up phases)
    ESVIT_FAULT_STALL="RANK:STEP[,...]"         that rank stops making progress before that optimizer step, for good
    ESVIT_FAULT_NAN="RANK:STEP[:persistent][,...]"   the loss of that rank at that step is not finite
    ESVIT_FAULT_SPIKE="STEP[:persistent][,...]"      the loss of every rank at that step is multiplied by 100
    ESVIT_FAULT_LOADER="LOADER[,...]"           that loader fails its start-up check (dali_gpu, dali_cpu; data/build.py)
    ESVIT_FAULT_KERNEL="OP[,...]"               that fused op's kernel returns wrong numbers (window_attention,
                                                region_matching; read by esvit_scale/ops/_ext.py's configure)

Steps count optimizer steps from 1, as metrics.jsonl does. A fault fires once (a replay of the step after a rewind
meets a healthy step: a transient fault), or with `persistent` at every pass through its step (a bad batch).
"Once" is per process, or per run when $ESVIT_FAULT_STATE_DIR names a folder: the faults fired are remembered there,
so a restarted or relaunched job does not meet them again (what `bench chaos` needs: a fault is one event).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

SPIKE_FACTOR = 100.0
_fired: set[str] = set()


def pause_point(phase: str) -> None:
    """$ESVIT_FAULT_PAUSE="PHASE:SECONDS" sleeps that long when this process reaches PHASE."""
    fault = os.environ.get("ESVIT_FAULT_PAUSE", "")
    name, _, seconds = fault.partition(":")
    if name == phase and seconds:
        log.warning("ESVIT_FAULT_PAUSE: pausing %s s at %s (test fault)", seconds, phase)
        time.sleep(float(seconds))


def _faults(variable: str) -> list[list[str]]:
    """The comma-separated entries of a fault variable, each split at ':'."""
    return [entry.strip().split(":") for entry in os.environ.get(variable, "").split(",") if entry.strip()]


def _fire(key: str, persistent: bool) -> bool:
    """Whether the fault `key` fires now: always if persistent, else the first time only."""
    if persistent:
        return True
    folder = os.environ.get("ESVIT_FAULT_STATE_DIR")
    if folder:
        marker = Path(folder) / key
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            with open(marker, "x"):
                return True
        except FileExistsError:
            return False
    if key in _fired:
        return False
    _fired.add(key)
    return True


def _matching(variable: str, rank: Optional[int], step: int) -> Optional[bool]:
    """None if no entry of `variable` names (rank, step); else whether that entry is persistent."""
    for entry in _faults(variable):
        fields = entry[1:] if rank is not None else entry
        if rank is not None and entry[0] != str(rank):
            continue
        if fields and fields[0] == str(step):
            return fields[1:2] == ["persistent"]
    return None


def stall_if_injected(rank: int, step: int) -> None:
    """$ESVIT_FAULT_STALL="RANK:STEP" makes that rank stop making progress before that step, for good."""
    if _matching("ESVIT_FAULT_STALL", rank, step) is not None and _fire(f"stall-r{rank}-s{step}", False):
        log.warning("ESVIT_FAULT_STALL: rank %d stalls before step %d (test fault)", rank, step)
        while True:
            time.sleep(3600)


def corrupt_loss(loss, rank: int, step: int):
    """The loss of optimizer step `step` on `rank`, made non-finite (ESVIT_FAULT_NAN) or 100 x larger
    (ESVIT_FAULT_SPIKE) where a fault says so; through the product, the gradients are corrupted too."""
    persistent = _matching("ESVIT_FAULT_NAN", rank, step)
    if persistent is not None and _fire(f"nan-r{rank}-s{step}", persistent):
        log.warning("ESVIT_FAULT_NAN: the loss of rank %d at step %d is made NaN (test fault%s)", rank, step,
                    ", persistent" if persistent else "")
        return loss * float("nan")
    persistent = _matching("ESVIT_FAULT_SPIKE", None, step)
    if persistent is not None and _fire(f"spike-r{rank}-s{step}", persistent):
        log.warning("ESVIT_FAULT_SPIKE: the loss at step %d is multiplied by %g (test fault%s)", step, SPIKE_FACTOR,
                    ", persistent" if persistent else "")
        return loss * SPIKE_FACTOR
    return loss


def kernel_faults() -> set[str]:
    """$ESVIT_FAULT_KERNEL: the fused ops ("window_attention", "region_matching") whose kernels are to be wrong."""
    return {entry[0] for entry in _faults("ESVIT_FAULT_KERNEL")}


def loader_faults() -> set[str]:
    """$ESVIT_FAULT_LOADER: the loaders ("dali_gpu", "dali_cpu") whose start-up check is to fail."""
    return {entry[0] for entry in _faults("ESVIT_FAULT_LOADER")}
