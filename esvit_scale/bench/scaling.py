"""Scaling model: images/s and scaling efficiency from 1 to 512 GPUs, predicted from one device's measured step and
the communication of each ZeRO stage.

    python -m esvit_scale.bench scaling --step-json runs/step.json --png scaling.png --json scaling.json
    python -m esvit_scale.bench scaling --step-json runs/step.json --gpu H100 --precision bf16 --mfu 0.4 ...
    python -m esvit_scale.bench scaling --sweep runs/sweep --png sweep.png      # measured points of a SLURM sweep

Weak scaling: every GPU keeps the micro-batch b, so N GPUs train a global batch of b N and do the same compute
per step as one GPU; only the communication grows. Per step, with P the student's trainable parameters, w the
bytes of the training dtype, and one "pass" = one reduce-scatter or one all-gather of S bytes over N GPUs:

    ZeRO 0       all-reduce of the gradients = 2 passes of w P
    ZeRO 1, 2    reduce-scatter of the gradients + all-gather of the updated parameters = 2 passes of w P
    ZeRO 3       all-gather in forward + all-gather in backward + reduce-scatter of the gradients = 3 passes of w P,
                 + the teacher's forward: its fp32 parameters are partitioned like the student's (engine/teacher.py)
                 and gathered for its forward = 1 pass of 4 P
    EMA update   nothing at any stage: each rank updates the teacher parameters it holds (all at ZeRO 0-2, its
                 shard at ZeRO 3) from the same student parameters

A pass is hierarchical (NCCL-style): within a node of G GPUs over NVLink, then between the M = ceil(N / G) nodes
over the nodes' network, each GPU sending its 1/G of the data:

    pass_s(S) = S (g - 1) / g / B_intra  +  S (M - 1) / M / B_node          g = min(N, G)

B_intra: bytes/s one GPU moves over NVLink in one direction; B_node: bytes/s a node moves between nodes, all its
NICs together (8 x 400 Gb/s rails = 3200 Gb/s). Both are the bandwidths collectives achieve (nccl-tests' bus
bandwidth), not datasheet figures. Latency per message is ignored (buckets are megabytes).

Overlap: DeepSpeed overlaps bucketed gradient reduction (and ZeRO-3's prefetch) with compute; the model lets a
fraction f (--overlap, default 0.5) of the step's communication run concurrently with the backward pass, hiding at
most the backward's own time:

    step_s(N) = compute_s + comm_s(N) - min(f comm_s(N), backward_s)
    images/s(N) = b N / step_s(N)          efficiency(N) = compute_s / step_s(N)  (<= 1; 1 at N = 1)

Compute (one GPU, micro-batch b, no communication), from a `bench step` JSON:
    measured      its step_s_median, scaled linearly to --batch-per-gpu; backward_s from its measured phase split.
                  A JSON of a multi-rank run still contains that run's communication (the report says so).
    --gpu NAME    predicted: flops_per_image b / (the datasheet dense peak of NAME in --precision x --mfu), the
                  backward's share taken from the measured phase split. Labelled predicted everywhere.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
from dataclasses import asdict, dataclass

DEFAULT_GPUS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TEACHER_BYTES = 4                       # the teacher stays fp32 whatever the training precision


@dataclass(frozen=True)
class Network:
    inter_gbps: float                   # between nodes, per node (all its NICs), Gbit/s
    intra_gbytes_s: float = 450.0       # within a node, per GPU and direction (NVLink 4: 450 GB/s), GB/s
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Compute:
    step_s: float                       # one device's step at `batch`, without communication
    backward_s: float                   # the part of it that communication may overlap with
    batch: int                          # micro-batch per device
    source: str                         # where step_s comes from, in words


def communication_bytes(stage: int, parameters: int, dtype_bytes: int) -> dict[str, float]:
    """Bytes of each term, in passes x bytes per pass (a pass: one reduce-scatter or all-gather of that many)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage}: only 0-3 exist")
    student = (3 if stage == 3 else 2) * dtype_bytes * parameters
    teacher = TEACHER_BYTES * parameters if stage == 3 else 0.0
    return {"student": float(student), "teacher_forward": float(teacher), "ema_update": 0.0}


def pass_seconds(nbytes: float, gpus: int, net: Network) -> float:
    """One reduce-scatter or all-gather of `nbytes` over `gpus` GPUs, intra-node then inter-node."""
    g = min(gpus, net.gpus_per_node)
    nodes = math.ceil(gpus / net.gpus_per_node)
    intra = nbytes * (g - 1) / g / (net.intra_gbytes_s * 1e9)
    inter = nbytes * (nodes - 1) / nodes / (net.inter_gbps * 1e9 / 8)
    return intra + inter


def predict(compute: Compute, stage: int, parameters: int, dtype_bytes: int, net: Network, gpus: int,
            overlap: float) -> dict:
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"--overlap {overlap}: a fraction of the communication, between 0 and 1")
    if gpus < 1:
        raise ValueError(f"{gpus} GPUs: at least 1")
    terms = communication_bytes(stage, parameters, dtype_bytes)
    comm_s = sum(pass_seconds(b, gpus, net) for b in terms.values())
    exposed = comm_s - min(overlap * comm_s, compute.backward_s)
    step_s = compute.step_s + exposed
    return {"stage": stage, "inter_gbps": net.inter_gbps, "gpus": gpus, "nodes": math.ceil(gpus / net.gpus_per_node),
            "global_batch": compute.batch * gpus, "step_s": step_s, "comm_s": comm_s, "exposed_comm_s": exposed,
            "images_per_s": compute.batch * gpus / step_s, "efficiency": compute.step_s / step_s,
            "bytes_per_pass": terms}


# ---------------------------------------------------------------------------------------------- from bench step JSON

def measured_compute(report: dict, batch: int | None = None) -> Compute:
    b = batch or report["batch_per_rank"]
    step_s = report["step_s_median"] * b / report["batch_per_rank"]
    source = (f"measured: {report['device_name']} ({report['device']}, {report.get('threads', '?')} threads), "
              f"{report['config']}, batch {report['batch_per_rank']}")
    if b != report["batch_per_rank"]:
        source += f", scaled linearly to {b}"
    if report["world_size"] > 1:
        source += f"; a {report['world_size']}-rank run: includes its communication"
    return Compute(step_s, step_s * report["phase_fraction"]["backward"], b, source)


def predicted_compute(report: dict, gpu: str, precision: str, mfu: float, batch: int | None = None) -> Compute:
    from esvit_scale.bench.peak import gpu_peak_flops
    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"--mfu {mfu}: a fraction of the peak, in (0, 1]")
    peak = gpu_peak_flops(gpu, precision)
    if peak is None:
        raise ValueError(f"--gpu {gpu!r} with {precision}: not in esvit_scale/bench/peak.py's PEAK_TFLOPS table")
    b = batch or report["batch_per_rank"]
    step_s = report["flops_per_image"] * b / (peak * mfu)
    source = (f"predicted: {report['flops_per_image'] / 1e9:.1f} GFLOP/image (counted) x {b} / ({gpu} {precision} "
              f"peak {peak / 1e12:.0f} TFLOP/s x assumed MFU {mfu:.2f}); backward share "
              f"{report['phase_fraction']['backward']:.2f} from the step measured on {report['device_name']}")
    return Compute(step_s, step_s * report["phase_fraction"]["backward"], b, source)


def student_parameters(report: dict) -> int:
    """The report's `parameters`, else counted on the meta device from its config and overrides."""
    if "parameters" in report:
        return int(report["parameters"])
    from esvit_scale.bench.plan import parameter_count
    from esvit_scale.bench.step import bench_config
    return parameter_count(bench_config(report["config"], report["overrides"]))


def load_reports(paths: list[str], sweep: str | None) -> list[dict]:
    """bench step JSONs: the given files and every *.json of the sweep folder, by world size."""
    if sweep:
        found = sorted(glob.glob(os.path.join(sweep, "*.json")))
        if not found:
            raise FileNotFoundError(f"--sweep {sweep}: no *.json there (did the sweep's jobs run and finish?)")
        paths = [*paths, *found]
    reports = []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        if "step_s_median" not in report:
            raise ValueError(f"{path}: not a `bench step` report (no step_s_median)")
        reports.append({**report, "path": path})
    return sorted(reports, key=lambda r: r["world_size"])


# ---------------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step-json", help="the one-device `bench step` report the compute comes from (default: "
                                            "the measured report of the fewest ranks)")
    parser.add_argument("--measured", nargs="*", default=[], help="`bench step` reports to plot as measured points")
    parser.add_argument("--sweep", help="a folder of `bench step` reports (slurm/throughput_sweep.sbatch): measured")
    parser.add_argument("--gpus", type=int, nargs="+", default=list(DEFAULT_GPUS))
    parser.add_argument("--inter-gbps", type=float, nargs="+", default=[100.0, 200.0, 400.0],
                        help="bandwidth between nodes, per node (all its NICs together), Gbit/s; one curve each")
    parser.add_argument("--intra-gbytes", type=float, default=450.0,
                        help="bandwidth within a node, per GPU and direction (NVLink), GB/s")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--stages", type=int, nargs="+", help="ZeRO stages to predict (default: the report's)")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="fraction of the communication that may run during the backward pass")
    parser.add_argument("--batch-per-gpu", type=int, help="micro-batch per GPU (default: the report's)")
    parser.add_argument("--gpu", help="predict the compute on this GPU (peak.py's table) instead of using the "
                                      "measured step time")
    parser.add_argument("--precision", choices=tuple(DTYPE_BYTES), help="default: the report's")
    parser.add_argument("--mfu", type=float, default=0.4, help="with --gpu: the assumed model FLOPs utilisation")
    parser.add_argument("--png", help="write the plot here")
    parser.add_argument("--json", help="write the predictions (and the measured points) here")


def build(args) -> dict:
    measured = load_reports(args.measured, args.sweep)
    if args.step_json:
        base = load_reports([args.step_json], None)[0]
    elif measured:
        base = measured[0]
    else:
        raise SystemExit("scaling: give --step-json (a `bench step` report), or --sweep/--measured reports")
    precision = args.precision or base["precision"]
    if args.gpu:
        compute = predicted_compute(base, args.gpu, precision, args.mfu, args.batch_per_gpu)
    else:
        compute = measured_compute(base, args.batch_per_gpu)
    parameters = student_parameters(base)
    stages = args.stages if args.stages is not None else [base["zero_stage"]]
    networks = [Network(bw, args.intra_gbytes, args.gpus_per_node) for bw in args.inter_gbps]
    predictions = [predict(compute, s, parameters, DTYPE_BYTES[precision], net, n, args.overlap)
                   for s in stages for net in networks for n in sorted(set(args.gpus))]
    per_device = base["images_per_s_per_device"]
    points = [{"gpus": r["world_size"], "stage": r["zero_stage"], "images_per_s": r["images_per_s"],
               "batch_per_rank": r["batch_per_rank"], "device_name": r["device_name"], "path": r["path"],
               "efficiency": r["images_per_s"] / (r["world_size"] * per_device)} for r in measured]
    return {
        "compute": asdict(compute), "predicted_compute": bool(args.gpu), "base_report": base["path"],
        "arch": base["arch"], "parameters": parameters, "precision": precision,
        "dtype_bytes": DTYPE_BYTES[precision], "overlap": args.overlap, "intra_gbytes_s": args.intra_gbytes,
        "gpus_per_node": args.gpus_per_node,
        "assumptions": "weak scaling at a fixed micro-batch per GPU; hierarchical reduce-scatter/all-gather passes "
                       "(NVLink in a node, the node's network between nodes) at the given achieved bandwidths; a "
                       "fraction `overlap` of the communication hides behind the backward pass; no per-message "
                       "latency; measured points: efficiency against the base report's images/s per device",
        "predictions": predictions, "measured": points,
    }


def run(args) -> None:
    from esvit_scale.bench.report import write_json
    try:
        result = build(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"scaling: {e}") from None
    for p in result["predictions"]:
        if p["gpus"] in (1, 8, 64, 512) or p["gpus"] == max(args.gpus):
            print(f"ZeRO {p['stage']}, {p['inter_gbps']:g} Gb/s: {p['gpus']:4d} GPUs, global batch "
                  f"{p['global_batch']:6d}: {p['images_per_s']:10.1f} images/s, efficiency {p['efficiency']:.3f}")
    for m in result["measured"]:
        print(f"measured ZeRO {m['stage']}: {m['gpus']} ranks: {m['images_per_s']:.2f} images/s, "
              f"efficiency {m['efficiency']:.3f} ({m['path']})")
    print(f"compute: {result['compute']['source']}")
    if args.png:
        from esvit_scale.bench.scaling_plot import plot
        plot(result, args.png)
        print(f"wrote {args.png}")
    write_json(result, args.json)
