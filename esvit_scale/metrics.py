"""Training output on rank 0: TensorBoard scalars, a JSON-lines file, and progress on the console
(a progress bar on a terminal, plain periodic lines otherwise, e.g. in a SLURM log)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("esvit_scale")


def drop_records_after(path: Path, step: int) -> int:
    """Remove the records of steps after `step` (logged by a run that crashed before its next checkpoint, about to
    be logged again) and any line cut short; returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def phase_split(scalars: dict[str, float]) -> str:
    """'1.23 s: data_wait 2%, teacher_forward 10%, ...' from a step's step_s and phase_s/<phase> scalars."""
    total = scalars["step_s"]
    parts = [f"{k[len('phase_s/'):]} {100 * v / max(total, 1e-12):.0f}%" for k, v in scalars.items()
             if k.startswith("phase_s/")]
    return f"{total:.3f} s: " + ", ".join(parts)


class MetricsLogger:
    """`start_step`: the step training starts from; records of later steps are dropped from metrics.jsonl and
    TensorBoard (purge_step), so that a resumed run holds one record per step."""

    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, log_every: int,
                 start_step: int = 0):
        self.enabled, self.log_every, self.total_steps = enabled, log_every, total_steps
        self.writer = self.jsonl = self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        out = Path(output_dir)
        dropped = drop_records_after(out / "metrics.jsonl", start_step)
        if dropped:
            log.info("dropped %d records after step %d from metrics.jsonl (they are logged again)", dropped, start_step)
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        self._redirect = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()       # log lines above the bar, not glued to its end
            self._redirect.__enter__()
        self._last_time = time.time()

    def step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", ips=f"{scalars.get('images_per_s', 0):.1f}",
                                 mfu=f"{100 * scalars.get('mfu', 0):.1f}%")
            self.bar.refresh()
        elif step % self.log_every == 0 or step == self.total_steps:
            terms = ", ".join(f"{k[:-5]} {v:.4f}" for k, v in scalars.items() if k.endswith("_loss"))
            log.info("step %d/%d  epoch %d  loss %.4f (%s)  lr %.2e  %.1f images/s  MFU %.1f%%", step,
                     self.total_steps, scalars["epoch"], scalars["loss"], terms, scalars["lr"],
                     scalars.get("images_per_s", 0.0), 100 * scalars.get("mfu", 0.0))
            if "step_s" in scalars:
                log.info("step %d phases: %s", step, phase_split(scalars))

    def scalar(self, key: str, value: float, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(key, value, step)
            self.jsonl.write(json.dumps({"step": step, key: value}) + "\n")

    def scalars(self, group: str, values: dict[str, float], step: int) -> None:
        """Named values of one concern (e.g. stragglers) as `group/name` in TensorBoard and one JSON line."""
        if self.enabled:
            for key, value in values.items():
                self.writer.add_scalar(f"{group}/{key}", value, step)
            self.jsonl.write(json.dumps({"step": step, group: values}) + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()
        self.writer.close()
        self.jsonl.close()
