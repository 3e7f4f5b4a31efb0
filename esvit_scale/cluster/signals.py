"""The stop request: SIGTERM / SIGUSR1 (preemption, SLURM's pre-timeout signal) or the job's time limit.

Honoured from the first moment of the process, in two phases:
- start-up (until the first training step starts): nothing new exists that a save could keep, so a stop signal
  ends the process at once with EXIT_PREEMPTED, even while the main thread is blocked in C code (rendezvous,
  DeepSpeed initialisation, a JIT build): a thread woken through `signal.set_wakeup_fd` does it. Writes that must
  not be cut short run inside `critical()`, which defers the exit to their end.
- training: a signal only sets the flag; the loop reads it at the next optimizer step (every rank agrees through
  the step's all-reduce), saves, and the process exits with EXIT_PREEMPTED.
Once the run has finished or saved, further signals are ignored, so a second SIGTERM cannot kill a process that
is already on its way out with its state saved (Python restores the default handlers while it shuts down).

Every rank that exits with EXIT_PREEMPTED appends a line to $ESVIT_EXIT_STATUS_FILE when that is set: a launcher
that reports its own exit status (torchrun exits 1 when its workers exit 75) is read through it by
slurm/launch.sh, which also waits for the process ids listed in $ESVIT_EXIT_STATUS_FILE.pids (torchrun starts each
worker in a session of its own, so a process group does not find workers that outlive a killed torchrun).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75      # EX_TEMPFAIL: stopped by a signal or before the time limit, state saved: run it again
EXIT_LOST_RANK = 69      # EX_UNAVAILABLE: another rank died; resubmit to resume from the last complete checkpoint
EXIT_HANG = 70           # EX_SOFTWARE: no step completed within run.hang_timeout_minutes; stacks are in the log

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Process-wide; `install()` it first thing in the main thread."""

    def __init__(self):
        self.signum = 0
        self.deadline: Optional[float] = None      # time.time() at which to stop (the job's end minus a margin)
        self._startup = True
        self._critical = 0
        self._lock = threading.Lock()
        self._installed = False
        self._startup_exit_code: Optional[int] = None     # set once the process is only waiting to exit

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        # forked children (DataLoader workers) keep our handlers, which only set their own flag, but must not
        # write into our pipe: a worker terminated by its DataLoader would read here as a signal to us
        os.register_at_fork(after_in_child=_forget_wakeup_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="esvit-stop-signal", daemon=True).start()
        _die_with_launcher()
        _register_with_launcher()
        self._installed = True
        return self

    # ------------------------------------------------------------------ reading it

    @property
    def requested(self) -> bool:
        return self.signum != 0 or (self.deadline is not None and time.time() >= self.deadline)

    def reason(self) -> str:
        if self.signum:
            return f"signal {signal.Signals(self.signum).name}"
        if self.deadline is not None and time.time() >= self.deadline:
            return "the job's time limit is near (run.exit_before_end_minutes)"
        return "asked by another rank"

    @property
    def in_startup(self) -> bool:
        return self._startup

    # ------------------------------------------------------------------ phases

    def training_started(self) -> None:
        """From now on a signal is read at the next step boundary instead of ending the process."""
        with self._lock:
            self._startup = False

    def finished(self) -> None:
        """The run has ended or saved: later signals are ignored while the process exits."""
        if self._installed:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    @contextlib.contextmanager
    def critical(self):
        """A start-up write that must not be cut in half: a stop signal waits for its end."""
        with self._lock:
            self._critical += 1
        try:
            yield
        finally:
            with self._lock:
                self._critical -= 1
                exit_now = self._critical == 0 and self._startup and self.signum
            if exit_now:
                self.exit_during_startup()

    # ------------------------------------------------------------------ internals

    def _on_signal(self, signum, frame) -> None:      # main thread, between bytecodes
        self.signum = self.signum or signum

    def _watch(self, read_fd: int) -> None:           # woken by the C-level handler, whatever the main thread does
        while True:
            data = os.read(read_fd, 64)
            received = [s for s in data if s in STOP_SIGNALS]
            if not received:
                continue
            self.signum = self.signum or received[0]
            with self._lock:
                exit_now = self._startup and self._critical == 0
            if exit_now:
                self.exit_during_startup()

    def exit_quietly_on_signal(self, code: int) -> None:
        """The process has nothing left to do but exit with `code`: a stop signal now ends it with that code."""
        self._startup_exit_code = code

    def exit_during_startup(self) -> None:
        if self._startup_exit_code is not None:
            os._exit(self._startup_exit_code)
        name = signal.Signals(self.signum).name
        sys.stderr.write(f"esvit_scale: {name} during start-up: nothing to save yet; exiting with "
                         f"{EXIT_PREEMPTED} so that the job is run again\n")
        record_exit_status(EXIT_PREEMPTED, f"{name} during start-up")
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)


def record_exit_status(code: int, what: str) -> None:
    """One line per exiting rank in $ESVIT_EXIT_STATUS_FILE (see slurm/launch.sh)."""
    path = os.environ.get("ESVIT_EXIT_STATUS_FILE")
    if not path:
        return
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    line = f"{code} rank={rank} world_size={world} {what}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as e:
        sys.stderr.write(f"esvit_scale: could not record the exit status in {path}: {e}\n")


def _register_with_launcher() -> None:
    path = os.environ.get("ESVIT_EXIT_STATUS_FILE")
    if path:
        with open(path + ".pids", "a") as f:
            f.write(f"{os.getpid()}\n")


def _forget_wakeup_fd() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:        # forked from a thread other than the main one: nothing was inherited there
        pass


def _die_with_launcher() -> None:
    """Under torchrun, a launcher killed outright (SIGUSR1's default action, SIGKILL) would leave its workers
    training with no parent: ask the kernel for SIGTERM when the parent dies, which saves and exits like any
    preemption."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): workers may outlive a killed launcher",
                    ctypes.get_errno())
    elif parent == 1 or os.getppid() != parent:     # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
