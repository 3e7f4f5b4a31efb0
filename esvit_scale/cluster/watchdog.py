"""Hung ranks and lost ranks.

HangWatchdog: a thread per rank; when no training step completes within the timeout, it logs why, dumps the
Python stacks of every thread to the log and ends the process with EXIT_HANG (so the job ends and the next one
resumes, instead of a hung collective burning the allocation). A second, C-level timer (faulthandler) does the
same a little later in case the interpreter itself is stuck.

PeerHeartbeats: every rank increments a counter in the rendezvous store every few seconds, with how far its training
has got (micro-batches started). When a collective fails or the watchdog fires, the counters that stopped moving
name the lost ranks and their hosts; in a hang, the ranks behind the others are the suspects.

RunGuard: both around the training loop, and what a failed collective means (a lost rank: exit 69). Every hang and
lost rank is also recorded in the run's events log (esvit_scale/events.py) with the suspects' ranks and hosts, which
the restart logic reads (cluster/restarts.py: a node named in two failures is left out).
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

from esvit_scale.cluster.signals import EXIT_HANG, EXIT_LOST_RANK, record_exit_status

log = logging.getLogger(__name__)

BACKSTOP_S = 120        # the C-level timer fires this much after the Python one


class HangWatchdog:
    def __init__(self, timeout_s: float, rank: int, diagnose: Optional[Callable[[], tuple[str, list]]] = None,
                 dump_dir: Optional[Path] = None, events=None):
        """diagnose() -> (what the other ranks are doing, in words; the suspects). dump_dir: where each rank also
        writes its stacks (hang_stacks_rank<R>.txt): in a shared log the dumps of all ranks arrive at once and
        interleave. events: the run's EventLog, which gets the hang."""
        self.timeout_s, self.rank, self.diagnose, self.dump_dir = timeout_s, rank, diagnose, dump_dir
        self.events = events
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
        suspects: list = []
        if self.diagnose is not None:
            try:
                text, suspects = self.diagnose()
                lines.append(text)
            except Exception as e:      # the explanation is best effort; the dump and exit must happen
                lines.append(f"(could not check the other ranks: {e})")
        if self.events is not None:
            self.events.record("hang", action=f"stacks dumped, exit {EXIT_HANG}", suspects=suspects,
                               timeout_minutes=round(minutes, 3), diagnosis=lines[-1])
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
        record_exit_status(EXIT_HANG, "hang")
        os._exit(EXIT_HANG)


class PeerHeartbeats:
    """A counter per rank in the rendezvous store (its own client connection), advanced by a thread, and the rank's
    progress (micro-batches started, `progress`), published with each beat."""

    PREFIX = "esvit/heartbeat"

    def __init__(self, rank: int, world_size: int, interval_s: float = 2.0):
        import torch.distributed as dist
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self.progress = 0
        from esvit_scale.engine.distributed import restart_prefix
        self.master = os.environ["MASTER_ADDR"]
        self.store = dist.PrefixStore(restart_prefix(), dist.TCPStore(
            self.master, int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timedelta(seconds=30)))
        self.store.set(f"{self.PREFIX}/host/{rank}", socket.gethostname())
        self._publish()
        self._stopped = threading.Event()
        threading.Thread(target=self._beat, name="esvit-heartbeat", daemon=True).start()

    def _publish(self) -> None:
        self.store.set(f"{self.PREFIX}/progress/{self.rank}", str(self.progress))
        self.store.add(f"{self.PREFIX}/beat/{self.rank}", 1)

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self._publish()
            except Exception:        # the store's host is gone; lost_peers() says so when asked
                return

    def close(self) -> None:
        self._stopped.set()

    def _counters(self) -> list[int]:
        return [self.store.add(f"{self.PREFIX}/beat/{r}", 0) for r in range(self.world_size)]

    def _host(self, r: int) -> str:
        try:
            return self.store.get(f"{self.PREFIX}/host/{r}").decode()
        except Exception:
            return "?"

    def lost_peers(self) -> list[dict]:
        """Ranks whose heartbeat stopped, as {"rank", "host"}; takes ~3 heartbeat intervals. The store's own host
        gone (rank 0's node, or the launcher's) is {"rank": 0, "host": MASTER_ADDR, "store": "unreachable"}."""
        try:
            before = self._counters()
            time.sleep(3 * self.interval_s)
            after = self._counters()
        except Exception as e:
            return [{"rank": 0, "host": self.master, "store": f"unreachable ({e})"}]
        return [{"rank": r, "host": self._host(r)} for r in range(self.world_size)
                if r != self.rank and after[r] == before[r]]

    def behind(self) -> list[dict]:
        """Ranks that have started fewer micro-batches than the furthest one, as {"rank", "host", "progress"}."""
        progress = [int(self.store.get(f"{self.PREFIX}/progress/{r}")) for r in range(self.world_size)]
        return [{"rank": r, "host": self._host(r), "progress": p, "furthest": max(progress)}
                for r, p in enumerate(progress) if p < max(progress)]

    def diagnose(self) -> tuple[str, list[dict]]:
        """(in words, the suspects): the lost ranks, or in a hang the ranks behind the others."""
        lost = self.lost_peers()
        if lost:
            return "lost: " + describe(lost), lost
        behind = self.behind()
        if behind:
            return ("every other rank's heartbeat is still advancing; behind the others (stuck before their next "
                    "micro-batch): " + describe(behind)), behind
        return "every other rank's heartbeat is still advancing, and every rank has started as many micro-batches", []


def describe(ranks: list[dict]) -> str:
    """'rank 1 (host gpu7), rank 3 (host gpu9)'."""
    return ", ".join(f"rank {r['rank']} (host {r['host']})" + (f" [store {r['store']}]" if "store" in r else "")
                     for r in ranks)


class RunGuard:
    """The hang watchdog and the peer heartbeats around the training loop (start() ... close()), and what a failed
    collective means: `watching()` turns it into EXIT_LOST_RANK when a peer's heartbeat stopped."""

    def __init__(self, hang_timeout_minutes: float, rank: int, world_size: int, output_dir: Path, events):
        self.hang_timeout_s, self.rank, self.world_size = hang_timeout_minutes * 60, rank, world_size
        self.output_dir, self.events = output_dir, events
        self.heartbeats: Optional[PeerHeartbeats] = None
        self.watchdog: Optional[HangWatchdog] = None

    def start(self) -> None:
        if self.world_size > 1:
            self.heartbeats = PeerHeartbeats(self.rank, self.world_size)
        if self.hang_timeout_s > 0:
            self.watchdog = HangWatchdog(self.hang_timeout_s, self.rank,
                                         self.heartbeats.diagnose if self.heartbeats else None,
                                         dump_dir=self.output_dir, events=self.events)
        self.kick()

    def kick(self) -> None:
        """A step completed (or a long phase starts): the hang timeout counts from now."""
        if self.watchdog:
            self.watchdog.kick()

    def started_micro_batch(self, count: int) -> None:
        if self.heartbeats:
            self.heartbeats.progress = count

    def paused(self):
        return self.watchdog.paused() if self.watchdog else contextlib.nullcontext()

    def close(self) -> None:
        """Both stop; kick() and paused() do nothing from now on."""
        if self.watchdog:
            self.watchdog.close()
        if self.heartbeats:
            self.heartbeats.close()
        self.watchdog = self.heartbeats = None

    @contextlib.contextmanager
    def watching(self, last_checkpoint: Callable[[], object]):
        """A failed collective whose peer stopped beating: the lost rank is named (log, events) and the process exits
        EXIT_LOST_RANK at once (the process group is broken: its destructors could hang). Any other error is
        recorded as the run's end (unless its raiser recorded it: `event_recorded`) and raised."""
        try:
            yield
        except Exception as e:
            lost = self.heartbeats.lost_peers() if self.heartbeats and isinstance(e, RuntimeError) else []
            first_line = (str(e).splitlines() or [type(e).__name__])[0][:300]
            if lost:
                log.error("rank %d: a collective failed (%s) and %s stopped responding. Exiting with %d: the job "
                          "restarts and resumes from the last complete checkpoint (%s).", self.rank, first_line,
                          describe(lost), EXIT_LOST_RANK, last_checkpoint() or "none")
                self.events.record("lost_rank", action=f"exit {EXIT_LOST_RANK}", suspects=lost, error=first_line)
                record_exit_status(EXIT_LOST_RANK, "lost " + describe(lost))
                logging.shutdown()
                os._exit(EXIT_LOST_RANK)
            if not getattr(e, "event_recorded", False):
                self.events.record("failed", action="the run ends with this error",
                                   error=f"{type(e).__name__}: {first_line}")
            raise
        finally:
            self.close()
