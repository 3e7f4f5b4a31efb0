"""Test-only faults, switched on by environment variables, so that tests can put a real process into the states
that operations must survive (a rank that stops making progress, a signal in the middle of a start-up phase).
Without the variables every function here returns at once."""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def pause_point(phase: str) -> None:
    """$ESVIT_FAULT_PAUSE="PHASE:SECONDS" sleeps that long when this process reaches PHASE."""
    fault = os.environ.get("ESVIT_FAULT_PAUSE", "")
    name, _, seconds = fault.partition(":")
    if name == phase and seconds:
        log.warning("ESVIT_FAULT_PAUSE: pausing %s s at %s (test fault)", seconds, phase)
        time.sleep(float(seconds))


def stall_if_injected(rank: int, step: int) -> None:
    """$ESVIT_FAULT_STALL="RANK:STEP" makes that rank stop making progress before that step, for good."""
    if os.environ.get("ESVIT_FAULT_STALL") == f"{rank}:{step}":
        log.warning("ESVIT_FAULT_STALL: rank %d stalls before step %d (test fault)", rank, step)
        while True:
            time.sleep(3600)
