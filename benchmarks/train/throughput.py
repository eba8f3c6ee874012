"""Training throughput against sequence length: Hyena-RTF, Hyena with implicit filters and a
Hugging Face GPT-NeoX of the same width, depth and vocabulary, side by side in one run.

    python -m benchmarks.train.throughput --device cpu --preset small --threads 2 \\
        --out benchmarks/results/train_throughput_cpu.json
    python -m benchmarks.train.throughput --device cuda --preset 125m \\
        --out benchmarks/results/train_throughput_cuda.json
    python -m benchmarks.train.throughput --markdown --out benchmarks/results/train_throughput_cpu.json

What is timed is a full training step as the trainer runs it (training/engine.py, TorchEngine):
the micro-batches of the step, each the trainer's own loss (training/engine.py `lm_loss_terms`:
for Hyena-RTF the chunked LM head + cross-entropy, models/chunked_loss.py; the float32 token loss
over full logits for GPT-NeoX) / tokens, backward of loss / accumulation steps; then clip_grad_norm_ (max 1.0,
read on the host), AdamW step over the trainer's parameter groups (training/optim.py:
param_groups / make_optimizer; the lr and decay values do not change the time) and
zero_grad(set_to_none=True). fp32 on CPU; bf16 autocast on GPU with float32 parameters (the RTF
filters and the FFTs stay float32 inside the model, as in training). Hyena models are built with
l_max = the sequence length, as train.py does. GPT-NeoX: rotary embeddings (its default
rotary_pct 0.25), attn_implementation="sdpa", untied input and output embeddings (its default),
n_head and MLP width from the preset. Random weights and
tokens: speed does not depend on them.

Every length processes the same --tokens-per-step (batch = tokens / length sequences), split into
micro-batches of at most --micro-tokens tokens (at least one sequence) with gradient accumulation,
as the trainer's micro_batch_size / grad_accum_steps do. Per configuration: --warmup steps, on
CPU one more step under the memory instrument, then --steps timed steps (torch.cuda.synchronize
around each on GPU); tokens/s is tokens per step / the median step time. On CPU the process CPU
time of each step is recorded too: on a shared machine it moves less than the wall time.

Peak memory, absolute (weights, gradients, AdamW state and activations): on GPU
torch.cuda.max_memory_allocated over the timed steps; on CPU the bytes of the weights and AdamW
state held before one step plus the peak of what that step allocates, from
benchmarks/common.peak_memory (the torch profiler's allocation timeline, or RSS growth).

Guards. A configuration whose estimated peak memory is over --max-memory-gb is skipped, with the
reason in its row. Time: the step time at a new length is predicted from the same model's last
two lengths (per-token cost linear in the length, which bounds attention's growth and
over-estimates an FFT's), or proportional to the length after one; a configuration predicted
over --budget-s is timed on fewer steps, or skipped, and its row says so. GPU out-of-memory errors
become skipped rows too.

Model FLOPs per token (MFU = FLOPs per token x tokens/s / the GPU's dense bf16 peak, from
training/metrics.py; GPU only):
    all models     6 N, N = the weights that multiply activations (every nn.Linear weight once:
                   projections, MLPs, the LM head over the padded vocabulary; not the input
                   embedding lookup of GPT-NeoX's untied table, norms or biases)
    GPT-NeoX       + 6 d T per layer (causal attention: QK^T and AV over T / 2 keys on average,
                   forward 2 x 2 d T / 2, backward twice that; training/metrics.train_flops_per_token)
    Hyena          + d (f + b) / T per layer with N' = fast_fft_size(2T - 1) (models/fftconv.py),
                   f = 3 x 2.5 N' log2 N' + 6 (N'/2 + 1): two real FFTs and an inverse real FFT
                   (2.5 N' log2 N' each) and the complex product, per channel and sequence;
                   b = 3 x 2.5 N' log2 N' + 12 (N'/2 + 1): the written-out backward
    Left out: the short depthwise conv and the gates (O(d) per token), the filters' own kernels
    (computed once per step, not per sequence), softmax and norms.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from transformers import GPTNeoXForCausalLM

from benchmarks.common import (
    MEMORY_METHODS,
    cpu_memory_method,
    gpt_neox_baseline,
    ints,
    machine,
    memory_limit_bytes,
    peak_memory,
    sync,
    write_json,
)
from benchmarks.train.report import BASELINE, MODELS, markdown, plot
from models import config_from_preset
from models.fftconv import fast_fft_size
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from training.engine import lm_loss_terms
from training.metrics import peak_flops, train_flops_per_token
from training.optim import make_optimizer, param_groups
from utils.logs import get_logger, setup_logging

# The trainer's defaults (training/config.py OptimConfig); they do not change the time of a step.
LR, RTF_LR, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP = 6e-4, 1e-3, 0.1, (0.9, 0.95), 1e-8, 1.0
# Live activation bytes per token, layer and channel at the peak of backward (float32), measured
# with the profiler on the small preset (d 256, T 1024 and 4096; the estimate came out 2-4% above
# the measured peak): an upper bound for the guard.
ACTIVATION_FLOATS = {"hyena_rtf": 40, "hyena_implicit": 40, "gpt_neox": 36}
log = get_logger("bench")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--preset", default="small", help="model preset (models/configuration_hyena_rtf.py)")
    p.add_argument("--d-model", type=int, help="override the preset's width")
    p.add_argument("--n-layer", type=int, help="override the preset's depth")
    p.add_argument("--vocab-size", type=int, default=50277)
    p.add_argument("--lengths", type=ints, default=ints("512,1024,2048,4096,8192,16384,32768"))
    p.add_argument("--tokens-per-step", type=int, default=32768, help="the same at every length")
    p.add_argument("--micro-tokens", type=int, help="tokens per micro-batch (default: 8192 on CPU, all on GPU)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 1 on CPU, 3 on GPU)")
    p.add_argument("--steps", type=int, help="timed steps, median reported (default: 3 on CPU, 10 on GPU)")
    p.add_argument("--budget-s", type=float, default=1200.0, help="time allowed per configuration")
    p.add_argument("--max-memory-gb", type=float, help="default: 90%% of the GPU, or of the memory available now")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", help="JSON path, the PNG goes beside it (default benchmarks/results/train_throughput_<dev>)"
    )
    p.add_argument("--markdown", action="store_true", help="print the README tables of an existing --out JSON")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = p.parse_args(argv)
    bad = [m for m in args.models.split(",") if m not in MODELS]
    if bad or not args.models:
        p.error(f"argument --models: unknown {bad}; choose from {', '.join(MODELS)}")
    for name in ("tokens_per_step", "micro_tokens", "steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    too_long = [T for T in args.lengths if T > args.tokens_per_step or T < 2]
    if too_long or not args.lengths:
        p.error(f"argument --lengths: {too_long or 'none'} not in [2, --tokens-per-step {args.tokens_per_step}]")
    return args


# ---------------------------------------------------------------------------------------------
# models, FLOPs, memory estimate
# ---------------------------------------------------------------------------------------------
def build_model(kind: str, args, length: int, device: torch.device) -> nn.Module:
    """A freshly initialised model of `kind` for sequences of `length`, float32, in train mode."""
    overrides = {k: v for k, v in (("d_model", args.d_model), ("n_layer", args.n_layer)) if v}
    filt = "implicit" if kind == "hyena_implicit" else "rtf"
    config = config_from_preset(args.preset, vocab_size=args.vocab_size, l_max=length, filter=filt, **overrides)
    torch.manual_seed(args.seed)
    if kind != BASELINE:
        return HyenaRTFForCausalLM(config).to(device).train()
    neox = gpt_neox_baseline(config, args.vocab_size, length, use_cache=False)
    return GPTNeoXForCausalLM(neox).to(device).train()


def matmul_params(model: nn.Module) -> int:
    """Weights that multiply activations: every nn.Linear weight, once (a tied head is counted once).
    The LM head counts its vocabulary rows only: rows padding the vocabulary to a multiple are
    never multiplied (HyenaRTFForCausalLM.logits slices them off)."""
    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    head = model.get_output_embeddings()
    if head is not None:
        weights[id(head.weight)] = model.config.vocab_size * head.weight.shape[1]
    return sum(weights.values())


def fft_conv_flops_per_token(d: int, T: int) -> float:
    """Forward + backward FLOPs of one layer's causal FFT convolution per token (module docstring)."""
    n = fast_fft_size(2 * T - 1)
    transforms = 3 * 2.5 * n * math.log2(n)
    return d * (2 * transforms + 18 * (n // 2 + 1)) / T


def flops_per_token(kind: str, model: nn.Module, d: int, n_layer: int, T: int) -> float:
    if kind == BASELINE:
        return train_flops_per_token(matmul_params(model), n_layer, d, T)
    return train_flops_per_token(matmul_params(model), 0, d, T) + n_layer * fft_conv_flops_per_token(d, T)


def estimate_peak_bytes(kind: str, n_params: int, d: int, n_layer: int, vocab: int, micro_tokens: int, bf16: bool):
    """Weights, gradients and AdamW moments (16 bytes a parameter), the logits at the peak of the
    loss's backward (float32 log-probabilities, their gradient and the logits' gradient, plus the
    bf16 logits under autocast) and the activations (ACTIVATION_FLOATS per token, layer, channel)."""
    logits = micro_tokens * vocab * (3 * 4 + (2 if bf16 else 0))
    return 16 * n_params + logits + micro_tokens * n_layer * d * 4 * ACTIVATION_FLOATS[kind]


# ---------------------------------------------------------------------------------------------
# one configuration
# ---------------------------------------------------------------------------------------------
def make_step(model: nn.Module, optimizer, micro: list[torch.Tensor], device: torch.device, bf16: bool):
    """The trainer's step over the micro-batches `micro` (each (b, T + 1) token ids)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def micro_loss(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss_sum, n = lm_loss_terms(model, batch)
            return loss_sum / n

    def step() -> float:
        total = 0.0
        for batch in micro:
            loss = micro_loss(batch)
            (loss / len(micro)).backward()
            total += float(loss.detach()) / len(micro)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP))
        if math.isfinite(total) and math.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def predict_step_s(history: list[tuple[int, float]], T: int) -> float | None:
    """Step time at length T from this model's earlier (length, step s), see the module docstring."""
    if not history:
        return None
    if len(history) == 1:
        ((T1, s1),) = history
        return s1 * max(T / T1, 1.0)
    (T1, s1), (T2, s2) = history[-2:]
    slope = max((s2 - s1) / (T2 - T1), 0.0)
    return max(s2 + slope * (T - T2), s2)


def run_config(kind: str, T: int, args, device: torch.device, history: list, mem_method: str) -> dict:
    bf16 = args.precision == "bf16"
    batch = args.tokens_per_step // T
    per_micro = max(1, min(batch, args.micro_tokens // T))
    accum = -(-batch // per_micro)
    row = {
        "model": kind,
        "length": T,
        "batch": batch,
        "micro_batch": per_micro,
        "accum_steps": accum,
        "tokens_per_step": batch * T,
    }
    model = build_model(kind, args, T, device)
    n_params = sum(p.numel() for p in model.parameters())
    d, n_layer = model.config.hidden_size, model.config.num_hidden_layers
    vocab = model.get_output_embeddings().weight.shape[0]
    row.update(params=n_params, flops_per_token=flops_per_token(kind, model, d, n_layer, T))
    est = estimate_peak_bytes(kind, n_params, d, n_layer, vocab, per_micro * T, bf16)
    row["estimated_peak_gb"] = est / 2**30
    if est > args.max_memory_gb * 2**30:
        return {
            **row,
            "status": "skipped",
            "reason": f"estimated peak {est / 2**30:.1f} GB > {args.max_memory_gb:.1f} GB",
        }
    mem_steps = 1 if device.type == "cpu" else 0
    steps = args.steps
    predicted = predict_step_s(history, T)
    if predicted is not None:
        row["predicted_step_s"] = predicted
        steps = min(steps, int(args.budget_s // predicted) - args.warmup - mem_steps)
        if steps < 1 and mem_steps:
            mem_steps, steps = 0, int(args.budget_s // predicted) - args.warmup
        if steps < 1:
            return {
                **row,
                "status": "skipped",
                "reason": f"predicted {predicted:.0f} s a step > budget {args.budget_s:.0f} s",
            }
    optimizer = make_optimizer(param_groups(model, LR, RTF_LR, WEIGHT_DECAY), betas=BETAS, eps=EPS)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (batch, T + 1), device=device, generator=gen)
    step = make_step(model, optimizer, list(ids.split(per_micro)), device, bf16)
    try:
        losses = [step() for _ in range(args.warmup)]
        if mem_steps:
            state = sum(t.nbytes for t in model.parameters()) + sum(
                t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
            )
            row["peak_memory_gb"] = (state + peak_memory(lambda: losses.append(step()), device, mem_method)) / 2**30
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        wall, cpu = [], []
        for _ in range(steps):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(step())
            sync(device)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError as e:
        del model, optimizer, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0]}"}
    median = statistics.median(wall)
    history.append((T, median))
    row.update(
        status="ok",
        steps_timed=len(wall),
        step_s=median,
        step_s_min=min(wall),
        tokens_per_s=batch * T / median,
        cpu_s=statistics.median(cpu),
        tokens_per_cpu_s=batch * T / statistics.median(cpu),
        loss_first=losses[0],
        loss_last=losses[-1],
    )
    if "peak_memory_gb" not in row:
        row["memory_note"] = "not measured: the budget left no room for the extra profiled step"
    peak = peak_flops(device)
    if peak:
        row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / peak
    if len(wall) < args.steps:
        row["note"] = f"timed {len(wall)} of {args.steps} steps to stay within the budget"
    return row


def ratios(rows: list[dict]) -> list[dict]:
    """For every length with an ok GPT-NeoX row: each other ok model's tokens/s (wall and CPU
    time) divided by GPT-NeoX's, and its peak memory divided by GPT-NeoX's."""
    ok = {(r["model"], r["length"]): r for r in rows if r["status"] == "ok"}
    out = []
    for (kind, T), r in sorted(ok.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = ok.get((BASELINE, T))
        if kind == BASELINE or base is None:
            continue
        entry = {"model": kind, "length": T, "tokens_per_s_vs_gpt_neox": r["tokens_per_s"] / base["tokens_per_s"]}
        entry["tokens_per_cpu_s_vs_gpt_neox"] = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        if "peak_memory_gb" in r and "peak_memory_gb" in base:
            entry["peak_memory_vs_gpt_neox"] = r["peak_memory_gb"] / base["peak_memory_gb"]
        out.append(entry)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    dev = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    out = Path(args.out or f"benchmarks/results/train_throughput_{dev}.json")
    if args.markdown or args.plot_only:
        if not out.is_file():
            print(f"train_throughput: error: --out {out}: no such JSON file", file=sys.stderr)
            return 2
        result = json.loads(out.read_text())
        if args.markdown:
            print(markdown(result))
        if args.plot_only:
            plot(result, out.with_suffix(".png"))
        return 0
    device = torch.device(dev)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_throughput: error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.micro_tokens = args.micro_tokens or (args.tokens_per_step if gpu else 8192)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.steps = args.steps or (10 if gpu else 3)
    args.max_memory_gb = args.max_memory_gb or 0.9 * memory_limit_bytes(device) / 2**30
    if args.threads:
        torch.set_num_threads(args.threads)
    mem_method = "cuda" if gpu else cpu_memory_method()
    kinds = args.models.split(",")
    probe = config_from_preset(
        args.preset,
        vocab_size=args.vocab_size,
        **{k: v for k, v in (("d_model", args.d_model), ("n_layer", args.n_layer)) if v},
    )
    result = {
        "benchmark": "train_throughput",
        "machine": machine(device),
        "device": str(device),
        "precision": args.precision,
        "transformers": transformers.__version__,
        "command": "python -m benchmarks.train.throughput " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "model": {
            "preset": args.preset,
            "d_model": probe.d_model,
            "n_layer": probe.n_layer,
            "vocab_size": args.vocab_size,
        },
        "memory_method": MEMORY_METHODS[mem_method] + ("" if gpu else "; plus the weights and AdamW state"),
        "rows": [],
    }
    history = {k: [] for k in kinds}
    for T in sorted(args.lengths):
        for kind in kinds:
            row = run_config(kind, T, args, device, history[kind], mem_method)
            result["rows"].append(row)
            write_json(out, {**result, "ratios": ratios(result["rows"]), "partial": True})  # kept if killed
            what = (
                f"{row['tokens_per_s']:,.0f} tokens/s ({row['step_s']:.2f} s a step)"
                if row["status"] == "ok"
                else row["reason"]
            )
            log.info(f"{kind} length {T}: {what}")
    result["ratios"] = ratios(result["rows"])
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    log.info(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
