"""Training output on rank 0: TensorBoard scalars, a JSON-lines file, and progress on the console
(a progress bar on a terminal, plain periodic lines otherwise, e.g. in a SLURM log)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("esvit_scale")


def drop_records_after(path: Path, step: int) -> tuple[int, int]:
    """Remove the records of steps after `step` (logged by a run that crashed before its next checkpoint, or before a
    rewind, about to be logged again) and any line cut short; returns (lines dropped, the last step they had)."""
    if not path.is_file():
        return 0, step
    kept, dropped, last = [], 0, step
    for line in path.read_text().splitlines():
        try:
            logged = json.loads(line)["step"]
            keep = logged <= step
            last = max(last, logged)
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
    return dropped, last


def phase_split(scalars: dict[str, float]) -> str:
    """'1.23 s: data_wait 2%, teacher_forward 10%, ...' from a step's step_s and phase_s/<phase> scalars."""
    total = scalars["step_s"]
    parts = [f"{k[len('phase_s/'):]} {100 * v / max(total, 1e-12):.0f}%" for k, v in scalars.items()
             if k.startswith("phase_s/")]
    return f"{total:.3f} s: " + ", ".join(parts)


class MetricsLogger:
    """`start_step`: the step training starts from; records of later steps are dropped from metrics.jsonl and
    TensorBoard (purge_step), so that a resumed run holds one record per step. `last_logged` is the last step the
    files had before (the steps in between are recomputed); `rewind(step)` does the same inside a running run."""

    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, log_every: int,
                 start_step: int = 0):
        self.enabled, self.log_every, self.total_steps = enabled, log_every, total_steps
        self.out = Path(output_dir)
        self.writer = self.jsonl = self.bar = None
        self._redirect = None
        self.last_logged = start_step
        if enabled:
            self._open(start_step)

    def _open(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        dropped, self.last_logged = drop_records_after(self.out / "metrics.jsonl", start_step)
        if dropped:
            log.info("dropped %d records after step %d from metrics.jsonl (they are logged again)", dropped, start_step)
        self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=start_step + 1)
        self.jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)
        if sys.stderr.isatty() and self.bar is None:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self.bar = tqdm(total=self.total_steps, unit="step", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()       # log lines above the bar, not glued to its end
            self._redirect.__enter__()

    def rewind(self, step: int) -> None:
        """Training goes back to `step`: its later records go, as at a resume."""
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
            self._open(step)

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

    def skipped(self, step: int, details: dict) -> None:
        """A step whose batch was not trained on (recovery.py): one record, no loss."""
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, "time": time.time(), "skipped_batch": True, **details}) + "\n")
            self.writer.add_scalar("train/skipped_batch", 1.0, step)

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
            self.bar = None
        self.writer.close()
        self.jsonl.close()


def model_flops_and_peak(cfg, device) -> tuple[float, dict]:
    """Model FLOPs per image of a step (counted on the meta device) and the device's peak FLOP/s, for the MFU."""
    from esvit_scale.bench.flops import CONVENTION, step_flops
    from esvit_scale.bench.peak import device_peak
    per_image = step_flops(cfg).per_image
    peak = device_peak(device, cfg.deepspeed.precision)
    log.info("model FLOPs per image of a step: %.2f G (%s); peak per device %.2f TFLOP/s (%s): MFU is against it",
             per_image / 1e9, CONVENTION, peak["peak_flops"] / 1e12, peak["source"])
    return per_image, peak


class Throughput:
    """Images/s of each optimizer step, its model TFLOP/s per device and MFU, and its phase split when it was timed
    (seconds summed over its micro-batches, esvit_scale/step.py)."""

    def __init__(self, flops_per_image: float, peak_flops: float, world_size: int):
        self.flops_per_image, self.peak_flops, self.world_size = flops_per_image, peak_flops, world_size
        self.steps: list[tuple[int, float]] = []     # (images, seconds) of each optimizer step
        self._phases: dict[str, float] = {}
        self._images, self._start = 0, time.time()

    def micro_batch(self, images: int, phases: Optional[dict[str, float]]) -> None:
        self._images += images
        if phases is not None:
            self._phases = {p: self._phases.get(p, 0.0) + t for p, t in phases.items()}

    def end_step(self) -> dict[str, float]:
        """The scalars of the optimizer step that just ended; the next one starts now."""
        seconds = max(time.time() - self._start, 1e-9)
        ips = self._images / seconds
        self.steps.append((self._images, seconds))
        flops_per_s = ips / self.world_size * self.flops_per_image
        out = {"images_per_s": ips, "tflops_per_s": flops_per_s / 1e12, "mfu": flops_per_s / self.peak_flops}
        if self._phases:
            out.update(step_s=sum(self._phases.values()), **{f"phase_s/{p}": t for p, t in self._phases.items()})
        self.restart()
        return out

    def restart(self) -> None:
        """Forget the step in progress (after a rewind, a skipped batch or an evaluation)."""
        self._phases, self._images, self._start = {}, 0, time.time()

    def steady(self) -> dict:
        """For summary.json: images over wall time of the steps without the first quarter (start-up, JIT, worker
        spawn), everything between them included (loading, checkpoints, logging), and its MFU."""
        if not self.steps:
            return {"images_per_s": None}
        steady = self.steps[len(self.steps) // 4:] if len(self.steps) >= 4 else self.steps
        ips = sum(n for n, _ in steady) / sum(s for _, s in steady)
        return {"images_per_s": ips, "mfu": ips / self.world_size * self.flops_per_image / self.peak_flops}
