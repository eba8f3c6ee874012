"""Laughing Hyena distillation, measured on models trained here: quality per order, decode latency,
and the RTF target against a modal (diagonal complex) one.

Inputs are exported checkpoints of the default CPU model (configs/default.yaml) trained with the
implicit filter and with RTF filters of order 64, e.g.

    python train.py --config configs/default.yaml model.filter=implicit train.out_dir=runs/implicit \\
        checkpoint.export_dir=runs/implicit/hf
    python train.py --config configs/default.yaml model.state_size=64 train.out_dir=runs/rtf64 \\
        checkpoint.export_dir=runs/rtf64/hf
    python -m benchmarks.distill --source implicit=runs/implicit/hf --source rtf64=runs/rtf64/hf \\
        --data data/default --orders 2,4,8,16,32,64

1. Quality: every source distilled at every order (hf/distill_checkpoint.py, the code behind
   distill.py): mean / max relative filter error, validation perplexity and bits per byte of the
   original and the distilled model on the same windows, KL(original || distilled) per token.
2. Decode latency: ms per generated token after prompts of increasing length, for each source and
   its distillation at --latency-order (the implicit filter keeps its whole input history, so its
   step cost grows with the prompt; an RTF's state does not).
3. Target comparison: the filters of each source fitted as RTFs and as conjugate-pair modal
   systems (models/distill.py, same initialisation, optimiser and step budget) at --modal-orders.

Writes benchmarks/results/distill_<device>.json and .png (machine named in the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM

from benchmarks.common import RESULTS, ints, machine, save_png, write_json
from hyena_rtf.hf.distill_checkpoint import Options, distill_checkpoint, long_filters
from hyena_rtf.models.distill import distill_filters, distill_modal, filter_bank_taps
from hyena_rtf.models.hf_compat import cache_kwargs, output_cache
from hyena_rtf.models.rtf import fft_length, rational_kernel
from hyena_rtf.utils.logs import get_logger, setup_logging

log = get_logger("bench")


def quality(name: str, source: Path, orders: list[int], args, scratch: Path) -> list[dict]:
    rows = []
    for order in orders:
        opts = Options(
            checkpoint=source,
            out=scratch / f"{name}_{order}",
            order=order,
            steps=args.steps,
            data=[args.data],
            max_tokens=args.max_tokens,
        )
        report = distill_checkpoint(opts)
        ev = report["evaluation"]
        rows.append(
            {
                "order": order,
                "filter_rel_error_mean": sum(layer["rel_error"]["mean"] for layer in report["layers"])
                / len(report["layers"]),
                "filter_rel_error_max": max(layer["rel_error"]["max"] for layer in report["layers"]),
                "ppl_original": ev["original"]["perplexity"],
                "ppl_distilled": ev["distilled"]["perplexity"],
                "bpb_original": ev["original"]["bits_per_byte"],
                "bpb_distilled": ev["distilled"]["bits_per_byte"],
                "kl_nats_per_token": ev["kl_nats_per_token"],
                "tokens": ev["tokens"],
                "recurrent_check": report["recurrent_check"],
                "fit_seconds": report["seconds"]["fit"],
            }
        )
        log.info(
            "%s order %d: filter error %.3g, ppl %.3f -> %.3f, KL %.3g",
            name,
            order,
            rows[-1]["filter_rel_error_mean"],
            rows[-1]["ppl_original"],
            rows[-1]["ppl_distilled"],
            rows[-1]["kl_nats_per_token"],
        )
    return rows


@torch.inference_mode()
def ms_per_token(model, prompt_length: int, new_tokens: int, repeats: int) -> float:
    """Median over `repeats` of the time of `new_tokens` single-token steps after a cached prefill
    of `prompt_length` random tokens, in ms per token (batch 1)."""
    ids = torch.randint(1, model.config.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats):
        out = model(input_ids=ids, use_cache=True)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **cache_kwargs(cache))
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        times.append((time.perf_counter() - start) / new_tokens * 1e3)
    return sorted(times)[len(times) // 2]


def latency(models: dict[str, Path], prompts: list[int], args) -> dict[str, list[float]]:
    result = {}
    for label, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        result[label] = [ms_per_token(model, p, args.new_tokens, args.repeats) for p in prompts]
        log.info("%s: %s ms/token", label, ", ".join(f"{t:.2f}" for t in result[label]))
    return result


def targets(name: str, source: Path, orders: list[int], steps: int) -> list[dict]:
    """Mean relative tap error of the RTF and the modal fit of every filter of `source`."""
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    l_max = model.config.l_max
    banks = [filter_bank_taps(module, l_max) for _, _, module in long_filters(model)]
    taps = torch.cat(banks)
    rows = []
    for order in orders:
        rtf = distill_filters(taps, fft_length(l_max), order=order, steps=steps)
        modal = distill_modal(taps, order, steps=steps)
        rows.append(
            {
                "order": order,
                "filters": taps.shape[0],
                "rtf_rel_error_mean": float(rtf.rel_error.mean()),
                "modal_rel_error_mean": float(modal.rel_error.mean()),
                "rtf_mse": float(((rtf_taps(rtf, l_max) - taps) ** 2).mean()),
                "modal_mse": float(((modal.kernel(l_max) - taps) ** 2).mean()),
            }
        )
        log.info("%s order %d: RTF %.3g, modal %.3g (mean relative error)", name, order, *list(rows[-1].values())[2:4])
    return rows


def rtf_taps(fit, length: int) -> torch.Tensor:
    """The taps the fitted RTF parameters give, as the model computes them (float64)."""
    return rational_kernel(fit.b, fit.a, fit.h0, fit.fft_len)[:, :length]


def log2_ticks(ax, values: list[int]) -> None:
    """A base-2 log axis labelled at exactly `values`."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()


def plot(result: dict, path: Path) -> None:
    fig = Figure(figsize=(15, 4.5))
    ax_q, ax_l, ax_t = fig.subplots(1, 3)
    for name, rows in result["quality"].items():
        orders = [r["order"] for r in rows]
        ax_q.plot(orders, [r["ppl_distilled"] for r in rows], marker="o", label=f"{name} distilled")
        ax_q.axhline(rows[0]["ppl_original"], linestyle="--", color=ax_q.lines[-1].get_color(), label=f"{name}")
    ax_q.set(xlabel="order", ylabel="validation perplexity", title="quality per order")
    log2_ticks(ax_q, orders)
    ax_q.legend(fontsize=8)
    for label, times in result["latency"]["ms_per_token"].items():
        ax_l.plot(result["latency"]["prompt_lengths"], times, marker="o", label=label)
    ax_l.set(xlabel="prompt length", ylabel="ms / token (batch 1)", title="decode latency")
    log2_ticks(ax_l, result["latency"]["prompt_lengths"])
    ax_l.legend(fontsize=8)
    for name, rows in result["targets"].items():
        orders = [r["order"] for r in rows]
        ax_t.plot(orders, [r["rtf_mse"] for r in rows], marker="o", label=f"{name}: RTF")
        ax_t.plot(orders, [r["modal_mse"] for r in rows], marker="s", linestyle="--", label=f"{name}: modal")
    ax_t.set(yscale="log", xlabel="order", ylabel="tap MSE", title="distillation target")
    log2_ticks(ax_t, orders)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"Laughing Hyena distillation, {result['machine'].get('cpu', 'cpu')}")
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", action="append", required=True, help="NAME=HF_FOLDER, repeatable")
    ap.add_argument("--data", type=Path, required=True, help="evaluation data (formats evaluate_lm.py reads)")
    ap.add_argument("--orders", type=ints, default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--modal-orders", type=ints, default=[4, 16, 64])
    ap.add_argument("--latency-order", type=int, default=16)
    ap.add_argument("--prompt-lengths", type=ints, default=[128, 512, 1024, 2048, 4096])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=20000, help="validation tokens scored per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "distill_cpu.json")
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    sources = dict(item.split("=", 1) for item in args.source)
    result = {
        "benchmark": "distill",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(torch.device("cpu")),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "quality": {},
        "targets": {},
    }
    with tempfile.TemporaryDirectory(prefix="distill_bench_") as tmp:
        scratch = Path(tmp)
        for name, folder in sources.items():
            result["quality"][name] = quality(name, Path(folder), args.orders, args, scratch)
        latency_models = {}
        for name, folder in sources.items():
            latency_models[f"{name} (original)"] = Path(folder)
            distilled = scratch / f"{name}_{args.latency_order}"
            if not distilled.is_dir():
                distilled = scratch / f"{name}_latency"
                distill_checkpoint(Options(checkpoint=Path(folder), out=distilled, order=args.latency_order))
            latency_models[f"{name} distilled, order {args.latency_order}"] = distilled
        result["latency"] = {
            "prompt_lengths": args.prompt_lengths,
            "new_tokens": args.new_tokens,
            "ms_per_token": latency(latency_models, args.prompt_lengths, args),
        }
    for name, folder in sources.items():
        result["targets"][name] = targets(name, Path(folder), args.modal_orders, args.steps)
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
