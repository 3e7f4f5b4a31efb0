"""Fused ops (window attention, region matching) with pure-PyTorch references and a backend dispatcher.

    configure(cfg.kernels)   # once, from the run config (KernelConfig); logs once which backend each op uses
"""
from __future__ import annotations

from esvit_scale.ops import _ext
from esvit_scale.ops._ext import available, cuda_available


def configure(kernels_cfg=None) -> None:
    """Set the backends from a KernelConfig (None: defaults, kernels on)."""
    if kernels_cfg is None:
        _ext.configure()
    else:
        try:
            _ext.configure(kernels_cfg.window_attention, kernels_cfg.region_matching, kernels_cfg.force_reference,
                           kernels_cfg.cpu_isa)
        except ValueError as e:
            raise ValueError(f"config error: kernels.cpu_isa={kernels_cfg.cpu_isa!r}: {e}") from None


__all__ = ["configure", "available", "cuda_available"]
