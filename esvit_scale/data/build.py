"""Pick and build the multi-crop loader named by `data.loader` (auto: DALI where it imports, else torch)."""
from __future__ import annotations

import logging

from esvit_scale.config import DataConfig
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
    kind = data.loader
    if kind == "auto":
        kind = "dali" if dali_importable() and _has_dali_loader() else "torch"
    if kind == "dali":
        if not dali_importable():
            raise RuntimeError("data.loader=dali but NVIDIA DALI is not installed: "
                               "pip install nvidia-dali-cuda130 (or `pip install -e .[dali]`), or set data.loader=torch")
        from esvit_scale.data.dali_loader import DaliMultiCropLoader
        device_id = None if device == "cpu" else _local_cuda_device()
        loader = DaliMultiCropLoader(source, data, rank=rank, world_size=world_size, seed=seed, device_id=device_id)
    else:
        loader = TorchMultiCropLoader(source, data, rank=rank, world_size=world_size, seed=seed,
                                      pin_memory=device == "cuda")
    log.info("data loader: %s (%d batches per epoch per rank)", kind, len(loader))
    return loader


def _has_dali_loader() -> bool:
    try:
        import esvit_scale.data.dali_loader  # noqa: F401
    except ImportError:
        return False
    return True


def _local_cuda_device() -> int:
    import torch
    return torch.cuda.current_device()
