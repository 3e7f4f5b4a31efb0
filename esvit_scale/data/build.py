"""Pick and build the multi-crop loader named by `data.loader` (auto: DALI where it imports, else torch)."""
from __future__ import annotations

import logging

from esvit_scale.cluster import faults
from esvit_scale.config import DataConfig
from esvit_scale.engine import collectives
from esvit_scale.data.source import ImageSource
from esvit_scale.data.multicrop import MultiCropLoader
from esvit_scale.data.torch_loader import TorchMultiCropLoader

log = logging.getLogger(__name__)


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(data: DataConfig, source: ImageSource, rank: int, world_size: int, seed: int,
                 device: str) -> MultiCropLoader:
    """The loader `data.loader` names. A DALI loader is checked before training (built, one batch pulled and looked
    at); if it fails on any rank, every rank falls back as `data.fallback` says: DALI's CPU graph (after a GPU
    one), then the torch loader. The loader's `kind` and `fallbacks` say what happened (summary.json `data`)."""
    kind = data.loader
    if kind == "auto":
        kind = "dali" if dali_importable() and _has_dali_loader() else "torch"
    if kind == "dali" and not dali_importable():
        raise RuntimeError("data.loader=dali but NVIDIA DALI is not installed: "
                           "pip install nvidia-dali-cuda130 (or `pip install -e .[dali]`), or set data.loader=torch")
    tries = ["dali_gpu" if device == "cuda" else "dali_cpu"] if kind == "dali" else []
    if tries and data.fallback == "cpu" and tries[0] == "dali_gpu":
        tries.append("dali_cpu")
    if not tries or data.fallback != "none":
        tries.append("torch")
    fallbacks = []
    for i, name in enumerate(tries):
        problem, loader = None, None
        try:
            loader = _build(name, data, source, rank, world_size, seed, device)
            if name != "torch":
                _pull_one_batch(loader, name)
        except Exception as e:            # noqa: BLE001 -- any failure of DALI here is a reason to fall back
            problem = f"{type(e).__name__}: {_first_line(e)}"
        problem = collectives.first_error(problem)
        if problem is None:
            break
        if i + 1 == len(tries):
            raise RuntimeError(f"data loader {LOADER_NAMES[name]} failed its start-up check: {problem}"
                               + ("" if data.fallback != "none" else " (data.fallback=none)"))
        fallbacks.append(f"{LOADER_NAMES[name]} failed its start-up check ({problem}); using "
                         f"{LOADER_NAMES[tries[i + 1]]}")
        log.warning("data loader: %s (data.fallback=%s)", fallbacks[-1], data.fallback)
    loader.kind, loader.fallbacks = LOADER_NAMES[name], fallbacks
    log.info("data loader: %s (%d batches per epoch per rank)", loader.kind, len(loader))
    return loader


LOADER_NAMES = {"dali_gpu": "DALI (GPU graph)", "dali_cpu": "DALI (CPU graph)", "torch": "torch"}


def _build(name: str, data: DataConfig, source: ImageSource, rank: int, world_size: int, seed: int, device: str):
    if name == "torch":
        return TorchMultiCropLoader(source, data, rank=rank, world_size=world_size, seed=seed,
                                    pin_memory=device == "cuda")
    from esvit_scale.data.dali_loader import DaliMultiCropLoader
    device_id = _local_cuda_device() if name == "dali_gpu" else None
    return DaliMultiCropLoader(source, data, rank=rank, world_size=world_size, seed=seed, device_id=device_id)


def _pull_one_batch(loader, name: str) -> None:
    """One batch of epoch 0, checked and dropped: each epoch builds its own pipeline from its own seeds, so the
    training's batches are the same with or without this."""
    if name in faults.loader_faults():
        raise RuntimeError(f"ESVIT_FAULT_LOADER={name} (test fault)")
    batches = loader.epoch(0)
    try:
        crops = next(iter(batches))
    finally:
        batches.close()
    want = [spec.size for spec in loader.specs]
    got = [c.shape[-1] for c in crops]
    if got != want or any(not bool(c.isfinite().all()) for c in crops):
        raise RuntimeError(f"its first batch has crops of {got} px (want {want}) or values that are not finite")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _has_dali_loader() -> bool:
    try:
        import esvit_scale.data.dali_loader  # noqa: F401
    except ImportError:
        return False
    return True


def _local_cuda_device() -> int:
    import torch
    return torch.cuda.current_device()
