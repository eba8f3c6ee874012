"""Build time and memory of one layer's RTF recurrence (`RTF.recurrence`), per model preset: the
polynomial build of models/rtf.py beside the n x n matrix build it replaced, in one run.

    OMP_NUM_THREADS=2 nice -n 10 python -m benchmarks.recurrence_build --threads 2

writes benchmarks/results/recurrence_build_cpu.json (machine, arguments, one row per preset and
method) and .png (build time and recurrence bytes per preset, both methods).

Layers: tiny, small, 125m, 355m, 1.3b are a HyenaOperator's filter bank (channels = d_model, one
filter per channel, order state_size, l_max); multihyena-125m is a MultiHyenaOperator's at the 125m
shape: M = n_head = 12 filters of order 64, each serving e^2 = 64^2 channels (49,152 in all).
Filters come from `make_filter` with the preset's defaults (xavier init, l1_montel constraint).

Methods:
  polynomial      RTF.recurrence(float32) as it is now: z^N mod A(z) and the row resolvent by
                  squaring modulo A(z), Schur-Cohn only if a product does not converge; memory
                  O(channels n).
  matrix (old)    BASELINE, the build this code replaced, copied in `matrix_build` below: the pole
                  check by eigenvalues of the companion matrices, torch.linalg.matrix_power for
                  A^(L'-1), a transposed solve for C, and the prefill matrix I - A^L' expanded to
                  every channel; memory O(channels n^2).

Per (layer, method): the build time is the median of --repeats builds, each of a fresh RTF (new
random parameters, so the memo cannot answer), after one warm-up build, as wall time and as CPU
time of the process (steadier on a shared machine); memory is the bytes of the
recurrence's tensors (a, c, h0 and r, or m), float32. A matrix build whose tensors would exceed
--max-bytes (float64 expansion plus the float32 copy) is recorded as skipped. The JSON also holds,
per layer, the largest relative difference between the two builds' C (a sanity check, not a
reference: for freshly initialised filters A^L' underflows and both give C = b exactly).

The build is hundreds of small batched FFTs: on a machine whose cores are busy with other work,
every multi-threaded op waits for its slowest thread, and 2 threads can be several times slower
than 1 (the load average at the start is in the JSON and the figure's title).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from benchmarks.common import RESULTS, machine, save_png, write_json
from hyena_rtf.models import config_from_preset
from hyena_rtf.models.configuration_hyena_rtf import PRESETS
from hyena_rtf.models.hyena import make_filter
from hyena_rtf.models.rtf import RTF, companion
from hyena_rtf.utils.logs import get_logger, setup_logging

LAYERS = (*PRESETS, "multihyena-125m")
log = get_logger("bench")


def layer_filter(layer: str, seed: int) -> RTF:
    """A fresh filter bank of one layer of `layer` (module docstring), parameters from `seed`."""
    torch.manual_seed(seed)
    if layer == "multihyena-125m":
        config = config_from_preset("125m")
        heads = config.n_head
        e = config.d_model // heads
        return make_filter(config, 0, heads * e * e, heads)
    config = config_from_preset(layer)
    return make_filter(config, 0, config.d_model, config.filter_heads)


def matrix_build(rtf: RTF, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """BASELINE: the recurrence build this repository used before the polynomial one (kept here
    only to be measured): eigenvalue pole check, C from (I - A^L')^T C^T = b^T, h0_eff, and the
    (channels, n, n) prefill matrix I - A^L'."""
    with torch.no_grad():
        a = rtf.denominator().to(torch.float64)
        if bool((torch.linalg.eigvals(companion(a)).abs().amax(-1) >= 1).any()):
            raise ValueError("unstable filter in the benchmark")
        b, h0 = rtf.b.to(torch.float64), rtf.h0.to(torch.float64)
        A = companion(a)
        eye = torch.eye(rtf.state_size, dtype=torch.float64)
        P = torch.linalg.matrix_power(A, rtf.fft_len - 1)
        m = eye - A @ P
        c = torch.linalg.solve(m.transpose(-1, -2), b.unsqueeze(-1)).squeeze(-1)
        h = h0 + (c.unsqueeze(-2) @ P[..., :, 0:1]).squeeze(-1).squeeze(-1)
        return {k: rtf._expand(v).to(dtype) for k, v in dict(a=a, c=c, h0=h, m=m).items()}


def polynomial_build(rtf: RTF, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    rec = rtf.recurrence(dtype)
    return {k: v for k, v in vars(rec).items() if isinstance(v, torch.Tensor)}


METHODS = {"polynomial": polynomial_build, "matrix (old)": matrix_build}


def matrix_bytes(rtf: RTF) -> int:
    """Peak bytes the baseline's expanded prefill matrices take: float64 expansion + float32 copy."""
    return rtf.channels * rtf.state_size**2 * (8 + 4)


def measure(layer: str, method: str, repeats: int, max_bytes: float) -> dict:
    rtf = layer_filter(layer, seed=0)
    row = dict(
        layer=layer,
        method=method,
        channels=rtf.channels,
        filters=rtf.num_filters,
        state_size=rtf.state_size,
        fft_len=rtf.fft_len,
        skipped=False,
    )
    if method != "polynomial" and matrix_bytes(rtf) > max_bytes:
        row.update(
            skipped=True, reason=f"needs {matrix_bytes(rtf) / 1e9:.2f} GB > --max-bytes {max_bytes / 1e9:.2f} GB"
        )
        return row
    build = METHODS[method]
    tensors = build(rtf)  # warm-up, and the tensors whose bytes we report
    row["bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    times, cpu = [], []
    for i in range(repeats):
        fresh = layer_filter(layer, seed=i + 1)  # new parameters: no memo hit
        start, start_cpu = time.perf_counter(), time.process_time()
        build(fresh)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    row.update(
        time_ms=1e3 * statistics.median(times),
        time_min_ms=1e3 * min(times),
        cpu_ms=1e3 * statistics.median(cpu),
        repeats=repeats,
    )
    return row


def agreement(layer: str) -> float:
    """max |C_polynomial - C_matrix| / max |C_matrix| over the layer's filters (float64)."""
    rtf = layer_filter(layer, seed=0)
    c_new = rtf.recurrence(torch.float64).c
    c_old = matrix_build(rtf, torch.float64)["c"]
    return float((c_new - c_old).abs().max() / c_old.abs().max())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated, from {', '.join(LAYERS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed builds per (layer, method); the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-bytes", type=float, default=4e9, help="skip matrix builds needing more memory")
    p.add_argument("--out", default=str(RESULTS / "recurrence_build_cpu"), help="path prefix: <out>.json, <out>.png")
    args = p.parse_args(argv)
    args.layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    unknown = [x for x in args.layers if x not in LAYERS]
    if unknown or not args.layers:
        p.error(f"--layers: unknown {unknown}; choose from {', '.join(LAYERS)}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def plot(result: dict, path: Path) -> None:
    rows = [r for r in result["rows"] if not r["skipped"]]
    layers = [x for x in result["args"]["layers"]]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    width = 0.38
    for j, (method, color) in enumerate((("polynomial", "tab:blue"), ("matrix (old)", "tab:gray"))):
        for ax, key, scale in ((axes[0], "time_ms", 1.0), (axes[1], "bytes", 1e-6)):
            xs = [
                i + (j - 0.5) * width
                for i, layer in enumerate(layers)
                for r in rows
                if r["layer"] == layer and r["method"] == method
            ]
            ys = [r[key] * scale for layer in layers for r in rows if r["layer"] == layer and r["method"] == method]
            ax.bar(xs, ys, width, color=color, label=method)
    for ax, label in ((axes[0], "build time per layer (ms, median)"), (axes[1], "recurrence tensors (MB)")):
        ax.set_xticks(range(len(layers)), layers, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    m = result["machine"]
    load = m.get("load_average_at_start", ["?"])[0]
    fig.suptitle(
        f"RTF recurrence build, one layer per preset: {m['cpu']}, {m['torch_threads']} threads, "
        f"torch {m['torch']}, load average {load} at start",
        fontsize=9,
    )
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def table(result: dict) -> str:
    out = [
        "| layer | channels x n | polynomial ms (CPU ms) | old ms (CPU ms) | polynomial MB | old MB | C agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in result["args"]["layers"]:
        new = next(r for r in result["rows"] if r["layer"] == layer and r["method"] == "polynomial")
        old = next(r for r in result["rows"] if r["layer"] == layer and r["method"] == "matrix (old)")
        o_ms = "skipped" if old["skipped"] else f"{old['time_ms']:.1f} ({old['cpu_ms']:.1f})"
        o_mb = "skipped" if old["skipped"] else f"{old['bytes'] / 1e6:.2f}"
        agree = result["agreement"].get(layer)
        n_ms = f"{new['time_ms']:.1f} ({new['cpu_ms']:.1f})"
        out.append(
            f"| {layer} | {new['channels']} x {new['state_size']} | {n_ms} | {o_ms} | "
            f"{new['bytes'] / 1e6:.2f} | {o_mb} | {'-' if agree is None else f'{agree:.1e}'} |"
        )
    return "\n".join(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, agree = [], {}
    for layer in args.layers:
        for method in METHODS:
            row = measure(layer, method, args.repeats, args.max_bytes)
            rows.append(row)
            shown = row.get("reason") or f"{row['time_ms']:.1f} ms, {row['bytes'] / 1e6:.2f} MB"
            log.info(f"{layer:16s} {method:13s} {shown}")
        if not rows[-1]["skipped"]:
            agree[layer] = agreement(layer)
    result = {
        "benchmark": "recurrence_build",
        "machine": machine(torch.device("cpu")),
        "time_method": (
            "median of --repeats builds of fresh parameters after one warm-up: time_ms wall (perf_counter), "
            "cpu_ms CPU time of this process (process_time, all its threads)"
        ),
        "memory_method": "bytes of the recurrence's tensors (numel x element size), float32",
        "baseline": "matrix (old): the eigvals + matrix_power + solve build, copied in benchmarks/recurrence_build.py",
        "args": vars(args),
        "command": "python -m benchmarks.recurrence_build " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
        "agreement": agree,
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    print(table(result))
    log.info(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
