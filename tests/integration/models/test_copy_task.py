"""Learning test: a tiny Hyena-RTF LM learns a delayed copy on CPU in well under a minute.

Task: sequences of T = 128 tokens drawn uniformly from 16 symbols; at every position t >= K = 32
the model must output the token it saw K steps earlier, x[t - K]. Positions t < K have no
defined target and are not scored. The only way to solve it is to carry information 32 steps
back through the long convolutions (the short conv sees 3 tokens, there is no attention), and
chance accuracy is 1/16.

Model: HyenaRTFForCausalLM, d_model 32, 2 layers, RTF state size 64 (>= K, so an exact delay
z^-32 is representable by b alone), l_max 128, default xavier init + l1_montel constraint.
Training: AdamW, batch 32, 300 steps, one-cycle schedule, lr 3e-3 for the network and 1e-3 with
no weight decay for the RTF parameters (their own group, as training/optim.py makes them).
Held-out: 256 fresh sequences from a different generator; token accuracy must reach 99%.

Observed (2 shared CPU cores, 1 torch thread): 100% held-out accuracy for seeds 0, 1, 2, about
15-25 s of training.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from support.helpers import tiny_config

from models import HyenaRTFForCausalLM

VOCAB, DELAY, LENGTH = 16, 32, 128


def batch(size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (size, LENGTH) and targets (size, LENGTH - DELAY) for positions DELAY .. LENGTH-1."""
    x = torch.randint(0, VOCAB, (size, LENGTH), generator=gen)
    return x, x[:, :-DELAY]


def train_copy_task(seed: int, steps: int = 300, batch_size: int = 32) -> tuple[float, float]:
    """Train from scratch; returns (held-out token accuracy, training seconds)."""
    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=VOCAB, pad_vocab_size_multiple=16, l_max=LENGTH, state_size=64, use_cache=False)
    model = HyenaRTFForCausalLM(cfg)
    rtf = [p for name, p in model.named_parameters() if ".filter." in name]
    rest = [p for name, p in model.named_parameters() if ".filter." not in name]
    assert rtf
    assert len(rtf) == 4 * cfg.n_layer  # a, b, h0, slack per layer
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": 3e-3, "weight_decay": 0.01}, {"params": rtf, "lr": 1e-3, "weight_decay": 0.0}]
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[3e-3, 1e-3], total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = batch(batch_size, gen)
        logits = model(x).logits[:, DELAY:]  # positions t >= DELAY predict x[t - DELAY]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        x, y = batch(256, torch.Generator().manual_seed(10_000 + seed))  # held out
        acc = (model(x).logits[:, DELAY:].argmax(-1) == y).float().mean().item()
    return acc, seconds


def test_hyena_rtf_learns_delayed_copy():
    """>= 99% held-out token accuracy on the delay-32 copy task after a fixed budget of 300 steps.

    That budget trains in 9-21 s on 2 CPU cores (measured 2026-11-22, idle to heavily loaded);
    the time is printed, not asserted: speed goals live in benchmarks, where load cannot flake CI.
    One torch thread (conftest): on these tiny tensors two threads lose more than they gain."""
    acc, seconds = train_copy_task(seed=0)
    print(f"delayed copy: held-out accuracy {acc:.4f} after {seconds:.1f} s of training")
    assert acc >= 0.99, f"held-out accuracy {acc:.4f}"
