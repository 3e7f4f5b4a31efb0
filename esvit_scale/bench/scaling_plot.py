"""The scaling plot: predicted images/s (left, log-log, with the ideal linear line) and scaling efficiency (right)
against GPUs, one colour per inter-node bandwidth and one line style per ZeRO stage; measured points (a sweep's
`bench step` reports) as black markers beside them. The x labels give the global batch each GPU count trains."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")                   # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

STYLES = ("-", "--", ":", "-.")


def plot(result: dict, path: str) -> None:
    preds = result["predictions"]
    bandwidths = sorted({p["inter_gbps"] for p in preds})
    stages = sorted({p["stage"] for p in preds})
    colours = plt.get_cmap("viridis")([i / max(1, len(bandwidths) - 1) * 0.85 for i in range(len(bandwidths))])
    fig, (ax_rate, ax_eff) = plt.subplots(1, 2, figsize=(13, 5.2))
    for bw, colour in zip(bandwidths, colours):
        for k, stage in enumerate(stages):
            line = sorted((p for p in preds if p["inter_gbps"] == bw and p["stage"] == stage),
                          key=lambda p: p["gpus"])
            gpus = [p["gpus"] for p in line]
            label = f"predicted, {bw:g} Gb/s per node, ZeRO {stage}"
            style = STYLES[k % len(STYLES)]
            ax_rate.plot(gpus, [p["images_per_s"] for p in line], style, color=colour, marker=".", label=label)
            ax_eff.plot(gpus, [p["efficiency"] for p in line], style, color=colour, marker=".", label=label)
    first = min(preds, key=lambda p: p["gpus"])
    gpus = sorted({p["gpus"] for p in preds})
    ideal = [first["images_per_s"] * n / first["gpus"] for n in gpus]
    ax_rate.plot(gpus, ideal, color="grey", linewidth=0.8, label="ideal (linear)")
    for k, stage in enumerate(sorted({m["stage"] for m in result["measured"]})):
        pts = [m for m in result["measured"] if m["stage"] == stage]
        label = f"measured, ZeRO {stage} ({pts[0]['device_name']})"
        marker = "osD^"[k % 4]
        ax_rate.plot([m["gpus"] for m in pts], [m["images_per_s"] for m in pts], marker, color="black",
                     fillstyle="none", markersize=8, linestyle="none", label=label)
        ax_eff.plot([m["gpus"] for m in pts], [m["efficiency"] for m in pts], marker, color="black",
                    fillstyle="none", markersize=8, linestyle="none", label=label)
    batch = result["compute"]["batch"]
    ticks = sorted(set(gpus) | {m["gpus"] for m in result["measured"]})
    for ax in (ax_rate, ax_eff):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{n}\n({n * batch})" for n in ticks], fontsize=8)
        ax.set_xlabel(f"devices (global batch at {batch} per device)")
        ax.grid(True, which="both", alpha=0.3)
    ax_rate.set_yscale("log")
    ax_rate.set_ylabel("images/s")
    ax_eff.set_ylabel("scaling efficiency (images/s / (N x one GPU's))")
    ax_eff.set_ylim(0, 1.05)
    ax_eff.legend(fontsize=7, loc="lower left")
    kind = ("lines predicted; one GPU's compute predicted from counted FLOPs" if result["predicted_compute"]
            else "lines predicted from one device's measured step")
    fig.suptitle(f"EsViT {result['arch']} ({result['parameters'] / 1e6:.1f} M parameters, {result['precision']}), "
                 f"{kind}; overlap {result['overlap']:g}, within a node {result['intra_gbytes_s']:g} GB/s, "
                 f"{result['gpus_per_node']} devices/node", fontsize=10)
    fig.text(0.5, 0.005, "compute: " + result["compute"]["source"], ha="center", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
