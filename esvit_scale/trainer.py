"""The EsViT training loop: config -> data, student engine, EMA teacher, loss, schedules -> steps.

One optimizer step:
    teacher sees the 2 global crops, the student all crops -> EsViT loss -> backward -> DeepSpeed step
    -> teacher EMA update.
Checkpoints are written every `run.checkpoint_every_steps` and at every epoch end; a run resumes from the
newest complete one in its output folder. SIGTERM/SIGUSR1 make it save at the next step and stop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from esvit_scale import checkpoint as ckpt
from esvit_scale.config import Config
from esvit_scale.engine.distributed import DistInfo, init_distributed, resolve_device

log = logging.getLogger("esvit_scale")

EXIT_PREEMPTED = 75    # the run stopped on a signal after saving; run it again to continue


@dataclass
class TrainState:
    epoch: int = 0
    batch_in_epoch: int = 0          # micro-batches of `epoch` consumed
    step: int = 0                    # optimizer steps done
    knn_top1_init: Optional[dict] = None


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (preemption, SLURM's pre-timeout signal); read at step boundaries."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", force=True)


def quickstart_paths(cfg: Config) -> tuple[str, str, str]:
    """(train folder, k-NN train folder, k-NN val folder), generating the quickstart folder if needed."""
    if cfg.data.path is not None:
        return cfg.data.path, cfg.eval.train_path or cfg.data.path, cfg.eval.val_path
    from esvit_scale.data.synthetic import make_quickstart_folder
    root = Path(cfg.run.output_dir) / "quickstart_data"
    if not dist.is_initialized() or dist.get_rank() == 0:
        make_quickstart_folder(root)
    if dist.is_initialized():
        dist.barrier()
    return str(root / "train"), cfg.eval.train_path or str(root / "train"), cfg.eval.val_path or str(root / "val")


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class Trainer:
    def __init__(self, cfg: Config):
        from esvit_scale import ops
        from esvit_scale.data.build import build_loader
        from esvit_scale.data.folder import index_folder
        from esvit_scale.engine.student import accumulation_steps, build_student_engine, model_init_context
        from esvit_scale.engine.teacher import TeacherEMA
        from esvit_scale.losses.esvit_loss import EsViTLoss
        from esvit_scale.models.esvit import EsViT
        from esvit_scale.schedules import build_schedules

        self.cfg = cfg
        device = resolve_device(cfg.run.device)
        self.dist: DistInfo = init_distributed(device)
        setup_logging(self.dist.rank)
        self.out = Path(cfg.run.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml())
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

        torch.manual_seed(cfg.run.seed)                       # identical initial weights on every rank
        self.state = TrainState()
        self.loss_fn = EsViTLoss(cfg.loss, cfg.model.out_dim)
        resume = ckpt.latest_checkpoint(self.out)
        # init_from loads whole tensors into the modules: build them whole then, else partitioned at ZeRO-3
        whole = resume is None and bool(cfg.run.init_from)
        with contextlib.nullcontext() if whole else model_init_context(cfg, self.dist.world_size):
            student = EsViT(cfg)
        with contextlib.nullcontext() if whole else model_init_context(cfg, self.dist.world_size, teacher=True):
            teacher = EsViT(cfg, is_teacher=True)
        if resume is None and cfg.run.init_from:
            from esvit_scale.continuation import initialise_from
            self.state = initialise_from(Path(cfg.run.init_from), student, teacher, self.loss_fn)
        self.engine, self.optimizer = build_student_engine(cfg, student, self.dist.world_size)
        self.teacher = TeacherEMA(teacher, self.engine, cfg, self.dist.world_size)
        if resume is None and not cfg.run.init_from:
            self.teacher.copy_from_student()
        self.loss_fn.to(self.dist.device)
        torch.manual_seed(cfg.run.seed + 1000 * self.dist.rank)      # drop-path draws differ per rank
        if resume is not None:
            log.info("resuming from %s", resume)
            client = ckpt.load_checkpoint(resume, self.engine, self.teacher)
            self.state = TrainState(**client["train_state"])
            self.loss_fn.load_state_dict(client["loss"])

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
        """Phases are timed (device-synchronised) only in the optimizer steps whose metrics are logged."""
        return (self.state.step + 1) % self.cfg.run.log_every_steps == 0

    def client_state(self) -> dict:
        return {"train_state": dataclasses.asdict(self.state), "loss": self.loss_fn.state_dict(),
                "config": self.cfg.to_dict()}

    def save(self) -> Path:
        path = ckpt.save_checkpoint(self.out, self.state.step, self.engine, self.teacher, self.client_state(),
                                    keep=self.cfg.run.keep_checkpoints)
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

    @torch.no_grad()
    def _teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's view feature. At ZeRO-3 the engine's hooks gather each layer as it runs."""
        return self.teacher.module.backbone(x)[0]

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        if cfg.eval.knn_at_end and state.knn_top1_init is None:
            state.knn_top1_init = self.knn()
        from esvit_scale.metrics import MetricsLogger
        self.metrics = MetricsLogger(self.out, self.dist.is_main, self.total_steps, cfg.run.log_every_steps)
        self.stop = StopFlag()
        self.throughput: list[float] = []
        self.phase_seconds: dict[str, float] = {}
        self.saved_at = state.step if ckpt.latest_checkpoint(self.out) else -1
        log.info("training: %d steps per epoch, global batch %d (%d per rank x %d ranks x %d accumulation), "
                 "%d steps to go", self.steps_per_epoch, self.global_batch, cfg.data.batch_size_per_gpu,
                 self.dist.world_size, self.accum, self.total_steps - state.step)
        preempted = False
        while state.epoch < cfg.optim.epochs and state.step < self.total_steps and not preempted:
            preempted = self.train_epoch(state.epoch)
            if state.batch_in_epoch == self.steps_per_epoch * self.accum:   # the epoch is complete
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                self.save_once()
                self.knn_during_training()
        self.save_once()
        self.metrics.close()
        return self.finish(preempted)

    def train_epoch(self, epoch: int) -> bool:
        """Steps through `epoch` from the saved position; True if stopped by a signal."""
        state, batches_per_epoch = self.state, self.steps_per_epoch * self.accum
        sums, images, start = torch.zeros(3), 0, time.time()
        for crops in self.train_step.batches(self.loader.epoch(epoch, state.batch_in_epoch)):
            if state.batch_in_epoch % self.accum == 0:
                self.set_hyperparameters(epoch)
            boundary = (state.batch_in_epoch + 1) % self.accum == 0
            losses, phases = self.train_step.run(crops, epoch, state.step, boundary, timing=self.timed())
            self.phase_seconds = _add(self.phase_seconds, phases)
            state.batch_in_epoch += 1
            images += crops[0].shape[0] * self.dist.world_size
            sums += torch.stack([losses[k].detach().float().cpu() for k in ("loss", "view_loss", "region_loss")])
            if state.batch_in_epoch % self.accum:
                continue
            # ---- optimizer step boundary (the EMA update ran in the step)
            state.step += 1
            reduced = _mean_over_ranks(torch.cat([sums / self.accum, torch.tensor([float(self.stop.signum != 0)])]))
            self.check_finite(reduced[:3], epoch)
            self.throughput.append(images / max(time.time() - start, 1e-9))
            self.log_step(epoch, reduced[:3].tolist())
            sums, images, start = torch.zeros(3), 0, time.time()
            if reduced[3] > 0:
                log.warning("stop signal received: saving at step %d and exiting", state.step)
                self.save_once()
                return True
            every = self.cfg.run.checkpoint_every_steps
            if every and state.step % every == 0:
                self.save_once()
            if state.step >= self.total_steps or state.batch_in_epoch >= batches_per_epoch:
                break
        return False

    def knn_during_training(self) -> None:
        every = self.cfg.eval.knn_every_epochs
        if not every or self.state.epoch % every or self.state.epoch >= self.cfg.optim.epochs:
            return
        result = self.knn()
        for k, acc in (result or {}).items():
            self.metrics.scalar(f"eval/knn_top1_k{k}", acc, self.state.step)

    def check_finite(self, losses: torch.Tensor, epoch: int) -> None:
        if torch.isfinite(losses).all():
            return
        loss, view_loss, region_loss = losses.tolist()
        raise FloatingPointError(
            f"loss is not finite at epoch {epoch}, step {self.state.step} (loss {loss}, view {view_loss}, "
            f"region {region_loss}); nothing was saved from this state. Last complete checkpoint: "
            f"{ckpt.latest_checkpoint(self.out) or 'none'}. Lower optim.base_lr, or train in bf16/fp32.")

    def log_step(self, epoch: int, losses: list[float]) -> None:
        i = self.state.step - 1
        self.metrics.step(self.state.step, {
            "loss": losses[0], "view_loss": losses[1], "region_loss": losses[2], "epoch": epoch,
            "lr": float(self.sched.lr[i]), "weight_decay": float(self.sched.weight_decay[i]),
            "momentum": float(self.sched.momentum[i]), "teacher_temp": float(self.sched.teacher_temp[epoch]),
            "images_per_s": self.throughput[-1], **self.performance_scalars()})
        self.last_loss = losses[0]

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
            self.save()
            self.saved_at = self.state.step

    def finish(self, preempted: bool) -> dict:
        state, cfg = self.state, self.cfg
        summary = {"steps": state.step, "epochs_completed": state.epoch, "preempted": preempted,
                   "images_per_s": _steady_mean(self.throughput), "global_batch": self.global_batch,
                   "world_size": self.dist.world_size, "loss_final": getattr(self, "last_loss", None),
                   "flops_per_image": self.flops_per_image, "peak_flops_per_device": self.peak["peak_flops"]}
        if summary["images_per_s"]:
            summary["mfu"] = summary["images_per_s"] / self.dist.world_size * self.flops_per_image / \
                self.peak["peak_flops"]
        if cfg.eval.knn_at_end and not preempted:
            result = self.knn()
            if result is not None:
                k = str(20 if 20 in cfg.eval.knn_k else cfg.eval.knn_k[0])
                summary.update(knn_k=int(k), knn_top1=result[k], knn_top1_init=state.knn_top1_init[k],
                               knn_top1_by_k=result, knn_top1_init_by_k=state.knn_top1_init)
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


def train(cfg: Config) -> dict:
    return Trainer(cfg).train()
