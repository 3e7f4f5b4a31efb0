"""The EsViT training loop: config -> data, parts (student engine, EMA teacher, loss), schedules -> steps.

One optimizer step (esvit_scale/step.py, in timed phases):
    teacher sees the 2 global crops, the student all crops -> EsViT loss -> backward -> DeepSpeed step
    -> teacher EMA update.
Checkpoints are written every `run.checkpoint_every_steps` and at every epoch end; a run resumes from the newest
usable one in its output folder (esvit_scale/checkpoint). A non-finite or spiking loss rewinds the run to that
checkpoint inside this process and replays the same batches (esvit_scale/recovery.py). SIGTERM/SIGUSR1, or the SLURM
job's time limit drawing near, make it save at the next step and stop; a hang or a lost rank ends the process for
the job to restart it (esvit_scale/cluster). Every fault and what was done about it goes to
<output_dir>/events.jsonl (esvit_scale/events.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from esvit_scale.checkpoint.files import CheckpointError
from esvit_scale.checkpoint.restore import (TrainState, check_same_experiment, choose_checkpoint, initialise_from,
                                            load_into, run_layout)
from esvit_scale.checkpoint.store import CheckpointStore
from esvit_scale.cluster.faults import pause_point, stall_if_injected
from esvit_scale.cluster.signals import EXIT_PREEMPTED, StopRequest
from esvit_scale.cluster.slurm import stop_deadline
from esvit_scale.config import Config
from esvit_scale.engine import collectives
from esvit_scale.engine.distributed import init_distributed, resolve_device, set_cpu_threads
from esvit_scale.engine.student import batch_split
from esvit_scale.eval.during_training import Preempted
from esvit_scale.events import EventLog, previous_ending, read_events

log = logging.getLogger("esvit_scale")

MAX_FAILED_SAVES = 3       # saves in a row that may fail (a full disk) while training goes on


class Rewound(Exception):
    """The run went back to a checkpoint (recovery.py): the loop starts again from the restored position."""


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", force=True)


class Trainer:
    def __init__(self, cfg: Config, stop: Optional[StopRequest] = None):
        from esvit_scale import ops
        from esvit_scale.cluster.stragglers import StragglerMonitor
        from esvit_scale.cluster.watchdog import RunGuard
        from esvit_scale.data.build import build_loader
        from esvit_scale.data.digits import quickstart_paths
        from esvit_scale.data.source import open_source_collectively
        from esvit_scale.eval.during_training import TeacherProbe
        from esvit_scale.losses.monitors import CollapseWatch
        from esvit_scale.metrics import MetricsLogger, Throughput, model_flops_and_peak
        from esvit_scale.recovery import Recovery
        from esvit_scale.schedules import build_schedules
        from esvit_scale.step import TrainStep

        self.cfg, run = cfg, cfg.run
        self.stop = stop or StopRequest().install()
        device = resolve_device(run.device)
        self.dist = init_distributed(device, run.dist_timeout_minutes)
        setup_logging(self.dist.rank)
        if device == "cpu":
            log.info("CPU threads per process: %s", set_cpu_threads(run.cpu_threads, cfg.data.num_workers))
        self.out, main = Path(run.output_dir), self.dist.is_main
        self.events = EventLog(self.out, self.dist.rank)
        self.split = batch_split(cfg, self.dist.world_size)
        check_same_experiment(self.out, cfg)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            with self.stop.critical():
                (self.out / "config.yaml").write_text(cfg.to_yaml())
            self.stop.deadline = stop_deadline(run.exit_before_end_minutes)
        ops.configure(cfg.kernels)

        # ---- data and schedules
        train_path, knn_train, knn_val = quickstart_paths(cfg)      # data.path, or the quickstart's digits
        self.loader = build_loader(cfg.data, open_source_collectively(train_path), self.dist.rank,
                                   self.dist.world_size, run.seed, device)
        self.steps_per_epoch = len(self.loader) // self.split.accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has {len(self.loader)} batches per rank, fewer than "
                             f"{self.split.accumulation} accumulation steps")
        self.batches_per_epoch = self.steps_per_epoch * self.split.accumulation
        self.sched = build_schedules(cfg, self.split.global_batch, self.steps_per_epoch)
        self.total_steps = (run.stop_epoch or cfg.optim.epochs) * self.steps_per_epoch
        if run.max_steps:
            self.total_steps = min(self.total_steps, run.max_steps)

        # ---- the parts, put where the run starts
        pause_point("build")
        self.layout = run_layout(cfg, self.split)
        self.store = CheckpointStore(run.output_dir, run.keep_checkpoints, self.layout, run.async_checkpoint)
        self._recorded_damage: set[str] = set()
        self.parts, self.state, resumed_from = self._start()
        self.train_step = TrainStep(self.parts, self.sched, self.dist.device)

        # ---- recovery, monitoring, output
        self.recovery = Recovery(run, self.out, self.events, main, self.loader, self.store)
        self.guard = RunGuard(run.hang_timeout_minutes, self.dist.rank, self.dist.world_size, self.out, self.events)
        self.probe = TeacherProbe(cfg, self.parts.teacher, knn_train, knn_val, self.dist.device,
                                  self.parts.input_dtype, lambda: not self.stop.in_startup and self.stop.requested)
        flops_per_image, self.peak = model_flops_and_peak(cfg, self.dist.device)
        self.throughput = Throughput(flops_per_image, self.peak["peak_flops"], self.dist.world_size)
        self.stragglers = StragglerMonitor(run.straggler_every_steps, run.straggler_factor, self.dist.rank,
                                           self.dist.world_size, self.dist.device)
        self.collapse = CollapseWatch(cfg.model.out_dim, self.parts.teacher.module.backbone.num_features)
        self.metrics = MetricsLogger(self.out, main, self.total_steps, run.log_every_steps, start_step=self.state.step)
        self.saved_at = self.state.step if resumed_from else -1
        self.failed_saves = 0
        self.micro_batches_started = 0
        self.health: Optional[dict] = None
        self.last_loss: Optional[float] = None
        if main:
            self._record_start(resumed_from)

    # ------------------------------------------------------------------ start-up

    def _start(self):
        """Build the parts and put them where the run starts: resumed from the newest usable checkpoint, initialised
        from run.init_from, or afresh. Returns (parts, position, the checkpoint resumed from or None)."""
        from esvit_scale.engine.build import assemble, build_loss, build_models
        cfg = self.cfg
        choice = choose_checkpoint(self.store, self.layout)
        self._record_damage()
        init_from = choice is None and bool(cfg.run.init_from)
        student, teacher = build_models(cfg, self.dist.world_size, whole=init_from)
        loss_fn = build_loss(cfg, self.split)
        state = TrainState()
        if init_from:                   # full weights into the modules, before DeepSpeed wraps them
            state = initialise_from(Path(cfg.run.init_from), student, teacher, loss_fn, self.layout)
        parts = assemble(cfg, student, teacher, loss_fn, self.split, self.dist.device, copy_teacher=not init_from,
                         rank=self.dist.rank)
        if choice is None:
            return parts, state, None
        path, kind = choice
        return parts, load_into(path, parts, kind, self.layout), path

    def _record_start(self, resumed_from: Optional[Path]) -> None:
        ending = previous_ending(read_events(self.out))
        if resumed_from is None:
            self.events.record("start", self.state.step, action="training starts", source=(
                "init_from" if self.cfg.run.init_from else "fresh"), previous_ending=ending)
            return
        recomputed = max(0, self.metrics.last_logged - self.state.step)
        self.events.record("resume", self.state.step, action=f"resumed from {resumed_from.name}",
                           checkpoint=str(resumed_from), previous_ending=ending or "unknown",
                           steps_recomputed=recomputed)

    def _record_damage(self) -> None:
        """Damaged checkpoints the store met (skipped, an older one used), once each in the events log."""
        for tag, problem in self.store.bad.items():
            if tag not in self._recorded_damage and self.dist.is_main:
                self.events.record("checkpoint_damaged", action="skipped; an older checkpoint is used", checkpoint=tag,
                                   problem=problem)
            self._recorded_damage.add(tag)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        self.evaluate_at_initialisation()
        log.info("training: %d steps per epoch, global batch %d (%d per rank x %d ranks x %d accumulation), "
                 "%d steps to go", self.steps_per_epoch, self.split.global_batch, self.split.micro,
                 self.split.world_size, self.split.accumulation, self.total_steps - self.state.step)
        self.stop.training_started()
        self.guard.start()
        with self.guard.watching(self.store.last_good):
            try:
                preempted = self.train_until_done()
            except Preempted:
                preempted = True
            self.store.finish()               # an asynchronous save completes before the run ends
        self.metrics.close()
        return self.finish(preempted)

    def train_until_done(self) -> bool:
        """Epoch after epoch until the schedule (or run.max_steps) is done; True if stopped by a signal."""
        while self.state.epoch < self.cfg.optim.epochs and self.state.step < self.total_steps:
            try:
                if self.train_epoch():
                    return True
            except Rewound:
                continue
            if self.state.batch_in_epoch == self.batches_per_epoch:     # the epoch is complete
                self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
                self.report_data(self.state.epoch - 1)
                self.save_once()
                self.knn_during_training()
        self.save_once(final=True)
        return False

    def train_epoch(self) -> bool:
        """Steps through the current epoch from the saved position; True if stopped by a signal."""
        state, accum = self.state, self.split.accumulation
        sums: dict[str, torch.Tensor] = {}
        skip = False
        batches = self.train_step.batches(self.loader.epoch(state.epoch, state.batch_in_epoch))
        try:
            for crops in batches:
                stall_if_injected(self.dist.rank, state.step + 1)
                self.micro_batches_started += 1
                self.guard.started_micro_batch(self.micro_batches_started)
                if state.batch_in_epoch % accum == 0:            # the first micro-batch of an optimizer step
                    skip = state.step + 1 in self.recovery.skipped
                    self.set_hyperparameters(state.epoch)
                    # every run.log_every_steps, and the first step of a run: the readings at initialisation
                    self.parts.loss_fn.monitor = (state.step + 1) % self.cfg.run.log_every_steps == 0 or state.step == 0
                boundary = (state.batch_in_epoch + 1) % accum == 0
                if not skip:
                    losses, phases = self.train_step.run(crops, state.epoch, state.step, boundary,
                                                         timing=self.timed())
                    self.stragglers.record(phases)
                    self.throughput.micro_batch(crops[0].shape[0] * self.dist.world_size, phases)
                    for name, value in losses.items():  # the loss, every term's, and the readings of log steps
                        sums[name] = sums.get(name, 0.0) + value.detach().float().cpu()
                state.batch_in_epoch += 1
                if not boundary:
                    continue
                state.step += 1                          # ---- optimizer step boundary (the EMA update ran)
                if self.end_step(sums, skipped=skip):
                    return True
                sums = {}
                if state.step >= self.total_steps or state.batch_in_epoch >= self.batches_per_epoch:
                    break
        finally:
            batches.close()
        return False

    def end_step(self, sums: dict[str, torch.Tensor], skipped: bool) -> bool:
        """Collective, after each optimizer step: agree on its losses and on a stop request, judge the loss (a
        fault rewinds: Rewound, recovery.py), log, save when due. True when the run stops here for a signal."""
        state = self.state
        if skipped:
            stop = collectives.any_rank(self.stop.requested)
            self.metrics.skipped(state.step, {"reason": "skipped_steps.json"})
            self.throughput.restart()
        else:
            names = sorted(sums)
            local = torch.stack([sums[n] for n in names]) / self.split.accumulation
            reduced = collectives.mean_over_ranks(torch.cat([local, torch.tensor([float(self.stop.requested)])]))
            values = dict(zip(names, reduced[:-1].tolist()))
            stop = bool(reduced[-1] > 0)
            fault = self.recovery.judge(state, values, float(local[names.index("loss")]), self.split.accumulation)
            if fault is not None:
                target = self.rewind()
                self.recovery.rewound(fault, target, self.state)
                if target is not None:
                    raise Rewound
            self.log_step(values)
        self.guard.kick()
        if stop:
            log.warning("stop requested (here: %s; the ranks agree at each step): saving at step %d and exiting "
                        "with %d", self.stop.reason(), state.step, EXIT_PREEMPTED)
            self.save_once(final=True)
            if self.dist.is_main:
                self.events.record("preempted", state.step, action=f"saved, exit {EXIT_PREEMPTED}",
                                   reason=self.stop.reason())
            return True
        every = self.cfg.run.checkpoint_every_steps
        if every and state.step % every == 0:
            self.save_once()
        return False

    def rewind(self) -> Optional[Path]:
        """Collective: back to the newest usable checkpoint inside this process (the parts are loaded in place; a
        non-finite or spiking loss, recovery.py); None when there is none."""
        self.complete_pending_save()
        choice = choose_checkpoint(self.store, self.layout)
        self._record_damage()
        if choice is None:
            return None
        path, kind = choice
        self.state = load_into(path, self.parts, kind, self.layout)
        self.saved_at = self.state.step
        self.metrics.rewind(self.state.step)
        self.throughput.restart()
        return path

    # ------------------------------------------------------------------ pieces of a step

    def set_hyperparameters(self, epoch: int) -> None:
        self.train_step.set_hyperparameters(self.state.step,
                                            freeze_last_layer=epoch < self.cfg.optim.freeze_last_layer)

    def timed(self) -> bool:
        """Phases are timed (device-synchronised) only in the optimizer steps whose metrics are logged, and in
        those that close a straggler report's window."""
        step, run = self.state.step + 1, self.cfg.run
        return step % run.log_every_steps == 0 or bool(run.straggler_every_steps and
                                                       step % run.straggler_every_steps == 0)

    def log_step(self, values: dict[str, float]) -> None:
        i, epoch = self.state.step - 1, self.state.epoch
        self.metrics.step(self.state.step, {
            **values, "epoch": epoch,
            "lr": float(self.sched.lr[i]), "weight_decay": float(self.sched.weight_decay[i]),
            "momentum": float(self.sched.momentum[i]), "teacher_temp": float(self.sched.teacher_temp[epoch]),
            **self.throughput.end_step()})
        self.last_loss = values["loss"]
        if "view_teacher_entropy" in values:                 # a monitored step
            self.health = {k: v for k, v in values.items() if k != "loss" and not k.endswith("_loss")}
            self.collapse.update(self.health, self.state.step)
        slow = self.stragglers.report(self.state.step)
        if slow is not None:
            self.metrics.scalars("stragglers", slow, self.state.step)

    def client_state(self) -> dict:
        return {"train_state": dataclasses.asdict(self.state), "loss": self.parts.loss_fn.state_dict(),
                "config": self.cfg.to_dict()}

    def save(self) -> Path:
        path = self.store.save(self.state.step, self.parts, self.client_state())
        log.info("saved checkpoint %s", path)
        return path

    def save_once(self, final: bool = False) -> None:
        """Save the current step unless it is saved already. A failed save (a full disk) is recorded and training
        goes on with the previous checkpoint, up to MAX_FAILED_SAVES in a row; a `final` one (the end of the run, a
        stop) raises."""
        if self.saved_at == self.state.step:
            return
        self.guard.kick()                   # a save has the whole hang timeout to itself
        try:
            self.complete_pending_save()
            try:
                self.save()
            except CheckpointError as e:
                self._save_failed(e, final)
                return
            self.failed_saves = 0
            self.saved_at = self.state.step
        finally:
            self.guard.kick()

    def complete_pending_save(self) -> None:
        """The asynchronous save in flight (if any) completed; if it failed, that is recorded as a failed save."""
        try:
            self.store.finish()
        except CheckpointError as e:
            self._save_failed(e, final=False)

    def _save_failed(self, error: CheckpointError, final: bool) -> None:
        self.failed_saves += 1
        if final or self.failed_saves >= MAX_FAILED_SAVES:
            raise error
        if self.dist.is_main:
            self.events.record("save_failed", self.state.step, action="training goes on; resumable from "
                               f"{self.store.last_good() or 'none'}", error=str(error)[:500],
                               failed_in_a_row=self.failed_saves)

    # ------------------------------------------------------------------ evaluation and data health

    def evaluate_at_initialisation(self) -> None:
        cfg, state = self.cfg, self.state
        if cfg.eval.knn_at_end and state.knn_top1_init is None:
            pause_point("knn_init")
            state.knn_top1_init = self.probe.knn()
        if cfg.eval.linear_at_end and state.linear_top1_init is None:
            state.linear_top1_init = self.probe.linear()

    def knn_during_training(self) -> None:
        every = self.cfg.eval.knn_every_epochs
        if not every or self.state.epoch % every or self.state.epoch >= self.cfg.optim.epochs:
            return
        with self.guard.paused():
            result = self.probe.knn()
        for k, acc in (result or {}).items():
            self.metrics.scalar(f"eval/knn_top1_k{k}", acc, self.state.step)
        self.throughput.restart()

    def left_out_files(self) -> list[str]:
        """Files the loaders of every rank have left out so far (not images, or unusable), sorted."""
        return sorted({f for files in collectives.all_gather_object(self.loader.skipped_files()) for f in files})

    def report_data(self, epoch: int) -> None:
        """Once per epoch: how many files were left out so far, by name (each file was also named once when met)."""
        files = self.left_out_files()
        if files:
            log.warning("epoch %d: %d files of the data left out so far (not images, or unusable): %s", epoch,
                        len(files), ", ".join(Path(f).name for f in files[:20]) + (" ..." if len(files) > 20 else ""))

    # ------------------------------------------------------------------ the end

    def finish(self, preempted: bool) -> dict:
        from esvit_scale.events import summary as events_summary
        state, cfg = self.state, self.cfg
        summary = {"steps": state.step, "epochs_completed": state.epoch, "preempted": preempted,
                   **self.throughput.steady(), "global_batch": self.split.global_batch,
                   "world_size": self.dist.world_size, "loss_final": self.last_loss,
                   "health": self.health, "collapse": self.collapse.last(), "kernels": self.parts.kernels,
                   "flops_per_image": self.throughput.flops_per_image,
                   "peak_flops_per_device": self.peak["peak_flops"]}
        left_out = self.left_out_files()
        summary["data"] = {"loader": self.loader.kind, "loader_fallbacks": self.loader.fallbacks,
                           "files_left_out": len(left_out), "left_out": left_out[:100]}
        try:
            with self.guard.paused():
                if cfg.eval.knn_at_end and not preempted:
                    result = self.probe.knn()
                    if result is not None:
                        k = str(20 if 20 in cfg.eval.knn_k else cfg.eval.knn_k[0])
                        summary.update(knn_k=int(k), knn_top1=result[k], knn_top1_init=state.knn_top1_init[k],
                                       knn_top1_by_k=result, knn_top1_init_by_k=state.knn_top1_init)
                if cfg.eval.linear_at_end and not preempted:
                    summary.update(linear_top1=self.probe.linear(), linear_top1_init=state.linear_top1_init)
        except Preempted:
            summary["preempted"] = preempted = True
        if self.dist.is_main:
            if not preempted:
                self.events.record("finished", state.step, action="training done")
            summary["events"] = events_summary(self.out)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("summary: %s", json.dumps(summary))
        return summary


def train(cfg: Config, stop: Optional[StopRequest] = None) -> dict:
    return Trainer(cfg, stop).train()
