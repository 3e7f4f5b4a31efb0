"""Slow ranks: every `every` steps the per-rank step times are gathered and compared.

The time a rank reports is its own work before the step's first collective, from the phases of the timed steps
(esvit_scale/step.py: data wait + teacher forward + student forward; the device is synchronised at each phase
edge there): collectives make every rank's full step equally long, the wait landing on the fast ones.
"""
from __future__ import annotations

import logging
import socket
import statistics
from typing import Optional

import torch

from esvit_scale.engine import collectives

log = logging.getLogger(__name__)

PATIENCE = 3          # reports in a row in which a rank is slow before the warning names it
OWN_WORK = ("data_wait", "teacher_forward", "student_forward")


class StragglerMonitor:
    def __init__(self, every: int, factor: float, rank: int, world_size: int, device: torch.device):
        self.every, self.factor, self.rank, self.world_size = every, factor, rank, world_size
        self.device = device
        self.enabled = every > 0 and world_size > 1
        self._samples: list[float] = []
        self._slow_streak = [0] * world_size
        self.hosts = self._gather_hosts() if self.enabled else []

    def _gather_hosts(self) -> list[str]:
        return [h or "?" for h in collectives.all_gather_object(socket.gethostname())]

    def record(self, phases: Optional[dict[str, float]]) -> None:
        """The phase seconds of a timed micro-batch (None when it was not timed)."""
        if self.enabled and phases is not None:
            self._samples.append(sum(phases[p] for p in OWN_WORK))

    # ------------------------------------------------------------------ reporting

    def report(self, step: int) -> Optional[dict[str, float]]:
        """Collective every `every` steps (None otherwise): the scalars to log."""
        if not self.enabled or step % self.every:
            return None
        mine = statistics.fmean(self._samples) if self._samples else 0.0
        times = torch.zeros(self.world_size, dtype=torch.float64,
                            device=self.device if self.device.type == "cuda" else "cpu")
        times[self.rank] = mine
        collectives.sum_over_ranks_(times)
        self._samples = []
        return self._judge(step, times.cpu().tolist())

    def _judge(self, step: int, times: list[float]) -> dict[str, float]:
        median = statistics.median(times)
        slowest = max(range(self.world_size), key=lambda r: times[r])
        fastest = min(times)
        ratio = times[slowest] / median if median > 0 else 1.0
        log.info("step times (own work before the first collective, mean of the timed steps of the last %d): "
                 "slowest rank %d "
                 "on %s %.3f s, median %.3f s, fastest %.3f s (spread %.0f%%)", self.every, slowest,
                 self.hosts[slowest], times[slowest], median, fastest,
                 100 * (times[slowest] - fastest) / max(fastest, 1e-12))
        for r, t in enumerate(times):
            slow = median > 0 and t > self.factor * median
            self._slow_streak[r] = self._slow_streak[r] + 1 if slow else 0
            if self._slow_streak[r] == PATIENCE or (self._slow_streak[r] > PATIENCE
                                                    and self._slow_streak[r] % (4 * PATIENCE) == 0):
                log.warning("straggler: rank %d on %s has been slower than %.2fx the median rank for %d reports in "
                            "a row (now %.3f s vs %.3f s per step): check that node (thermal throttling, a noisy "
                            "neighbour, a slow data path)", r, self.hosts[r], self.factor, self._slow_streak[r], t,
                            median)
        return {"slowest_rank": float(slowest), "slowest_s": times[slowest], "median_s": median,
                "fastest_s": fastest, "slowest_over_median": ratio}

