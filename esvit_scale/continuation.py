"""Start a run from another run's checkpoint, allowing new heads: the paper's view-only -> +region recipe.

Weights (student and teacher), the view centre and the position (epoch, step) are taken from the
checkpoint; parameters the checkpoint lacks must all belong to heads the new run adds (any other missing
or unexpected key is an error: the official code's strict=False silently lost weights). New student heads
keep their fresh initialisation and the teacher's copy of them starts equal to the student's. The
optimizer starts anew.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from esvit_scale.checkpoint import COMPLETE, read_client_state

log = logging.getLogger(__name__)

NEW_HEAD_PREFIXES = ("region_head.",)


def read_student_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 student of a DeepSpeed checkpoint folder, at any ZeRO stage and world size."""
    if list(path.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    model_file = path / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{path}: no DeepSpeed model states found")
    state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def load_allowing_new_heads(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> list[str]:
    """load_state_dict that tolerates only missing new-head parameters; returns the missing names."""
    result = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in result.missing_keys if not k.startswith(NEW_HEAD_PREFIXES)]
    if bad_missing or result.unexpected_keys:
        raise RuntimeError(f"{what}: checkpoint does not fit the model: missing {bad_missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return result.missing_keys


def initialise_from(path: Path, student: nn.Module, teacher: nn.Module, loss_fn: nn.Module):
    from esvit_scale.trainer import TrainState
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"run.init_from={path} is not a complete checkpoint folder (no {COMPLETE})")
    new = load_allowing_new_heads(student, read_student_weights(path), "student")
    load_allowing_new_heads(teacher, torch.load(path / "teacher.pt", map_location="cpu", weights_only=True),
                            "teacher")
    student_params = dict(student.named_parameters())
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name in new:
                p.copy_(student_params[name])
    client = read_client_state(path)
    centres = {k: v for k, v in client["loss"].items() if k in loss_fn.state_dict()}
    loss_fn.load_state_dict({**loss_fn.state_dict(), **centres})
    state = TrainState(**client["train_state"])
    log.info("initialised from %s at epoch %d, step %d; new parameters: %s", path, state.epoch, state.step,
             sorted({n.split(".")[0] for n in new}) or "none")
    return state
