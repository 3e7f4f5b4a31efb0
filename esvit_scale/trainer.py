"""The EsViT training loop: config -> data, student engine, EMA teacher, loss, schedules -> steps.

One optimizer step:
    teacher sees the 2 global crops, the student all crops -> EsViT loss -> backward -> DeepSpeed step
    -> teacher EMA update.
Checkpoints are written every `run.checkpoint_every_steps` and at every epoch end; a run resumes from the
newest complete one in its output folder. SIGTERM/SIGUSR1, or the SLURM job's time limit drawing near, make it
save at the next step and stop (esvit_scale/cluster: signals, time limit, hang watchdog, lost and slow ranks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from esvit_scale.checkpoint.restore import start_run
from esvit_scale.cluster.faults import pause_point, stall_if_injected
from esvit_scale.cluster.signals import EXIT_LOST_RANK, EXIT_PREEMPTED, StopRequest, record_exit_status
from esvit_scale.config import Config
from esvit_scale.engine.distributed import DistInfo, init_distributed, resolve_device

log = logging.getLogger("esvit_scale")



class Preempted(Exception):
    """A stop request read during an evaluation: the state is saved already; the run ends as preempted."""


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", force=True)


def quickstart_paths(cfg: Config) -> tuple[str, str, str]:
    """(train folder, k-NN train folder, k-NN val folder); without data.path, the quickstart's real images:
    scikit-learn's digits written once to <output_dir>/quickstart_data."""
    if cfg.data.path is not None:
        return cfg.data.path, cfg.eval.train_path or cfg.data.path, cfg.eval.val_path
    from esvit_scale.data.digits import make_digits_folder
    root = Path(cfg.run.output_dir) / "quickstart_data"
    if not dist.is_initialized() or dist.get_rank() == 0:
        make_digits_folder(root)
    if dist.is_initialized():
        dist.barrier()
    return str(root / "train"), cfg.eval.train_path or str(root / "train"), cfg.eval.val_path or str(root / "val")


def _any_rank(flag: bool) -> bool:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor([float(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
    return flag


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class Trainer:
    def __init__(self, cfg: Config, stop: Optional[StopRequest] = None):
        from esvit_scale import ops
        from esvit_scale.data.build import build_loader
        from esvit_scale.data.folder import index_folder
        from esvit_scale.engine.student import accumulation_steps
        from esvit_scale.losses.esvit_loss import EsViTLoss
        from esvit_scale.schedules import build_schedules

        self.cfg = cfg
        self.stop = stop or StopRequest().install()
        device = resolve_device(cfg.run.device)
        self.dist: DistInfo = init_distributed(device, cfg.run.dist_timeout_minutes)
        setup_logging(self.dist.rank)
        self.out = Path(cfg.run.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with self.stop.critical():
                (self.out / "config.yaml").write_text(cfg.to_yaml())
        if self.dist.is_main:
            self.stop.deadline = _stop_deadline(cfg.run.exit_before_end_minutes)
        ops.configure(cfg.kernels)

        train_path, self.knn_train, self.knn_val = quickstart_paths(cfg)
        self.loader = build_loader(cfg.data, index_folder(train_path), self.dist.rank, self.dist.world_size,
                                   cfg.run.seed, device)
        self.accum = accumulation_steps(cfg, self.dist.world_size)
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has {len(self.loader)} batches per rank, fewer than "
                             f"{self.accum} accumulation steps")
        self.global_batch = cfg.data.batch_size_per_gpu * self.dist.world_size * self.accum
        self.sched = build_schedules(cfg, self.global_batch, self.steps_per_epoch)

        pause_point("build")
        self.loss_fn = EsViTLoss(cfg.loss, cfg.model.out_dim, accumulation=self.accum)
        from esvit_scale.step import build_models
        start = start_run(cfg, self.dist, lambda whole: build_models(cfg, self.dist.world_size, whole),
                          self.loss_fn)                                        # fresh, init_from or resume
        self.engine, self.optimizer, self.teacher = start.engine, start.optimizer, start.teacher
        self.state, self.checkpoints = start.state, start.checkpoints
        self.loss_fn.to(self.dist.device)

        from esvit_scale.step import TrainStep, engine_dtype
        self.input_dtype = engine_dtype(self.engine)
        self.train_step = TrainStep(self.engine, self.optimizer, self.teacher, self.loss_fn, self.sched,
                                    self.dist.device, self.input_dtype)
        self.flops_per_image, self.peak = _model_flops_and_peak(cfg, self.dist.device)
        self.total_steps = (cfg.run.stop_epoch or cfg.optim.epochs) * self.steps_per_epoch
        if cfg.run.max_steps:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)

    # ------------------------------------------------------------------ pieces of a step

    def teacher_autocast(self):
        from esvit_scale.step import teacher_autocast
        return teacher_autocast(self.dist.device, self.input_dtype)

    def set_hyperparameters(self, epoch: int) -> None:
        self.train_step.set_hyperparameters(self.state.step,
                                            freeze_last_layer=epoch < self.cfg.optim.freeze_last_layer)

    def timed(self) -> bool:
        """Phases are timed (device-synchronised) only in the optimizer steps whose metrics are logged, and in
        those that close a straggler report's window."""
        step, run = self.state.step + 1, self.cfg.run
        return step % run.log_every_steps == 0 or bool(run.straggler_every_steps and
                                                       step % run.straggler_every_steps == 0)

    def client_state(self) -> dict:
        return {"train_state": dataclasses.asdict(self.state), "loss": self.loss_fn.state_dict(),
                "config": self.cfg.to_dict()}

    def save(self) -> Path:
        path = self.checkpoints.save(self.state.step, self.engine, self.teacher, self.client_state())
        log.info("saved checkpoint %s", path)
        return path

    def knn(self) -> Optional[dict]:
        """k-NN top-1 (%) of the teacher backbone per k, or None without a validation folder."""
        if not self.knn_val:
            log.warning("k-NN skipped: eval.val_path is not set")
            return None
        from esvit_scale.eval.knn import knn_eval
        e = self.cfg.eval
        with self.teacher_autocast():
            result = knn_eval(self._teacher_features, self.knn_train, self.knn_val, e.knn_k, e.knn_temperature,
                              e.resize_size, e.image_size, self.dist.device)
        return {str(k): v for k, v in result.items()}

    def linear(self) -> Optional[float]:
        """Linear-probe top-1 (%) of the teacher backbone, or None without a validation folder."""
        if not self.knn_val:
            log.warning("linear probe skipped: eval.val_path is not set")
            return None
        from esvit_scale.eval.linear import block_features_fn, linear_eval
        e = self.cfg.eval
        blocks = block_features_fn(self.teacher.module.backbone, e.linear_blocks)
        with self.teacher_autocast():
            return linear_eval(lambda x: self._interruptible(blocks, x), self.knn_train, self.knn_val,
                               e.resize_size, e.image_size, self.dist.device, epochs=e.linear_epochs)

    @torch.no_grad()
    def _teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's view feature. At ZeRO-3 the engine's hooks gather each layer as it runs."""
        return self._interruptible(lambda x: self.teacher.module.backbone(x)[0], x)

    def _interruptible(self, forward, x: torch.Tensor) -> torch.Tensor:
        """Once training has started, a stop request ends an evaluation between batches (every rank at the same
        batch); during start-up the signal ends the process by itself."""
        if not self.stop.in_startup and _any_rank(self.stop.requested):
            raise Preempted
        return forward(x)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        if cfg.eval.knn_at_end and state.knn_top1_init is None:
            pause_point("knn_init")
            state.knn_top1_init = self.knn()
        if cfg.eval.linear_at_end and state.linear_top1_init is None:
            state.linear_top1_init = self.linear()
        from esvit_scale.cluster.stragglers import StragglerMonitor
        from esvit_scale.metrics import MetricsLogger
        self.metrics = MetricsLogger(self.out, self.dist.is_main, self.total_steps, cfg.run.log_every_steps,
                                     start_step=state.step)
        self.stragglers = StragglerMonitor(cfg.run.straggler_every_steps, cfg.run.straggler_factor,
                                           self.dist.rank, self.dist.world_size, self.dist.device)
        from esvit_scale.losses.monitors import CollapseWatch
        self.collapse = CollapseWatch(cfg.model.out_dim, self.teacher.module.backbone.num_features)
        self.throughput: list[float] = []
        self.phase_seconds: dict[str, float] = {}
        self.saved_at = state.step if self.checkpoints.resumed_from else -1
        log.info("training: %d steps per epoch, global batch %d (%d per rank x %d ranks x %d accumulation), "
                 "%d steps to go", self.steps_per_epoch, self.global_batch, cfg.data.batch_size_per_gpu,
                 self.dist.world_size, self.accum, self.total_steps - state.step)
        self.stop.training_started()
        with self._guarded():
            preempted = False
            try:
                while state.epoch < cfg.optim.epochs and state.step < self.total_steps and not preempted:
                    preempted = self.train_epoch(state.epoch)
                    if state.batch_in_epoch == self.steps_per_epoch * self.accum:   # the epoch is complete
                        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                        self.report_data(state.epoch - 1)
                        self.save_once()
                        self.knn_during_training()
                self.save_once()
            except Preempted:
                preempted = True
            self.checkpoints.finish()               # an asynchronous save completes before the run ends
            self.metrics.close()
            return self.finish(preempted)

    @contextlib.contextmanager
    def _guarded(self):
        """The hang watchdog and the rank heartbeats around the loop; a failed collective names the lost rank."""
        from esvit_scale.cluster.watchdog import HangWatchdog, PeerHeartbeats
        run, world = self.cfg.run, self.dist.world_size
        self.heartbeats = PeerHeartbeats(self.dist.rank, world) if world > 1 else None
        explain = self.heartbeats.explain if self.heartbeats else None
        self.watchdog = (HangWatchdog(run.hang_timeout_minutes * 60, self.dist.rank, explain, dump_dir=self.out)
                         if run.hang_timeout_minutes > 0 else None)
        self.kick_watchdog()
        try:
            yield
        except RuntimeError as e:
            lost = self.heartbeats.lost_peers() if self.heartbeats else []
            if not lost:
                raise
            log.error("rank %d: a collective failed (%s) and %s stopped responding. Exiting with %d; resubmit the "
                      "job to resume from the last complete checkpoint (%s).", self.dist.rank,
                      str(e).splitlines()[0][:300], ", ".join(lost), EXIT_LOST_RANK,
                      self.checkpoints.last_good() or "none")
            record_exit_status(EXIT_LOST_RANK, "lost " + ", ".join(lost))
            logging.shutdown()
            os._exit(EXIT_LOST_RANK)       # the process group is broken: its destructors could hang
        finally:
            if self.watchdog:
                self.watchdog.close()
            if self.heartbeats:
                self.heartbeats.close()

    def kick_watchdog(self) -> None:
        if self.watchdog:
            self.watchdog.kick()

    def paused_watchdog(self):
        return self.watchdog.paused() if self.watchdog else contextlib.nullcontext()

    def train_epoch(self, epoch: int) -> bool:
        """Steps through `epoch` from the saved position; True if stopped by a signal."""
        state, batches_per_epoch = self.state, self.steps_per_epoch * self.accum
        sums: dict[str, torch.Tensor] = {}
        images, start = 0, time.time()
        for crops in self.train_step.batches(self.loader.epoch(epoch, state.batch_in_epoch)):
            stall_if_injected(self.dist.rank, state.step + 1)
            if state.batch_in_epoch % self.accum == 0:
                self.set_hyperparameters(epoch)
                self.loss_fn.monitor = (state.step + 1) % self.cfg.run.log_every_steps == 0
            boundary = (state.batch_in_epoch + 1) % self.accum == 0
            losses, phases = self.train_step.run(crops, epoch, state.step, boundary, timing=self.timed())
            self.phase_seconds = _add(self.phase_seconds, phases)
            self.stragglers.record(phases)
            state.batch_in_epoch += 1
            images += crops[0].shape[0] * self.dist.world_size
            for name, value in losses.items():          # the loss, every term's, and the readings of log steps
                sums[name] = sums.get(name, 0.0) + value.detach().float().cpu()
            if state.batch_in_epoch % self.accum:
                continue
            # ---- optimizer step boundary (the EMA update ran in the step)
            state.step += 1
            names = sorted(sums)
            reduced = _mean_over_ranks(torch.cat([torch.stack([sums[n] for n in names]) / self.accum,
                                                  torch.tensor([float(self.stop.requested)])]))
            values = dict(zip(names, reduced[:-1].tolist()))
            self.check_finite(values, epoch)
            self.throughput.append(images / max(time.time() - start, 1e-9))
            self.log_step(epoch, values)
            slow = self.stragglers.report(state.step)
            if slow is not None:
                self.metrics.scalars("stragglers", slow, state.step)
            self.kick_watchdog()
            sums, images, start = {}, 0, time.time()
            if reduced[-1] > 0:
                log.warning("stop requested (here: %s; the ranks agree at each step): saving at step %d and "
                            "exiting with %d", self.stop.reason(), state.step, EXIT_PREEMPTED)
                self.save_once()
                return True
            every = self.cfg.run.checkpoint_every_steps
            if every and state.step % every == 0:
                self.save_once()
            if state.step >= self.total_steps or state.batch_in_epoch >= batches_per_epoch:
                break
        return False

    def left_out_files(self) -> list[str]:
        """Files the loaders of every rank have left out so far (not images, or unusable), sorted."""
        mine = self.loader.skipped_files()
        if self.dist.world_size == 1:
            return sorted(set(mine))
        every: list = [None] * self.dist.world_size
        dist.all_gather_object(every, mine)
        return sorted({f for files in every for f in files})

    def report_data(self, epoch: int) -> None:
        """Once per epoch: how many files were left out so far, by name (each file was also named once when met)."""
        files = self.left_out_files()
        if files:
            log.warning("epoch %d: %d files of the data left out so far (not images, or unusable): %s", epoch,
                        len(files), ", ".join(Path(f).name for f in files[:20]) + (" ..." if len(files) > 20 else ""))

    def knn_during_training(self) -> None:
        every = self.cfg.eval.knn_every_epochs
        if not every or self.state.epoch % every or self.state.epoch >= self.cfg.optim.epochs:
            return
        with self.paused_watchdog():
            result = self.knn()
        for k, acc in (result or {}).items():
            self.metrics.scalar(f"eval/knn_top1_k{k}", acc, self.state.step)

    def check_finite(self, values: dict[str, float], epoch: int) -> None:
        losses = {k: v for k, v in values.items() if k == "loss" or k.endswith("_loss")}
        if all(math.isfinite(v) for v in losses.values()):
            return
        # this loss tests the weights of the previous step: a checkpoint of them must not be resumed from
        last = self.checkpoints.reject(self.state.step - 1, f"the loss of step {self.state.step} is not finite")
        raise FloatingPointError(
            f"loss is not finite at epoch {epoch}, step {self.state.step} "
            f"({', '.join(f'{k} {v}' for k, v in losses.items())}); nothing was saved from this state. Last complete "
            f"checkpoint: {last or 'none'}. Lower optim.base_lr, or train in bf16/fp32.")

    def log_step(self, epoch: int, values: dict[str, float]) -> None:
        i = self.state.step - 1
        self.metrics.step(self.state.step, {
            **values, "epoch": epoch,
            "lr": float(self.sched.lr[i]), "weight_decay": float(self.sched.weight_decay[i]),
            "momentum": float(self.sched.momentum[i]), "teacher_temp": float(self.sched.teacher_temp[epoch]),
            "images_per_s": self.throughput[-1], **self.performance_scalars()})
        self.last_loss = values["loss"]
        if "view_teacher_entropy" in values:                 # a monitored step
            self.health = {k: v for k, v in values.items() if k != "loss" and not k.endswith("_loss")}
            self.collapse.update(self.health, self.state.step)

    def performance_scalars(self) -> dict[str, float]:
        """Achieved model TFLOP/s per device and MFU of the last optimizer step; its phase split when it was timed
        (seconds summed over its micro-batches)."""
        flops_per_s = self.throughput[-1] / self.dist.world_size * self.flops_per_image
        out = {"tflops_per_s": flops_per_s / 1e12, "mfu": flops_per_s / self.peak["peak_flops"]}
        phases, self.phase_seconds = self.phase_seconds, {}
        if phases:
            out.update(step_s=sum(phases.values()), **{f"phase_s/{p}": t for p, t in phases.items()})
        return out

    def save_once(self) -> None:
        if self.saved_at != self.state.step:
            self.kick_watchdog()            # a save has the whole hang timeout to itself
            self.save()
            self.saved_at = self.state.step
            self.kick_watchdog()

    def finish(self, preempted: bool) -> dict:
        state, cfg = self.state, self.cfg
        summary = {"steps": state.step, "epochs_completed": state.epoch, "preempted": preempted,
                   "images_per_s": _steady_mean(self.throughput), "global_batch": self.global_batch,
                   "world_size": self.dist.world_size, "loss_final": getattr(self, "last_loss", None),
                   "health": getattr(self, "health", None), "collapse": self.collapse.last(),
                   "flops_per_image": self.flops_per_image, "peak_flops_per_device": self.peak["peak_flops"]}
        if summary["images_per_s"]:
            summary["mfu"] = summary["images_per_s"] / self.dist.world_size * self.flops_per_image / \
                self.peak["peak_flops"]
        left_out = self.left_out_files()
        summary["data"] = {"files_left_out": len(left_out), "left_out": left_out[:100]}
        try:
            with self.paused_watchdog():
                if cfg.eval.knn_at_end and not preempted:
                    result = self.knn()
                    if result is not None:
                        k = str(20 if 20 in cfg.eval.knn_k else cfg.eval.knn_k[0])
                        summary.update(knn_k=int(k), knn_top1=result[k], knn_top1_init=state.knn_top1_init[k],
                                       knn_top1_by_k=result, knn_top1_init_by_k=state.knn_top1_init)
                if cfg.eval.linear_at_end and not preempted:
                    summary.update(linear_top1=self.linear(), linear_top1_init=state.linear_top1_init)
        except Preempted:
            summary["preempted"] = preempted = True
        if self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("summary: %s", json.dumps(summary))
        return summary


def _model_flops_and_peak(cfg: Config, device: torch.device) -> tuple[float, dict]:
    """Model FLOPs per image of a step (counted on the meta device) and the device's peak FLOP/s, for the MFU."""
    from esvit_scale.bench.flops import CONVENTION, step_flops
    from esvit_scale.bench.peak import device_peak
    per_image = step_flops(cfg).per_image
    peak = device_peak(device, cfg.deepspeed.precision)
    log.info("model FLOPs per image of a step: %.2f G (%s); peak per device %.2f TFLOP/s (%s): MFU is against it",
             per_image / 1e9, CONVENTION, peak["peak_flops"] / 1e12, peak["source"])
    return per_image, peak


def _add(total: dict[str, float], phases: Optional[dict[str, float]]) -> dict[str, float]:
    """Phase seconds summed over the micro-batches of an optimizer step."""
    return total if phases is None else {p: total.get(p, 0.0) + t for p, t in phases.items()}


def _steady_mean(values: list[float]) -> Optional[float]:
    """Mean throughput without the first steps (start-up, JIT, worker spawn)."""
    if not values:
        return None
    steady = values[len(values) // 4:] if len(values) >= 4 else values
    return sum(steady) / len(steady)


def _stop_deadline(margin_minutes: float) -> Optional[float]:
    """When to save and exit before the SLURM job's time limit (None outside SLURM, without a limit, or off)."""
    if margin_minutes <= 0:
        return None
    from esvit_scale.cluster.slurm import job_end_time
    end = job_end_time()
    if end is None:
        return None
    deadline = end - 60 * margin_minutes
    log.info("the job ends at %s: saving and exiting for a requeue at %s (run.exit_before_end_minutes=%g)",
             time.strftime("%H:%M:%S", time.localtime(end)), time.strftime("%H:%M:%S", time.localtime(deadline)),
             margin_minutes)
    return deadline


def train(cfg: Config, stop: Optional[StopRequest] = None) -> dict:
    return Trainer(cfg, stop).train()
