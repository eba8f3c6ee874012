"""What the benchmarks share: the description of the machine recorded beside every figure, device
synchronisation around timers, comma-separated integer arguments, and result files written
atomically (a JSON or PNG under benchmarks/results/ is complete or not there at all).

The benchmarks are modules of the `benchmarks` package: run them from the repository root as
`python -m benchmarks.<name>` (this module is then `benchmarks.common`, as it is for the tests).

torch is imported by the two functions that use it, not at the top: data_prep.py imports this
module, and its tokenizer workers (started with spawn) re-import data_prep.py, whose start-up
that benchmark times; they must not load torch for nothing.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from hyena_rtf.utils.atomic import AtomicFile, write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def ints(text: str) -> list[int]:
    """argparse type of a comma-separated list of integers: "128, 512,2048" -> [128, 512, 2048]."""
    return [int(x) for x in text.split(",") if x.strip()]


def sync(device) -> None:
    """Wait for the work queued on a CUDA `device` (torch.device), so that a timer around it
    measures the work and not its launch; nothing to wait for on CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device=None) -> dict:
    """The machine the figures come from: platform, Python, CPU model, cores (all and those this
    process may use), the load average at the start (the machine may be shared). With a torch
    `device`: the torch version and CPU threads, and on CUDA the GPU and CUDA version."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device is not None:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if device.type == "cuda":
            info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def write_json(path: str | os.PathLike, result: dict, indent: int = 1) -> Path:
    """Writes `result` as JSON to `path` atomically (creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=indent) + "\n")
    return path


def save_png(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Saves the matplotlib Figure `fig` as a PNG at `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path, "wb") as af:
        fig.savefig(af.file, format="png", dpi=dpi)
    return path
