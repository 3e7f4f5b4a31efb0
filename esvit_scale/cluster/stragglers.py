"""Slow ranks: every `every` steps the per-rank step times are gathered and compared.

The time a rank reports is its own work before the step's first collective (data wait + teacher and student
forwards): collectives make every rank's full step equally long, the wait landing on the fast ones. On a GPU
the forwards are timed with CUDA events, read when the report is due, so the loop never waits for the device.
"""
from __future__ import annotations

import logging
import socket
import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PATIENCE = 3          # reports in a row in which a rank is slow before the warning names it


class StragglerMonitor:
    def __init__(self, every: int, factor: float, rank: int, world_size: int, device: torch.device):
        self.every, self.factor, self.rank, self.world_size = every, factor, rank, world_size
        self.device = device
        self.enabled = every > 0 and world_size > 1
        self._host_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._steps = 0
        self._slow_streak = [0] * world_size
        self.hosts = self._gather_hosts() if self.enabled else []

    def _gather_hosts(self) -> list[str]:
        hosts: list[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        return [h or "?" for h in hosts]

    # ------------------------------------------------------------------ recording

    def add_host_time(self, seconds: float) -> None:
        """Time measured on the host (the data wait; on the CPU, the forwards too)."""
        self._host_seconds += seconds

    def forward_timer(self):
        """Context manager around the forwards: host time on the CPU, CUDA events on a GPU."""
        return _ForwardTimer(self)

    def step_done(self) -> None:
        self._steps += 1

    # ------------------------------------------------------------------ reporting

    def report(self, step: int) -> Optional[dict[str, float]]:
        """Collective every `every` steps (None otherwise): the scalars to log."""
        if not self.enabled or step % self.every or self._steps == 0:
            return None
        mine = self._host_seconds + sum(start.elapsed_time(end) / 1000 for start, end in self._events)
        mine /= self._steps
        times = torch.zeros(self.world_size, dtype=torch.float64,
                            device=self.device if self.device.type == "cuda" else "cpu")
        times[self.rank] = mine
        dist.all_reduce(times)
        self._host_seconds, self._events, self._steps = 0.0, [], 0
        return self._judge(step, times.cpu().tolist())

    def _judge(self, step: int, times: list[float]) -> dict[str, float]:
        median = statistics.median(times)
        slowest = max(range(self.world_size), key=lambda r: times[r])
        fastest = min(times)
        ratio = times[slowest] / median if median > 0 else 1.0
        log.info("step times (own work before the first collective, mean of the last %d steps): slowest rank %d "
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


class _ForwardTimer:
    def __init__(self, monitor: StragglerMonitor):
        self.monitor = monitor

    def __enter__(self):
        m = self.monitor
        if not m.enabled:
            return self
        if m.device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        m = self.monitor
        if not m.enabled:
            return False
        if m.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            m._events.append((self.start, end))
        else:
            m.add_host_time(time.perf_counter() - self.t0)
        return False
