"""Tests of the MultiHyena operator (models/multihyena.py), alone and inside the LM.

    q, k, v  = split(short_conv(W_in u + b_in))          M heads of e = d / M channels
    Z_t^m    = sum_{s<=t} h_m[s] k_{t-s}^m (v_{t-s}^m)^T    one long filter per head
    y_t^m    = (q_t^m)^T Z_t^m,    out = W_out concat_m(y^m) + b_out

The reference is numpy float64 written from that formula with explicit loops over batch, head, time
and lag; it reads the module's weights and, per channel (m, i, j), the filter's own kernel (the
kernels themselves are checked against their definitions in test_rtf.py / test_hyena.py). It never
calls the operator's methods.
"""

from __future__ import annotations

import ast

import numpy as np
import pytest
import torch
from support.helpers import assert_beams, assert_greedy, seeded, spy_on_forward, tiny_model
from support.train_utils import TINY
from torch.func import functional_call
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from export.folder import save_hf_checkpoint
from export.from_training import model_from_checkpoint
from models.configuration_hyena_rtf import HyenaRTFConfig
from models.hyena import HyenaOperator
from models.multihyena import MultiHyenaOperator
from training.config import load_config
from training.metrics import read_metrics
from training.trainer import run

L_MAX = 24


def P(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def slow_poles(filt) -> None:
    """Every other RTF filter gets a pole at radius ~0.995 and a larger numerator, so its impulse
    response is still large after l_max taps: past l_max the parallel form then really depends on
    the long kernel and the recurrence on the aliasing correction (as in test_generation.py)."""
    with torch.no_grad():
        filt.a[::2] = 0.0
        filt.a[::2, 0] = -1.0
        filt.slack[::2] = 0.005
        filt.b.mul_(3.0)
    assert 0.99 < filt.pole_radius().max() < 1.0


def op_config(filt="rtf", d=8, heads=2, n=4, l_max=L_MAX, **kw) -> HyenaRTFConfig:
    fields = {"implicit_order": 16, "implicit_bands": 3, "recurrent_dtype": "float64", **kw}
    return HyenaRTFConfig(
        vocab_size=16, d_model=d, n_layer=1, l_max=l_max, state_size=n, filter=filt, multi_hyena_heads=heads, **fields
    )


def make_op(filt="rtf", seed=0, **kw) -> MultiHyenaOperator:
    """A float64 operator (op_config) with non-zero biases, so that every term of the formula
    matters, and, for RTF, slow poles on head 0."""
    torch.manual_seed(seed)
    op = MultiHyenaOperator(op_config(filt, **kw), 0).double()
    with torch.no_grad():
        for p in op.parameters():
            if p.dim() == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    if filt == "rtf":
        slow_poles(op.filter)
    return op


def np_multihyena(op: MultiHyenaOperator, u: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """u (B, T, d) -> (B, T, d) in float64, given the filter's kernel (M e^2, T)."""
    B, T, d = u.shape
    M, e, w = op.heads, op.head_dim, op.width
    p = u @ P(op.in_proj.weight).T + P(op.in_proj.bias)  # (B, T, 3d)
    W, c = P(op.short_conv.weight)[:, 0, :], np.tile(P(op.short_conv.bias), (B, T, 1))
    for t in range(T):  # conv1d correlates: tap w - 1 meets the current input, tap w - 1 - j input t - j
        for j in range(min(w, t + 1)):
            c[:, t] += W[:, w - 1 - j] * p[:, t - j]
    q, k, v = c[..., :d], c[..., d : 2 * d], c[..., 2 * d :]
    y = np.zeros((B, T, d))
    for b in range(B):
        for m in range(M):
            hs = slice(m * e, (m + 1) * e)
            h = kernel[m * e * e : (m + 1) * e * e].reshape(e, e, T)  # h[i, j, s] for entry (i, j)
            for t in range(T):
                Z = np.zeros((e, e))
                for s in range(t + 1):
                    Z += h[:, :, s] * np.outer(k[b, t - s, hs], v[b, t - s, hs])
                y[b, t, hs] = q[b, t, hs] @ Z
    return y @ P(op.out_proj.weight).T + P(op.out_proj.bias)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# the parallel form
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("filt", ["rtf", "implicit"])
@pytest.mark.parametrize("T", [17, 40], ids=["below_lmax", "above_lmax"])
def test_parallel_forward_matches_reference(filt, T):
    """Float64 forward == the loop reference to 1e-10 relative to max|out|: both use the same
    kernel, so the gap is float64 rounding through two matmuls, the width-3 conv, the FFT
    convolution and the contractions (observed <= 5e-16). T = 40 > l_max = 24 uses the
    long RTF kernel (and the extrapolated implicit one). The filter serves M e^2 = 32 channels by
    M = 2 distinct filters, each head's 16 channels contiguous and equal."""
    op = make_op(filt, seed=T)
    assert (op.filter.channels, op.filter.num_filters) == (32, 2)
    kernel = P(op.filter.kernel(T))
    assert (kernel[:16] == kernel[0]).all() and (kernel[16:] == kernel[16]).all()
    assert np.abs(kernel[0] - kernel[16]).max() > 1e-2
    u = np.random.default_rng(T).standard_normal((2, T, 8))
    ref = np_multihyena(op, u, kernel)
    out = P(op(torch.from_numpy(u)))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-10


@pytest.mark.parametrize("filt", ["rtf", "implicit"])
def test_one_channel_per_head_is_the_order2_hyena_operator(filt):
    """M = d (e = 1): z = k v is Hyena's x1 * v and the contraction its gate x0 * (.), with the same
    parameter names and shapes; loaded with the same weights the two operators agree to 1e-12
    relative (float64; observed 0), also past l_max. For e > 1 they differ (the head mixes channels)."""
    mh = make_op(filt, heads=8, seed=1)
    hyena = HyenaOperator(op_config(filt, heads=None), 0).double()
    hyena.load_state_dict(mh.state_dict())
    u = torch.randn(2, 40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel(mh(u), hyena(u)) < 1e-12
    wide = make_op(filt, heads=2, seed=1)
    assert rel(wide(u), hyena(u)) > 1e-2


@pytest.mark.parametrize("filt", ["rtf", "implicit"])
@pytest.mark.parametrize("t0", [1, 20, 39])
def test_operator_is_causal(filt, t0):
    """Changing u at t >= t0 leaves the outputs at t < t0 unchanged (1e-12 relative to the change
    after t0: FFT rounding reaches every output, float64; observed <= 5e-15) and does change the
    outputs from t0 on."""
    op = make_op(filt, seed=t0)
    g = torch.Generator().manual_seed(100 + t0)
    u = torch.randn(2, 40, 8, dtype=torch.float64, generator=g)
    u2 = u.clone()
    u2[:, t0:] = torch.randn(2, 40 - t0, 8, dtype=torch.float64, generator=g)
    change = (op(u2) - op(u)).abs()
    assert change[:, t0:].max() > 1e-3
    assert change[:, :t0].max() < 1e-12 * change[:, t0:].max()


@pytest.mark.parametrize("filt,T", [("rtf", 6), ("rtf", 9), ("implicit", 6)], ids=["rtf", "rtf_above_lmax", "implicit"])
def test_gradcheck_input_and_parameters(filt, T):
    """torch.autograd.gradcheck (float64 central differences, its default eps 1e-6, atol 1e-5,
    rtol 1e-3) of a d = 4, M = 2, e = 2 operator with respect to the input and every parameter
    (projections, short conv, the filter's a, b, h0, slack or its MLP), l_max = 7: T = 9 goes
    through the long-kernel path."""
    op = make_op(filt, d=4, heads=2, n=2, l_max=7, seed=T, implicit_order=4, implicit_bands=1)
    names = [name for name, _ in op.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in op.parameters()]
    u = torch.randn(2, T, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(T)).requires_grad_()

    def f(u, *ps):
        return functional_call(op, dict(zip(names, ps)), (u,))

    assert torch.autograd.gradcheck(f, (u, *params))


# ---------------------------------------------------------------------------------------------
# recurrent decoding and left padding
# ---------------------------------------------------------------------------------------------
def decode(op: MultiHyenaOperator, u: torch.Tensor, prompt: int, mask: torch.Tensor | None = None):
    """forward(u[:, :prompt], return_state) then step() over the rest: outputs (B, T, d), last state."""
    out, state = op(u[:, :prompt], None if mask is None else mask[:, :prompt], return_state=True)
    outs = [out]
    for t in range(prompt, u.shape[1]):
        y, state = op.step(u[:, t], state)
        outs.append(y[:, None])
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("filt", ["rtf", "implicit"])
@pytest.mark.parametrize(
    "prompt,total", [(1, 12), (10, 40), (30, 50)], ids=["below_lmax", "across_lmax", "prefill_past_lmax"]
)
def test_prefill_then_step_matches_parallel_forward(filt, prompt, total):
    """Prefill + steps == one parallel forward over the whole sequence, also past l_max = 24 where
    the parallel form uses the long kernel and the slow poles (0.995^24 ~ 0.9) make the aliasing
    correction matter. RTF: recurrent_dtype float64, 1e-9 relative (the companion recursion of the
    corrected system over <= 50 steps adds ~ cond * eps * t; observed <= 3e-15). Implicit: its
    history is float64 here, and the step's kernel is the parallel one, 1e-9 (observed <= 6e-16).
    The state: w - 1 = 2 short-conv inputs, and (B, M e^2, n) for RTF (e x e x n per head)."""
    op = make_op(filt, seed=prompt)
    u = torch.randn(2, total, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(prompt))
    rec, state = decode(op, u, prompt)
    assert rel(rec, op(u)) < 1e-9
    assert state.conv.shape == (2, 24, 2)
    if filt == "rtf":  # the modal state: (B, M e^2, 2, slots), slots <= the order 4
        assert state.filt.shape[:3] == (2, 32, 2) and state.filt.shape[3] <= 4
    else:
        assert state.filt.shape == (2, 32, total)


@pytest.mark.parametrize("filt", ["rtf", "implicit"])
def test_left_padding_gives_the_unpadded_outputs(filt):
    """5 leading pad positions (mask 0, embeddings 10x larger than the real ones): the parallel
    forward and the masked prefill followed by steps past l_max both give, at the real positions,
    the outputs of the unpadded sequence (1e-9 relative, float64, as above; observed <= 3e-15). The
    mask matters: without it the pads change the outputs by more than 1e-3."""
    op = make_op(filt, seed=9)
    g = torch.Generator().manual_seed(9)
    u = torch.randn(2, 36, 8, dtype=torch.float64, generator=g)
    padded = torch.cat([10 * torch.randn(2, 5, 8, dtype=torch.float64, generator=g), u], 1)
    mask = torch.cat([torch.zeros(2, 5), torch.ones(2, 36)], 1)
    mask[1, :5] = 1  # row 1 is not padded: the pads are real tokens there
    ref = op(u)
    out = op(padded, mask)
    assert rel(out[:1, 5:], ref[:1]) < 1e-9
    assert rel(out[1:], op(padded[1:])) < 1e-9
    rec, _ = decode(op, padded, 12, mask)
    assert rel(rec, out) < 1e-9
    assert rel(op(padded)[:1, 5:], ref[:1]) > 1e-3


# ---------------------------------------------------------------------------------------------
# the language model: generate(), beam search, export
# ---------------------------------------------------------------------------------------------
VOCAB, PROMPT, NEW = 97, 6, 40  # 46 tokens > l_max = 32 of tiny_config


def multihyena_lm(attn_layers=None) -> torch.nn.Module:
    """tiny_model (d 32, 2 layers, l_max 32) with MultiHyena mixers of 4 heads (e = 8, 256 filter
    channels), slow poles on heads 0 and 2 of every layer."""
    model = tiny_model(attn_layers, vocab=VOCAB, multi_hyena_heads=4)
    for block in model.model.layers:
        if not block.is_attention:
            assert isinstance(block.mixer, MultiHyenaOperator)
            slow_poles(block.mixer.filter)
    return model


@pytest.mark.parametrize("padded", [False, True], ids=["batch", "left_padded"])
@pytest.mark.parametrize("attn", [None, [1]], ids=["multihyena", "hybrid"])
def test_generate_with_cache_decodes_greedily(attn, padded):
    """Greedy generate() past l_max: the prompt is fed once, then one token per step against a
    cache that has seen every earlier position, and the tokens are greedy choices of the full
    parallel forward (assert_greedy), left-padded rows included."""
    model = multihyena_lm(attn)
    ids = torch.randint(1, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padded:
        ids[0, :3], mask[0, :3] = 0, 0
    calls = spy_on_forward(model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert [c.positions for c in calls] == [PROMPT] + [1] * (NEW - 1)
    assert [c.seen for c in calls] == [None] + list(range(PROMPT, PROMPT + NEW - 1))
    assert out.shape == (2, PROMPT + NEW)
    assert_greedy(model, out, PROMPT, mask if padded else None)


def test_beam_search_with_cache_equals_without():
    """Beam search reorders the MultiHyena states (HyenaState.index_select) every step: every beam it
    returns, with the cache and without, is scored as the parallel forward scores it and keeps only
    continuations among the best 4 of their prefix (assert_beams; the two routes' beams are not
    compared, a near-tie of two candidates may send them down different branches)."""
    model = multihyena_lm([1])
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=30, num_beams=4, num_return_sequences=2, do_sample=False, early_stopping=False)
    kw.update(return_dict_in_generate=True, output_scores=True)
    cached = seeded(0, lambda: model.generate(ids, **kw))
    uncached = seeded(0, lambda: model.generate(ids, **kw, use_cache=False))
    assert_beams(model, cached, 5, num_beams=4, returned=2, reference=uncached)
    assert not torch.equal(cached.out.sequences[0], cached.out.sequences[1])


def test_export_loads_with_the_same_logits(tmp_path):
    """save_hf_checkpoint writes multihyena.py beside modeling_hyena_rtf.py, importing only relatively
    (and torch); config.json keeps multi_hyena_heads. In this process both AutoModelForCausalLM
    (which takes the registered project class) and the exported code itself (loaded from the
    folder as a dynamic module) rebuild MultiHyena mixers with bit-identical logits."""
    model = multihyena_lm([1])
    ckpt = save_hf_checkpoint(model, None, tmp_path / "ckpt")
    tree = ast.parse((ckpt / "multihyena.py").read_text())
    absolute = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    absolute |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m.split(".")[0] for m in absolute} <= {"__future__", "torch"}, absolute
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
        auto = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        exported_cls = get_class_from_dynamic_module("modeling_hyena_rtf.HyenaRTFForCausalLM", str(ckpt))
        exported = exported_cls.from_pretrained(ckpt).eval()
        for loaded, package in ((auto, "models."), (exported, "transformers_modules.")):
            mixer = type(loaded.model.layers[0].mixer)
            assert (mixer.__name__, loaded.config.multi_hyena_heads) == ("MultiHyenaOperator", 4)
            assert mixer.__module__.startswith(package) and mixer.__module__.endswith(".multihyena")
            assert torch.equal(loaded(ids).logits, ref)


def test_training_config_selects_multihyena(corpus, tmp_path):
    """`model.multi_hyena_heads=4` on the training command line (the model section is derived from
    HyenaRTFConfig.__init__) trains a MultiHyena model: 3 finite steps of the tiny run, and the
    checkpoint rebuilds MultiHyena mixers with one RTF filter per head."""
    overrides = ["model.multi_hyena_heads=4", "train.max_steps=3", "train.eval_every=3", "checkpoint.every=3"]
    run(load_config(None, [*TINY, f"data.dir={corpus}", f"train.out_dir={tmp_path}", *overrides]))
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    model, _ = model_from_checkpoint(str(tmp_path / "checkpoints" / "step_00000003"))
    for block in model.model.layers:
        assert isinstance(block.mixer, MultiHyenaOperator)
        assert (block.mixer.filter.num_filters, block.mixer.filter.channels) == (4, 4 * 8 * 8)
