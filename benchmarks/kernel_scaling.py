"""Time and peak memory of long-convolution kernel generation (forward + backward) against the
state size n: the RTF kernel, an S4D Vandermonde kernel, and Hyena's implicit filter.

    python -m benchmarks.kernel_scaling --device cpu --d-model 64 --lengths 1024,4096 \
        --states 4,8,16,32,64,128,256,512,1024,2048 --repeats 10 --out benchmarks/results/kernel_scaling_cpu

writes <out>.json (machine, date, every row) and <out>.png (time and memory against n, log-log).

What is measured, per (method, length L, state size n), with d = --d-model channels:

- rtf:      RTF(d, n, L).kernel(L).sum().backward(): one batched rfft of the zero-padded
            coefficients; its cost should not depend on n.
- s4d:      the diagonal SSM kernel K[c, l] = 2 Re(sum_i C'_i exp(dt_c lambda_i l)) with n/2 complex
            modes per channel (ZOH: C' = C (exp(dt lambda) - 1) / lambda), materialising the
            (d, n/2, L) Vandermonde matrix as S4D does in plain PyTorch; .sum().backward().
- implicit: ImplicitFilter(d, L).kernel(L).sum().backward(). It has no state size: measured once
            per length and stored with state_size null.

Time: median (and min) wall time of --repeats runs after one warm-up (fewer, but at least 3, once
--time-budget seconds are spent on one configuration), synchronising on GPU.
Peak memory: on CUDA, torch.cuda.max_memory_allocated over one run, minus what was allocated
before it. On CPU there is no allocator counter: we replay one run under torch.profiler with
profile_memory=True and take the peak of the running sum of the allocations and frees it
reports for the CPU device (torch.profiler._memory_profiler, a private API); if that is not
available, the peak RSS growth (psutil, sampled every 0.2 ms by a thread). The JSON says which.
Each row also carries an analytic estimate of the peak bytes (`est_bytes`), used to skip
configurations above --max-bytes; skipped rows are recorded with skipped: true (for S4D at large
n x L this is the "out of memory" of the comparison).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import MEMORY_METHODS, cpu_memory_method, ints, machine, peak_memory, save_png, sync, write_json
from models.implicit import ImplicitFilter
from models.rtf import RTF
from utils.logs import get_logger, setup_logging

log = get_logger("bench")


# ---------------------------------------------------------------------------------------------
# the three kernels
# ---------------------------------------------------------------------------------------------
class S4DKernel(torch.nn.Module):
    """Diagonal SSM (S4D-Lin init) kernel by an explicit Vandermonde product, (d, L)."""

    def __init__(self, d: int, n: int):
        super().__init__()
        m = max(n // 2, 1)
        self.log_dt = torch.nn.Parameter(torch.empty(d).uniform_(math.log(1e-3), math.log(1e-1)))
        self.log_neg_re = torch.nn.Parameter(torch.full((d, m), math.log(0.5)))
        self.im = torch.nn.Parameter(math.pi * torch.arange(m, dtype=torch.float32).repeat(d, 1))
        self.c = torch.nn.Parameter(torch.randn(d, m, 2) * 0.5**0.5)

    def forward(self, L: int) -> torch.Tensor:
        dt = self.log_dt.exp()[:, None]  # (d, 1)
        lam = torch.complex(-self.log_neg_re.exp(), self.im)  # (d, m)
        dtlam = dt * lam
        c = torch.view_as_complex(self.c) * (dtlam.exp() - 1) / lam  # ZOH, B folded into C
        pos = torch.arange(L, device=lam.device, dtype=torch.float32)
        vandermonde = (dtlam[..., None] * pos).exp()  # (d, m, L): the memory of S4D
        return 2 * torch.einsum("dm,dml->dl", c, vandermonde).real


def estimate_bytes(method: str, d: int, n: int, L: int) -> int:
    """Rough analytic peak of forward + backward (bytes), from the largest intermediates.

    rtf: a few (d, L'/2+1) complex64 spectra and (d, L') float32 kernels, about 8 d L' floats.
    s4d: the (d, n/2, L) complex64 Vandermonde lives about four times at the peak (the exponent,
         exp's saved output, and gradients of the same shape during backward; measured 1.3x the
         3-copy count on CPU).
    implicit: the (L, order) MLP activations and (d, L) kernel, about 6 (order + d) L floats.
    """
    if method == "rtf":
        return 4 * 8 * d * (L + L % 2)
    if method == "s4d":
        return 4 * 8 * d * max(n // 2, 1) * L
    return 4 * 6 * (64 + d) * L


def build(method: str, d: int, n: int, L: int, device: torch.device):
    torch.manual_seed(0)
    if method == "rtf":
        mod = RTF(d, n, L).to(device)
        return lambda: mod.kernel(L)
    if method == "s4d":
        mod = S4DKernel(d, n).to(device)
        return lambda: mod(L)
    mod = ImplicitFilter(d, L).to(device)
    return lambda: mod.kernel(L)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def time_fwd_bwd(fn, device: torch.device, repeats: int, budget_s: float = float("inf")) -> list[float]:
    """Wall times (s) of forward + backward, after one warm-up run: `repeats` runs, or fewer (but
    at least 3) once `budget_s` seconds have been spent on this configuration."""
    fn().sum().backward()
    times = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        sync(device)
        t0 = time.perf_counter()
        fn().sum().backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=64, help="channels (filters) per kernel")
    p.add_argument("--lengths", type=ints, default=[1024, 4096], help="comma-separated kernel lengths L")
    p.add_argument(
        "--states",
        type=ints,
        default=[2**k for k in range(2, 12)],
        help="comma-separated state sizes n (S4D: n/2 complex modes)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed runs per configuration (median reported)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=5.0,
        help="seconds of timed runs per configuration before stopping early (at least 3 runs)",
    )
    p.add_argument(
        "--max-bytes",
        type=float,
        default=6e9,
        help="skip (and record as skipped) configurations whose estimated peak exceeds this",
    )
    p.add_argument("--methods", default="rtf,s4d,implicit")
    p.add_argument(
        "--out", default="benchmarks/results/kernel_scaling", help="output path prefix: writes <out>.json and <out>.png"
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    methods = [m for m in args.methods.split(",") if m]
    mem_method = "cuda" if device.type == "cuda" else cpu_memory_method()
    rows = []
    for L in args.lengths:
        for method in methods:
            states = [None] if method == "implicit" else args.states
            for n in states:
                if n is not None and not 1 <= n < L:
                    continue
                est = estimate_bytes(method, args.d_model, n or 0, L)
                row = {
                    "method": method,
                    "length": L,
                    "state_size": n,
                    "d_model": args.d_model,
                    "est_bytes": est,
                    "skipped": False,
                }
                if est > args.max_bytes:
                    row.update(
                        skipped=True,
                        reason=f"estimated peak {est / 1e9:.2f} GB > --max-bytes "
                        f"{args.max_bytes / 1e9:.2f} GB (out of memory)",
                    )
                    rows.append(row)
                    log.info(f"{method:9s} L={L:6d} n={n!s:5s} skipped ({row['reason']})")
                    continue
                fn = build(method, args.d_model, n or 0, L, device)
                times = time_fwd_bwd(fn, device, args.repeats, args.time_budget)
                mem = peak_memory(lambda f=fn: f().sum().backward(), device, mem_method)
                row.update(
                    time_ms=1e3 * statistics.median(times),
                    time_min_ms=1e3 * min(times),
                    peak_bytes=mem,
                    repeats=len(times),
                )
                rows.append(row)
                log.info(f"{method:9s} L={L:6d} n={n!s:5s} {row['time_ms']:9.3f} ms  {mem / 1e6:10.2f} MB")
                del fn
    return {
        "benchmark": "kernel_scaling",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "machine": machine(device),
        "memory_method": MEMORY_METHODS[mem_method],
        "time_method": (
            f"median of up to {args.repeats} forward+backward runs after one warm-up (at least 3; "
            f"fewer once {args.time_budget} s were spent on a configuration); time_min_ms: fastest run"
        ),
        "args": {k: v for k, v in vars(args).items()},
        "rows": rows,
    }


def plot(result: dict, path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # a bare GPU machine: the JSON is the result, the PNG can be drawn elsewhere
        log.warning(f"matplotlib is not installed: no {path.name}")
        return
    rows = result["rows"]
    states = sorted({r["state_size"] for r in rows if r["state_size"] is not None})
    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 2)
    styles = {"rtf": ("tab:blue", "o"), "s4d": ("tab:red", "s"), "implicit": ("tab:green", "^")}
    lengths = sorted({r["length"] for r in rows})
    dashes = ["-", "--", ":", "-."]
    for ax, key, label, scale in (
        (axes[0], "time_ms", "forward + backward time (ms)", 1.0),
        (axes[1], "peak_bytes", "peak memory (MB)", 1e-6),
    ):
        for method, (color, marker) in styles.items():
            for i, L in enumerate(lengths):
                sel = [r for r in rows if r["method"] == method and r["length"] == L]
                if not sel:
                    continue
                ls = dashes[i % len(dashes)]
                done = [r for r in sel if not r["skipped"] and r.get(key, 0) > 0]
                if method == "implicit":  # no state size: a flat reference line
                    if done and states:
                        ax.plot(
                            [states[0], states[-1]],
                            [done[0][key] * scale] * 2,
                            color=color,
                            ls=ls,
                            label=f"implicit, L={L} (no state)",
                        )
                    continue
                ax.plot(
                    [r["state_size"] for r in done],
                    [r[key] * scale for r in done],
                    color=color,
                    marker=marker,
                    ls=ls,
                    label=f"{method}, L={L}",
                )
                skipped = [r["state_size"] for r in sel if r["skipped"]]
                if skipped and done:
                    top = max(r[key] * scale for r in done)
                    ax.scatter(
                        skipped,
                        [top * 2] * len(skipped),
                        color=color,
                        marker="x",
                        s=60,
                        label=f"{method}, L={L}: skipped (> memory cap)",
                    )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("state size n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(
        f"kernel forward+backward vs state size, d={result['args']['d_model']}, "
        f"{result['device']} ({m.get('gpu') or m['cpu']}), torch {m['torch']}",
        fontsize=9,
    )
    save_png(fig, path, dpi=110)


def table(result: dict) -> str:
    """Markdown table: one line per (length, n), columns time / memory per method."""
    rows = result["rows"]
    methods = [m for m in ("rtf", "s4d", "implicit") if any(r["method"] == m for r in rows)]
    head = "| L | n | " + " | ".join(f"{m} ms | {m} MB" for m in methods) + " |"
    out = [head, "|" + "---|" * (2 + 2 * len(methods))]
    for L in sorted({r["length"] for r in rows}):
        for n in sorted({r["state_size"] for r in rows if r["state_size"] is not None}):
            cells = []
            for m in methods:
                r = next(
                    (
                        r
                        for r in rows
                        if r["method"] == m and r["length"] == L and r["state_size"] == (None if m == "implicit" else n)
                    ),
                    None,
                )
                if r is None:
                    cells += ["", ""]
                elif r["skipped"]:
                    cells += ["skipped", "> cap"]
                else:
                    cells += [f"{r['time_ms']:.2f}", f"{r['peak_bytes'] / 1e6:.1f}"]
            out.append(f"| {L} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    out = Path(args.out)
    if out.suffix in (".json", ".png"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args)
    argv = sys.argv[1:] if argv is None else list(argv)
    result["command"] = "python -m benchmarks.kernel_scaling " + " ".join(argv)
    write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    print(table(result))
    log.info(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
