"""Hung ranks and lost ranks.

HangWatchdog: a thread per rank; when no training step completes within the timeout, it logs why, dumps the
Python stacks of every thread to the log and ends the process with EXIT_HANG (so the job ends and the next one
resumes, instead of a hung collective burning the allocation). A second, C-level timer (faulthandler) does the
same a little later in case the interpreter itself is stuck.

PeerHeartbeats: every rank increments a counter in the rendezvous store every few seconds. When a collective
fails or the watchdog fires, the counters that stopped moving name the lost ranks and their hosts.
"""
from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

from esvit_scale.cluster.signals import EXIT_HANG

log = logging.getLogger(__name__)

BACKSTOP_S = 120        # the C-level timer fires this much after the Python one


class HangWatchdog:
    def __init__(self, timeout_s: float, rank: int, explain: Optional[Callable[[], str]] = None,
                 dump_dir: Optional[Path] = None):
        """dump_dir: where each rank also writes its stacks (hang_stacks_rank<R>.txt): in a shared log the dumps of
        all ranks arrive at once and interleave."""
        self.timeout_s, self.rank, self.explain, self.dump_dir = timeout_s, rank, explain, dump_dir
        self._deadline: Optional[float] = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esvit-hang-watchdog", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """A step completed (or a long phase starts): the timeout counts from now."""
        with self._lock:
            self._deadline = time.monotonic() + self.timeout_s
        faulthandler.dump_traceback_later(self.timeout_s + BACKSTOP_S, exit=True, file=sys.stderr)

    @contextlib.contextmanager
    def paused(self):
        """For work with no step in it that may legitimately take longer (the k-NN evaluation)."""
        with self._lock:
            self._deadline = None
        faulthandler.cancel_dump_traceback_later()
        try:
            yield
        finally:
            self.kick()

    def close(self) -> None:
        self._stopped.set()
        faulthandler.cancel_dump_traceback_later()

    def _run(self) -> None:
        poll = max(0.2, min(5.0, self.timeout_s / 20))
        while not self._stopped.wait(poll):
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
            if late:
                self._fire()

    def _fire(self) -> None:
        minutes = self.timeout_s / 60
        lines = [f"hang watchdog: rank {self.rank} on {socket.gethostname()} completed no training step in "
                 f"{minutes:.2f} min (run.hang_timeout_minutes); exiting with {EXIT_HANG} so that the job ends "
                 f"and the next one resumes from the last complete checkpoint."]
        if self.explain is not None:
            try:
                lines.append(self.explain())
            except Exception as e:      # the explanation is best effort; the dump and exit must happen
                lines.append(f"(could not check the other ranks: {e})")
        dump = self.dump_dir / f"hang_stacks_rank{self.rank}.txt" if self.dump_dir else None
        lines.append(f"Python stacks of rank {self.rank}, every thread" + (f" (also in {dump})" if dump else "") + ":")
        log.error("\n".join(lines))
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        if dump is not None:
            try:
                with open(dump, "w") as f:
                    f.write("\n".join(lines) + "\n")
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
            except OSError as e:
                log.error("could not write %s: %s", dump, e)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HANG)


class PeerHeartbeats:
    """A counter per rank in the rendezvous store (its own client connection), advanced by a thread."""

    PREFIX = "esvit/heartbeat"

    def __init__(self, rank: int, world_size: int, interval_s: float = 2.0):
        import torch.distributed as dist
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self.master = os.environ["MASTER_ADDR"]
        self.store = dist.TCPStore(self.master, int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                                   timeout=timedelta(seconds=30))
        self.store.set(f"{self.PREFIX}/host/{rank}", socket.gethostname())
        self.store.add(f"{self.PREFIX}/beat/{rank}", 1)
        self._stopped = threading.Event()
        threading.Thread(target=self._beat, name="esvit-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        key = f"{self.PREFIX}/beat/{self.rank}"
        while not self._stopped.wait(self.interval_s):
            try:
                self.store.add(key, 1)
            except Exception:        # the store's host is gone; lost_peers() says so when asked
                return

    def close(self) -> None:
        self._stopped.set()

    def _counters(self) -> list[int]:
        return [self.store.add(f"{self.PREFIX}/beat/{r}", 0) for r in range(self.world_size)]

    def lost_peers(self) -> list[str]:
        """Ranks whose heartbeat stopped, as 'rank R (host H)'; takes ~3 heartbeat intervals."""
        try:
            before = self._counters()
            time.sleep(3 * self.interval_s)
            after = self._counters()
        except Exception as e:
            return [f"rank 0's rendezvous store at {self.master} is unreachable ({e}): the node hosting it "
                    f"(rank 0, or the launcher) is lost"]
        lost = []
        for r in range(self.world_size):
            if r != self.rank and after[r] == before[r]:
                try:
                    host = self.store.get(f"{self.PREFIX}/host/{r}").decode()
                except Exception:
                    host = "?"
                lost.append(f"rank {r} (host {host})")
        return lost

    def explain(self) -> str:
        lost = self.lost_peers()
        return ("lost: " + ", ".join(lost)) if lost else "every other rank's heartbeat is still advancing"

