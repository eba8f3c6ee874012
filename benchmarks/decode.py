"""Decode speed against prompt length and batch size, three ways side by side:

    hyena_rtf_recurrent   our model: parallel FFT prefill, then one O(1) recurrent step per token
    hyena_rtf_no_cache    our model re-running the full parallel forward for every new token
    gpt_neox_kv           Hugging Face GPT-NeoX of the same width, depth and vocabulary, KV cache

All three decode greedily with the same hand-written loop (argmax of the last position's logits,
only that position's logits computed), so the numbers compare the models, not generate()'s
bookkeeping. Weights are random: speed does not depend on them.

    python -m benchmarks.decode --device cpu --preset small --prompt-lengths 128,512,2048 \\
        --batch-sizes 1,8 --new-tokens 32 --repeats 3 --threads 1 \\
        --budget-s 20 --out benchmarks/results/decode_cpu.json

Per configuration: a warm-up (prefill + 2 steps, or one full forward), then a timed prefill and
--new-tokens timed steps, in --repeats rounds for the cached methods keeping the fastest
(torch.cuda.synchronize around every timer on GPU). Per-token latency is the median step time
(robust to a step preempted by another process; mean and min are in the JSON too); decode tokens/s
is batch / latency. A configuration whose predicted time (from the same method's previous, shorter
prompt, or its warm-up) is over --budget-s is skipped or timed on fewer steps, and its JSON row
says so; so are out-of-memory errors. Writes the JSON (machine, date, versions, arguments, rows)
and a PNG beside it (latency vs prompt length, tokens/s vs batch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import matplotlib.ticker
import torch
import transformers
from matplotlib.figure import Figure
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from benchmarks.common import ints, machine, save_png, sync, write_json
from hyena_rtf.models import HyenaRTFConfig, config_from_preset
from hyena_rtf.models.hf_compat import cache_kwargs, output_cache
from hyena_rtf.models.modeling_hyena_rtf import HyenaRTFForCausalLM
from hyena_rtf.models.precision import DTYPES, dtype_from_name, is_filter_param
from hyena_rtf.utils.logs import get_logger, setup_logging

METHODS = ("hyena_rtf_recurrent", "hyena_rtf_no_cache", "gpt_neox_kv")
log = get_logger("bench")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtype",
        default=None,
        choices=tuple(DTYPES),
        help="default: bfloat16 on CUDA, float32 on CPU (RTF filters and state stay float32)",
    )
    p.add_argument("--preset", default="small", help="model preset (models/configuration_hyena_rtf.py)")
    p.add_argument("--d-model", type=int, help="override the preset's width")
    p.add_argument("--n-layer", type=int, help="override the preset's depth")
    p.add_argument("--vocab-size", type=int, default=50277)
    p.add_argument("--prompt-lengths", type=ints, default=ints("512,1024,2048,4096,8192"))
    p.add_argument("--batch-sizes", type=ints, default=ints("1,8,64"))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over the cached methods; each row keeps its fastest (for shared machines)",
    )
    p.add_argument("--budget-s", type=float, default=60.0, help="time allowed per configuration")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/decode.json", help="JSON path; the PNG goes beside it")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    return p.parse_args(argv)


def build_models(args, device, dtype):
    """(ours, gpt_neox) of the same width, depth and vocabulary, random, in eval mode."""
    overrides = {k: v for k, v in (("d_model", args.d_model), ("n_layer", args.n_layer)) if v}
    config: HyenaRTFConfig = config_from_preset(args.preset, vocab_size=args.vocab_size, **overrides)
    if config.d_model % config.n_head:
        config.n_head = 1
    ours = HyenaRTFForCausalLM(config)
    keep = {id(p) for name, p in ours.named_parameters() if is_filter_param(name)}  # RTF stays float32
    for p in ours.parameters():
        if id(p) not in keep:
            p.data = p.data.to(dtype)
    neox_config = GPTNeoXConfig(
        vocab_size=args.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=4 * config.d_model,
        max_position_embeddings=max(args.prompt_lengths) + args.new_tokens,
        attn_implementation="sdpa",
    )
    neox = GPTNeoXForCausalLM(neox_config).to(dtype)
    return ours.to(device).eval(), neox.to(device).eval(), config


def cache_bytes(cache) -> int:
    """Bytes held by a HyenaRTFCache or a transformers KV cache."""
    seen, total = set(), 0

    def visit(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            if x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                total += x.nbytes
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif hasattr(x, "__dict__"):
            for y in vars(x).values():
                visit(y)

    visit(getattr(cache, "layers", cache))
    return total


def decode(model, ids, steps: int, use_cache: bool, device) -> tuple[float, list[float], object]:
    """Greedy decoding of `steps` tokens after `ids`. Returns (prefill s, step times s, cache)."""
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=use_cache, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill = time.perf_counter() - t0
    cache, times = output_cache(out) if use_cache else None, []
    for _ in range(steps):
        t0 = time.perf_counter()
        if use_cache:
            out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
            cache = output_cache(out)
        else:  # the whole sequence again: what a model without a recurrent form must do
            ids = torch.cat([ids, tok], dim=1)
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return prefill, times, cache


def run_config(method, model, batch, prompt, args, device, history) -> dict:
    row = {"method": method, "batch": batch, "prompt_len": prompt, "new_tokens": args.new_tokens}
    use_cache = method != "hyena_rtf_no_cache"
    # Predict from the previous (shorter) prompt of this method and batch: cost ~ linear in length
    # for full forwards, which is what could blow the budget.
    prev = history.get((method, batch))
    if prev is not None:
        p_prompt, p_step, p_prefill = prev
        scale = prompt / p_prompt
        predicted = p_prefill * scale + args.new_tokens * (p_step * scale if not use_cache else p_step)
        if predicted > 3 * args.budget_s:
            return {**row, "status": "skipped", "reason": f"predicted {predicted:.0f} s > budget {args.budget_s:.0f} s"}
    ids = torch.randint(
        0,
        args.vocab_size,
        (batch, prompt),
        device=device,
        generator=torch.Generator(device=device).manual_seed(args.seed),
    )
    try:
        with torch.inference_mode():
            warm_prefill, warm, _ = decode(model, ids, 2 if use_cache else 0, use_cache, device)
            steps = args.new_tokens
            if not use_cache:  # one full forward per token: fit the budget
                steps = int(min(steps, max(2, args.budget_s / max(warm_prefill, 1e-9))))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            prefill, times, cache = decode(model, ids, steps, use_cache, device)
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0]}"}
    # Median, not mean: one step preempted by another process should not move the figure.
    step = sorted(times)[len(times) // 2]
    history[(method, batch)] = (prompt, step, prefill)
    row.update(
        status="ok",
        steps_timed=len(times),
        prefill_ms=1e3 * prefill,
        per_token_ms=1e3 * step,
        per_token_ms_mean=1e3 * sum(times) / len(times),
        per_token_ms_min=1e3 * min(times),
        decode_tokens_per_s=batch / step,
        end_to_end_tokens_per_s=batch * len(times) / (prefill + sum(times)),
        cache_mb=cache_bytes(cache) / 2**20 if cache is not None else 0.0,
    )
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if len(times) < args.new_tokens:
        row["note"] = f"timed {len(times)} of {args.new_tokens} steps to stay within the budget"
    return row


def plot(result: dict, path: Path) -> None:
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    colors = dict(zip(METHODS, ("tab:blue", "tab:red", "tab:green")))
    batches = sorted({r["batch"] for r in rows})
    styles = dict(zip(batches, ("-", "--", ":", "-.") * 4))
    fig = Figure(figsize=(12, 4.8))
    left, right = fig.subplots(1, 2)
    for method in METHODS:
        for b in batches:
            pts = sorted(
                (r["prompt_len"], r["per_token_ms"]) for r in rows if r["method"] == method and r["batch"] == b
            )
            if pts:
                label = f"{method}, batch {b}"
                left.plot(*zip(*pts, strict=True), styles[b], marker="o", color=colors[method], label=label)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="prompt length (tokens)",
        ylabel="per-token latency (ms)",
        title="latency of one new token",
    )
    left.set_xticks(sorted({r["prompt_len"] for r in rows}), [str(p) for p in sorted({r["prompt_len"] for r in rows})])
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.legend(fontsize=7)
    prompts = sorted({r["prompt_len"] for r in rows})
    ref = max([p for p in prompts if p <= 2048] or prompts)
    for method in METHODS:
        pts = sorted(
            (r["batch"], r["decode_tokens_per_s"]) for r in rows if r["method"] == method and r["prompt_len"] == ref
        )
        if pts:
            right.plot(*zip(*pts), marker="o", color=colors[method], label=method)
    right.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="decode tokens/s",
        title=f"throughput at prompt length {ref}",
    )
    right.set_xticks(batches, [str(b) for b in batches])
    right.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    right.legend(fontsize=7)
    m, mach = result["model"], result["machine"]
    where = mach.get("gpu") or (
        f"CPU, {mach['torch_threads']} thread(s), load average "
        f"{mach.get('load_average_at_start', ['?'])[0]} on {mach['cpu_count']} cores"
    )
    fig.suptitle(
        f"{where}, {result['dtype']}: d {m['d_model']}, {m['n_layer']} layers, state {m['state_size']}, "
        f"vocab {m['vocab_size']}; median step of the best of {result['args']['repeats']} rounds"
    )
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return 0
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ours, neox, config = build_models(args, device, dtype_from_name(dtype_name))
    models = {"hyena_rtf_recurrent": ours, "hyena_rtf_no_cache": ours, "gpt_neox_kv": neox}
    methods = [m for m in args.methods.split(",") if m]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "device": str(device),
        "dtype": dtype_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": vars(args),
        "model": {
            "d_model": config.d_model,
            "n_layer": config.n_layer,
            "state_size": config.state_size,
            "l_max": config.l_max,
            "vocab_size": config.vocab_size,
            "n_head": config.n_head,
            "params_hyena_rtf": sum(p.numel() for p in ours.parameters()),
            "params_gpt_neox": sum(p.numel() for p in neox.parameters()),
        },
        "rows": [],
    }
    history: dict = {}
    best: dict = {}
    # Repeats are whole rounds over every configuration rather than back to back, so that a burst
    # of load from other processes hits one round, not every repeat of one configuration. The
    # no-cache baseline is slow and far from the others: it is timed in the first round only.
    for rnd in range(args.repeats):
        for batch in args.batch_sizes:
            for prompt in sorted(args.prompt_lengths):
                for method in methods:
                    key = (method, batch, prompt)
                    if rnd and (method == "hyena_rtf_no_cache" or best[key]["status"] != "ok"):
                        continue
                    row = run_config(method, models[method], batch, prompt, args, device, history)
                    if key not in best or (row["status"] == "ok" and row["per_token_ms"] < best[key]["per_token_ms"]):
                        best[key] = {**row, "repeats": args.repeats if method != "hyena_rtf_no_cache" else 1}
                    log.info(
                        f"round {rnd + 1}: {method} batch {batch} prompt {prompt}: "
                        + (f"{row['per_token_ms']:.2f} ms/token" if row["status"] == "ok" else row["reason"])
                    )
    result["rows"] = list(best.values())
    print(
        f"{'method':22} {'batch':>5} {'prompt':>6} {'prefill ms':>10} {'ms/token':>9} {'min ms':>7} "
        f"{'tokens/s':>9} {'cache MB':>8}"
    )
    for row in result["rows"]:
        head = f"{row['method']:22} {row['batch']:5d} {row['prompt_len']:6d}"
        if row["status"] == "ok":
            print(
                f"{head} {row['prefill_ms']:10.1f} {row['per_token_ms']:9.2f} {row['per_token_ms_min']:7.2f} "
                f"{row['decode_tokens_per_s']:9.1f} "
                f"{row['cache_mb']:8.2f}" + (" *" if "note" in row else "")
            )
        else:
            print(f"{head}  skipped: {row['reason']}")
    out = write_json(args.out, result)
    plot(result, out.with_suffix(".png"))
    log.info(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
