"""Build time and memory of one layer's recurrent form (`filter.recurrence()`), per model preset.

    python -m benchmarks.recurrence_build --threads 1
    python -m benchmarks.against_baseline --baseline d47685f -- python -m benchmarks.recurrence_build --threads 1

writes benchmarks/results/recurrence_build_cpu.json (machine, arguments, one row per preset) and
.png; the second command runs the same measurement on this tree and on an earlier commit, side by
side in one run (benchmarks/against_baseline.py).

Layers: tiny, small, 125m, 355m, 1.3b are a HyenaOperator's filter bank (channels = d_model, one
filter per channel, order state_size, l_max); multihyena-125m is a MultiHyenaOperator's at the 125m
shape: M = n_head = 12 filters of order 64, each serving e^2 = 64^2 channels (49,152 in all).
Filters are built as the model builds them (xavier init, l1_montel constraint).

Per layer: the median of --repeats builds, each of a fresh filter bank (new random parameters, so no
memo can answer), after one warm-up build, as wall time and as CPU time of the process (steadier on
a shared machine); memory is the bytes of the recurrence's tensors.

Two builds per layer on a tree that has the stored form (models/rtf.py, "Stored form"):
`build_ms`, from the parameters alone (what a model trained here, or a checkpoint exported before the
stored form, pays once at its first decode), and `stored_build_ms`, the same filter bank loaded as
an export loads it (its state dict, stored form included, copied into a new filter bank), which is
what decoding an exported checkpoint pays; the build it replaces costs the export `build_ms` once.
The two recurrences are checked to be the same. Today's build is the modal
conversion (models/rtf.py `convert_rtf`): eigenvalues of the companion matrices in float64
(LAPACK, O(n^3) per filter: the part that grows with the order), closed-form residues, and the
check of every filter's taps against its float64 FFT kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from benchmarks.common import RESULTS, add_run_options, machine, save_png, start_run, write_json
from models import config_from_preset, hyena
from models.configuration_hyena_rtf import PRESETS
from models.rtf import RTF
from utils.logs import get_logger

if hasattr(hyena, "make_filter"):  # a tree from before the filter registry (against_baseline.py)
    make_filter = hyena.make_filter
else:
    from models.filters import make_filter

LAYERS = (*PRESETS, "multihyena-125m")
log = get_logger("bench")


def layer_filter(layer: str, seed: int, **fields):
    """A fresh filter bank of one layer of `layer` (module docstring), parameters from `seed`;
    `fields` override config fields."""
    torch.manual_seed(seed)
    if layer == "multihyena-125m":
        config = config_from_preset("125m", **fields)
        heads = config.n_head
        e = config.d_model // heads
        return make_filter(config, 0, heads * e * e, heads)
    config = config_from_preset(layer, **fields)
    return make_filter(config, 0, config.d_model, config.filter_heads)


def recurrence_bytes(rec) -> int:
    """Bytes of every tensor the recurrence object holds (in fields or tuples of them)."""
    tensors = [v for v in vars(rec).values() if isinstance(v, torch.Tensor)]
    tensors += [t for v in vars(rec).values() if isinstance(v, tuple) for t in v if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed_build(f) -> tuple[object, float, float]:
    """f.recurrence(float32), its wall and process CPU seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        rec = f.recurrence(torch.float32)
    return rec, time.perf_counter() - t0, time.process_time() - c0


def loaded_from_export(f, layer: str, seed: int):
    """A new filter bank of `layer` holding f's parameters and stored form, as an export's load does."""
    f.store_recurrence()
    g = layer_filter(layer, seed + 1000, stored_recurrence=True)
    g.load_state_dict(f.state_dict())
    return g


def measure(layer: str, repeats: int) -> dict:
    stored = hasattr(RTF, "stored_conversion")  # a tree from before the stored form has no such build
    walls, cpus, stored_walls = [], [], []
    for r in range(repeats + 1):  # the first is a warm-up
        f = layer_filter(layer, seed=r)
        rec, wall, cpu = timed_build(f)
        if r:
            walls.append(wall)
            cpus.append(cpu)
        if stored:
            rec2, wall2, _ = timed_build(loaded_from_export(f, layer, r))
            if not all(torch.equal(x, y) for x, y in zip(rec.coef, rec2.coef)):
                raise AssertionError(f"{layer}: the recurrence built from the stored form is not the one it stores")
            if r:
                stored_walls.append(wall2)
    row = {
        "layer": layer,
        "channels": f.channels,
        "filters": f.num_filters,
        "state_size": f.state_size,
        "l_max": f.l_max,
        "build_ms": statistics.median(walls) * 1e3,
        "build_cpu_ms": statistics.median(cpus) * 1e3,
        "recurrence_mb": recurrence_bytes(rec) / 1e6,
    }
    if stored:
        row["stored_build_ms"] = statistics.median(stored_walls) * 1e3
    log.info("%s: %.1f ms (CPU %.1f ms), %.2f MB", layer, row["build_ms"], row["build_cpu_ms"], row["recurrence_mb"])
    if stored:
        log.info("%s: %.1f ms from an export's stored form", layer, row["stored_build_ms"])
    return row


def plot(result: dict, path: Path) -> None:
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    rows = result["rows"]
    x = torch.arange(len(rows)).tolist()
    ax.bar([i - 0.2 for i in x], [r["build_ms"] for r in rows], width=0.4, label="from the parameters")
    if all("stored_build_ms" in r for r in rows):
        stored = [r["stored_build_ms"] for r in rows]
        ax.bar([i + 0.2 for i in x], stored, width=0.4, label="from an export's stored form")
    ax.legend(fontsize=8)
    ax.set_xticks(x, [r["layer"] for r in rows], fontsize=8)
    ax.set(ylabel="build ms per layer", yscale="log", title=f"recurrence build, {result['machine'].get('cpu', 'cpu')}")
    save_png(fig, path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    add_run_options(p, RESULTS / "recurrence_build_cpu.json")
    args = p.parse_args(argv)
    start_run(args)
    result = {
        "benchmark": "recurrence_build",
        "machine": machine(torch.device("cpu")),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [measure(layer, args.repeats) for layer in args.layers],
    }
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
