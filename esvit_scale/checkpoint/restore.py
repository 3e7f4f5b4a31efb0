"""How a checkpoint comes back: which one a run starts from, and loading it into parts that are already built.

    choice = choose_checkpoint(store, layout)          # the newest usable checkpoint and how it loads, or None
    state = load_into(path, parts, kind, layout)       # student, optimizer, teacher, centres, RNG -> position

The trainer starts a run with them (after building its parts, engine/build.py), and a rewind inside a running run
uses the very same two calls. Building never depends on what is loaded: whether DeepSpeed reads a checkpoint as its
universal one is set per load.
- resume: the newest complete checkpoint in `run.output_dir/checkpoints/` whose files verify (store.py): student,
  optimizer, teacher, centres, position, loss history and RNG states. Written under another layout (world size,
  ZeRO stage, batch split) it resumes when the global batch and precision stay (check_layout).
- run.init_from (only when the output folder has no checkpoint): another run's weights (student and teacher),
  view centre and position, loaded into the modules before DeepSpeed wraps them (initialise_from); heads the
  checkpoint lacks must all be new heads (any other missing or unexpected key is an error: the official code's
  strict=False silently lost weights); they keep their fresh initialisation and the teacher's copy starts equal to
  the student's. The optimizer starts anew. The paper's view-only -> +region.
- fresh: the teacher starts equal to the student.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from esvit_scale.checkpoint.files import (CheckpointError, describe_write_error, load_file, safe_torch_load,
                                          save_file, set_rng_state)
from esvit_scale.checkpoint.manifest import find_problems, read_marker
from esvit_scale.checkpoint.store import CheckpointStore
from esvit_scale.cluster.faults import pause_point
from esvit_scale.engine import collectives

log = logging.getLogger(__name__)

NEW_HEAD_PREFIXES = ("region_head.",)


@dataclass
class TrainState:
    epoch: int = 0
    batch_in_epoch: int = 0          # micro-batches of `epoch` consumed per rank
    step: int = 0                    # optimizer steps done
    knn_top1_init: Optional[dict] = None
    linear_top1_init: Optional[float] = None
    loss_history: list[float] = field(default_factory=list)   # the last step losses, for spike detection


def run_layout(cfg, split) -> dict:
    """How a run splits its work (engine.student.BatchSplit), recorded in every checkpoint's marker (check_layout
    compares)."""
    return {"world_size": split.world_size, "zero_stage": cfg.deepspeed.zero_stage, "micro_batch": split.micro,
            "accumulation": split.accumulation, "global_batch": split.global_batch,
            "precision": cfg.deepspeed.precision}


# what defines an experiment: another value under the same output folder is another run, not this one resumed
EXPERIMENT_KEYS = {"model": ("compile", "activation_checkpointing"), "data": None}


def check_same_experiment(out: Path, cfg) -> None:
    """A folder holding checkpoints of another model or data set is not resumed (a resubmitted job of the same name
    reuses its folder by default): ConfigError naming the difference."""
    saved = out / "config.yaml"
    if not saved.is_file() or not any((out / "checkpoints").glob("step*/COMPLETE")):
        return
    import yaml

    from esvit_scale.config import ConfigError
    old, new = yaml.safe_load(saved.read_text()) or {}, cfg.to_dict()
    diffs = [f"model.{k}: {v!r} -> {new['model'].get(k)!r}" for k, v in old.get("model", {}).items()
             if k not in EXPERIMENT_KEYS["model"] and new["model"].get(k) != v]
    if old.get("data", {}).get("path") != new["data"]["path"]:
        diffs.append(f"data.path: {old.get('data', {}).get('path')!r} -> {new['data']['path']!r}")
    if diffs:
        raise ConfigError(f"run.output_dir={out} holds checkpoints of another experiment ({'; '.join(diffs)}): "
                          "resuming it would fail or mix two runs. Give the new experiment its own folder "
                          "(run.output_dir, or under SLURM another --job-name or ESVIT_OUTPUT_DIR).")


def choose_checkpoint(store: CheckpointStore, layout: dict) -> Optional[tuple[Path, str]]:
    """Collective: the newest usable checkpoint and how it loads under `layout` (check_layout), or None."""
    path = store.newest_usable()
    if path is None:
        return None
    return path, check_layout(path, read_marker(path).get("layout"), layout)


def load_into(path: Path, parts, kind: str, layout: dict) -> TrainState:
    """Collective: the checkpoint `path` loaded into built parts; the training position in this run's layout."""
    log.info("resuming from %s", path)
    pause_point("resume")
    state = load_checkpoint(path, parts, kind)
    state.batch_in_epoch = _batches_at(state.batch_in_epoch, read_marker(path).get("layout"), layout, path)
    return state


ELASTIC_KEYS = {"world_size", "micro_batch", "accumulation"}      # may change if the global batch stays


def check_layout(path: Path, saved: Optional[dict], layout: dict) -> str:
    """How a checkpoint resumes under `layout`: "same" layout; "split", another split of the same global batch at
    ZeRO stage 0 (every rank holds the whole student and optimizer: DeepSpeed's files load as they are);
    "universal", another split of the same global batch and/or another ZeRO stage, both stages 1-3, through
    DeepSpeed's universal checkpoint. The sampler reads the same samples per optimizer step whatever the split, and
    the centres move once per step. Anything else (global batch, precision, stage 0 <-> 1-3) stops the run."""
    if saved is None:                      # a checkpoint of an older version: nothing to compare
        return "same"
    changed = {k for k, v in layout.items() if saved.get(k) != v}
    if not changed:
        return "same"
    stages = (saved["zero_stage"], layout["zero_stage"])
    if changed <= ELASTIC_KEYS or (changed <= ELASTIC_KEYS | {"zero_stage"} and min(stages) >= 1):
        kind = "split" if stages == (0, 0) else "universal"
        log.warning("resuming %s, written by %d ranks x %d micro-batches of %d at ZeRO stage %d, with %d ranks x %d "
                    "x %d at stage %d (the same global batch of %d)", path, saved["world_size"],
                    saved["accumulation"], saved["micro_batch"], saved["zero_stage"], layout["world_size"],
                    layout["accumulation"], layout["micro_batch"], layout["zero_stage"], layout["global_batch"])
        return kind
    diffs = [f"{k} {saved.get(k)} -> {layout[k]}" for k in layout if k in changed]
    raise CheckpointError(
        f"cannot resume {path}: it was written by a run split differently ({', '.join(diffs)}). Continuing would "
        f"change the global batch, the learning rate or the data order, or fail inside DeepSpeed. A checkpoint "
        f"resumes under another world size or ZeRO stage only with the same global batch and precision, and not "
        f"between stage 0 and stages 1-3. "
        f"Run with deepspeed.zero_stage={saved.get('zero_stage')}, deepspeed.precision={saved.get('precision')} and "
        f"global batch {saved.get('global_batch')} (e.g. {saved.get('world_size')} ranks), or start a new run from "
        f"its weights with run.init_from={path} (the optimizer starts anew).")


def load_checkpoint(path: Path, parts, kind: str = "same") -> TrainState:
    """Restore student, optimizer, teacher, centres and this rank's RNG; returns the position.
    kind (check_layout): "universal" loads the student from a universal copy made next to the checkpoint."""
    engine, teacher, loss_fn = parts.engine, parts.teacher, parts.loss_fn
    rank = collectives.rank()
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()}
    tag = universal_copy(path, shapes).name if kind == "universal" else path.name
    flags = [{k: g[k] for k in ("apply_weight_decay", "is_last_layer")} for g in engine.optimizer.param_groups]
    engine._config.load_universal_checkpoint = kind == "universal"     # read by DeepSpeed at load time only
    with safe_torch_load():            # DeepSpeed's universal loader calls torch.load itself
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=tag)
    if kind == "universal":
        _repair_universal_load(engine, flags)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {path.parent / tag}")
    if kind == "same" and not (path / "teacher.pt").is_file():       # ZeRO-3 shards of this very layout
        teacher.load_local_state(load_file(path / f"teacher_rank{rank}.pt"))
    else:
        teacher.load_full_state_dict(read_teacher_weights(path))
    rng_file = path / f"rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(load_file(rng_file))
    else:
        log.warning("%s missing: this rank's RNG streams restart", rng_file)
    client = load_file(path / "client_state.pt")
    loss_fn.load_state_dict(client["loss"])
    return TrainState(**client["train_state"])


def _repair_universal_load(engine, flags: list[dict]) -> None:
    """Undo two things DeepSpeed's (0.19) universal loader gets wrong: it gives every parameter group the settings
    of the first (our weight-decay and last-layer flags included), and at ZeRO-3 one `step` tensor is shared by the
    AdamW state of every group, so that each group's step advances it (wrong bias corrections from then on)."""
    for group, own in zip(engine.optimizer.param_groups, flags):
        group.update(own)
    base = getattr(engine.optimizer, "optimizer", None)
    for state in (base.state.values() if base is not None else []):
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _loadable_at_any_stage(out: Path, shapes: dict[str, tuple]) -> None:
    """DeepSpeed 0.19 writes a universal checkpoint that loads only at stages of the family it came from (1-2 or 3):
    complete our copy with what the other family's loader reads. The engine takes only metadata from the model-states
    file, under its own stage's name; stages 1-2 want each parameter's `step` and full-shape tensors (stage 3 writes
    them flat), the global `ds_version`; stage 3 wants the step in `optimizer_state_dict`."""
    import shutil

    import deepspeed
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    present = next(out / n for n in names if (out / n).is_file())
    for name in names:
        if not (out / name).is_file():
            shutil.copyfile(present, out / name)
    zero = out / "zero"
    state = load_file(zero / "optimizer_state.pt")
    steps = [load_file(zero / n / "step.pt") for n in shapes if (zero / n / "step.pt").is_file()]
    step = steps[0] if steps else state["optimizer_state_dict"]["state"][0]["step"]
    state.setdefault("ds_version", deepspeed.__version__)
    state.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": state["param_groups"]})
    save_file(state, zero / "optimizer_state.pt")
    for name, shape in shapes.items():
        folder = zero / name
        if not folder.is_dir():                     # a frozen parameter: no optimizer state
            continue
        if not (folder / "step.pt").is_file():
            save_file(step, folder / "step.pt")
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            if not (folder / f"{key}.pt").is_file():
                continue
            saved = load_file(folder / f"{key}.pt")
            tensor = saved["param"] if isinstance(saved, dict) else saved
            if not isinstance(saved, dict) or tensor.shape != torch.Size(shape):
                save_file({**(saved if isinstance(saved, dict) else {}), "param": tensor.reshape(shape)},
                          folder / f"{key}.pt")


UNIVERSAL_SUFFIX = "_universal"
CONVERTED = "CONVERTED"


def universal_copy(path: Path, shapes: dict[str, tuple]) -> Path:
    """Collective: DeepSpeed's universal checkpoint of `path` (loadable at any world size and ZeRO stage 1-3),
    converted once by rank 0 into `<tag>_universal` next to it; the original is never modified."""
    out = path.with_name(path.name + UNIVERSAL_SUFFIX)
    error = None
    if collectives.rank() == 0 and not (out / CONVERTED).is_file():
        error = _convert_to_universal(path, out, shapes)
    error = collectives.broadcast_object(error)   # every rank stops with rank 0's error, none waits for it
    if error:
        raise CheckpointError(error)
    return out


def _convert_to_universal(path: Path, out: Path, shapes: dict[str, tuple]) -> Optional[str]:
    """Write the universal copy of `path` into `out`; on failure remove the partial copy and return why."""
    import shutil
    import sys

    from deepspeed.checkpoint import ds_to_universal
    shutil.rmtree(out, ignore_errors=True)
    log.info("converting %s to a universal checkpoint in %s", path, out)
    argv, sys.argv = sys.argv, ["ds_to_universal", "--input_folder", str(path), "--output_folder", str(out),
                                "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    try:                                   # its only interface is a command line
        with safe_torch_load():
            ds_to_universal.main(ds_to_universal.parse_arguments())
        _loadable_at_any_stage(out, shapes)
        (out / CONVERTED).write_text(path.name + "\n")
        return None
    except (OSError, RuntimeError) as e:
        why = describe_write_error(e, out.parent)            # before the removal frees the space again
        shutil.rmtree(out, ignore_errors=True)
        return (f"could not write {out}, the universal copy of {path} that resumes it under another world size or "
                f"ZeRO stage: {why}. The partial copy was removed; {path} is "
                f"unchanged. Free space next to it (the copy is about as large as the checkpoint) and start again.")
    finally:
        sys.argv = argv


# --------------------------------------------------------------------------- run.init_from

def read_student_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 student of a DeepSpeed checkpoint folder, at any ZeRO stage and world size."""
    if list(path.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with safe_torch_load():
            return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    model_file = path / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{path}: no DeepSpeed model states found")
    return {k: v.float() for k, v in load_file(model_file)["module"].items()}


def read_teacher_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 teacher of a checkpoint folder: teacher.pt, or the ZeRO-3 shards of every rank put together."""
    if (path / "teacher.pt").is_file():
        return load_file(path / "teacher.pt")
    files = sorted(path.glob("teacher_rank*.pt"), key=lambda f: int(f.stem[len("teacher_rank"):]))
    if not files:
        raise FileNotFoundError(f"{path}: no teacher.pt and no teacher_rank*.pt shards")
    shards = [load_file(f) for f in files]
    full = {}
    for i, (name, shape) in enumerate(zip(shards[0]["names"], shards[0]["shapes"])):
        flat = torch.cat([s["shards"][i].flatten() for s in shards])
        full[name] = flat[:torch.Size(shape).numel()].view(shape).float()
    return full


def load_allowing_new_heads(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> list[str]:
    """load_state_dict that tolerates only missing new-head parameters; returns the missing names."""
    result = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in result.missing_keys if not k.startswith(NEW_HEAD_PREFIXES)]
    if bad_missing or result.unexpected_keys:
        raise RuntimeError(f"{what}: checkpoint does not fit the model: missing {bad_missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return result.missing_keys


def verified_marker(path: Path) -> dict:
    """Collective: the marker of a complete checkpoint folder whose files verify; an error otherwise."""
    marker = read_marker(path)
    if marker is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint folder (no COMPLETE marker)")
    problems = find_problems(path, marker)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    return marker


def initialise_from(path: Path, student: nn.Module, teacher: nn.Module, loss_fn: nn.Module,
                    layout: dict) -> TrainState:
    try:
        marker = verified_marker(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"run.init_from: {e}") from None
    new = load_allowing_new_heads(student, read_student_weights(path), "student")
    load_allowing_new_heads(teacher, read_teacher_weights(path), "teacher")
    student_params = dict(student.named_parameters())
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name in new:
                p.copy_(student_params[name])
    client = load_file(path / "client_state.pt")
    centres = {k: v for k, v in client["loss"].items() if k in loss_fn.state_dict()}
    loss_fn.load_state_dict({**loss_fn.state_dict(), **centres})
    state = TrainState(**client["train_state"])
    state.loss_history = []            # another run's losses, possibly of another objective: no spike baseline
    state.batch_in_epoch = _batches_at(state.batch_in_epoch, marker.get("layout"), layout, path)
    log.info("initialised from %s at epoch %d, step %d; new parameters: %s", path, state.epoch, state.step,
             sorted({n.split(".")[0] for n in new}) or "none")
    return state


def _batches_at(batches: int, saved: Optional[dict], layout: dict, path: Path) -> int:
    """The checkpoint's position in micro-batches per rank of this run's layout (data.sampler.batches_at)."""
    if saved is None:
        return batches
    from esvit_scale.data.sampler import batches_at
    try:
        return batches_at(batches, (saved["micro_batch"], saved["world_size"]),
                          (layout["micro_batch"], layout["world_size"]), layout["global_batch"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
