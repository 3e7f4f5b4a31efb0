"""The peak FLOP/s that MFU (model FLOPs utilisation) is measured against.

GPU: the vendor's dense (no sparsity) tensor-core figure for bf16/fp16 and the plain fp32 figure, by device name
(PEAK_TFLOPS, first match wins; SXM parts unless the name says PCIe/NVL). CPU: measured now, the rate of a
2048^3 matmul in the training dtype at the current torch thread count (the best of a few runs), since a CPU's
peak depends on its model, clock and instruction sets.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

# (substring of torch.cuda.get_device_name, {dtype: dense TFLOP/s}); datasheet figures
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]

_TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def gpu_peak_flops(name: str, precision: str) -> Optional[float]:
    """Dense peak FLOP/s of a GPU named `name` in `precision` (fp32/fp16/bf16), None when not in the table."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peaks.get(precision, 0.0) * 1e12 or None
    return None


def matmul_size(device: torch.device, precision: str) -> int:
    """2048, or 1024 for bf16 / fp16 on the CPU: without native support a 2048^3 product there takes seconds."""
    return 1024 if device.type == "cpu" and precision != "fp32" else 2048


def measured_matmul_flops(device: torch.device, precision: str, size: int | None = None, repeats: int = 3) -> float:
    """FLOP/s of a size^3 matrix product in `precision` on `device` now (the best of `repeats` after a warm-up), as
    F.linear, the backbone's and the heads' product: on a CPU without native bf16, torch.mm in bf16 ran at 1.3
    GFLOP/s and F.linear at 10-16 (2 Zen 3 cores), and a bf16 run spent minutes measuring its peak."""
    size = size or matmul_size(device, precision)
    dtype = _TORCH_DTYPE[precision]
    gen = torch.Generator().manual_seed(0)          # not the global generator: a run's random draws stay its own
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.nn.functional.linear(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def device_peak(device: torch.device, precision: str) -> dict:
    """{"peak_flops", "source", "device_name"} of the device a step runs on: the table on a GPU (the measured
    matmul when the GPU is not in it), the measured matmul rate at this thread count on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, precision)
        if peak is not None:
            return {"peak_flops": peak, "source": f"datasheet dense {precision}", "device_name": name}
        return {"peak_flops": measured_matmul_flops(device, precision), "device_name": name,
                "source": f"measured 2048^3 {precision} matmul (not in the datasheet table)"}
    size = matmul_size(device, precision)
    from esvit_scale.bench.report import cpu_model
    return {"peak_flops": measured_matmul_flops(device, precision, size), "device_name": cpu_model(),
            "source": f"measured {size}^3 {precision} matmul, {torch.get_num_threads()} threads"}
