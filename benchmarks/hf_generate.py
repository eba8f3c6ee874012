"""Hugging Face `generate()` against the recurrent decode it should be, on the installed transformers:

    generate_cached     model.generate(ids, use_cache=True): what a user of the HF API runs
    generate_static     model.generate(ids, cache_implementation="static"): the preallocated
                        StaticHyenaRTFCache (eager on CPU: generate() compiles only on CUDA)
    generate_no_cache   model.generate(ids, use_cache=False): the whole sequence again per token
    recurrent_loop      generate.py's own loop: one prefill, then model(token, cache) per token
    gpt_neox_generate   the baseline users would otherwise run: Hugging Face GPT-NeoX of the same
                        width, depth and vocabulary (rotary, sdpa), generate() with its KV cache

Each method decodes greedily the same number of new tokens after the same random prompts, on a
random model of a preset (speed does not depend on the weights), and records how many positions
every forward call was fed: a cached generate() that feeds [prompt, 1, 1, ...] is recurrent, one
that feeds [prompt, prompt + 1, ...] is silently re-running the sequence. The Hyena-RTF methods
must give the same tokens (the JSON says whether they did); GPT-NeoX is another model.

    python -m benchmarks.hf_generate --prompt-length 2048 --new-tokens 32 --repeats 3
    python -m benchmarks.hf_generate --batch-size 16 --prompt-length 1024 \
        --methods generate_cached,generate_static,recurrent_loop,gpt_neox_generate

Writes benchmarks/results/hf_generate_cpu_b<batch>_p<prompt>_transformers-<version>.json
(machine, date, versions, arguments, per method: seconds per run and, for the fastest run, the
time to the first token, new tokens/s over the whole call, tokens/s after the first and its ratio
to GPT-NeoX's, the positions fed) and redraws hf_generate_cpu_b<batch>_p<prompt>.png from every
such JSON there, so runs under several transformers releases appear side by side.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from matplotlib.figure import Figure
from transformers import GPTNeoXForCausalLM

import generate
from benchmarks.common import RESULTS, gpt_neox_baseline, machine, save_png, write_json
from models import config_from_preset
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from utils.logs import get_logger, setup_logging

METHODS = ("generate_cached", "generate_static", "generate_no_cache", "recurrent_loop", "gpt_neox_generate")
BASELINE = "gpt_neox_generate"
log = get_logger("bench")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model preset (models/configuration_hyena_rtf.py)")
    p.add_argument("--vocab-size", type=int, default=50277)
    p.add_argument("--prompt-length", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--methods", type=_methods, default=list(METHODS), help="comma-separated (default: all)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method; the fastest is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    return p.parse_args(argv)


def _methods(text: str) -> list[str]:
    names = [m for m in text.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; known: {', '.join(METHODS)}")
    return names


def gpt_neox_like(config, max_positions: int) -> GPTNeoXForCausalLM:
    """Hugging Face GPT-NeoX with our model's width, depth, heads, MLP width and vocabulary."""
    neox = gpt_neox_baseline(config, config.vocab_size, max_positions)
    model = GPTNeoXForCausalLM(neox).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return model


def record_calls(model) -> tuple[list[int], list[float]]:
    """Wrap model.forward so that every call appends how many positions it was fed, and the time
    at which it returned (so the prefill can be told from the decode steps)."""
    fed: list[int] = []
    returned: list[float] = []
    forward = type(model).forward.__get__(model)

    @functools.wraps(forward)  # keeps the signature: generate() reads it to decide what to pass
    def counting_forward(*args, **kwargs):
        x = next(t for t in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if t is not None)
        fed.append(int(x.shape[1]))
        out = forward(*args, **kwargs)
        returned.append(time.perf_counter())
        return out

    model.forward = counting_forward
    return fed, returned


def run_method(method: str, model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """The new tokens (B, new) that `method` decodes greedily after `ids`."""
    if method == "recurrent_loop":
        tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)  # ids in, ids out: no text needed
        args = SimpleNamespace(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=new)
        tokens, _ = generate.decode_ids(model, tokenizer, ids, torch.ones_like(ids), args)
        return tokens
    extra = {"cache_implementation": "static"} if method == "generate_static" else {}
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        use_cache=method != "generate_no_cache",
        **extra,
    )
    return out[:, ids.shape[1] :]


def tag(args) -> str:
    return f"cpu_b{args.batch_size}_p{args.prompt_length}"


def plot(out_dir: Path, run_tag: str) -> Path:
    """One bar group per transformers release with results for run_tag: tokens/s of each method."""
    results = sorted(
        (json.loads(p.read_text()) for p in out_dir.glob(f"hf_generate_{run_tag}_transformers-*.json")),
        key=lambda r: [int(x) for x in r["versions"]["transformers"].split(".")[:3]],
    )
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        ax.bar(
            [g + i * width for g in range(len(results))],
            [r["methods"].get(method, {}).get("decode_tokens_per_s", 0) for r in results],
            width,
            label=method,
        )
    ax.set_xticks(
        [g + 0.4 - width / 2 for g in range(len(results))],
        [f"transformers {r['versions']['transformers']}" for r in results],
    )
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens / s after the first (log)")
    if results:
        a, m = results[-1]["arguments"], results[-1]["machine"]
        ax.set_title(
            f"greedy generate(), preset {a['preset']}, batch {a['batch_size']}, prompt {a['prompt_length']}, "
            f"{a['new_tokens']} new tokens\n{m['cpu_count']}-core CPU, {m['torch_threads']} torch thread(s)",
            fontsize=10,
        )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    return save_png(fig, out_dir / f"hf_generate_{run_tag}.png", dpi=120)


def time_method(method: str, model, ids: torch.Tensor, args) -> tuple[dict, torch.Tensor]:
    """The fastest of --repeats calls: whole call, first token, tokens/s after it, positions fed."""
    seconds, first, decode = [], [], []
    for _ in range(args.repeats):
        fed, returned = record_calls(model)
        start = time.perf_counter()
        tokens = run_method(method, model, ids, args.new_tokens)
        end = time.perf_counter()
        seconds.append(end - start)
        first.append(returned[0] - start)  # prefill (and recurrence build) + first token
        decode.append(end - returned[0])  # the other new_tokens - 1 tokens
    i = seconds.index(min(seconds))
    batch = ids.shape[0]
    row = {
        "seconds": [round(x, 4) for x in seconds],
        "first_token_s": round(first[i], 4),
        "tokens_per_s": batch * args.new_tokens / seconds[i],
        "decode_tokens_per_s": batch * (args.new_tokens - 1) / decode[i],
        "fed_positions": fed,
    }
    log.info(
        f"{method}: fastest of {args.repeats}: {seconds[i]:.2f} s = {row['tokens_per_s']:.1f} new tokens/s "
        f"(first token {first[i]:.2f} s, then {row['decode_tokens_per_s']:.1f} tokens/s); "
        f"positions fed per call: {fed[:4]}{' ...' if len(fed) > 4 else ''}"
    )
    return row, tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = config_from_preset(args.preset, vocab_size=args.vocab_size)
    model = HyenaRTFForCausalLM(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    baseline = gpt_neox_like(config, args.prompt_length + args.new_tokens) if BASELINE in args.methods else None
    shape = (args.batch_size, args.prompt_length)
    ids = torch.randint(1, args.vocab_size, shape, generator=torch.Generator().manual_seed(1))
    methods, outputs = {}, {}
    with torch.inference_mode():
        for method in args.methods:
            methods[method], outputs[method] = time_method(method, baseline if method == BASELINE else model, ids, args)
    ours = [m for m in args.methods if m != BASELINE]
    same = all(torch.equal(outputs[m], outputs[ours[0]]) for m in ours)
    if baseline is not None:
        for m in ours:
            base = methods[BASELINE]["decode_tokens_per_s"]
            methods[m]["decode_tokens_per_s_vs_gpt_neox"] = methods[m]["decode_tokens_per_s"] / base
    result = {
        "benchmark": "hf_generate",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(torch.device("cpu")),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"preset": args.preset, "parameters": model.num_parameters()},
        "baseline_parameters": baseline.num_parameters() if baseline is not None else None,
        "same_tokens": same,
        "methods": methods,
    }
    name = f"hf_generate_{tag(args)}_transformers-{transformers.__version__}.json"
    path = write_json(args.out_dir / name, result, indent=2)
    log.info(f"same tokens from every Hyena-RTF method: {same}; wrote {path} and {plot(args.out_dir, tag(args))}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
