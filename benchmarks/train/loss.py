"""Peak memory and time of a training step's loss + backward: the LM head and cross-entropy over
full logits (what the trainer did) against the chunked linear + cross-entropy (models/chunked_loss.py,
what it does now).

    python -m benchmarks.train.loss --tokens 8192 --vocab-size 50277 --d-model 768 --threads 1 \\
        --repeats 1 --out benchmarks/results/train_loss_cpu.json          # PNG beside it

Per variant, in a fresh Python process (so one variant's freed memory cannot hide the other's):
hidden states h (N, d) and a head W (padded to a multiple of 64 rows, as the model's) with
requires_grad, random targets; then `--repeats` times

    unchunked   loss = next_token_nll(F.linear(h, W[:V]), y)      (HyenaRTFForCausalLM.logits off CUDA)
    chunked     loss = linear_cross_entropy(h, W[:V], y, n_classes=V)   (HyenaRTFForCausalLM.head_nll)
    loss.backward()

The times are the fastest repeat's, process CPU time (which a shared machine disturbs least; with
several threads it adds up every thread's, OpenMP's spin-waits included) and wall clock; the first
repeat counts (both variants' first call allocates as the rest do). Peak memory beyond what
existed before the call, two ways:
`peak_profiler`: torch.profiler's allocation timeline of the last repeat (benchmarks/common.py
MEMORY_METHODS); `peak_rss`: the process's maximum resident set (getrusage ru_maxrss) after all
repeats minus its value before the first (glibc hands large blocks back to the system on free, so
this is the peak of live memory too). Inputs and the weight's gradient buffer (C x d) exist before
the first call and count in neither. float32 (the CPU trainer's precision) unless --precision bf16.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import MEMORY_METHODS, machine, save_png, write_json

VARIANTS = ("unchunked", "chunked")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=8192, help="N: rows of h (micro-batch x sequence length)")
    p.add_argument("--vocab-size", type=int, default=50277)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: CPU autocast")
    p.add_argument("--chunk-rows", type=int, help="default: models.chunked_loss.default_chunk_rows")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/train_loss_cpu.json")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's job
    return p.parse_args(argv)


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_variant(args) -> dict:
    """One variant in this process: times and peaks (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.common import peak_memory
    from models.chunked_loss import default_chunk_rows, linear_cross_entropy
    from models.modeling_hyena_rtf import next_token_nll

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, v, d = args.tokens, args.vocab_size, args.d_model
    padded = -(-v // 64) * 64
    h = torch.randn(n, d, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(padded, d) * 0.02)
    y = torch.randint(0, v, (n,))
    w.grad, h.grad = torch.zeros_like(w), torch.zeros_like(h)  # present before: not counted
    chunk_rows = args.chunk_rows or default_chunk_rows(v)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            if args.variant == "chunked":
                loss = linear_cross_entropy(h, w[:v], y, n_classes=v, chunk_rows=chunk_rows)
            else:
                loss = next_token_nll(F.linear(h, w[:v])[None], y[None])  # (1, N, V): one sequence
        loss.backward()
        return loss.item()

    base = maxrss_bytes()
    times, cpu_times, losses = [], [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak_rss = maxrss_bytes() - base
    peak_prof = peak_memory(step, torch.device("cpu"), "profiler")
    return {
        "variant": args.variant,
        "time_s": min(times),
        "times_s": times,
        "cpu_time_s": min(cpu_times),
        "cpu_times_s": cpu_times,
        "peak_rss_bytes": peak_rss,
        "peak_profiler_bytes": peak_prof,
        "loss": losses[0],
        "grad_h_norm": float(h.grad.norm()),
        "chunk_rows": chunk_rows if args.variant == "chunked" else None,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["variant"] for r in rows]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(9, 3.6))
    gib = 2**30
    x = range(len(rows))
    ax_m.bar([i - 0.2 for i in x], [r["peak_profiler_bytes"] / gib for r in rows], 0.4, label="torch.profiler")
    ax_m.bar([i + 0.2 for i in x], [r["peak_rss_bytes"] / gib for r in rows], 0.4, label="max RSS growth")
    ax_m.set_xticks(list(x), names)
    ax_m.set_ylabel("peak memory of loss + backward (GiB)")
    ax_m.legend(fontsize=8)
    ax_t.bar([i - 0.2 for i in x], [r["cpu_time_s"] for r in rows], 0.4, color="tab:gray", label="process CPU")
    ax_t.bar([i + 0.2 for i in x], [r["time_s"] for r in rows], 0.4, color="silver", label="wall clock")
    ax_t.set_xticks(list(x), names)
    ax_t.set_ylabel("time of loss + backward (s)")
    ax_t.legend(fontsize=8)
    c = result["config"]
    fig.suptitle(
        f"LM head + cross-entropy, N={c['tokens']} tokens, V={c['vocab_size']}, d={c['d_model']}, "
        f"{c['precision']}, {c['threads']} thread(s)\n{result['machine']['cpu']}",
        fontsize=9,
    )
    save_png(fig, path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:  # child: one variant, its result as JSON on stdout
        print(json.dumps(run_variant(args)))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "benchmarks.train.loss", "--variant", variant]
        for key in ("tokens", "vocab_size", "d_model", "precision", "chunk_rows", "repeats", "threads"):
            if getattr(args, key) is not None:
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{variant:10s} {r['cpu_time_s']:7.2f} s CPU {r['time_s']:7.2f} s wall   "
            f"peak {r['peak_profiler_bytes'] / 2**30:6.2f} GiB (profiler), "
            f"{r['peak_rss_bytes'] / 2**30:6.2f} GiB (max RSS)   loss {r['loss']:.6f}",
            flush=True,
        )
    config = {k: getattr(args, k) for k in ("tokens", "vocab_size", "d_model", "precision", "repeats", "threads")}
    config["logits_fp32_bytes"] = args.tokens * args.vocab_size * 4
    result = {
        "benchmark": "train_loss",
        "config": config,
        "memory_methods": {
            "peak_profiler_bytes": MEMORY_METHODS["profiler"],
            "peak_rss_bytes": "getrusage ru_maxrss growth over the repeats",
        },
        "machine": machine(torch.device("cpu")),
        "rows": rows,
        "chunked_over_unchunked": {
            "time": rows[1]["time_s"] / rows[0]["time_s"],
            "cpu_time": rows[1]["cpu_time_s"] / rows[0]["cpu_time_s"],
            "peak_profiler": rows[1]["peak_profiler_bytes"] / rows[0]["peak_profiler_bytes"],
            "peak_rss": rows[1]["peak_rss_bytes"] / max(1, rows[0]["peak_rss_bytes"]),
            "loss_relative_difference": abs(rows[1]["loss"] - rows[0]["loss"]) / abs(rows[0]["loss"]),
        },
    }
    out = write_json(args.out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
