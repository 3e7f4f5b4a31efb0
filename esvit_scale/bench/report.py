"""The JSON file each benchmark writes: its report plus when, where and by which command it was made, so that
docs/benchmarks.md can quote a run with its provenance. Written to a temporary name and renamed: a benchmark
killed mid-write leaves the previous file, never half of one."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), what a CPU figure has to be quoted with."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_json(report: dict, path: str | None) -> None:
    if not path:
        return
    provenance = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.orig_argv[0]), *sys.orig_argv[1:]]),
        "host": platform.node(),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({**provenance, **report}, f, indent=2)
    os.replace(tmp, path)
