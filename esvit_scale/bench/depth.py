"""Swin V1 and V2 blocks at depth: a narrow pair with a large preset's depths trained side by side, and the
amplitude of the activations block by block (the SwinV2 paper's finding: with V1's pre-norm the deeper blocks'
outputs grow until training at H and G size becomes unstable; res-post-norm and cosine attention keep them level).

    python -m esvit_scale.bench depth --data PATH --out runs/depth [--depth-of swin_huge] [--width 32] [--steps 300]

For each family (swin_<size>, swinv2_<size>): `train.py` on the quickstart recipe in bf16 on the CPU at the paper's
peak learning rate (1e-3: its recipe at batch 512), the depths of the preset, `--width` channels and 32-wide heads,
`--crop` / half of it px crops, a checkpoint every `--every` steps. Each checkpoint's student then runs a fixed batch of the data's
images; the amplitude of a block is the mean |x| of its output tokens (the residual stream; also their largest |x|).
Writes depth.json (amplitudes by step and block, max / min over the blocks, the losses, non-finite steps) and
depth.png. A family whose run exists in --out is measured again, not retrained.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from esvit_scale.bench.report import cpu_model, write_json

ROOT = Path(__file__).resolve().parents[2]
PEAK_LR = 1e-3          # the paper's recipe: base_lr 5e-4 per 256 images at batch 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="an image folder (e.g. python -m esvit_scale.data.photos OUT)")
    parser.add_argument("--out", default="runs/depth")
    parser.add_argument("--depth-of", default="swin_huge", choices=("swin_huge", "swin_giant"),
                        help="whose depths the pair takes ([2,2,18,2] or [2,2,42,4])")
    parser.add_argument("--width", type=int, default=32, help="embed_dim (heads 32 wide)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="steps between the measured checkpoints")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--crop", type=int, default=32, help="global crop px (local crops half of it)")
    parser.add_argument("--images", type=int, default=32, help="images of the measuring batch")
    parser.add_argument("--json", help="also write the result here")


def _depths(arch: str) -> list[int]:
    from esvit_scale.models.registry import presets
    return presets()[arch]["depths"]


def _overrides(args, arch: str, out: Path) -> list[str]:
    depths = _depths(arch)
    heads = [max(1, args.width * 2 ** i // 32) for i in range(len(depths))]
    return [f"model.arch={arch}", f"model.embed_dim={args.width}", f"model.num_heads=[{','.join(map(str, heads))}]",
            f"data.path={args.data}", "data.num_workers=0", f"data.batch_size_per_gpu={args.batch}",
            f"data.global_crops_size={args.crop}", f"data.local_crops_size=[{args.crop // 2}]",
            f"optim.base_lr={PEAK_LR * 256 / args.batch}", "optim.warmup_epochs=1", "deepspeed.precision=bf16",
            f"run.output_dir={out}", f"run.max_steps={args.steps}", f"run.checkpoint_every_steps={args.every}",
            "run.keep_checkpoints=1000", "eval.knn_at_end=false", "eval.linear_at_end=false", "run.log_every_steps=10"]


def _train(args, arch: str, out: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/quickstart.yaml"),
           *_overrides(args, arch, out)]
    print(f"[depth] training {arch}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, env=env, check=False, stdout=open(out.with_suffix(".log"), "w"), stderr=subprocess.STDOUT)


def _images(args, size: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import center_crop, normalize, pil_to_tensor, resize
    root = Path(args.data)
    root = root.parent / "val" if (root.parent / "val").is_dir() and root.name == "train" else root
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files[:: max(1, len(files) // args.images)][: args.images]
    batch = []
    for f in files:
        x = pil_to_tensor(Image.open(f).convert("RGB")).float() / 255
        batch.append(normalize(center_crop(resize(x, size, antialias=True), size), [0.485, 0.456, 0.406],
                               [0.229, 0.224, 0.225]))
    return torch.stack(batch)


@torch.no_grad()
def amplitudes(model, images: torch.Tensor) -> tuple[list[float], list[float]]:
    """(mean |x|, max |x|) of each block's output tokens, in forward order."""
    mean: list[float] = []
    peak: list[float] = []

    def record(module, inputs, out):
        mean.append(float(out.float().abs().mean()))
        peak.append(float(out.float().abs().max()))
    blocks = [b for stage in model.backbone.blocks_by_stage() for b in stage]
    hooks = [b.register_forward_hook(record) for b in blocks]
    try:
        model.backbone(images)
    finally:
        for h in hooks:
            h.remove()
    return mean, peak


def _measure(run: Path, images: torch.Tensor) -> dict:
    from esvit_scale import ops
    from esvit_scale.checkpoint.restore import read_student_weights
    from esvit_scale.checkpoint import load_file
    from esvit_scale.config import config_from_dict
    from esvit_scale.models.esvit import EsViT
    checkpoints = sorted((run / "checkpoints").glob("step*"))
    cfg = config_from_dict(load_file(checkpoints[0] / "client_state.pt")["config"])
    ops.configure(cfg.kernels)
    by_step = {}
    for ckpt in [None, *checkpoints]:
        torch.manual_seed(cfg.run.seed)
        model = EsViT(cfg).eval()
        if ckpt is not None:
            model.load_state_dict(read_student_weights(ckpt), strict=True)
        amps, peaks = amplitudes(model, images)
        by_step[0 if ckpt is None else int(ckpt.name[len("step"):])] = {
            "amplitude": [round(a, 5) for a in amps], "max_over_min": round(max(amps) / min(amps), 2),
            "peak": [round(a, 4) for a in peaks], "peak_max_over_min": round(max(peaks) / min(peaks), 2),
            "finite": all(math.isfinite(a) for a in amps + peaks)}
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    bad = sorted(s for s, v in losses.items() if not math.isfinite(v))
    return {"by_step": by_step, "losses": losses, "non_finite_steps": bad, "steps_done": max(losses, default=0)}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_blocks, ax_ratio, ax_loss) = plt.subplots(1, 3, figsize=(18, 4.8))
    colours = {"V1": "tab:red", "V2": "tab:blue"}
    for label, run in result["runs"].items():
        steps = sorted(run["by_step"], key=int)
        first, last = run["by_step"][steps[0]], run["by_step"][steps[-1]]
        ax_blocks.plot(range(1, len(first["amplitude"]) + 1), first["amplitude"], ":", color=colours[label],
                       label=f"{label} at initialisation")
        ax_blocks.plot(range(1, len(last["amplitude"]) + 1), last["amplitude"], "-", marker=".",
                       color=colours[label], label=f"{label} after {steps[-1]} steps")
        ax_ratio.plot([int(s) for s in steps], [run["by_step"][s]["max_over_min"] for s in steps], "-o",
                      color=colours[label], label=f"{label}, mean |x|")
        ax_ratio.plot([int(s) for s in steps], [run["by_step"][s]["peak_max_over_min"] for s in steps], "--s",
                      color=colours[label], label=f"{label}, max |x|")
        losses = sorted((int(k), v) for k, v in run["losses"].items())
        ax_loss.plot([k for k, _ in losses], [v for _, v in losses], color=colours[label], lw=0.8, label=label)
    ax_blocks.set(yscale="log", xlabel="block (forward order)", ylabel="mean |activation| of the block's output",
                  title=f"{result['depth_of']} depths {result['depths']}, {result['width']} channels, bf16")
    ax_ratio.set(yscale="log", xlabel="training step", ylabel="max / min amplitude over the blocks",
                 title="spread of the amplitudes over depth")
    ax_loss.set(xlabel="training step", ylabel="loss (view + region)", title="training loss")
    for ax in (ax_blocks, ax_ratio, ax_loss):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = args.depth_of.split("_", 1)[1]
    result = {"command": " ".join(["python -m esvit_scale.bench depth", *sys.argv[2:]]), "cpu": cpu_model(),
              "depth_of": args.depth_of, "width": args.width, "steps": args.steps,
              "depths": _depths(args.depth_of), "runs": {}}
    images = None
    for label, arch in (("V1", f"swin_{size}"), ("V2", f"swinv2_{size}")):
        run_dir = out / arch
        if not (run_dir / "metrics.jsonl").is_file():
            _train(args, arch, run_dir)
        if images is None:
            images = _images(args, args.crop)
        result["runs"][label] = {"arch": arch, **_measure(run_dir, images)}
        r = result["runs"][label]
        last = r["by_step"][max(r["by_step"])]
        print(f"[depth] {arch}: {r['steps_done']} steps, non-finite losses at {r['non_finite_steps'] or 'none'}; "
              f"max/min amplitude {r['by_step'][0]['max_over_min']} at init, {last['max_over_min']} at the end",
              flush=True)
    write_json(result, str(out / "depth.json"))
    plot(result, out / "depth.png")
    write_json(result, args.json)
    return result
