"""Decode speed against prompt length and batch size, side by side:

    hyena_rtf_recurrent   our model: parallel FFT prefill, then one O(1) recurrent step per token (eager)
    hyena_rtf_compiled    the same recurrence through the static decode step (models/static_decode.py),
                          torch.compile'd (CUDA graphs on GPU)
    hyena_implicit        Hyena with implicit filters: no finite state, each step convolves the whole
                          input history kept in its cache (O(t) per token)
    gpt_neox_kv           Hugging Face GPT-NeoX of the same width, depth and vocabulary, KV cache
    hyena_rtf_no_cache    our model re-running the full parallel forward for every new token
                          (not in the default --methods: hopeless beyond short prompts)

All of them decode greedily with the same hand-written loop (argmax of the last position's logits,
only that position's logits computed), so the numbers compare the models, not generate()'s
bookkeeping. Weights and prompts are random: speed does not depend on them.

    python -m benchmarks.decode --device cpu --preset small --threads 2 --repeats 2 \\
        --out benchmarks/results/decode_cpu.json
    python -m benchmarks.decode --markdown --out benchmarks/results/decode_cpu.json   # README tables

Per configuration: a warm-up (prefill + 2 steps, or one full forward; it compiles the static step
on its first use for a batch size, timed as compile_s), then a timed prefill and --new-tokens
timed steps, in --repeats rounds for the cached methods keeping the fastest (torch.cuda.synchronize
around every timer on GPU). Per-token latency is the median step time (robust to a step preempted
by another process; mean and min are in the JSON too, and the median process CPU time,
per_token_cpu_ms, which a shared machine disturbs less); decode tokens/s is batch / latency.
First-token latency = recurrence build + prefill, both in the row: the build (the RTFs' modal
systems, in float64, normally memoised per model) is forced and timed for the RTF methods, so
first_token_ms is what a freshly loaded model pays.

Prefill runs in pieces so that large batches fit: Hyena models in groups of rows of at most
--prefill-tokens tokens, their states concatenated; GPT-NeoX in chunks of positions through its
KV cache (at most --prefill-tokens tokens, and an attention mask of at most 1 GiB a chunk).

Guards. A configuration whose estimated memory (cache, prefill piece, weights) is over
--max-memory-gb is skipped; one whose predicted time (from the same method's previous, shorter
prompt at this batch, or else its previous, smaller batch at this prompt, or its warm-up) is over
--budget-s is skipped or timed on fewer steps. Skipped rows say why; so do out-of-memory errors.
Memory: cache_mb (every tensor of the cache, recurrence coefficients included) and peak_memory_mb
(GPU: max_memory_allocated over the timed run; CPU: weights plus the peak of the warm-up's
allocations, benchmarks/common.peak_memory; not measured for the compiled step on CPU, whose
warm-up compiles). Writes the JSON (machine, date, versions, arguments, rows, summary) and a PNG
beside it (benchmarks/decode/report.py, which also prints the README tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

from benchmarks.common import (
    MEMORY_METHODS,
    cpu_memory_method,
    ints,
    machine,
    memory_limit_bytes,
    peak_memory,
    sync,
    write_json,
)
from benchmarks.decode.models import build_models, cache_bytes, estimate_bytes
from benchmarks.decode.report import markdown, plot, print_rows, summary
from models.hf_compat import cache_kwargs, output_cache
from models.hyena import HyenaOperator, HyenaState
from models.precision import DTYPES, dtype_from_name
from models.rtf import RTF
from models.static_decode import StaticDecoder, compile_options
from utils.logs import get_logger, setup_logging

METHODS = ("hyena_rtf_recurrent", "hyena_rtf_compiled", "hyena_implicit", "gpt_neox_kv", "hyena_rtf_no_cache")
DEFAULT_METHODS = METHODS[:4]
GROWING = ("hyena_rtf_no_cache", "hyena_implicit")  # per-token cost grows with the context
log = get_logger("bench")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    p.add_argument("--l-max", type=int, help="override the preset's training length")
    p.add_argument("--vocab-size", type=int, default=50277)
    p.add_argument("--prompt-lengths", type=ints, default=ints("512,2048,8192"))
    p.add_argument("--batch-sizes", type=ints, default=ints("1,16,64,256"))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over the cached methods; each row keeps its fastest (for shared machines)",
    )
    p.add_argument("--budget-s", type=float, default=60.0, help="time allowed per configuration")
    p.add_argument("--max-memory-gb", type=float, help="default: 80%% of the GPU or of the memory available now")
    p.add_argument("--prefill-tokens", type=int, default=65536, help="tokens per prefill piece")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the static step (eager: traces it without generating code, for checks)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/decode.json", help="JSON path; the PNG goes beside it")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    p.add_argument("--markdown", action="store_true", help="print the README tables of an existing --out JSON")
    args = p.parse_args(argv)
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad or not args.methods:
        p.error(f"argument --methods: unknown {bad}; choose from {', '.join(METHODS)}")
    for name in ("new_tokens", "repeats", "prefill_tokens"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    return args


def build_recurrences(model, device) -> float:
    """Forget every RTF's memoised recurrence and rebuild it as the prefill will ask for it (its
    operator's recurrent dtype, poles checked); returns the seconds taken."""
    ops = [m for m in model.modules() if isinstance(m, HyenaOperator) and isinstance(m.filter, RTF)]
    sync(device)
    t0 = time.perf_counter()
    for op in ops:
        # Forget the memo (what a freshly loaded model lacks): `_memo` today, `_recurrence_cache` in
        # trees before the modal form (benchmarks/against_baseline.py runs this script on those).
        op.filter.__dict__.pop("_memo", None)
        op.filter.__dict__["_recurrence_cache"] = None
        op.filter.recurrence(op.rec_dtype, "error")
    sync(device)
    return time.perf_counter() - t0


def prefill(method, model, ids, args) -> tuple[torch.Tensor, object]:
    """The prompt through the model in pieces (module docstring) -> (last logits (B, V), cache)."""
    B, T = ids.shape
    if method == "hyena_rtf_no_cache":
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1], None
    if method == "gpt_neox_kv":
        chunk = max(1, min(T, args.prefill_tokens // B))
        # A chunk after the first attends through a (B, 1, chunk, T) mask: 1 GiB of it at most. (CPU
        # sdpa does not build the (B, heads, chunk, T) scores: a 512 x 4096 chunk at batch 8 peaked
        # at 104 MB where the scores alone would take 256 MB.)
        chunk = max(1, min(chunk, 2**30 // (4 * B * T)))
        cache = None
        for s in range(0, T, chunk):
            out = model(input_ids=ids[:, s : s + chunk], use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
            cache = output_cache(out)
        return out.logits[:, -1], cache
    parts = [
        model(input_ids=rows, use_cache=True, logits_to_keep=1) for rows in ids.split(max(1, args.prefill_tokens // T))
    ]
    cache = output_cache(parts[0])
    if len(parts) > 1:  # every layer's state is per row: concatenate the groups' states
        caches = [output_cache(p) for p in parts]
        cache.layers = [
            HyenaState(
                torch.cat([c.layers[i].conv for c in caches]), torch.cat([c.layers[i].filt for c in caches]), s.rec
            )
            for i, s in enumerate(cache.layers)
        ]
    return torch.cat([p.logits[:, -1] for p in parts]), cache


def decode(method, model, ids, steps: int, device, args, decoder=None) -> dict:
    """Greedy decoding of `steps` tokens after `ids`: build s, prefill s, step wall and process CPU
    times s, cache."""
    build = build_recurrences(model, device) if method in ("hyena_rtf_recurrent", "hyena_rtf_compiled") else 0.0
    sync(device)
    t0 = time.perf_counter()
    logits, cache = prefill(method, model, ids, args)
    if decoder is not None:  # the static cache takes the prefilled states over
        decoder.cache.load_(cache)
        decoder.seen, cache = ids.shape[1], decoder.cache
    tok = logits.argmax(-1, keepdim=True)
    sync(device)
    prefill_s, times, cpu = time.perf_counter() - t0, [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        if decoder is not None:
            logits = decoder.step(tok)
        elif cache is not None:
            out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
            cache, logits = output_cache(out), out.logits[:, -1]
        else:  # the whole sequence again: what a model without a recurrent form must do
            ids = torch.cat([ids, tok], dim=1)
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"build": build, "prefill": prefill_s, "times": times, "cpu": cpu, "cache": cache}


def predict(method, batch, prompt, args, history) -> float | None:
    """Seconds for prefill + new tokens, from this method's previous prompt at this batch (cost
    linear in the prompt for prefill and growing methods), else from its previous batch at this
    prompt (linear in the batch: an upper bound for the steps)."""
    grows = method in GROWING
    if (method, batch) in history:
        p_prompt, p_step, p_prefill = history[(method, batch)]
        scale = prompt / p_prompt
        return p_prefill * scale + args.new_tokens * (p_step * scale if grows else p_step)
    if (method, "prompt", prompt) in history:
        p_batch, p_step, p_prefill = history[(method, "prompt", prompt)]
        return (p_prefill + args.new_tokens * p_step) * batch / p_batch
    return None


def run_config(method, model, batch, prompt, args, device, history, decoders, mem_method) -> dict:
    row = {"method": method, "batch": batch, "prompt_len": prompt, "new_tokens": args.new_tokens}
    est = estimate_bytes(method, model, batch, prompt, args)
    if est > args.max_memory_gb * 2**30:
        return {**row, "status": "skipped", "reason": f"estimated {est / 2**30:.1f} GB > {args.max_memory_gb:.1f} GB"}
    predicted = predict(method, batch, prompt, args, history)
    if predicted is not None and predicted > 3 * args.budget_s:
        return {**row, "status": "skipped", "reason": f"predicted {predicted:.0f} s > budget {args.budget_s:.0f} s"}
    use_cache = method != "hyena_rtf_no_cache"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (batch, prompt), device=device, generator=gen)
    decoder, compile_s = None, None
    try:
        with torch.inference_mode():
            if method == "hyena_rtf_compiled":
                decoder = decoders.get(batch)
                if decoder is None:  # one compiled step per batch size, room for the longest prompt
                    options = {**compile_options(device), "dynamic": False}
                    if args.compile_backend != "inductor":  # modes are inductor's
                        options = {"backend": args.compile_backend, "dynamic": False}
                    max_length = max(args.prompt_lengths) + args.new_tokens + 3
                    decoder = decoders[batch] = StaticDecoder(model, compile=True, max_length=max_length, **options)
                    t0 = time.perf_counter()
                    decode(method, model, ids, 1, device, args, decoder)
                    compile_s = time.perf_counter() - t0
            weights = sum(p.nbytes for p in model.parameters())
            warm: dict = {}

            def warm_up():
                warm.update(decode(method, model, ids, 2 if use_cache else 0, device, args, decoder))

            if device.type == "cpu" and decoder is None:  # the warm-up, under the memory instrument
                row["peak_memory_mb"] = (weights + peak_memory(warm_up, device, mem_method)) / 2**20
            else:
                warm_up()
            # Fit the budget: one full forward per token without a cache, else the warm-up's slower step.
            per_step = warm["prefill"] if not use_cache else max(warm["times"])
            steps = int(min(args.new_tokens, max(2, (args.budget_s - warm["prefill"]) / max(per_step, 1e-9))))
            warm.clear()  # its cache: the timed run builds its own
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            run = decode(method, model, ids, steps, device, args, decoder)
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0]}"}
    times = run["times"]
    # Median, not mean: one step preempted by another process should not move the figure.
    step = sorted(times)[len(times) // 2]
    history[(method, batch)] = (prompt, step, run["prefill"])
    history[(method, "prompt", prompt)] = (batch, step, run["prefill"])
    row.update(
        status="ok",
        steps_timed=len(times),
        recurrence_build_ms=1e3 * run["build"],
        prefill_ms=1e3 * run["prefill"],
        first_token_ms=1e3 * (run["build"] + run["prefill"]),
        per_token_ms=1e3 * step,
        per_token_ms_mean=1e3 * sum(times) / len(times),
        per_token_ms_min=1e3 * min(times),
        per_token_cpu_ms=1e3 * sorted(run["cpu"])[len(times) // 2],  # process CPU time: steadier when shared
        decode_tokens_per_s=batch / step,
        end_to_end_tokens_per_s=batch * len(times) / (run["build"] + run["prefill"] + sum(times)),
        cache_mb=cache_bytes(run["cache"]) / 2**20 if run["cache"] is not None else 0.0,
        weights_mb=weights / 2**20,
        estimated_mb=est / 2**20,
    )
    if compile_s is not None:
        row["compile_s"] = compile_s
    if device.type == "cuda":
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    elif decoder is not None:
        row["memory_note"] = "peak not measured on CPU: the warm-up compiles"
    if len(times) < args.new_tokens:
        row["note"] = f"timed {len(times)} of {args.new_tokens} steps to stay within the budget"
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.plot_only or args.markdown:
        if not Path(args.out).is_file():
            print(f"decode: error: --out {args.out}: no such JSON file", file=sys.stderr)
            return 2
        result = json.loads(Path(args.out).read_text())
        if args.markdown:
            print(markdown(result))
        if args.plot_only:
            plot(result, Path(args.out).with_suffix(".png"))
        return 0
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        print("decode: error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.max_memory_gb = args.max_memory_gb or 0.8 * memory_limit_bytes(device) / 2**30
    torch.manual_seed(args.seed)
    methods = args.methods.split(",")
    models, config = build_models(args, device, dtype_from_name(dtype_name), methods)
    mem_method = "cuda" if device.type == "cuda" else cpu_memory_method()
    mach = machine(device)
    result = {
        "date": mach["date"],
        "machine": mach,
        "device": str(device),
        "dtype": dtype_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python -m benchmarks.decode " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "memory_method": MEMORY_METHODS[mem_method] + ("" if device.type == "cuda" else "; plus the weights"),
        "model": {
            "d_model": config.d_model,
            "n_layer": config.n_layer,
            "state_size": config.state_size,
            "l_max": config.l_max,
            "vocab_size": config.vocab_size,
            "n_head": config.n_head,
            **{f"params_{m}": sum(p.numel() for p in models[m].parameters()) for m in methods},
        },
        "rows": [],
    }
    history: dict = {}
    best: dict = {}
    decoders: dict = {}
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
                    row = run_config(method, models[method], batch, prompt, args, device, history, decoders, mem_method)
                    if key not in best or (row["status"] == "ok" and row["per_token_ms"] < best[key]["per_token_ms"]):
                        best[key] = {**row, "repeats": args.repeats if method != "hyena_rtf_no_cache" else 1}
                        write_json(args.out, {**result, "rows": list(best.values()), "partial": True})  # kept if killed
                    log.info(
                        f"round {rnd + 1}: {method} batch {batch} prompt {prompt}: "
                        + (f"{row['per_token_ms']:.2f} ms/token" if row["status"] == "ok" else row["reason"])
                    )
    result["rows"] = list(best.values())
    result["summary"] = summary(result["rows"])
    print_rows(result["rows"])
    out = write_json(args.out, result)
    plot(result, out.with_suffix(".png"))
    log.info(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
