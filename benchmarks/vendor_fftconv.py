"""Vendor FFT causal-convolution kernels made for Hyena, checked and timed against
models/fftconv.py (torch.fft, the reference path and the one the model uses):

    subquadratic_ops_torch   pip install --no-deps subquadratic-ops-torch-cu12 (or -cu13):
                             subquadratic_ops_torch.fft_causal_conv1d.fft_causal_conv1d(x, weight)
    cudnn                    pip install --no-deps nvidia-cudnn-frontend (needs cuDNN >= 9.26):
                             cudnn.ops.fft_causal_conv1d(x, weight)

Both take x (batch, dim, seq_len) and weight (dim, kernel_size), as fft_causal_conv does (u, k).
Each is used only when importable and on CUDA; otherwise its rows say why. Nothing here is wired
into the model: the project keeps a vendor kernel only if it is exact and faster (docs/baselines.md).

    python -m benchmarks.vendor_fftconv --device cuda --d-model 768 --lengths 1024,2048,4096,8192,16384 \\
        --tokens 16384 --out benchmarks/results/vendor_fftconv_cuda.json

Per (kernel, length): float32 x and weight (batch = --tokens / length), the kernel's output against a
float64 torch.fft reference; a kernel that stores its taps in the other order is tried with the
taps reversed, and the orientation that matches is recorded. `exact` means within 1e-5 of max|y|
(float32 rounding of an FFT convolution: eps32 1.2e-7 times log2(2T) times the O(10) ratio of
sum|k||u| to max|y|; models/fftconv.py meets the same bound, tests/unit/models/test_fftconv.py). Then the
median time of forward, and of forward + backward (both inputs needing gradients), over --repeats
runs after a warm-up, for the kernel and for fft_causal_conv.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time

import torch

from benchmarks.common import ints, machine, sync, write_json
from models.fftconv import fft_causal_conv
from utils.logs import get_logger, setup_logging

TOLERANCE = 1e-5
log = get_logger("bench")


def load_kernels() -> dict:
    """{name: callable(x, weight) or the reason it is not available}."""
    found = {}
    try:
        found["subquadratic_ops_torch"] = importlib.import_module(
            "subquadratic_ops_torch.fft_causal_conv1d"
        ).fft_causal_conv1d
    except Exception as e:  # an extension that fails to load raises more than ImportError
        found["subquadratic_ops_torch"] = f"not importable: {type(e).__name__}: {e}".splitlines()[0]
    try:
        found["cudnn"] = importlib.import_module("cudnn").ops.fft_causal_conv1d
    except Exception as e:
        found["cudnn"] = f"not importable: {type(e).__name__}: {e}".splitlines()[0]
    return found


def median_ms(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def fwd_bwd(conv, u, k):
    def run():
        a, b = u.detach().requires_grad_(), k.detach().requires_grad_()
        conv(a, b).sum().backward()

    return run


def run(args) -> dict:
    device = torch.device(args.device)
    kernels = load_kernels()
    rows = []
    for T in args.lengths:
        batch = max(1, args.tokens // T)
        gen = torch.Generator(device=device).manual_seed(T)
        u = torch.randn(batch, args.d_model, T, device=device, generator=gen)
        decay = torch.exp(-torch.arange(T, device=device) / (T / 4))  # a long filter that decays
        k = torch.randn(args.d_model, T, device=device, generator=gen) * decay
        ref = fft_causal_conv(u.double(), k.double())
        ours = {
            "torch_fft_error": rel_error(fft_causal_conv(u, k), ref),
            "torch_fft_fwd_ms": median_ms(lambda u=u, k=k: fft_causal_conv(u, k), device, args.repeats),
            "torch_fft_fwd_bwd_ms": median_ms(fwd_bwd(fft_causal_conv, u, k), device, args.repeats),
        }
        for name, fn in kernels.items():
            row = {"kernel": name, "length": T, "batch": batch, "d_model": args.d_model, **ours}
            if isinstance(fn, str) or device.type != "cuda":
                rows.append({**row, "status": "not available", "reason": fn if isinstance(fn, str) else "needs CUDA"})
                log.info(f"{name} length {T}: {rows[-1]['reason']}")
                continue
            try:
                errors = {order: rel_error(fn(u, kk), ref) for order, kk in (("fir", k), ("reversed", k.flip(-1)))}
                order = min(errors, key=errors.get)
                kk = k if order == "fir" else k.flip(-1).contiguous()
                row.update(
                    status="ok",
                    tap_order=order,
                    error=errors[order],
                    exact=errors[order] < TOLERANCE,
                    fwd_ms=median_ms(lambda fn=fn, u=u, kk=kk: fn(u, kk), device, args.repeats),
                    fwd_bwd_ms=median_ms(fwd_bwd(fn, u, kk), device, args.repeats),
                )
                row["speedup_fwd_bwd"] = row["torch_fft_fwd_bwd_ms"] / row["fwd_bwd_ms"]
            except Exception as e:  # an unsupported shape or dtype: record it, go on
                row.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0])
            rows.append(row)
            log.info(f"{name} length {T}: {row}")
    return {
        "benchmark": "vendor_fftconv",
        "machine": machine(device),
        "device": str(device),
        "tolerance": TOLERANCE,
        "args": vars(args),
        "rows": rows,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--lengths", type=ints, default=ints("1024,2048,4096,8192,16384"))
    p.add_argument("--tokens", type=int, default=16384, help="batch x length of each configuration")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/vendor_fftconv.json")
    args = p.parse_args(argv)
    setup_logging()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("vendor_fftconv: error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    result = run(args)
    write_json(args.out, result)
    log.info(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
