"""What the benchmarks share: the description of the machine recorded beside every figure, device
synchronisation around timers, peak memory of one call, comma-separated integer arguments, and
result files written atomically (a JSON or PNG under benchmarks/results/ is complete or not there
at all).

The benchmarks are modules of the `benchmarks` package: run them from the repository root as
`python -m benchmarks.<name>` (this module is then `benchmarks.common`, as it is for the tests).

torch is imported by the two functions that use it, not at the top: data_prep.py imports this
module, and its tokenizer workers (started with spawn) re-import data_prep.py, whose start-up
that benchmark times; they must not load torch for nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import threading
import time
from pathlib import Path

from utils.atomic import AtomicFile, write_text
from utils.logs import setup_logging

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def add_run_options(p, out: Path, repeats: int = 3, threads: int | None = 1) -> None:
    """The options every timing benchmark takes: --repeats (rounds, the best or median kept),
    --threads (torch's CPU threads; None: torch's default) and --out (the JSON; PNG beside it)."""
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=out)


def start_run(args) -> None:
    """Before a benchmark's work: the project's log format, and --threads applied to torch."""
    import torch

    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)


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
    """The machine the figures come from: the date (UTC), platform, Python, CPU model, cores (all
    and those this process may use), memory, the load average at the start (the machine may be
    shared). With a torch `device`: the torch version and CPU threads, and on CUDA the GPU, its
    memory and compute capability, and the CUDA version."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device is not None:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            info.update(
                gpu=torch.cuda.get_device_name(device),
                gpu_memory_gb=round(props.total_memory / 2**30, 1),
                compute_capability=f"{props.major}.{props.minor}",
                cuda=torch.version.cuda,
            )
    return info


def memory_limit_bytes(device) -> int:
    """What a benchmark may plan to use on `device` (torch.device): the GPU's memory, or on CPU the
    memory available now (MemAvailable of /proc/meminfo, else the physical memory)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------
# peak memory of one call
# ---------------------------------------------------------------------------------------------
MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated over one call, minus the bytes allocated before it",
    "profiler": "torch.profiler(profile_memory=True) allocation/free timeline of one call on the CPU device; "
    "peak of the running sum of live tensor bytes (torch.profiler._memory_profiler, a private API)",
    "rss": "psutil RSS growth over one call, sampled every 0.2 ms by a thread (coarse: allocator caching and "
    "page reuse hide small allocations)",
}


def _profiler_peak_cpu(fn) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(max((sum(s) for s in sizes), default=0))


def _rss_peak_cpu(fn) -> int:
    import psutil

    proc = psutil.Process(os.getpid())
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(2e-4)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return max(peak[0] - base, 0)


def cpu_memory_method() -> str:
    """'profiler' when torch's private memory-timeline API works here, else 'rss'."""
    import torch

    try:
        x = torch.ones(4, requires_grad=True)
        _profiler_peak_cpu(lambda: (x * 2).sum().backward())
        return "profiler"
    except Exception:
        return "rss"


def peak_memory(fn, device, cpu_method: str) -> int:
    """Peak bytes allocated by one call of `fn` (no arguments) on `device` (torch.device), beyond
    what was allocated before it; `cpu_method` ("profiler" or "rss", see MEMORY_METHODS) on CPU."""
    if device.type == "cuda":
        import torch

        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return _profiler_peak_cpu(fn) if cpu_method == "profiler" else _rss_peak_cpu(fn)


def write_json(path: str | os.PathLike, result: dict, indent: int = 1) -> Path:
    """Writes `result` as JSON to `path` atomically (creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=indent) + "\n")
    return path


def save_png(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lays out the matplotlib Figure `fig` (tight) and saves it as a PNG at `path` atomically;
    returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path, "wb") as af:
        fig.savefig(af.file, format="png", dpi=dpi)
    return path


def gpt_neox_baseline(config, vocab_size: int, max_positions: int, **extra):
    """The Transformer the speed benchmarks compare with: a Hugging Face GPT-NeoX config (rotary,
    sdpa) with the Hyena config's width, depth, heads (1 when they do not divide the width) and MLP
    width, and the given vocabulary. `extra` goes to GPTNeoXConfig (use_cache=False, ...)."""
    from transformers import GPTNeoXConfig  # here, so that importing common stays light

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head if config.d_model % config.n_head == 0 else 1,
        intermediate_size=config.mlp_ratio * config.d_model,
        max_position_embeddings=max_positions,
        attn_implementation="sdpa",
        **extra,
    )
