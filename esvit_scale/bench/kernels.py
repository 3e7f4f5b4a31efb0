"""Fused kernels vs their references (and timm's window attention) at Swin-T shapes, forward + backward.

    python -m esvit_scale.bench kernels --json runs/bench_kernels.json [--arch swin_base|swinv2_tiny|...]

With a swinv2_ arch the block rows are SwinV2 blocks (cosine attention, continuous position bias): timm's own
against ours (the same fused op around the normalisation and the bias MLP); timm has no SDPA path for them.

Every variant of an op runs in this one process, interleaved round by round; the reported time is the
median over rounds of one forward + backward, with glibc reusing freed blocks as a long run does. Peak memory
is the growth of the process's peak RSS during one call on the CPU (VmHWM, reset through /proc/self/clear_refs),
measured in a first pass over the cases in which glibc returns blocks over 64 KiB to the OS when freed;
torch.cuda.max_memory_allocated on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import random
import statistics
import time
from typing import Callable

import torch
from timm.models.swin_transformer import SwinTransformerBlock, get_relative_position_index
from timm.models.swin_transformer_v2 import SwinTransformerV2Block

from esvit_scale.bench.report import cpu_model, write_json
from esvit_scale.ops import _ext
from esvit_scale.ops.region_matching import (
    consumable_chunks, matched_soft_cross_entropy_sum, matched_soft_cross_entropy_sum_reference, region_argmax,
    region_argmax_reference)
from esvit_scale.ops.swin_attention import install_window_attention, window_layout
from esvit_scale.ops.window_attention import window_attention, window_attention_reference

CASES = ("window_attention", "region_matching", "region_loss_step")
# Swin-T at 224 px: (feature map side, channels, heads, shifted) of the blocks of each stage; window 7.
SWIN_T_STAGES = [(56, 96, 3, True), (28, 192, 6, True), (14, 384, 12, True), (7, 768, 24, False)]
SWIN_B_STAGES = [(56, 128, 4, True), (28, 256, 8, True), (14, 512, 16, True), (7, 1024, 32, False)]
STAGES = {"swin_tiny": SWIN_T_STAGES, "swin_base": SWIN_B_STAGES,
          "swinv2_tiny": SWIN_T_STAGES, "swinv2_base": SWIN_B_STAGES}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="images per window-attention call")
    parser.add_argument("--arch", choices=sorted(STAGES), default="swin_tiny", help="window-attention shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="of the window-attention cases (region matching runs in fp32)")
    parser.add_argument("--ce-batch", type=int, default=8, help="images per region-matching call")
    parser.add_argument("--K", type=int, default=65536, help="prototypes of the region head")
    parser.add_argument("--step-batch", type=int, default=4, help="images of the training-step region-loss case")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which cases to run")
    parser.add_argument("--cpu-isa", default="auto",
                        help="vector instruction set of the CPU kernels (auto: the best; the others the CPU has are "
                             "timed next to it for window attention)")


# --- measurement ---------------------------------------------------------------------------------------
def _mallopt(mmap_threshold: int, trim_threshold: int, trim: bool = False) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim_threshold)   # M_TRIM_THRESHOLD
        if trim:
            libc.malloc_trim(0)            # free heap pages back to the OS: reusing them shows up in RSS
    except OSError:
        pass


def _malloc_for_timing() -> None:
    """glibc's steady state in a long run: blocks up to 32 MiB (its dynamic maximum) reused from the heap."""
    _mallopt(32 * 2**20, 64 * 2**20)


@contextlib.contextmanager
def _rss_tracks_tensors():
    """Blocks over 64 KiB mmap'd and given back to the OS when freed, so that RSS follows the tensors (the memory
    pass, before any timing; see Meter)."""
    _mallopt(64 * 1024, 64 * 1024, trim=True)
    try:
        yield
    finally:
        _malloc_for_timing()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Extra memory at the peak of one call of fn."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                  # resets VmHWM to the current RSS
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def retained_memory_mib(forward: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Memory that one forward keeps alive for its backward (its output held, the graph not yet run)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = forward()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
    else:
        base = _rss_kib("VmRSS") * 1024
        out = forward()
        held = _rss_kib("VmRSS") * 1024 - base
    del out
    return held / 2**20


def time_variants(variants: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds per call of each variant, interleaved so that machine noise hits all alike, in a new
    (seeded) order each round: in a fixed order a variant pays for the caches its predecessor leaves behind (on the
    CPU, the same window-attention kernel timed 3-9% slower when it always ran right after the reference)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in variants.values():           # warm-up: allocations, kernel caches, layout caches
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order, rng = list(variants), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn = variants[name]
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextlib.contextmanager
def running_on(isa: str):
    """The CPU kernels on another instruction set inside the block (the choice in force is restored after)."""
    current = _ext.cpu_isa()
    _ext.extension().set_cpu_isa(isa)
    try:
        yield
    finally:
        _ext.extension().set_cpu_isa(current)


def with_cpu_isa(isa: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run():
        with running_on(isa):
            fn()
    return run


def other_cpu_isas(device: torch.device) -> list[str]:
    """The instruction sets this CPU has besides the one in use (none on a GPU or without _C)."""
    if device.type != "cpu" or not _ext.available():
        return []
    return [isa for isa in _ext.extension().supported_cpu_isas() if isa != _ext.cpu_isa()]


def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run():
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def fwd_grads(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """Forward + the gradients of the inputs, as an op inside a network computes them (nothing accumulated)."""
    def run():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


class Meter:
    """One pass over the cases: "memory" first (glibc returns big blocks to the OS, so RSS follows the tensors),
    then "time" (glibc reuses freed blocks as a long run does; mmap-ing every large block would page-fault afresh
    on each call and slow most the variants that allocate most, the references). run() merges the two passes."""

    def __init__(self, kind: str, rounds: int, device: torch.device):
        self.kind, self.rounds, self.device = kind, rounds, device

    def times(self, variants: dict[str, Callable[[], None]], ref: str = "reference", fused: str = "fused") -> dict:
        if self.kind != "time":
            return {}
        ms = time_variants(variants, self.rounds, self.device)
        return {"ms": {k: round(v, 3) for k, v in ms.items()}, "speedup_vs_reference": round(ms[ref] / ms[fused], 2)}

    def peaks(self, variants: dict[str, Callable[[], None]], held: dict[str, Callable[[], torch.Tensor]] = None
              ) -> dict:
        if self.kind != "memory":
            return {}
        for fn in variants.values():        # first calls build caches and layouts
            fn()
        mem = {k: peak_memory_mib(fn, self.device) for k, fn in variants.items()}
        out = {"peak_mib": {k: None if v is None else round(v, 1) for k, v in mem.items()}}
        if mem.get("fused") is not None and mem.get("reference") is not None:
            # a peak under 1 MiB counts as 1 MiB: the ratio is then a lower bound, not a division by ~0
            out["memory_ratio_vs_reference"] = round(mem["reference"] / max(mem["fused"], 1.0), 2)
        if held:
            out["retained_by_forward_mib"] = {k: round(retained_memory_mib(fn, self.device), 1)
                                              for k, fn in held.items()}
        return out


def _merge(a, b):
    """The two passes' results, key by key."""
    if isinstance(a, dict):
        return {**a, **{k: _merge(a[k], v) if k in a else v for k, v in b.items()}}
    if isinstance(a, list):
        return [_merge(x, y) for x, y in zip(a, b)]
    return b


# --- window attention -----------------------------------------------------------------------------------
def bench_window_attention(args, device: torch.device, meter: Meter) -> list[dict]:
    results = []
    rel = get_relative_position_index(7, 7).to(device)
    dtype = DTYPES[args.dtype]
    for side, dim, heads, shifted in STAGES[args.arch]:
        shift = (3, 3) if shifted else (0, 0)
        gather, _, region = window_layout(side, side, (7, 7), shift, device)
        nW, N, D = gather.numel() // 49, 49, dim // heads
        gen = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(args.batch * nW, N, 3 * dim, device=device, generator=gen).to(dtype).requires_grad_()
        table = (0.02 * torch.randn(169, heads, device=device, generator=gen)).to(dtype).requires_grad_()
        scale = D ** -0.5
        op = {
            "fused": fwd_grads(lambda: window_attention(qkv, table, rel, region, heads, scale), [qkv, table]),
            "reference": fwd_grads(lambda: window_attention_reference(qkv, table, rel, region, heads, scale),
                                   [qkv, table]),
        }
        # the same kernel on the CPU's other instruction sets (avx2 next to avx512), timed in the same rounds
        by_isa = {f"fused_{isa}": with_cpu_isa(isa, op["fused"]) for isa in other_cpu_isas(device)}
        # the whole attention path of a block (roll/partition, qkv, attention, proj, reverse), ours vs timm's
        x = torch.randn(args.batch, side, side, dim, device=device, generator=gen).to(dtype).requires_grad_()
        blocks = {}
        v2 = args.arch.startswith("swinv2")
        for name in ("timm", "ours_fused", "ours_reference") if v2 else ("timm", "timm_sdpa", "ours_fused",
                                                                         "ours_reference"):
            torch.manual_seed(0)
            block_class = SwinTransformerV2Block if v2 else SwinTransformerBlock
            blk = block_class(dim, (side, side), num_heads=heads, window_size=7,
                              shift_size=3 if shifted else 0, dynamic_mask=True).to(device, dtype)
            blk.attn.fused_attn = name == "timm_sdpa"
            if name.startswith("ours"):
                install_window_attention(blk, fused=name == "ours_fused")
            blocks[name] = fwd_bwd(lambda blk=blk: blk._attn(x))
        r = {"stage_map": [side, side], "windows": args.batch * nW, "tokens_per_window": N, "heads": heads,
             "head_dim": D, "shifted": shifted, "qkv_shape": list(qkv.shape)}
        r.update(meter.times({**op, **by_isa, **{f"block_{k}": v for k, v in blocks.items()}}))
        if "ms" in r:
            ms = r["ms"]
            if by_isa:
                r["speedup_vs_reference_by_isa"] = {
                    _ext.cpu_isa(): r["speedup_vs_reference"],
                    **{k[len("fused_"):]: round(ms["reference"] / ms[k], 2) for k in by_isa}}
            # the fused op's 7 matrix products (2 forward, 5 backward incl. recomputing the scores), N^2 D each
            r["fused_matmul_gflop"] = round(7 * 2 * N * N * D * qkv.shape[0] * heads / 1e9, 4)
            r["fused_matmul_gflops_per_s"] = round(r["fused_matmul_gflop"] / (ms["fused"] / 1e3), 1)
            r["block_speedup_vs_timm"] = round(ms["block_timm"] / ms["block_ours_fused"], 2)
            if "block_timm_sdpa" in ms:
                r["block_speedup_vs_timm_sdpa"] = round(ms["block_timm_sdpa"] / ms["block_ours_fused"], 2)
        r.update(meter.peaks(op))
        results.append(r)
    return results


# --- region matching -------------------------------------------------------------------------------------
class HeadOutput:
    """Student region logits as the loss receives them: the non-leaf output of the region head, made once.

    Each call first restores the original values (the fused op writes its gradient over them), in every variant
    alike, so that the restore costs all variants the same; gradients are taken with autograd.grad with respect
    to the logits themselves, so what is measured is the loss, not the accumulation of a parameter gradient.
    """

    def __init__(self, *shape: int, device: torch.device, gen: torch.Generator):
        self.values = 3 * torch.randn(*shape, device=device, generator=gen)
        self.logits = torch.zeros(*shape, device=device, requires_grad=True) * 1.0

    def fresh(self) -> torch.Tensor:
        with torch.no_grad():
            self.logits.copy_(self.values)
        return self.logits


def _loss_variants(loss: Callable[[bool, bool], torch.Tensor], inputs: list[torch.Tensor]) -> tuple[dict, dict]:
    """{variant: forward + backward} and {variant: forward only} of loss(fused, consume) -> scalar.

    fused: the kernels as training runs them (gradient written over the logits); fused_keep: the kernels with
    a separately allocated gradient; reference: the gather formulation.
    """
    settings = {"fused": (True, True), "fused_keep": (True, False), "reference": (False, False)}

    def step(fused: bool, consume: bool) -> Callable[[], None]:
        return lambda: torch.autograd.grad(loss(fused, consume), inputs)
    return ({k: step(*v) for k, v in settings.items()},
            {k: (lambda v=v: loss(*v)) for k, v in settings.items()})


def _matched_ce(fused: bool, consume: bool) -> Callable:
    if fused:
        return lambda s, p, m: matched_soft_cross_entropy_sum(s, p, m, 0.1, consume_logits=consume)
    return lambda s, p, m: matched_soft_cross_entropy_sum_reference(s, p, m, 0.1)


def bench_region_matching(args, device: torch.device, meter: Meter) -> list[dict]:
    """One student crop against its teacher targets, as the loss calls it: a global crop (49 tokens) against the
    other global crop, a local crop (9 tokens) against both."""
    results = []
    gen = torch.Generator(device=device).manual_seed(0)
    N, K, Lt = args.ce_batch, args.K, 49
    probs = torch.softmax(torch.randn(2, N, Lt, K, device=device, generator=gen) / 0.07, dim=-1)
    ft = torch.randn(N, Lt, 768, device=device, generator=gen)
    for Ls, targets in ((49, (1,)), (9, (0, 1))):
        head = HeadOutput(N, Ls, K, device=device, gen=gen)
        fs = torch.randn(N, Ls, 768, device=device, generator=gen)
        matches = {g: region_argmax_reference(fs, ft) for g in targets}
        loss = lambda fused, consume: _matched_ce(fused, consume)(head.fresh(), probs, matches)  # noqa: E731
        variants, held = _loss_variants(loss, [head.logits])
        # peak_mib: one call; retained_by_forward_mib: kept alive from forward to backward (10 calls per step)
        results.append({"op": "matched_soft_cross_entropy", "logits_shape": [N, Ls, K],
                        "probs_shape": [2, N, Lt, K], "targets": len(targets),
                        **meter.times(variants), **meter.peaks(variants, held)})
        results.append({"op": "region_argmax", "student_shape": [N, Ls, 768], "teacher_shape": [N, Lt, 768],
                        **meter.times({"fused": lambda: region_argmax(fs, ft),
                                       "reference": lambda: region_argmax_reference(fs, ft)})})
    return results


def bench_region_loss_step(args, device: torch.device, meter: Meter) -> dict:
    """The region loss as one training step runs it: 18 matched-CE terms forward, summed, then one backward.

    Student region logits of 2 global crops (49 tokens: the 7x7 map of Swin-T at 224 px) and 8 local crops (9
    tokens, 3x3), one tensor per resolution chunked per crop like EsViT.forward (consumable_chunks; the gradient
    of each is what flows into the region head); teacher probabilities of the 2 global crops; every crop against
    each teacher crop but itself: one call per student crop for the kernels (fused), one per pair for the
    reference, which keeps log_softmax and the gathered target of every term from forward to backward.
    """
    N, K, Lg, Ll, n_local = args.step_batch, args.K, 49, 9, 8
    gen = torch.Generator(device=device).manual_seed(1)
    heads = [HeadOutput(2 * N, Lg, K, device=device, gen=gen), HeadOutput(n_local * N, Ll, K, device=device, gen=gen)]
    probs = torch.softmax(torch.randn(2, N, Lg, K, device=device, generator=gen) / 0.07, dim=-1)
    tokens = [Lg] * 2 + [Ll] * n_local
    feats = [torch.randn(N, L, 768, device=device, generator=gen) for L in tokens]
    matches = [{g: region_argmax_reference(feats[v], feats[g]) for g in range(2) if g != v} for v in range(10)]

    def loss(fused: bool, consume: bool) -> torch.Tensor:
        crops = consumable_chunks(heads[0].fresh(), 2) + consumable_chunks(heads[1].fresh(), n_local)
        ce = _matched_ce(fused, consume)
        return sum(ce(crops[v], probs, matches[v]) for v in range(len(crops))) / 18

    variants, held = _loss_variants(loss, [h.logits for h in heads])
    return {
        "op": "region_loss_step", "pairs": 18, "images": N, "K": K,
        "student_logits": [[2 * N, Lg, K], [n_local * N, Ll, K]], "teacher_probs": [2, N, Lg, K],
        "logits_mib": round(sum(h.logits.numel() for h in heads) * 4 / 2**20, 1),
        **meter.times(variants), **meter.peaks(variants, held),
    }


def _print_table(report: dict) -> None:
    print(f"device {report['device']} ({report['cpu_model']})  threads {report['threads']}  "
          f"backends {report['backends']}  cpu isa {report['cpu_isa']}  "
          f"load average {report['load_average_before']} -> {report['load_average_after']}")
    if "cpu_fma_peak_gflops_per_thread_by_isa" in report:
        print("fp32 FMA peak, one thread: " + ", ".join(
            f"{isa} {v} GFLOP/s" for isa, v in report["cpu_fma_peak_gflops_per_thread_by_isa"].items()))
    if "window_attention" in report:
        _print_window_attention(report)
    if "region_matching" in report:
        _print_region_matching(report)
    if "region_loss_step" in report:
        _print_region_loss_step(report)


def _print_window_attention(report: dict) -> None:
    print("window attention, forward + backward, ms (median)")
    print(f"{'map':>7} {'heads':>5} {'fused':>8} {'ref':>8} {'x':>5} {'GFLOP/s':>7} | {'blk ours':>8} {'blk ref':>8} "
          f"{'timm':>8} {'sdpa':>8} | {'MiB fused':>9} {'MiB ref':>8}")
    for r in report["window_attention"]:
        m, p = r["ms"], r["peak_mib"]
        print(f"{r['stage_map'][0]:>4}x{r['stage_map'][1]:<2} {r['heads']:>5} {m['fused']:>8.1f} "
              f"{m['reference']:>8.1f} {r['speedup_vs_reference']:>5.2f} {r['fused_matmul_gflops_per_s']:>7.1f} | "
              f"{m['block_ours_fused']:>8.1f} "
              f"{m['block_ours_reference']:>8.1f} {m['block_timm']:>8.1f} {m.get('block_timm_sdpa', float('nan')):>8.1f} | "
              f"{p['fused'] or float('nan'):>9.1f} {p['reference'] or float('nan'):>8.1f}")
        for isa, x in r.get("speedup_vs_reference_by_isa", {}).items():
            if isa != report["cpu_isa"]:
                print(f"{'':>13} fused on {isa}: {m['fused_' + isa]:.1f} ms, x{x:.2f}")


def _print_region_matching(report: dict) -> None:
    print("region matching, ms (median)")
    for r in report["region_matching"]:
        shape = r.get("logits_shape") or r.get("student_shape")
        keep = f"  fused_keep {r['ms']['fused_keep']:8.2f}" if "fused_keep" in r["ms"] else ""
        mem = (f"\n      peak MiB {r['peak_mib']} (x{r.get('memory_ratio_vs_reference')}),"
               f" kept for backward MiB {r['retained_by_forward_mib']}") if "peak_mib" in r else ""
        print(f"  {r['op']:<27} {str(shape):<18} fused {r['ms']['fused']:8.2f}{keep}  ref {r['ms']['reference']:8.2f}"
              f"  x{r['speedup_vs_reference']}{mem}")


def _print_region_loss_step(report: dict) -> None:
    r = report["region_loss_step"]
    print(f"region loss of a training step ({r['pairs']} matched-CE terms, {r['images']} images, K={r['K']}, "
          f"logits {r['logits_mib']} MiB), forward + backward:")
    print(f"  ms {r['ms']} (x{r['speedup_vs_reference']})\n  peak MiB {r['peak_mib']} "
          f"(x{r.get('memory_ratio_vs_reference')}), kept for backward MiB {r['retained_by_forward_mib']}")


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        _ext.configure(cpu_isa=args.cpu_isa)
    except ValueError as e:
        raise SystemExit(f"--cpu-isa {args.cpu_isa}: {e}") from None
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_model": cpu_model(),
        "cpu_isa": _ext.cpu_isa(),
        "threads": torch.get_num_threads(), "arch": args.arch, "dtype": args.dtype,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "backends": {op: _ext.backend(op, torch.empty(1, device=device)) for op in _ext.OPS},
    }
    if device.type == "cpu" and _ext.available():
        # the yardstick for the fused ops' GFLOP/s: fp32 FMA throughput of one thread with the vectors the kernels
        # use, measured now (and with those of the other instruction sets, for the variants timed on them)
        report["cpu_fma_peak_gflops_per_thread"] = round(_ext.extension().cpu_fma_peak_gflops(), 1)
        peaks = {_ext.cpu_isa(): report["cpu_fma_peak_gflops_per_thread"]}
        for isa in other_cpu_isas(device):
            with running_on(isa):
                peaks[isa] = round(_ext.extension().cpu_fma_peak_gflops(), 1)
        report["cpu_fma_peak_gflops_per_thread_by_isa"] = peaks
    for kind in ("memory", "time"):
        meter = Meter(kind, args.rounds, device)
        with _rss_tracks_tensors() if kind == "memory" else contextlib.nullcontext():
            for case in args.cases:
                result = globals()[f"bench_{case}"](args, device, meter)
                report[case] = _merge(report[case], result) if case in report else result
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    _print_table(report)
    write_json(report, args.json)
