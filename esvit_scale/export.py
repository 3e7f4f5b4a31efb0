"""Export a checkpoint for the people who use the backbone:

    python -m esvit_scale.export RUN/checkpoints/<tag> OUT_DIR

writes into OUT_DIR
    backbone_timm.safetensors   the teacher's backbone under timm's own key names (the backbone says which timm model
                                it is and how its names map: Backbone.timm_recipe / timm_state_dict)
    teacher.safetensors         the whole fp32 teacher (backbone + heads), our key names
    student.safetensors         the whole fp32 student, consolidated from any ZeRO stage and world size
    export.json                 the timm model name and arguments, the run's config, step and k-NN result
A backbone that timm cannot rebuild (no timm equivalent, or timm's model would have other parameters) is refused
with a message, before anything is written.
Load the backbone with timm (no network: the weights come from the file):
    timm.create_model(j["timm_model"], pretrained=True,
                      pretrained_cfg_overlay=dict(file=".../backbone_timm.safetensors"),
                      norm_layer=functools.partial(torch.nn.LayerNorm, eps=j["layer_norm_eps"]), **j["timm_kwargs"])
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from esvit_scale.checkpoint import CheckpointError, load_file
from esvit_scale.checkpoint.restore import read_student_weights, read_teacher_weights, verified_marker
from esvit_scale.config import config_from_dict
from esvit_scale.models.backbone import ExportError, TimmRecipe
from esvit_scale.models.registry import build_backbone


def timm_export(cfg, teacher_state: dict[str, torch.Tensor]) -> tuple[TimmRecipe, dict[str, torch.Tensor]]:
    """(how timm builds the backbone, the backbone's weights under timm's names), checked against the model timm
    builds from that recipe (on the meta device: no memory): ExportError names what differs."""
    import timm
    with torch.device("meta"):
        backbone = build_backbone(cfg.model, img_size=cfg.data.global_crops_size, kernels=cfg.kernels)
        recipe = backbone.timm_recipe()
        theirs = timm.create_model(recipe.name, pretrained=False, **recipe.kwargs,
                                   norm_layer=functools.partial(torch.nn.LayerNorm, eps=recipe.layer_norm_eps))
    ours = backbone.timm_state_dict({k[len("backbone."):]: v.float().contiguous() for k, v in teacher_state.items()
                                     if k.startswith("backbone.")})
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    missing, extra = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    wrong = sorted(k for k in set(ours) & set(expected) if tuple(ours[k].shape) != expected[k])
    if missing or extra or wrong:
        raise ExportError(f"timm's {recipe.name} with {recipe.kwargs} is not this backbone ({cfg.model.arch}): "
                          f"{len(missing)} parameters it has that ours lacks {missing[:3]}, {len(extra)} of ours it "
                          f"lacks {extra[:3]}, {len(wrong)} of other shapes {wrong[:3]}")
    return recipe, ours


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().float().contiguous().clone() for k, v in state.items()}, str(path))


def export(checkpoint: Path, out_dir: Path) -> dict:
    marker = verified_marker(checkpoint)
    client = load_file(checkpoint / "client_state.pt")
    cfg = config_from_dict(client["config"])
    teacher = read_teacher_weights(checkpoint)
    recipe, backbone_state = timm_export(cfg, teacher)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(backbone_state, out_dir / "backbone_timm.safetensors")
    _save(teacher, out_dir / "teacher.safetensors")
    _save(read_student_weights(checkpoint), out_dir / "student.safetensors")
    summary_file = checkpoint.parents[1] / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    info = {"checkpoint": str(checkpoint), "step": marker["step"], "epoch": client["train_state"]["epoch"],
            "timm_model": recipe.name, "timm_kwargs": recipe.kwargs, "layer_norm_eps": recipe.layer_norm_eps,
            "knn_top1_init": client["train_state"].get("knn_top1_init"),
            "knn_top1": summary.get("knn_top1_by_k") if summary.get("steps") == marker["step"] else None,
            "config": client["config"]}
    (out_dir / "export.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esvit_scale.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder (RUN/checkpoints/<tag>)")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        info = export(args.checkpoint, args.out_dir)
    except (FileNotFoundError, CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("checkpoint", "step", "timm_model", "knn_top1")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
