"""Shared fixtures: a small generated image folder, a tiny-model config, and launchers for real runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))


# configs/quickstart.yaml is the recipe for small digit images; tests run on it with the paper's objective and
# augmentation instead (the region term at its full weight, no batch-normalised heads, the crops, flips, solarisation).
PAPER_RECIPE = {
    "loss.region_loss": "true", "loss.region_weight": 1.0, "model.head_batchnorm": "false", "data.hflip_prob": 0.5,
    "data.solarize_prob": 0.2, "data.rotation_degrees": 0, "data.global_crops_scale": "[0.4,1.0]",
    "data.local_crops_scale": "[0.05,0.4]",
    "optim.momentum_teacher": 0.996, "optim.weight_decay_end": 0.4, "eval.linear_at_end": "false",
}


def paper_recipe_overrides() -> list[str]:
    return [f"{k}={v}" for k, v in PAPER_RECIPE.items()]


def tiny_overrides(data_path: str | Path, output_dir: str | Path, **extra) -> list[str]:
    """A Swin of a few blocks on 32/16 px crops: seconds per step on 2 CPU cores."""
    values = {
        **PAPER_RECIPE,
        "model.arch": "swin_nano", "model.window_size": 4, "model.drop_path_rate": 0.1,
        "model.out_dim": 128, "model.head_hidden_dim": 64, "model.head_bottleneck_dim": 32,
        "data.path": str(data_path), "data.loader": "torch", "data.batch_size_per_gpu": 4,
        "data.num_workers": 0, "data.global_crops_size": 32, "data.local_crops_size": "[16]",
        "data.local_crops_number": "[2]", "optim.epochs": 3, "optim.warmup_epochs": 1,
        "loss.warmup_teacher_temp_epochs": 1, "deepspeed.precision": "fp32", "run.device": "cpu",
        "run.output_dir": str(output_dir), "run.log_every_steps": 1, "kernels.window_attention": "false",
        "kernels.region_matching": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    from esvit_scale.data.synthetic import make_colour_folder
    root = make_colour_folder(tmp_path_factory.mktemp("images"), train_per_class=8, val_per_class=4, size=48)
    return root / "train"


def run_command(args: list[str], timeout: int = 600, env: dict | None = None, check: bool = True
                ) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
                **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:6])} ... exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def torchrun(script_and_args: list[str], nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    return run_command([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_port", str(_free_port()), *script_and_args], **kw)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_losses(output_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl (the last record of a step wins)."""
    losses = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def _cpu_isas() -> list[str]:
    try:
        import torch  # noqa: F401  (loads the libraries _C links against)
        from esvit_scale import _C
        return list(_C.supported_cpu_isas())
    except ImportError:      # not built: kernels_on fails with the build command
        return ["auto"]


@pytest.fixture(params=_cpu_isas())
def cpu_isa(kernels_on, request):
    """Each vector instruction set this CPU runs the CPU kernels with (avx2, and avx512 where the CPU has it)."""
    from esvit_scale.ops import _ext
    _ext.set_cpu_isa(request.param)
    yield request.param
    _ext.set_cpu_isa()


@pytest.fixture
def kernels_on():
    """The compiled kernels, with the dispatch reset to its defaults around the test."""
    from esvit_scale.ops import _ext
    assert _ext.available(), "esvit_scale._C is not built: run `python setup.py build_ext --inplace`"
    _ext.configure()
    yield
    _ext.configure()
