"""The student under DeepSpeed: the one place where our config becomes a DeepSpeed config."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from esvit_scale.config import Config, ConfigError
from esvit_scale.models.esvit import last_layer_parameter_names

log = logging.getLogger("esvit_scale")


@dataclass(frozen=True)
class BatchSplit:
    """How the global batch of one optimizer step is cut: micro-batches per rank x accumulation x ranks."""
    micro: int
    accumulation: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world_size


def batch_split(cfg: Config, world_size: int) -> BatchSplit:
    """The split for `world_size` ranks: deepspeed.grad_accum_steps, or derived from deepspeed.global_batch_size,
    which the ranks' micro-batches must divide (ConfigError otherwise, naming the key)."""
    ds, micro = cfg.deepspeed, cfg.data.batch_size_per_gpu
    if ds.global_batch_size is None:
        return BatchSplit(micro, ds.grad_accum_steps, world_size)
    per_step = micro * world_size
    if ds.global_batch_size % per_step:
        per_rank = ds.global_batch_size // micro if ds.global_batch_size % micro == 0 else 0
        fits = [n for n in range(1, per_rank + 1) if per_rank % n == 0]
        raise ConfigError(f"deepspeed.global_batch_size: {ds.global_batch_size} is not a multiple of "
                          f"data.batch_size_per_gpu x ranks = {micro} x {world_size} = {per_step}; with this "
                          f"micro-batch it divides for {', '.join(map(str, fits[:8])) or 'no'} rank count(s)")
    return BatchSplit(micro, ds.global_batch_size // per_step, world_size)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    split = batch_split(cfg, world_size)
    precision = cfg.deepspeed.precision
    zero: dict = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        # keep partitioned parameters partitioned between forward passes (several per step: one per crop size)
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    if cfg.deepspeed.bucket_elements is not None:
        n = cfg.deepspeed.bucket_elements
        zero.update(reduce_bucket_size=n, allgather_bucket_size=n)
        if cfg.deepspeed.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=n, stage3_max_live_parameters=n)
    return {
        "train_micro_batch_size_per_gpu": split.micro,
        "gradient_accumulation_steps": split.accumulation,
        "train_batch_size": split.global_batch,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def model_init_context(cfg: Config, world_size: int, teacher: bool = False):
    """Where the student (or teacher) is constructed. At ZeRO-3 with deepspeed.zero_init: deepspeed.zero.Init,
    which partitions each parameter as soon as its module is built (every rank draws the same full values from the
    same seed and keeps its shard), so no rank ever holds a whole model: a 3 B-parameter student and teacher would
    need 24 GB per rank first. The teacher's parameters stay fp32 (see engine/teacher.py). Elsewhere: nothing."""
    if cfg.deepspeed.zero_stage != 3 or not cfg.deepspeed.zero_init:
        return contextlib.nullcontext()
    import deepspeed
    config = deepspeed_config(cfg, world_size)
    if teacher:
        config.update(bf16={"enabled": False}, fp16={"enabled": False})
    return deepspeed.zero.Init(config_dict_or_path=config)


def parameter_groups(model: nn.Module) -> list[dict]:
    """Four groups: (decayed or not, as the model says: EsViT.decays) x (last layer or not); the heads' last layers
    are told apart so that they can be frozen in the first epoch(s)."""
    last = last_layer_parameter_names(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        dims = len(getattr(p, "ds_shape", p.shape))      # built under zero.Init, p itself is an empty 1-D shard
        decay = model.decays(name, dims)
        groups.setdefault((decay, name in last), []).append(p)
    return [{"params": ps, "apply_weight_decay": decay, "is_last_layer": is_last, "weight_decay": 0.0}
            for (decay, is_last), ps in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: Config, device_type: str) -> torch.optim.Optimizer:
    """AdamW over parameter_groups: NVIDIA apex's FusedAdam on a GPU where apex is importable, else torch's AdamW
    with fused=True (one kernel per step on CPU and GPU, and no partition-sized temporaries, which the default
    foreach path allocates several of: at ZeRO-3 a rank's whole partition is one flat tensor). Logs which."""
    groups, betas = parameter_groups(model), tuple(cfg.optim.betas)
    if device_type == "cuda":
        try:
            from apex.optimizers import FusedAdam
            log.info("optimizer: apex FusedAdam (AdamW mode)")
            return FusedAdam(groups, lr=0.0, betas=betas, adam_w_mode=True)
        except ImportError:
            pass
    log.info("optimizer: torch AdamW, fused=True (apex %s)",
             "not importable" if device_type == "cuda" else "is for GPUs only")
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, fused=True)


def build_student_engine(cfg: Config, model: nn.Module, world_size: int):
    """The student under DeepSpeed with its optimizer. Whether a checkpoint loads as DeepSpeed's universal one is
    decided per load (checkpoint/restore.py), not here."""
    import deepspeed
    device_type = "cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu"
    optimizer = build_optimizer(model, cfg, device_type)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg, world_size))
    return engine, optimizer


def set_optimizer_hyperparameters(optimizer, lr: float, weight_decay: float, freeze_last_layer: bool) -> None:
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if (freeze_last_layer and group["is_last_layer"]) else lr
        group["weight_decay"] = weight_decay if group["apply_weight_decay"] else 0.0
