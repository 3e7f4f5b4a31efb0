"""Everything GPU-related a lent GPU machine allows, in one command, each part run even when an earlier one failed.

    python3 -m esvit_scale.bench gpu_check --out runs/gpu          # make gpu-check: on the GPU machine
    python -m esvit_scale.bench gpu_check --out runs/gpu-dry --dry  # make gpu-check-dry: the same script, tiny, on CPU

Parts, in order (the GPU machine has torch, timm, pytest and nvcc but no network, no DeepSpeed and no DALI):
  deepspeed    DeepSpeed importable, else installed offline from the bundle `make gpu-bundle` wrote (build/gpu_bundle)
  build        the extension built in place with its CUDA sources
  cuda_tests   tests/test_kernels_cuda.py
  kernels_*    bench kernels: the fused ops against their references and timm's (SDPA) attention, Swin-T and Swin-B
               shapes, and SwinV2-T's blocks against timm's SwinV2, bf16
  step_*       bench step of Swin-T (kernels on / off, compile on / off), Swin-B and SwinV2-T (kernels on / off) at
               224 + 96, bf16, ZeRO-0, one GPU
  train        train.py on the generated digits: a checkpoint, kill -9, the same command resumes and finishes
  knn          k-NN of that run's checkpoint (python -m esvit_scale.eval knn)
Each part writes <out>/<part>.log (and its JSON where it has one); <out>/gpu_check.json has, per part, its status
(passed / failed / skipped, with the reason), seconds, exit code, command and results. --dry runs every part that
needs no GPU on the CPU with tiny shapes and reports the others "skipped: no GPU", so that this script is tested in
CI and is not what breaks on the day a GPU is lent.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "build" / "gpu_bundle"
SITE = ROOT / "build" / "gpu_site"              # where the bundle installs (on sys.path of every part)
PY = sys.executable
BF16 = ["deepspeed.precision=bf16", "run.device=cuda", "deepspeed.zero_stage=0"]
# the tiny model of the dry run (and of the GPU run's train / knn parts, which test the path, not the speed)
TINY = ["model.arch=swin_nano", "model.window_size=4", "model.out_dim=256", "model.head_hidden_dim=64",
        "model.head_bottleneck_dim=32", "data.batch_size_per_gpu=8", "data.num_workers=1",
        "data.global_crops_size=32", "data.local_crops_size=[16]", "data.local_crops_number=[2]",
        "deepspeed.precision=fp32", "eval.image_size=32", "eval.resize_size=36", "eval.linear_at_end=false"]


@dataclass
class Part:
    name: str
    command: list[str]
    timeout_s: int
    in_dry_run: bool = True                          # runs in --dry (on the CPU); the others need the GPU
    json_out: Optional[str] = None                   # the JSON the command writes, kept in the report
    run: Optional[Callable[["Part", Path, dict], int]] = None    # instead of one command (the train part)
    env: dict = field(default_factory=dict)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/gpu", help="folder of the logs and gpu_check.json")
    parser.add_argument("--dry", action="store_true", help="on the CPU, tiny shapes; GPU-only parts skipped")
    parser.add_argument("--only", nargs="+", help="run these parts only")


def parts(dry: bool, out: Path) -> list[Part]:
    j = lambda name: str(out / f"{name}.json")                 # noqa: E731
    device = ["run.device=cpu"] if dry else BF16
    steps = ["--warmup", "1", "--steps", "2"] if dry else ["--warmup", "3", "--steps", "10"]
    tiny_kernels = ["--batch", "1", "--rounds", "1", "--K", "256", "--step-batch", "1"]
    result = [
        Part("deepspeed", [PY, "-c", "import deepspeed; print(deepspeed.__version__, deepspeed.__file__)"], 300,
             run=_deepspeed),
        Part("build", [PY, "setup.py", "build_ext", "--inplace"], 600, in_dry_run=False,
             env={"MAX_JOBS": str(os.cpu_count() or 2)}),
        Part("cuda_tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests/test_kernels_cuda.py"], 600,
             in_dry_run=False),
    ]
    for arch in ("swin_tiny", "swin_base", "swinv2_tiny"):
        name = f"kernels_{arch}"
        if dry:
            cmd = [PY, "-m", "esvit_scale.bench", "kernels", "--device", "cpu", "--arch", arch, *tiny_kernels,
                   "--cases", "window_attention", "--json", j(name)]
        else:
            cmd = [PY, "-m", "esvit_scale.bench", "kernels", "--device", "cuda", "--arch", arch, "--dtype", "bf16",
                   "--json", j(name)]
        result.append(Part(name, cmd, 600, json_out=j(name)))
    step_cases = [("swin_tiny", True, False), ("swin_tiny", False, False), ("swin_tiny", True, True),
                  ("swin_tiny", False, True), ("swin_base", True, False), ("swin_base", False, False),
                  ("swinv2_tiny", True, False), ("swinv2_tiny", False, False)]
    for arch, kernels, compiled in step_cases:
        name = f"step_{arch}_kernels_{'on' if kernels else 'off'}_compile_{'on' if compiled else 'off'}"
        config = ["--config", "configs/quickstart.yaml", *TINY] if dry else \
            ["--config", f"configs/{arch}.yaml", "data.batch_size_per_gpu=32", "data.local_crops_size=[96]"]
        switch = [f"kernels.window_attention={str(kernels).lower()}", f"kernels.region_matching={str(kernels).lower()}",
                  f"model.compile={str(compiled).lower()}"]
        result.append(Part(name, [PY, "-m", "esvit_scale.bench", "step", *steps, "--json", j(name), *config,
                                  *switch, *device, f"run.output_dir={out}/work/{name}"], 600,
                           in_dry_run=arch == "swin_tiny" and not compiled, json_out=j(name)))
    train = [PY, "train.py", "--config", "configs/quickstart.yaml", *TINY, *device, "run.max_steps=12",
             "run.checkpoint_every_steps=4", "run.keep_checkpoints=3", "eval.knn_at_end=false",
             f"run.output_dir={out}/work/train"]
    result.append(Part("train", train, 600, run=_train_kill_resume))
    knn = [PY, "-m", "esvit_scale.eval", "knn", "--checkpoint", f"{out}/work/train/checkpoints/step000000012",
           "--train", f"{out}/work/train/quickstart_data/train", "--val", f"{out}/work/train/quickstart_data/val",
           "--json", j("knn")]
    result.append(Part("knn", knn, 300, json_out=j("knn")))
    return result


def _env(part: Part) -> dict:
    path = [str(ROOT)] + ([str(SITE)] if SITE.is_dir() else []) + [os.environ.get("PYTHONPATH", "")]
    return {**os.environ, **part.env, "PYTHONPATH": os.pathsep.join(p for p in path if p), "PYTHONUNBUFFERED": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))}


def _command(part: Part, log: Path, command: Optional[list[str]] = None, timeout_s: Optional[int] = None) -> int:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command or part.command)}\n")
        f.flush()
        try:
            return subprocess.run(command or part.command, cwd=ROOT, env=_env(part), stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout_s or part.timeout_s).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_check] timed out after {timeout_s or part.timeout_s} s\n")
            return 124


def _deepspeed(part: Part, log: Path, notes: dict) -> int:
    """DeepSpeed as it is, or installed offline from the bundle into build/gpu_site."""
    if _command(part, log) == 0:
        return 0
    if not BUNDLE.is_dir():
        notes["reason"] = f"DeepSpeed is not importable and there is no bundle at {BUNDLE} (make gpu-bundle)"
        return 1
    install = [PY, "-m", "pip", "install", "--no-index", "--find-links", str(BUNDLE), "--target", str(SITE),
               "--no-deps", *sorted(str(w) for w in BUNDLE.glob("*.whl"))]
    if _command(part, log, install) != 0:
        notes["reason"] = "the offline install from the bundle failed"
        return 1
    notes["installed_from"] = str(BUNDLE)
    return _command(part, log)


def _train_kill_resume(part: Part, log: Path, notes: dict) -> int:
    """Train until the first checkpoint is complete, kill -9, run the same command again: it must resume and finish."""
    out = Path(part.command[-1].split("=", 1)[1])
    with open(log, "a") as f:
        f.write(f"$ {' '.join(part.command)}   # killed with SIGKILL after its first checkpoint\n")
        f.flush()
        proc = subprocess.Popen(part.command, cwd=ROOT, env=_env(part), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + part.timeout_s / 2
        while proc.poll() is None and time.time() < deadline and not list(out.glob("checkpoints/*/COMPLETE")):
            time.sleep(0.5)
        if proc.poll() is not None:
            notes["reason"] = f"the run ended (exit {proc.returncode}) before it was killed"
            return proc.returncode or 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rc = _command(part, log, timeout_s=part.timeout_s // 2)
    summary = out / "summary.json"
    if rc == 0 and summary.is_file():
        done = json.loads(summary.read_text())
        notes["result"] = {k: done.get(k) for k in ("steps", "images_per_s", "kernels", "events")}
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
        if not any(e.get("event") == "resume" for e in events) or done["steps"] != 12:
            notes["reason"] = "the second run did not resume from the checkpoint or did not reach step 12"
            return 1
    return rc


def run(args) -> None:
    import torch
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    report = {"dry": args.dry, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "parts": {}}
    for part in parts(args.dry, out):
        if args.only and part.name not in args.only:
            continue
        log = out / f"{part.name}.log"
        log.unlink(missing_ok=True)
        entry = {"command": " ".join(part.command), "log": str(log)}
        if (not part.in_dry_run if args.dry else not gpu and part.name != "deepspeed"):
            entry.update(status="skipped", reason="no GPU")
        else:
            start, notes = time.time(), {}
            rc = part.run(part, log, notes) if part.run else _command(part, log)
            entry.update(status="passed" if rc == 0 else "failed", rc=rc, seconds=round(time.time() - start, 1),
                         **notes)
            if part.json_out and Path(part.json_out).is_file():
                entry["result"] = json.loads(Path(part.json_out).read_text())
            if rc != 0:
                entry["log_tail"] = log.read_text(errors="replace")[-2000:]
        report["parts"][part.name] = entry
        print(f"[gpu_check] {part.name}: {entry['status']}" + (f" ({entry['reason']})" if "reason" in entry else "")
              + (f" in {entry['seconds']} s" if "seconds" in entry else ""), flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    ran = [p for p in report["parts"].values() if p["status"] != "skipped"]
    report["passed"] = all(p["status"] == "passed" for p in ran)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"[gpu_check] {sum(p['status'] == 'passed' for p in ran)} of {len(ran)} parts passed, "
          f"{len(report['parts']) - len(ran)} skipped; {out / 'gpu_check.json'}")
    if not report["passed"]:
        raise SystemExit(1)
