"""Where a Hyena-RTF training step spends its time on CPU, beside variants of its pieces.

    python -m benchmarks.train.profile_step --preset small --lengths 2048,8192 --threads 1,2 \\
        --out benchmarks/results/train_profile_cpu.json

Part 1, per (length, threads): one training step of benchmarks/train/throughput.py (8192 tokens,
after a warm-up step) under torch.profiler; the JSON keeps the ops with the most self CPU time.

Part 2, per (length, threads): forward + backward of pieces of the model in isolation (process CPU
time, the fastest of --repeats, which a shared machine disturbs least), each beside a proposed
variant computing the same function:

    head        the model's head (HyenaRTFForCausalLM.logits: the vocabulary rows of the tied
                weight only) and next_token_nll
    head_padded a variant: a bias of -inf on the padding rows (exp(-inf) = 0: the same loss and,
                on real tokens, the same gradient) and the loss over the padded logits
    mixer       HyenaOperator.forward as it is ((B, 3d, T) layout, the short conv as w shifted
                multiply-adds: models/hyena.py short_causal_conv)
    mixer_btc   a variant: time on dim 1 throughout, one transpose of the d-channel z for the FFT
    attention   GPT-NeoX's attention layer (sdpa, rotary) at the same width, for scale
    mlp         one MLP block (both models have the same)

Two proposals this benchmark made are now in the code: the head over the vocabulary rows only
(it used to build padded logits and slice them) and the short conv as shifted multiply-adds (the
backward of nn.Conv1d took 12.8 s of a 46 s step with two threads). docs/benchmarks.md has the
figures measured before them, with the commit that reproduces them.

Each variant is checked against the current code's output before it is timed (float32: 1e-5 of
max|y|, the rounding of a different summation order). With more than one thread the process CPU
time adds up every thread's time, OpenMP's spin-waits included: it then measures the work a
piece costs the machine, not its latency.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXRotaryEmbedding

from benchmarks.common import ints, machine, write_json
from benchmarks.train.throughput import build_model, make_step
from models import config_from_preset
from models.fftconv import fft_causal_conv
from models.hyena import HyenaOperator
from models.modeling_hyena_rtf import MLP, next_token_nll
from training.optim import make_optimizer, param_groups
from utils.logs import get_logger, setup_logging

TOKENS = 8192
log = get_logger("bench")


def mixer_btc(op: HyenaOperator, u: torch.Tensor) -> torch.Tensor:
    """The proposed HyenaOperator.forward (no mask, no state): u (B, T, d) -> (B, T, d)."""
    T, w = u.shape[1], op.width
    p = op.in_proj(u)  # (B, T, 3d)
    padded = F.pad(p, (0, 0, w - 1, 0))  # w - 1 zero steps before the start
    weight = op.short_conv.weight[:, 0, :]  # (3d, w): tap j multiplies p[t - (w - 1) + j]
    q = torch.addcmul(op.short_conv.bias, padded[:, :T], weight[:, 0])
    for j in range(1, w):
        q = torch.addcmul(q, padded[:, j : j + T], weight[:, j])
    x0, x1, v = q.chunk(3, dim=-1)
    z = (x1 * v).transpose(1, 2)  # (B, d, T)
    y = x0 * fft_causal_conv(z, op.filter.kernel(T)).transpose(1, 2)
    return op.out_proj(y)


def head_current(h, weight, vocab, targets):
    return next_token_nll(F.linear(h, weight[:vocab]), targets)  # HyenaRTFForCausalLM.logits


def head_padded(h, weight, vocab, targets):
    bias = torch.zeros(weight.shape[0], dtype=h.dtype)
    bias[vocab:] = float("-inf")
    return next_token_nll(F.linear(h, weight, bias), targets)


def cpu_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return 1e3 * best


def check(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    err = float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())
    if err > 1e-5:
        raise AssertionError(f"{what}: the proposal differs from the current code by {err:.2e}")
    return err


def pieces(args, T: int) -> dict:
    """Forward + backward CPU ms of each piece and variant at length T, TOKENS tokens."""
    B = max(1, TOKENS // T)
    cfg = config_from_preset(args.preset, vocab_size=args.vocab_size, l_max=T)
    torch.manual_seed(0)
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    out, errors = {}, {}

    def fwd_bwd(f):
        def run():
            x.grad = None
            f().float().sum().backward()

        return run

    weight = torch.nn.Parameter(torch.randn(cfg.padded_vocab_size, cfg.d_model) * 0.02)
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    errors["head_padded"] = check(
        head_padded(x, weight, cfg.vocab_size, targets), head_current(x, weight, cfg.vocab_size, targets), "head"
    )
    out["head"] = cpu_ms(fwd_bwd(lambda: head_current(x, weight, cfg.vocab_size, targets)), args.repeats)
    out["head_padded"] = cpu_ms(fwd_bwd(lambda: head_padded(x, weight, cfg.vocab_size, targets)), args.repeats)
    op = HyenaOperator(cfg, 0)
    errors["mixer_btc"] = check(mixer_btc(op, x), op(x), "mixer")
    out["mixer"] = cpu_ms(fwd_bwd(lambda: op(x)), args.repeats)
    out["mixer_btc"] = cpu_ms(fwd_bwd(lambda: mixer_btc(op, x)), args.repeats)
    neox = GPTNeoXConfig(
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.mlp_ratio * cfg.d_model,
        max_position_embeddings=T,
        attn_implementation="sdpa",
    )
    attn, rope = GPTNeoXAttention(neox, 0), GPTNeoXRotaryEmbedding(neox)
    pos = torch.arange(T)[None].expand(B, T)
    out["attention"] = cpu_ms(fwd_bwd(lambda: attn(x, None, position_embeddings=rope(x, pos))[0]), args.repeats)
    mlp = MLP(cfg)
    out["mlp"] = cpu_ms(fwd_bwd(lambda: mlp(x)), args.repeats)
    return {"batch": B, "cpu_ms": out, "proposal_error": errors}


def profile_step(args, T: int) -> list[dict]:
    """The ops with the most self CPU time in one Hyena-RTF training step at length T."""
    from torch.profiler import ProfilerActivity, profile

    ns = argparse.Namespace(preset=args.preset, vocab_size=args.vocab_size, d_model=None, n_layer=None, seed=0)
    model = build_model("hyena_rtf", ns, T, torch.device("cpu"))
    optimizer = make_optimizer(param_groups(model, 6e-4, 1e-3, 0.1), betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, args.vocab_size, (max(1, TOKENS // T), T + 1))
    step = make_step(model, optimizer, [ids], torch.device("cpu"), bf16=False)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
        for e in events[: args.top]
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab-size", type=int, default=50277)
    p.add_argument("--lengths", type=ints, default=ints("2048,8192"))
    p.add_argument("--threads", type=ints, default=ints("1,2"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=25, help="ops kept from each profile")
    p.add_argument("--no-profile", action="store_true", help="part 2 only")
    p.add_argument("--out", default="benchmarks/results/train_profile_cpu.json")
    args = p.parse_args(argv)
    setup_logging()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for T in args.lengths:
            row = {"length": T, "threads": threads, **pieces(args, T)}
            if not args.no_profile:
                row["profile"] = profile_step(args, T)
            rows.append(row)
            log.info(
                f"length {T}, {threads} thread(s): " + ", ".join(f"{k} {v:.0f} ms" for k, v in row["cpu_ms"].items())
            )
    result = {"benchmark": "train_profile", "machine": machine(torch.device("cpu")), "args": vars(args), "rows": rows}
    write_json(args.out, result)
    log.info(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
