"""Export a checkpoint for the people who use the backbone:

    python -m esvit_scale.export RUN/checkpoints/<tag> OUT_DIR

writes into OUT_DIR
    backbone_timm.safetensors   the teacher's Swin backbone under timm's own key names (our window attention keeps
                                timm's parameters: attn.qkv, attn.proj, attn.relative_position_bias_table)
    teacher.safetensors         the whole fp32 teacher (backbone + heads), our key names
    student.safetensors         the whole fp32 student, consolidated from any ZeRO stage and world size
    export.json                 the timm model name and arguments, the run's config, step and k-NN result
Load the backbone with timm (no network: the weights come from the file):
    timm.create_model(j["timm_model"], pretrained=True,
                      pretrained_cfg_overlay=dict(file=".../backbone_timm.safetensors"),
                      norm_layer=functools.partial(torch.nn.LayerNorm, eps=j["layer_norm_eps"]), **j["timm_kwargs"])
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from esvit_scale.checkpoint import CheckpointError, load_file
from esvit_scale.checkpoint.restore import read_student_weights, read_teacher_weights, verified_marker
from esvit_scale.config import config_from_dict
from esvit_scale.config import resolved_arch

BACKBONE_PREFIX = "backbone.swin."
LAYER_NORM_EPS = 1e-6                     # SwinBackbone's norm layers
TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224", "swin_small": "swin_small_patch4_window7_224",
              "swin_base": "swin_base_patch4_window7_224", "swin_large": "swin_large_patch4_window7_224"}


def timm_recipe(cfg) -> tuple[str, dict]:
    """(timm model name, keyword arguments) that build our backbone's architecture in timm."""
    arch = resolved_arch(cfg.model)
    kwargs = {"img_size": cfg.data.global_crops_size, "patch_size": cfg.model.patch_size,
              "window_size": cfg.model.window_size, "embed_dim": arch["embed_dim"], "depths": list(arch["depths"]),
              "num_heads": list(arch["num_heads"]), "num_classes": 0, "strict_img_size": False}
    return TIMM_NAMES.get(cfg.model.arch, "swin_tiny_patch4_window7_224"), kwargs


def timm_backbone_state(teacher_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(BACKBONE_PREFIX):]: v.float().contiguous() for k, v in teacher_state.items()
            if k.startswith(BACKBONE_PREFIX)}


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().float().contiguous().clone() for k, v in state.items()}, str(path))


def export(checkpoint: Path, out_dir: Path) -> dict:
    marker = verified_marker(checkpoint)
    client = load_file(checkpoint / "client_state.pt")
    cfg = config_from_dict(client["config"])
    teacher = read_teacher_weights(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(timm_backbone_state(teacher), out_dir / "backbone_timm.safetensors")
    _save(teacher, out_dir / "teacher.safetensors")
    _save(read_student_weights(checkpoint), out_dir / "student.safetensors")
    name, kwargs = timm_recipe(cfg)
    summary_file = checkpoint.parents[1] / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    info = {"checkpoint": str(checkpoint), "step": marker["step"], "epoch": client["train_state"]["epoch"],
            "timm_model": name, "timm_kwargs": kwargs, "layer_norm_eps": LAYER_NORM_EPS,
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
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("checkpoint", "step", "timm_model", "knn_top1")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
