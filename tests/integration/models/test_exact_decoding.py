"""Exact decoding for every filter, through the Hugging Face API: cached decoding (prefill, a chunk
continuing the state, then one token at a time) against the parallel forward, on an adversarial
family of filters, prompts below and past l_max, and a left-padded batch.

    RTF filters     poles up to 0.9999; 4 conjugate pairs within 1e-3 of each other; repeated
                    roots (double real and double pair, a pole of multiplicity 3 at the origin);
                    orders 1 to 64; l_max 256 to 8192
    distilled       implicit-filter models trained here (train.py) at seq_len 256 and 2048,
                    distilled by distill.py at orders 4 to 64 (modal, the default; and RTF)
    MultiHyena      with RTF and with modal filters

Relative logits error (max over positions and vocabulary, relative to max |logit|) <= 1e-4, the
contract of the issue that asked for this; the float64 models are far inside it, the float32 ones
inside it by the margin `decode_tolerance` computes from their filters' conditioning.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from support.helpers import NO_PROJECT, decode_tolerance, load_script, run_child
from support.train_utils import torch_threads
from transformers import AutoModelForCausalLM

from models import HyenaRTFConfig, HyenaRTFForCausalLM
from models.hf_compat import cache_kwargs, output_cache
from training.config import load_config
from training.trainer import run as train

pytestmark = pytest.mark.hf
RTOL = 1e-4
VOCAB = 64


def pair(radius, angle):
    z = radius * np.exp(1j * angle)
    return [z, np.conj(z)]


def denominators(kind: str, n: int, channels: int, rng) -> np.ndarray:
    """(channels, n) monic denominators of one adversarial kind, each channel slightly different."""
    rows = []
    for c in range(channels):
        jitter = 1e-3 * c / channels
        if kind == "edge":  # one pair (or the real pole) at 0.9999, the others spread
            roots = pair(0.9999, 0.2 + jitter) if n > 1 else [0.9999]
            while len(roots) < n - 1:
                roots += pair(rng.uniform(0.3, 0.95), rng.uniform(0.1, 3.0))
            roots += [rng.uniform(-0.9, 0.9)] * (n - len(roots))
        elif kind == "cluster":  # 4 conjugate pairs within 1e-3 near the unit circle
            # Radius 0.9995 at most: float64 coefficients pin such a cluster's roots only to ~2e-4
            # (at 0.9999 some rounded polynomials have a root at 1.00002, which the model rightly
            # refuses to decode).
            roots = sum((pair(0.9995 - 2e-4 * k, 0.6 + jitter + 2.5e-4 * k) for k in range(4)), [])
            roots += [rng.uniform(-0.5, 0.5) for _ in range(n - 8)]
        elif kind == "repeated":  # a double real root, a double pair, a triple pole at 0
            roots = [0.99, 0.99] + pair(0.97, 0.5 + jitter) * 2 + [0.0, 0.0, 0.0]
            roots += [rng.uniform(-0.5, 0.5) for _ in range(n - len(roots))]
        rows.append(np.real(np.poly(np.asarray(roots[:n])))[1:])
    return np.stack(rows)


def tiny_lm(seed: int = 0, **fields) -> HyenaRTFForCausalLM:
    """A tiny random Hyena-RTF LM (d 8, 2 layers, vocabulary VOCAB), float32, eval mode."""
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, pad_vocab_size_multiple=8, d_model=8, n_layer=2, n_head=2, initializer_range=0.3)
    return HyenaRTFForCausalLM(HyenaRTFConfig(**{**base, **fields})).eval()


def rtf_model(kind: str, n: int, l_max: int, dtype: torch.dtype, heads: int | None = None, seed: int = 0):
    """A tiny Hyena-RTF LM whose every filter is of the adversarial `kind` (constraint none), or for
    kind "montel" the default trained kind (xavier, l1 Montel constraint) with its slack at 0, which
    lets sum |a| reach 1 and the poles approach the circle (0.976 at order 64)."""
    model = tiny_lm(
        seed,
        l_max=l_max,
        state_size=n,
        rtf_constraint="l1_montel" if kind == "montel" else "none",
        multi_hyena_heads=heads,
    ).to(dtype)
    rng = np.random.default_rng(seed)
    for block in model.model.layers:
        f = block.mixer.filter
        with torch.no_grad():
            if kind == "montel":
                f.slack.zero_()
            else:
                f.a.copy_(torch.from_numpy(denominators(kind, n, f.a.shape[0], rng)))
            f.b.copy_(torch.from_numpy(rng.uniform(-1, 1, tuple(f.b.shape)) / math.sqrt(n)))
    return model


@torch.no_grad()
def cached_logits(model, ids: torch.Tensor, mask: torch.Tensor | None, prefill: int, chunk_end: int):
    """Logits of ids (B, T) through the cache: a prefill of `prefill` positions, one chunk up to
    chunk_end, then one token per call; with the attention mask grown as generate() grows it."""
    cuts = [0, prefill, chunk_end, *range(chunk_end + 1, ids.shape[1] + 1)]
    cache, pieces = None, []
    for start, end in zip(cuts[:-1], cuts[1:]):
        if end <= start:
            continue
        part = None if mask is None else mask[:, :end]
        out = model(input_ids=ids[:, start:end], attention_mask=part, use_cache=True, **cache_kwargs(cache))
        cache = output_cache(out)
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


def check_decoding(model, l_max: int, tol: float = RTOL) -> None:
    """Cached against parallel, for a prompt below l_max and one past it, on a batch whose first
    row is left-padded (the padded positions' logits are not compared)."""
    g = torch.Generator().manual_seed(1)
    for total in (min(l_max // 2, 200), l_max + 40):
        ids = torch.randint(1, VOCAB, (2, total), generator=g)
        mask = torch.ones(2, total, dtype=torch.long)
        mask[0, :5] = 0
        prefill = total - 24
        with torch.no_grad():
            parallel = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        cached = cached_logits(model, ids, mask, prefill // 2, prefill)
        real = mask.bool()
        err = float((cached - parallel)[real].abs().max() / parallel[real].abs().max())
        assert err <= tol, f"prompt {total}, l_max {l_max}: relative logits error {err:.3g} > {tol:.3g}"


CASES = [  # (kind, order, l_max)
    ("edge", 1, 8192),
    ("edge", 2, 256),
    ("edge", 16, 1024),
    ("cluster", 16, 256),
    ("cluster", 16, 8192),
    ("repeated", 12, 256),
    ("edge", 32, 2048),
    ("montel", 64, 256),
    ("montel", 64, 2048),
]


@pytest.mark.parametrize("kind,n,l_max", CASES, ids=[f"{k}-n{n}-L{L}" for k, n, L in CASES])
def test_adversarial_rtf_filters_decode_exactly_float64(kind, n, l_max):
    check_decoding(rtf_model(kind, n, l_max, torch.float64), l_max)


@pytest.mark.parametrize("kind,n,l_max", [("edge", 16, 1024), ("repeated", 12, 256), ("montel", 64, 2048)])
def test_adversarial_rtf_filters_decode_exactly_float32(kind, n, l_max):
    """The default dtype: float32 coefficients (the 4-pair cluster cannot be stored in float32
    without its poles leaving the unit disk, so it is tested in float64 only)."""
    model = rtf_model(kind, n, l_max, torch.float32)
    check_decoding(model, l_max, tol=max(RTOL, decode_tolerance(model, float(torch.finfo(torch.float32).eps))))


@pytest.mark.parametrize("filter_kind", ["rtf", "modal"])
def test_multihyena_decodes_exactly(filter_kind):
    if filter_kind == "rtf":
        model = rtf_model("edge", 8, 256, torch.float32, heads=2)
    else:
        model = tiny_lm(l_max=256, state_size=8, filter="modal", multi_hyena_heads=2)
    check_decoding(model, 256)


# ---------------------------------------------------------------------------------------------
# distilled checkpoints of implicit models trained here
# ---------------------------------------------------------------------------------------------
TRAIN = [
    "model.filter=implicit",
    "model.d_model=32",
    "model.n_layer=2",
    "data.eval_samples=4",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
    "train.device=cpu",
    "train.eval_every=0",
    "optim.lr=1e-2",
    "schedule.warmup_steps=2",
    "logging.log_every=5",
    "logging.progress_bar=false",
    "logging.unigram_baseline=false",
    "checkpoint.every=0",
]


@pytest.fixture(scope="module", params=[256, 2048], ids=["seq256", "seq2048"])
def trained_implicit(request, corpus, tmp_path_factory):
    """An implicit-filter model trained by train.py at seq_len 256 or 2048 (a few steps: enough to
    move its filters off their initialisation), exported with a tokenizer."""
    seq = request.param
    out = tmp_path_factory.mktemp(f"implicit{seq}")
    steps = 20 if seq == 256 else 6
    with torch_threads():
        train(
            load_config(
                None,
                [
                    *TRAIN,
                    f"data.dir={corpus}",
                    f"data.seq_len={seq}",
                    f"train.max_steps={steps}",
                    f"train.out_dir={out / 'run'}",
                    f"checkpoint.export_dir={out / 'hf'}",
                ],
            )
        )
    return out / "hf", seq


@pytest.mark.slow
@pytest.mark.parametrize("form,order", [("modal", 4), ("modal", 16), ("modal", 64), ("rtf", 16)])
def test_distilled_implicit_models_decode_exactly(trained_implicit, form, order, tmp_path):
    """distill.py (its own decoding check on) then, independently, the checkpoint loaded by
    AutoModelForCausalLM: cached against parallel past l_max and with a padded batch."""
    source, seq = trained_implicit
    out = tmp_path / "out"
    code = load_script("distill.py").main(
        # --no-polish: exact decoding holds for any fit; the variable-projection stage is
        # distill.py's own tests' subject (tests/integration/test_distill_cli.py).
        [str(source), str(out), "--order", str(order), "--form", form, "--steps", "15", "--no-polish"]
    )
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.filter == form
    check_decoding(model, seq)


@pytest.mark.parametrize("kind", ["rtf", "hybrid"])
def test_padding_inside_a_later_turn_is_honoured_by_the_cache(kind):
    """A batched multi-turn continuation: the second turn of row 0 is left-padded (mask zeros in the
    middle of the sequence). Fed through the cache as a chunk, or token by token, the logits of the
    real positions equal one uncached forward with the same mask: masked positions are zero inputs
    in every form (a time-invariant filter still counts them as time steps, uncached too)."""
    model = tiny_lm(l_max=64, state_size=4, attn_layers=[1] if kind == "hybrid" else None)
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 20:26] = 0  # row 0's second turn starts with 6 pad tokens
    with torch.no_grad():
        parallel = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    scale = parallel[real].abs().max()
    for chunk_end in (20, 34):  # the turn as one chunk; or the first 14 of it then token by token
        cached = cached_logits(model, ids, mask, 20, chunk_end)
        assert float((cached - parallel)[real].abs().max() / scale) <= RTOL


FRESH_PROCESS = (
    NO_PROJECT
    + """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__  # the folder's code
assert model.config.filter == "modal", model.config.filter
ids = torch.randint(1, 64, (1, model.config.l_max + 40), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    parallel = model(input_ids=ids, use_cache=False).logits
    out = model(input_ids=ids[:, :100], use_cache=True)
    cache, pieces = out.cache if getattr(out, "cache", None) is not None else out.past_key_values, [out.logits]
    for t in range(100, ids.shape[1]):
        kw = {"cache": cache} if hasattr(out, "cache") else {"past_key_values": cache}
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **kw)
        pieces.append(out.logits)
err = float((torch.cat(pieces, 1) - parallel).abs().max() / parallel.abs().max())
print(err)
"""
)


@pytest.mark.slow
def test_a_distilled_checkpoint_decodes_exactly_in_a_fresh_process_from_its_own_code(trained_implicit, tmp_path):
    """What a user elsewhere does: plain transformers, trust_remote_code=True, no project import. The
    exported code files (modal.py, filters.py, long_filter.py among them) load, and the cached
    decoding of the distilled modal model past l_max equals its parallel forward (<= 1e-4)."""
    source, seq = trained_implicit
    if seq != 256:
        pytest.skip("one length is enough here")
    out = tmp_path / "out"
    assert load_script("distill.py").main([str(source), str(out), "--order", "8", "--steps", "15"]) == 0
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = run_child([sys.executable, "-c", FRESH_PROCESS, str(out)], cwd=tmp_path, env=env, timeout=300)
    assert float(proc.stdout.strip().splitlines()[-1]) <= RTOL
