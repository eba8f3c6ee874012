"""Laughing Hyena distillation measured on a model trained here: the modal (pole-residue) form against
the RTF (polynomial) form, order by order.

The source is an exported checkpoint with implicit filters trained at a long length, e.g. (English
data from ../shared/data, about 15 CPU minutes):

    python -m data_prep.prepare --input ../shared/data/pile_sample.jsonl.zst \\
        ../shared/data/tinyshakespeare_input.txt --out data/english --vocab-size 4096 --val-fraction 0.05
    python train.py --config configs/default.yaml model.filter=implicit data.dir=data/english \\
        data.seq_len=2048 train.micro_batch_size=4 train.global_batch_size=4 train.max_steps=400 \\
        optim.lr=6e-3 train.out_dir=runs/implicit2048 checkpoint.export_dir=runs/implicit2048/hf
    python -m benchmarks.distill --source runs/implicit2048/hf --data data/english

For every form (--forms) and order (--orders) the source is distilled as distill.py does it
(distillation/checkpoint.py, with --force so that a failed decoding check is recorded rather than
stopping the run) and measured:

- memory-tap error of every fitted filter (taps >= 1, relative l2: `models/distill.memory_error`),
  median and max over all filters of all layers, as the saved model computes its kernel;
- perplexity of the original and the distilled model on the same validation windows, KL(original ||
  distilled) per token and top-1 agreement;
- the distilled model's own decoding check (cached prefill, chunk and steps against its parallel
  forward, past l_max);
- decode latency: ms per token of batch-1 greedy steps after a cached prompt (median of --repeats),
  for each distilled model and for the source (whose implicit filter re-convolves its history).

Writes benchmarks/results/distill_cpu.json and .png (machine named in the JSON).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM

from benchmarks.common import RESULTS, add_run_options, ints, machine, save_png, start_run, write_json
from distillation.checkpoint import Options, distill_checkpoint
from models.hf_compat import cache_kwargs, output_cache
from utils.logs import get_logger

log = get_logger("bench")


def distil(source: Path, form: str, order: int, args, out: Path) -> dict:
    """One distillation and its measurements (module docstring), as a row of the results."""
    opts = Options(
        checkpoint=source,
        out=out,
        order=order,
        form=form,
        steps=args.steps,
        data=[args.data],
        max_tokens=args.max_tokens,
        force=True,
    )
    report = distill_checkpoint(opts)
    errors = torch.tensor([e for layer in report["layers"] for e in layer["memory_tap_error_per_filter"]])
    ev, check = report["evaluation"], report["recurrent_check"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    row = {
        "form": form,
        "order": order,
        "filters": len(errors),
        "memory_tap_error_median": float(errors.median()),
        "memory_tap_error_max": float(errors.max()),
        "ppl_original": ev["original"]["perplexity"],
        "ppl_distilled": ev["distilled"]["perplexity"],
        "kl_nats_per_token": ev["kl_nats_per_token"],
        "top1_agreement": ev["top1_agreement"],
        "tokens": ev["tokens"],
        "recurrent_check": check,
        "fit_seconds": report["seconds"]["fit"],
        "decode_ms_per_token": ms_per_token(model, args.prompt_length, args.new_tokens, args.repeats),
    }
    log.info(
        "%s order %d: memory-tap error median %.3g max %.3g, ppl %.3f -> %.3f, KL %.3g, top-1 %.4f, %.2f ms/token",
        form,
        order,
        row["memory_tap_error_median"],
        row["memory_tap_error_max"],
        row["ppl_original"],
        row["ppl_distilled"],
        row["kl_nats_per_token"],
        row["top1_agreement"],
        row["decode_ms_per_token"],
    )
    return row


@torch.inference_mode()
def ms_per_token(model, prompt_length: int, new_tokens: int, repeats: int) -> float:
    """Median over `repeats` of the time of `new_tokens` single-token greedy steps after a cached
    prefill of `prompt_length` tokens, in ms per token (batch 1)."""
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


def plot(result: dict, path: Path) -> None:
    fig = Figure(figsize=(15, 4.5))
    ax_e, ax_kl, ax_ms = fig.subplots(1, 3)
    for form, marker in (("modal", "o"), ("rtf", "s")):
        rows = [r for r in result["rows"] if r["form"] == form]
        if not rows:
            continue
        orders = [r["order"] for r in rows]
        ax_e.plot(orders, [r["memory_tap_error_median"] for r in rows], marker=marker, label=f"{form}: median")
        ax_e.plot(orders, [r["memory_tap_error_max"] for r in rows], marker=marker, ls="--", label=f"{form}: max")
        ax_kl.plot(orders, [max(r["kl_nats_per_token"], 1e-12) for r in rows], marker=marker, label=form)
        ax_ms.plot(orders, [r["decode_ms_per_token"] for r in rows], marker=marker, label=f"{form} distilled")
    ax_ms.axhline(result["source_ms_per_token"], color="k", ls=":", label="source (implicit)")
    for ax, title, ylabel in (
        (ax_e, "memory-tap error (taps >= 1)", "relative l2 error"),
        (ax_kl, "KL(original || distilled)", "nats / token"),
        (ax_ms, f"decode after a {result['arguments']['prompt_length']}-token prompt", "ms / token (batch 1)"),
    ):
        ax.set(xlabel="order", ylabel=ylabel, title=title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["arguments"]["orders"], [str(o) for o in result["arguments"]["orders"]])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    ax_e.set_yscale("log")
    ax_kl.set_yscale("log")
    fig.suptitle(f"distilling {result['source']} ({result['machine'].get('cpu', 'cpu')})", fontsize=10)
    save_png(fig, path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, required=True, help="the exported checkpoint to distil")
    ap.add_argument("--data", type=Path, required=True, help="evaluation data (formats evaluate_lm.py reads)")
    ap.add_argument("--orders", type=ints, default=[4, 8, 16, 32, 64])
    ap.add_argument("--forms", default="modal,rtf", help="comma-separated: modal, rtf")
    ap.add_argument("--steps", type=int, default=300, help="refinement steps of each fit")
    ap.add_argument("--max-tokens", type=int, default=20000, help="validation tokens scored per model")
    ap.add_argument("--prompt-length", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    add_run_options(ap, RESULTS / "distill_cpu.json")
    args = ap.parse_args(argv)
    start_run(args)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    source = AutoModelForCausalLM.from_pretrained(args.source).eval()
    result = {
        "benchmark": "distill",
        "machine": machine(torch.device("cpu")),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "source": str(args.source),
        "source_config": {k: source.config.to_dict()[k] for k in ("filter", "d_model", "n_layer", "l_max")},
        "source_ms_per_token": ms_per_token(source, args.prompt_length, args.new_tokens, args.repeats),
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="distill_bench_") as tmp:
        for form in forms:
            for order in args.orders:
                result["rows"].append(distil(args.source, form, order, args, Path(tmp) / f"{form}_{order}"))
                write_json(args.out, result)  # what is done so far survives an interruption
    plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
