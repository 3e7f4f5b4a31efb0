"""Faults in the numbers, recovered inside the running process: rewind and replay.

A step whose loss (the mean over ranks and micro-batches) is not finite, or is above `run.spike_factor` x the median
of the last `run.spike_window` step losses, is a fault. The run goes back to its newest usable checkpoint (student,
optimizer, teacher, both centres, loss history, data position and RNG streams: exactly the state it had there) and
replays the same micro-batches:
- the fault does not come back at that step: it was transient (a flaky device, a glitch); the rank and host where
  it showed are recorded and training goes on;
- it comes back: it is persistent (a bad batch, or weights gone wrong). The run rewinds once more and skips that
  step's micro-batches (no update, no EMA or centre move; the step counter, the schedules and the data position
  advance as if it had run). The skip is written to `<output_dir>/skipped_steps.json` with the samples' ids and
  files, and honoured by every later resume of the run. At the `run.max_rewinds`-th persistent fault the run stops
  with a message naming them all (that step is in the file too, so resuming the run by hand goes on past it).
  `run.max_rewinds: 0` turns rewinding off: a non-finite loss stops the run, a spike is only recorded.
Every decision goes to the events log (esvit_scale/events.py).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Optional

SKIPPED_FILE = "skipped_steps.json"
MIN_HISTORY = 10          # step losses needed before a spike can be judged


class LossWatch:
    """Which step losses are faults. The history (the last `window` losses) is training state: it is checkpointed
    (checkpoint.restore.TrainState.loss_history), so a rewind or resume judges exactly as the first pass did."""

    def __init__(self, spike_factor: float, window: int):
        self.spike_factor, self.window = spike_factor, window

    def judge(self, loss: float, history: list[float]) -> Optional[str]:
        if not math.isfinite(loss):
            return "nonfinite_loss"
        if self.spike_factor > 0 and len(history) >= min(self.window, MIN_HISTORY):
            if loss > self.spike_factor * statistics.median(history):
                return "loss_spike"
        return None

    def remember(self, history: list[float], loss: float) -> None:
        history.append(loss)
        del history[:-self.window]


class SkippedSteps:
    """Optimizer steps whose micro-batches a run does not train on, `<output_dir>/skipped_steps.json`:
    {"<step>": {"epoch", "samples", "files", "reason"}}. Written by rank 0 when a persistent fault is skipped; read by
    every rank at start. A person may add steps by hand (the run then skips them too)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / SKIPPED_FILE
        self.entries: dict[int, dict] = {}
        if self.path.is_file():
            try:
                self.entries = {int(k): v for k, v in json.loads(self.path.read_text()).items()}
            except (json.JSONDecodeError, ValueError, AttributeError) as e:
                raise ValueError(f"{self.path} is not a JSON object of step -> details: {e}") from None

    def __contains__(self, step: int) -> bool:
        return step in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, step: int, details: dict, write: bool) -> None:
        self.entries[step] = details
        if write:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({str(k): v for k, v in sorted(self.entries.items())}, indent=1))
            os.replace(tmp, self.path)


class Rewinds:
    """The policy: what a fault at a step means, given what this process has seen there before."""

    def __init__(self, max_rewinds: int, skipped: SkippedSteps):
        self.max_rewinds, self.skipped = max_rewinds, skipped
        self.suspects: dict[int, dict] = {}        # step -> the first event there, awaiting its replay

    @property
    def enabled(self) -> bool:
        return self.max_rewinds > 0

    def is_repeat(self, step: int) -> bool:
        """The fault at `step` was seen there before this replay: persistent."""
        return step in self.suspects

    def suspect(self, step: int, event: dict) -> None:
        self.suspects[step] = event

    def replayed(self, step: int) -> Optional[dict]:
        """`step` completed without a fault: if it was a suspect, its first event (now known to be transient)."""
        return self.suspects.pop(step, None)

    def exhausted(self) -> bool:
        """The persistent faults skipped so far (hand-written entries included) reach run.max_rewinds."""
        return len(self.skipped) >= self.max_rewinds


class Recovery:
    """The policy above, applied after each optimizer step, and its records. The rewind itself is the trainer's (it
    owns the parts); it calls `judge` with the step's agreed losses and, for a fault, rewinds and calls `rewound`.
    Every call is collective (the ranks judge the same reduced loss; `where` gathers the ranks' own losses)."""

    def __init__(self, run_cfg, output_dir: Path, events, is_main: bool, loader, store):
        self.watch = LossWatch(run_cfg.spike_factor, run_cfg.spike_window)
        self.rewinds = Rewinds(run_cfg.max_rewinds, SkippedSteps(output_dir))
        self.skipped = self.rewinds.skipped
        self.events, self.is_main, self.loader, self.store = events, is_main, loader, store

    def judge(self, state, values: dict[str, float], local_loss: float, accumulation: int) -> Optional[dict]:
        """None: the step is healthy; its loss joins the history, and a suspect step that replayed healthy is
        recorded as transient. A fault: its details; a repeated one has its batches skipped from now on (or stops
        the run: FloatingPointError); the caller rewinds."""
        loss = values["loss"]
        fault = self.watch.judge(loss, state.loss_history)
        if fault is None:
            first = self.rewinds.replayed(state.step)
            if first is not None:
                self._record("transient", state.step, action="not recurring on replay: training goes on",
                             fault=first["fault"], where=first["where"])
            self.watch.remember(state.loss_history, loss)
            return None
        details = {"fault": fault, "loss": loss, "where": where(fault, local_loss)}
        if state.loss_history:
            details["running_median"] = statistics.median(state.loss_history)
        losses = {k: v for k, v in values.items() if k == "loss" or k.endswith("_loss")}
        if not self.rewinds.enabled:
            if fault == "nonfinite_loss":
                self.give_up(state, losses, "run.max_rewinds=0: no rewind")
            self._record(fault, state.step, action="recorded (run.max_rewinds=0: no rewind)", **details)
            self.watch.remember(state.loss_history, loss)
            return None
        if self.rewinds.is_repeat(state.step):
            self._skip(state, accumulation, details)
            if self.rewinds.exhausted():
                self.give_up(state, losses, f"{len(self.skipped)} batches skipped, run.max_rewinds="
                                            f"{self.rewinds.max_rewinds}")
        else:
            self.rewinds.suspect(state.step, details)
        return {**details, "step": state.step, "epoch": state.epoch, "losses": losses}

    def rewound(self, fault: dict, target: Optional[Path], state) -> None:
        """After the trainer's rewind to `target` (None: there was no checkpoint), now at `state`."""
        details = {k: v for k, v in fault.items() if k not in ("step", "epoch", "losses")}
        if target is None:
            if fault["fault"] == "nonfinite_loss":
                self.give_up(state, fault["losses"], "no checkpoint to rewind to")
            self._record(fault["fault"], fault["step"], action="no checkpoint to rewind to: training goes on",
                         **details)
            return
        self._record(fault["fault"], fault["step"], action=f"rewound to {target.name} and replaying",
                     steps_recomputed=fault["step"] - state.step, **details)

    def _skip(self, state, accumulation: int, details: dict) -> None:
        """The fault came back at its step: its micro-batches (every rank's) are skipped from now on."""
        samples = self.loader.order.global_samples(state.epoch, state.batch_in_epoch - accumulation, accumulation)
        entry = {"epoch": state.epoch, "samples": [int(i) for i in samples],
                 "files": [self.loader.source.name(int(i)) for i in samples], "reason": f"persistent {details['fault']}"}
        self.skipped.add(state.step, entry, write=self.is_main)
        self._record("skipped_batch", state.step, action="persistent: rewinding again, its batches skipped from now "
                     "on", samples=entry["samples"], files=entry["files"][:20], **details)

    def give_up(self, state, losses: dict[str, float], why: str) -> None:
        """Stop the run: the checkpoint whose next loss was bad is marked REJECTED (never resumed from)."""
        loss = losses["loss"]
        last = self.store.reject(state.step - 1, f"the loss of step {state.step} is {loss}")
        skipped = ", ".join(f"step {s} ({e['reason']})" for s, e in sorted(self.skipped.entries.items()))
        self._record("gave_up", state.step, action=f"the run stops ({why})", skipped=skipped)
        error = FloatingPointError(
            f"loss is {'not finite' if not math.isfinite(loss) else 'spiking'} at epoch {state.epoch}, step "
            f"{state.step} ({', '.join(f'{k} {v}' for k, v in losses.items())}); {why}"
            f"{'; batches skipped: ' + skipped if skipped else ''}. Nothing was saved from this state. Last complete "
            f"checkpoint: {last or 'none'}. Lower optim.base_lr, or train in bf16/fp32.")
        error.event_recorded = True
        raise error

    def _record(self, event: str, step: int, **fields) -> None:
        if self.is_main:
            self.events.record(event, step, **fields)


def where(fault: str, local_loss: float) -> list[dict]:
    """Collective: the ranks (and hosts) where a fault shows: a non-finite local loss, or the largest one."""
    import socket

    from esvit_scale.engine import collectives
    every = collectives.all_gather_object((socket.gethostname(), local_loss))
    if fault == "nonfinite_loss":
        ranks = [r for r, (_, v) in enumerate(every) if not math.isfinite(v)]
    else:
        ranks = [max(range(len(every)), key=lambda r: every[r][1])]
    return [{"rank": r, "host": every[r][0], "loss": every[r][1]} for r in ranks]
