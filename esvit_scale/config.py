"""Run configuration: typed dataclasses, loaded from YAML, overridden by `key.sub=value` arguments.

Everything is validated before any work starts: an unknown key, a value of the wrong type or a value
outside its allowed set raises ConfigError naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class ModelConfig:
    # a backbone preset: swin_nano .. swin_giant (Swin V1), swinv2_nano .. swinv2_giant (Swin V2); models/registry.py
    arch: str = "swin_tiny"
    # None: take the value of the `arch` preset.
    embed_dim: Optional[int] = None
    depths: Optional[list[int]] = None
    num_heads: Optional[list[int]] = None
    drop_path_rate: Optional[float] = None
    window_size: int = 7
    patch_size: int = 4
    out_dim: int = 65536               # K, prototypes of both heads
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    norm_last_layer: bool = False
    head_batchnorm: bool = False       # batch-normalised hidden layers in both heads (DINO's use_bn_in_head)
    region_head_batchnorm: Optional[bool] = None    # the region head's own choice; null: head_batchnorm
    # recompute each block's activations in backward: true/false for every stage, or one bool per stage
    activation_checkpointing: typing.Union[bool, list[bool]] = False
    # torch.compile the backbone and the heads of the student and the teacher (nn.Module.compile: in place, the
    # state_dict keys stay the same); see docs/performance.md for what it gains and where it is refused
    compile: bool = False


@dataclass
class KernelConfig:
    window_attention: bool = True      # fused window attention op in the backbone
    region_matching: bool = True       # fused argmax + matched cross-entropy in the region loss
    force_reference: bool = False      # use the pure-PyTorch reference of each op
    # before training: each fused op in use runs once against its reference on the config's shapes, dtype and device;
    # one that fails falls back to the reference with a warning (esvit_scale/ops/self_check.py)
    self_check: bool = True
    # the backbone's LayerNorms as NVIDIA apex's FusedLayerNorm where apex is importable on a GPU (same parameter
    # names); torch's LayerNorm elsewhere, with model.compile, or when false. Logged which.
    apex_layer_norm: bool = True
    # vector instruction set of the CPU kernels; auto: $ESVIT_CPU_ISA if set, else the best the CPU has
    cpu_isa: str = field(default="auto", metadata=_choices("auto", "avx512", "avx2", "generic"))


@dataclass
class DataConfig:
    path: Optional[str] = None         # image folder; None: the quickstart's digits (trainer.quickstart_paths)
    loader: str = field(default="auto", metadata=_choices("auto", "dali", "torch"))
    # when the DALI loader fails its start-up check (built, one batch pulled; data/build.py): "cpu" tries DALI's CPU
    # graph next (on a GPU node), then the torch loader; "torch" goes straight to the torch loader; "none" stops
    fallback: str = field(default="cpu", metadata=_choices("cpu", "torch", "none"))
    batch_size_per_gpu: int = 32
    num_workers: int = 8
    global_crops_size: int = 224
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops_size: list[int] = field(default_factory=lambda: [96])
    local_crops_number: list[int] = field(default_factory=lambda: [8])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # The paper's photometric augmentation, made adjustable for images it does not suit (e.g. digits, where a
    # mirrored 2 is not a 2): probability of a horizontal flip (every crop), of solarisation (the second global
    # crop), and the range of the Gaussian blur's sigma in pixels.
    hflip_prob: float = 0.5
    solarize_prob: float = 0.2
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # Not in the paper: every crop turned by an angle drawn uniformly in [-d, d] degrees (corners black), for
    # images whose class survives a small turn but not a mirror (handwriting). 0: off.
    rotation_degrees: float = 0.0


@dataclass
class LossConfig:
    region_loss: bool = True
    pair_factor: float = 0.5           # each (teacher, student) pair adds pair_factor * (L_V + L_R)
    region_weight: float = 1.0         # L_R's share next to L_V (the paper: 1)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    koleo_weight: float = 0.0          # >0: the KoLeo feature-spreading term (esvit_scale/losses/koleo.py)


@dataclass
class OptimConfig:
    epochs: int = 300
    base_lr: float = 5e-4              # for a global batch of 256, scaled linearly
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0             # global gradient norm; 0 disables
    freeze_last_layer: int = 1         # epochs during which the heads' last layers are not updated
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class DeepSpeedConfig:
    zero_stage: int = field(default=0, metadata=_choices(0, 1, 2, 3))
    # ZeRO-3 only: build student and teacher already partitioned (deepspeed.zero.Init), so that no rank ever holds
    # a whole model (the ~0.65 B and ~3 B configs set it). Off by default: smaller models start faster without it.
    zero_init: bool = False
    precision: str = field(default="bf16", metadata=_choices("fp32", "fp16", "bf16"))
    grad_accum_steps: int = 1
    # If set, the global batch the hyper-parameters were tuned for; grad_accum_steps is then derived
    # as global_batch_size / (batch_size_per_gpu * world_size), which must divide exactly.
    global_batch_size: Optional[int] = None
    # Elements per communication bucket (gradient reduction; ZeRO-3 prefetch) and, at ZeRO-3, the most parameter
    # elements gathered at once. None: DeepSpeed's defaults (5e8 reduce, 5e7 prefetch, 1e9 live), sized for GPUs;
    # each costs its size in memory, which matters for big models on small hosts (the CPU tests use 5e7).
    bucket_elements: Optional[int] = None


@dataclass
class RunConfig:
    output_dir: str = "runs/esvit"
    seed: int = 0
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    max_steps: int = 0                 # >0: stop after this many optimizer steps in total
    stop_epoch: int = 0                # >0: stop when this many epochs are done (schedules still span optim.epochs)
    checkpoint_every_steps: int = 0    # 0: at the end of every epoch only
    keep_checkpoints: int = 2
    # CPU runs: torch's threads per process; 0: this process's share of the cores less data.num_workers (the loader's
    # workers run on the same cores: a pool that counts them in spins against them), at least 1; OMP_NUM_THREADS wins
    cpu_threads: int = 0
    async_checkpoint: bool = False     # write checkpoints on a thread while training goes on (one in flight at most)
    log_every_steps: int = 10
    # A checkpoint folder (<output_dir>/checkpoints/<tag>) to initialise from when output_dir has none:
    # weights, centres and position are taken, heads missing there (the region head of a view-only run)
    # start fresh, and the optimizer starts anew. The paper's W=14 / Swin-B recipe: view-only, then +region.
    init_from: Optional[str] = None
    # Cluster operations (see slurm/README.md). Under SLURM: save and exit with code 75 (requeue) this many minutes
    # before the job's time limit, whether or not a signal comes; 0: off.
    exit_before_end_minutes: float = 5.0
    hang_timeout_minutes: float = 30.0    # no step completes in this time: every rank dumps its stacks, exits 70
    dist_timeout_minutes: float = 30.0    # collective timeout of the process group
    straggler_every_steps: int = 100      # gather the per-rank step times this often (0: off)
    straggler_factor: float = 1.3         # a rank slower than this x the median, 3 reports in a row, is named
    # Faults in the numbers (esvit_scale/recovery.py): a non-finite step loss, or one above spike_factor x the median
    # of the last spike_window step losses (0: spikes are not judged), rewinds the run to its newest checkpoint and
    # replays the same batches; a fault that recurs there is a bad batch, skipped. At the max_rewinds-th skipped
    # batch the run stops (0: no rewinds; a non-finite loss stops the run).
    spike_factor: float = 0.0
    spike_window: int = 50
    max_rewinds: int = 5


@dataclass
class EvalConfig:
    knn_at_end: bool = False           # run k-NN of the teacher backbone when training ends
    knn_every_epochs: int = 0          # >0: also after every this many epochs (logged as eval/knn_top1_k<k>)
    train_path: Optional[str] = None   # labelled folders for k-NN; None with data.path None: quickstart's
    val_path: Optional[str] = None
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    # how each rank stores its shard of the k-NN bank: bf16 halves it (at 14 M images x 768, 21 GB in fp32), and on
    # the digits moves a vote or two of 360 (docs/performance.md)
    knn_dtype: str = field(default="fp32", metadata=_choices("fp32", "bf16", "fp16"))
    linear_at_end: bool = False        # linear probe of the teacher (at initialisation and at the end), as knn_at_end
    linear_blocks: int = 4             # features: token averages of this many last blocks, concatenated
    linear_epochs: int = 100
    image_size: int = 224              # centre crop fed to the backbone
    resize_size: int = 256


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def num_local_crops(self) -> int:
        return sum(self.data.local_crops_number)


# --------------------------------------------------------------------------- loading


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Config from a YAML file (or the defaults) with `a.b=value` overrides applied, validated."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else None)
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"unknown key '{prefix}{key}' (allowed in {prefix.rstrip('.') or 'the top level'}: "
                f"{', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = prefix + name
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, raw[name] or {}, key + ".")
        else:
            value = _coerce(raw[name], typ, key)
            allowed = f.metadata.get("choices")
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not allowed (choose one of: "
                                  f"{', '.join(map(str, allowed))})")
            kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, typ, key: str):
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union:                       # Optional[X], or X | Y: the first that accepts the value
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        return _coerce(value, options[-1], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):          # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {typ}")


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Every check names the key it is about; the first failure raises ConfigError."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {what}")

    m, d, l, o, ds, r, e = cfg.model, cfg.data, cfg.loss, cfg.optim, cfg.deepspeed, cfg.run, cfg.eval
    for key, v in [("model.window_size", m.window_size), ("model.patch_size", m.patch_size),
                   ("model.out_dim", m.out_dim), ("model.head_hidden_dim", m.head_hidden_dim),
                   ("model.head_bottleneck_dim", m.head_bottleneck_dim),
                   ("data.batch_size_per_gpu", d.batch_size_per_gpu), ("data.global_crops_size", d.global_crops_size),
                   ("optim.epochs", o.epochs), ("deepspeed.grad_accum_steps", ds.grad_accum_steps),
                   ("run.keep_checkpoints", r.keep_checkpoints), ("run.log_every_steps", r.log_every_steps),
                   ("eval.image_size", e.image_size), ("eval.resize_size", e.resize_size)]:
        need(v >= 1, key, f"must be >= 1, got {v}")
    _validate_architecture(cfg, need)
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    need(len(d.local_crops_size) == len(d.local_crops_number), "data.local_crops_number",
         "must have one entry per size in data.local_crops_size")
    need(all(n >= 0 for n in d.local_crops_number), "data.local_crops_number", f"counts must be >= 0, got "
         f"{d.local_crops_number}")
    need(all(s >= 1 for s in d.local_crops_size), "data.local_crops_size", f"sizes must be >= 1, got "
         f"{d.local_crops_size}")
    _validate_crop_geometry(cfg, need)
    need(not (m.compile and ds.zero_stage == 3), "model.compile",
         "is not supported with deepspeed.zero_stage=3: ZeRO-3 gathers each layer's parameters in hooks that break "
         "the compiled graph at every block (it compiled for minutes and ran no faster); use stage 0, 1 or 2, or "
         "model.compile=false")
    for key, s in [("data.global_crops_scale", d.global_crops_scale), ("data.local_crops_scale", d.local_crops_scale)]:
        need(len(s) == 2 and 0 < s[0] <= s[1] <= 1, key, f"must be [min, max] with 0 < min <= max <= 1, got {s}")
    for key, v in [("data.hflip_prob", d.hflip_prob), ("data.solarize_prob", d.solarize_prob)]:
        need(0 <= v <= 1, key, f"must be a probability in [0, 1], got {v}")
    need(0 <= d.rotation_degrees <= 180, "data.rotation_degrees", f"must be in [0, 180], got {d.rotation_degrees}")
    need(len(d.blur_sigma) == 2 and 0 < d.blur_sigma[0] <= d.blur_sigma[1], "data.blur_sigma",
         f"must be [min, max] pixels with 0 < min <= max, got {d.blur_sigma}")
    for key, v in [("loss.student_temp", l.student_temp), ("loss.teacher_temp", l.teacher_temp),
                   ("loss.warmup_teacher_temp", l.warmup_teacher_temp), ("loss.pair_factor", l.pair_factor),
                   ("optim.base_lr", o.base_lr), ("eval.knn_temperature", e.knn_temperature)]:
        need(v > 0, key, f"must be > 0, got {v}")
    for key, v in [("loss.warmup_teacher_temp_epochs", l.warmup_teacher_temp_epochs), ("optim.min_lr", o.min_lr),
                   ("optim.warmup_epochs", o.warmup_epochs), ("optim.weight_decay", o.weight_decay),
                   ("optim.weight_decay_end", o.weight_decay_end), ("optim.freeze_last_layer", o.freeze_last_layer),
                   ("run.max_steps", r.max_steps), ("run.checkpoint_every_steps", r.checkpoint_every_steps),
                   ("eval.knn_every_epochs", e.knn_every_epochs)]:
        need(v >= 0, key, f"must be >= 0, got {v}")
    need(o.clip_grad >= 0, "optim.clip_grad", f"must be >= 0 (0 disables clipping), got {o.clip_grad}")
    need(0 <= l.center_momentum < 1, "loss.center_momentum", f"must be in [0, 1), got {l.center_momentum}")
    need(0 <= o.momentum_teacher <= 1, "optim.momentum_teacher", f"must be in [0, 1], got {o.momentum_teacher}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
         f"must be two numbers in [0, 1), got {o.betas}")
    need(ds.global_batch_size is None or ds.global_batch_size >= 1, "deepspeed.global_batch_size",
         f"must be >= 1, got {ds.global_batch_size}")
    need(ds.bucket_elements is None or ds.bucket_elements >= 1, "deepspeed.bucket_elements",
         f"must be >= 1, got {ds.bucket_elements}")
    need(0 <= r.stop_epoch <= o.epochs, "run.stop_epoch",
         f"must be in [0, optim.epochs={o.epochs}], got {r.stop_epoch}")
    need(l.koleo_weight >= 0, "loss.koleo_weight", f"must be >= 0 (0: off), got {l.koleo_weight}")
    need(r.exit_before_end_minutes >= 0, "run.exit_before_end_minutes",
         f"must be >= 0 (0: off), got {r.exit_before_end_minutes}")
    need(r.hang_timeout_minutes >= 0, "run.hang_timeout_minutes", f"must be >= 0 (0: off), got {r.hang_timeout_minutes}")
    need(r.dist_timeout_minutes > 0, "run.dist_timeout_minutes", f"must be > 0, got {r.dist_timeout_minutes}")
    need(r.straggler_every_steps >= 0, "run.straggler_every_steps",
         f"must be >= 0 (0: off), got {r.straggler_every_steps}")
    need(r.straggler_factor > 1, "run.straggler_factor", f"must be > 1, got {r.straggler_factor}")
    need(r.spike_factor == 0 or r.spike_factor > 1, "run.spike_factor",
         f"must be 0 (off) or > 1 (a multiple of the running median loss), got {r.spike_factor}")
    need(r.spike_window >= 1, "run.spike_window", f"must be >= 1, got {r.spike_window}")
    need(r.max_rewinds >= 0, "run.max_rewinds", f"must be >= 0 (0: off), got {r.max_rewinds}")
    need(e.linear_blocks >= 1, "eval.linear_blocks", f"must be >= 1, got {e.linear_blocks}")
    need(e.linear_epochs >= 1, "eval.linear_epochs", f"must be >= 1, got {e.linear_epochs}")
    need(bool(e.knn_k) and all(k >= 1 for k in e.knn_k), "eval.knn_k", f"must be a list of k >= 1, got {e.knn_k}")


ARCH_KEYS = ("embed_dim", "depths", "num_heads", "drop_path_rate")


def resolved_arch(m: ModelConfig) -> dict:
    """The `model.arch` preset with the explicitly set model.embed_dim/depths/num_heads/drop_path_rate applied."""
    from esvit_scale.models.registry import presets      # the families' modules (timm): only when asked
    known = presets()
    if m.arch not in known:
        raise ConfigError(f"model.arch: {m.arch!r} is not allowed (choose one of: {', '.join(known)})")
    arch = dict(known[m.arch])
    for key in ARCH_KEYS:
        if getattr(m, key) is not None:
            arch[key] = getattr(m, key)
    return arch


def _validate_architecture(cfg: Config, need) -> None:
    """The Swin shape after the preset is resolved: one head count per stage, heads dividing each stage's width."""
    m = cfg.model
    arch = resolved_arch(m)
    need(all(x >= 1 for x in arch["depths"]), "model.depths", f"must be >= 1 blocks per stage, got {arch['depths']}")
    need(all(x >= 1 for x in arch["num_heads"]), "model.num_heads", f"must be >= 1, got {arch['num_heads']}")
    need(len(arch["depths"]) == len(arch["num_heads"]), "model.num_heads",
         f"must have one entry per stage of model.depths ({len(arch['depths'])}), got {arch['num_heads']}")
    need(arch["embed_dim"] >= 1, "model.embed_dim", f"must be >= 1, got {arch['embed_dim']}")
    need(0 <= arch["drop_path_rate"] < 1, "model.drop_path_rate", f"must be in [0, 1), got {arch['drop_path_rate']}")
    ckpt = m.activation_checkpointing
    need(isinstance(ckpt, bool) or len(ckpt) == len(arch["depths"]), "model.activation_checkpointing",
         f"must be true, false or one bool per stage ({len(arch['depths'])}), got {ckpt}")
    for i, heads in enumerate(arch["num_heads"]):
        width = arch["embed_dim"] * 2 ** i          # each stage doubles the channels
        need(width % heads == 0, "model.num_heads",
             f"stage {i} has {width} channels (model.embed_dim={arch['embed_dim']} x 2^{i}), not divisible by "
             f"its {heads} heads")


def _validate_crop_geometry(cfg: Config, need) -> None:
    """Every image fed to the backbone must be a whole number of patches. That is the only size constraint of
    timm's SwinTransformer with strict_img_size=False (tried for every size 4..120 px, window 4 and 7, 2 and 4
    stages): the patch embedding refuses a remainder; each later stage pads an odd grid before halving it, and
    every window attention pads a grid smaller than or not a multiple of its window (a crop of at most
    patch_size x 2^(stages-1) px ends in one token)."""
    p = cfg.model.patch_size
    sizes = [("data.global_crops_size", cfg.data.global_crops_size), ("eval.image_size", cfg.eval.image_size)]
    sizes += [(f"data.local_crops_size[{i}]", s) for i, s in enumerate(cfg.data.local_crops_size)]
    for key, size in sizes:
        need(size % p == 0, key, f"{size} px is not a multiple of model.patch_size={p} (the patch embedding "
             f"needs whole patches); e.g. {max(p, size // p * p)} or {(size // p + 1) * p}")
