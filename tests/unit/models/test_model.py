"""Tests of the decoder LM (models/modeling_hyena_rtf.py, configuration_hyena_rtf.py):
causality of the logits (Hyena and attention layers), bf16 autocast, parameter counts of the
presets against an independent closed-form count, head tying, vocabulary padding, init, loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.helpers import FFTSpy, tiny_config

import models.attention as attention_module
from models import HyenaRTFConfig, HyenaRTFForCausalLM, config_from_preset


def tiny_lm(seed=0, dtype=torch.float64, **kw) -> HyenaRTFForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=37, pad_vocab_size_multiple=16, d_model=16, n_layer=3, n_head=2, attn_layers=[1])
    return HyenaRTFForCausalLM(tiny_config(**{**fields, "use_cache": False, **kw})).to(dtype).eval()


def logit_change(model, ids, t0, seed=1):
    """Max |change| of the logits before t0 and from t0 on, when tokens at t >= t0 are redrawn."""
    g = torch.Generator().manual_seed(seed)
    ids2 = ids.clone()
    ids2[:, t0:] = (ids[:, t0:] + 1 + torch.randint(0, 30, ids[:, t0:].shape, generator=g)) % 37
    with torch.no_grad():
        d = (model(ids2).logits - model(ids).logits).abs()
    return d[:, :t0].max().item(), d[:, t0:].max().item()


# ---------------------------------------------------------------------------------------------
# 3. causality of the whole LM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("filt", ["rtf", "implicit"])
@pytest.mark.parametrize("t0", [1, 17, 31])
def test_lm_logits_are_causal_with_attention_layers(filt, t0):
    """3 layers (Hyena, attention, Hyena), float32: changing the tokens at t >= t0 leaves the
    logits at t < t0 unchanged up to float32 FFT rounding, which reaches every position (1e-5
    relative to the change after t0; eps32 = 1.2e-7 times a few layers), and does change the
    logits from t0 on. (float32, not float64: CPU depthwise conv1d in float64 takes a slow path,
    ~1 s per forward of this tiny model.)"""
    model = tiny_lm(seed=t0, filter=filt, dtype=torch.float32)
    ids = torch.randint(0, 37, (2, 32), generator=torch.Generator().manual_seed(t0))
    before, after = logit_change(model, ids, t0)
    assert after > 1e-3
    assert before <= 1e-5 * after


def test_causality_check_catches_a_non_causal_attention(monkeypatch):
    """The check above is not vacuous: with attention made bidirectional (is_causal forced to
    False), the logits before t0 move by far more than the tolerance."""
    sdpa = F.scaled_dot_product_attention

    def bidirectional(q, k, v, attn_mask=None, is_causal=False, **kw):
        return sdpa(q, k, v, attn_mask=None, is_causal=False)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", bidirectional)
    model = tiny_lm(seed=0, dtype=torch.float32)
    ids = torch.randint(0, 37, (2, 32), generator=torch.Generator().manual_seed(0))
    before, after = logit_change(model, ids, 17)
    assert before > 1e-3 * after


# ---------------------------------------------------------------------------------------------
# 4. bf16 autocast
# ---------------------------------------------------------------------------------------------


def test_lm_under_bf16_autocast():
    """A float32 model under CPU bf16 autocast: finite logits and loss, every FFT input float32 /
    complex64, RTF parameters float32 before and after an optimizer step, finite gradients."""
    model = tiny_lm(dtype=torch.float32).train()
    ids = torch.randint(0, 37, (2, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16), FFTSpy() as spy:
        out = model(ids, labels=ids)
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.logits.float()).all()
    assert torch.isfinite(out.loss)
    assert out.logits.dtype == torch.bfloat16  # the autocast really was on
    assert spy.dtypes, spy.dtypes
    assert set(spy.dtypes) <= {torch.float32, torch.complex64}, spy.dtypes
    for name, p in model.named_parameters():
        if ".filter." in name:
            assert p.dtype == torch.float32, name
        assert p.grad is None or torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------------------------
# 10. presets and parameter counts
# ---------------------------------------------------------------------------------------------
def expected_parameters(cfg: HyenaRTFConfig) -> int:
    """Closed-form count written from the architecture (models/hyena.py and the block in
    models/modeling_hyena_rtf.py), not by walking the module tree."""
    d, w, n, r = cfg.d_model, cfg.short_conv_width, cfg.state_size, cfg.mlp_ratio
    V = -(-cfg.vocab_size // cfg.pad_vocab_size_multiple) * cfg.pad_vocab_size_multiple
    filters = cfg.filter_heads or d
    num_a = cfg.num_a or filters
    assert cfg.filter == "rtf"
    rtf = num_a * n + filters * n + filters + (num_a if cfg.rtf_constraint == "l1_montel" else 0)
    hyena = (3 * d * d + 3 * d) + (3 * d * w + 3 * d) + (d * d + d) + rtf
    attn = (3 * d * d + 3 * d) + (d * d + d)
    block_common = 2 * (2 * d) + (d * r * d + r * d) + (r * d * d + d)  # two LayerNorms + MLP
    layers = sum(block_common + (attn if i in cfg.attn_layers else hyena) for i in range(cfg.n_layer))
    head = 0 if cfg.tie_word_embeddings else V * d
    return V * d + layers + 2 * d + head


def meta_parameter_count(cfg: HyenaRTFConfig) -> int:
    with torch.device("meta"):
        return HyenaRTFForCausalLM(cfg).num_parameters()


@pytest.mark.parametrize(
    "preset,low,high", [("tiny", 2e6, 5e6), ("125m", 110e6, 140e6), ("355m", 320e6, 400e6), ("1.3b", 1.2e9, 1.45e9)]
)
def test_preset_parameter_counts(preset, low, high):
    """The model's own count (`num_parameters()`, built on the meta device so the 1.3b preset costs
    no memory) equals the closed-form count exactly and lies in the expected ballpark with the
    GPT-NeoX vocabulary (50277, padded to 50304)."""
    cfg = config_from_preset(preset, vocab_size=50277)
    count = meta_parameter_count(cfg)
    assert count == expected_parameters(cfg)
    assert low <= count <= high, f"{preset}: {count / 1e6:.1f}M"


def test_parameter_count_untied_with_attention_and_sharing():
    """The closed form also matches with an untied head, attention layers, shared denominators
    and tied filter heads (so double-counting a tied weight, or not counting a new one, fails)."""
    sharing = dict(tie_word_embeddings=False, num_a=2, filter_heads=4)
    cfg = tiny_config(vocab_size=1000, n_layer=3, l_max=64, state_size=8, attn_layers=[0, 2], **sharing)
    assert meta_parameter_count(cfg) == expected_parameters(cfg)
    tied = HyenaRTFConfig(**{**cfg.to_dict(), "tie_word_embeddings": True})
    assert meta_parameter_count(cfg) - meta_parameter_count(tied) == 1024 * 32  # padded vocab x d


# ---------------------------------------------------------------------------------------------
# head, vocabulary, init, loss
# ---------------------------------------------------------------------------------------------
def test_tied_head_padded_vocab_and_logit_width():
    """The LM head is the embedding matrix (tied), padded to a multiple of 16 (37 -> 48 rows),
    and the logits are cut to the true vocabulary size."""
    model = tiny_lm(dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed.weight
    assert model.model.embed.weight.shape == (48, 16)
    ids = torch.randint(0, 37, (1, 10))
    assert model(ids).logits.shape == (1, 10, 37)


def _head_reference(model: HyenaRTFForCausalLM, h: torch.Tensor) -> torch.Tensor:
    """The head written out: every padded row's logit, then cut to the vocabulary (float64)."""
    return (h.double() @ model.lm_head.weight.double().T)[..., : model.config.vocab_size]


def test_logits_of_the_real_vocabulary_equal_the_padded_head_cut():
    """`logits` multiplies by the vocabulary rows only; values and the gradient reaching the tied
    embedding equal the padded head's (float64 reference; float32 sums of 16 products give logits
    within 1e-6, and gradients summed over 10 positions, with cancellation, within 1e-6 of their
    largest entry, ~100)."""
    model = tiny_lm(dtype=torch.float32)
    h = torch.randn(2, 5, 16, requires_grad=True)
    out = model.logits(h)
    assert out.shape == (2, 5, 37)
    torch.testing.assert_close(out.double(), _head_reference(model, h), rtol=0, atol=1e-6)
    (out * torch.arange(37.0)).sum().backward()
    grad = model.lm_head.weight.grad
    assert torch.equal(grad[37:], torch.zeros_like(grad[37:]))  # padding rows never score
    expected = torch.einsum("btv,btd->vd", torch.arange(37.0).expand(2, 5, 37).double(), h.detach().double())
    torch.testing.assert_close(grad[:37].double(), expected, rtol=0, atol=1e-6 * expected.abs().max().item())


def test_logits_call_a_hooked_head_as_a_module():
    """A forward hook on the head (how accelerate offloads weights, how PEFT-like wrappers act) must
    run: the fast path that reads the weight directly is taken only for a plain, hook-free head."""
    model = tiny_lm(dtype=torch.float32)
    h = torch.randn(1, 3, 16)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape) or out * 2)
    out = model.logits(h)
    assert seen == [(1, 3, 48)]
    torch.testing.assert_close(out.double(), 2 * _head_reference(model, h), rtol=0, atol=1e-6)


def test_gpt2_init():
    """GPT-2 init: Linear weights N(0, 0.02), residual output projections N(0, 0.02/sqrt(2 L)),
    zero biases; the RTF filters keep their own init (h0 ~ U(-1, 1), not ones or zeros).
    Standard deviations estimated from >= 16k samples: 10% relative tolerance (~6 sigma)."""
    torch.manual_seed(0)
    cfg = HyenaRTFConfig(vocab_size=64, d_model=128, n_layer=4, l_max=64, state_size=8)
    model = HyenaRTFForCausalLM(cfg)
    blk = model.model.layers[0]
    assert blk.mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert blk.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    resid = 0.02 / math.sqrt(2 * 4)
    assert blk.mixer.out_proj.weight.std().item() == pytest.approx(resid, rel=0.1)
    assert blk.mlp.proj.weight.std().item() == pytest.approx(resid, rel=0.1)
    assert blk.mixer.in_proj.bias.abs().max().item() == 0
    h0 = blk.mixer.filter.h0
    assert h0.min().item() >= -1
    assert h0.max().item() <= 1
    assert h0.std().item() > 0.3


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    """labels are shifted inside: loss == CE(logits[:, :-1], labels[:, 1:]) ignoring -100."""
    model = tiny_lm(dtype=torch.float32)
    ids = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 5:] = -100
    out = model(ids, labels=labels)
    logits = out.logits.double()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 37), labels[:, 1:].reshape(-1), ignore_index=-100)
    # float32 logits, the reference accumulates in float64: 1e-6 relative
    assert out.loss.item() == pytest.approx(ce.item(), rel=1e-6)
    assert out.loss.item() != pytest.approx(
        F.cross_entropy(logits.reshape(-1, 37), labels.reshape(-1), ignore_index=-100).item(), rel=1e-3
    )  # unshifted


def test_plain_eval_forward_of_unstable_model_returns_logits():
    """Scoring text (evaluate_lm.py, lm-eval's HFLM call model(input_ids) in eval mode) needs only the
    parallel form, which is defined for any filter; it must not fail because config.use_cache
    makes a plain call build a cache whose recurrence would diverge. That cache is built with a
    warning; an explicit use_cache=True (what generate() passes) still refuses the model."""
    model = tiny_lm(dtype=torch.float32, rtf_constraint="none", attn_layers=[], use_cache=True)  # the default
    with torch.no_grad():
        model.model.layers[0].mixer.filter.a[0] = torch.tensor([-2.2, 1.17, 0.0, 0.0])  # poles 1.3, 0.9
    ids = torch.randint(0, 37, (1, 8))
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        with pytest.warns(UserWarning, match="outside the unit circle"):
            plain = model(ids)
        assert torch.equal(plain.logits, reference)
        with pytest.raises(ValueError, match="outside the unit circle"):
            model(ids, use_cache=True)


@pytest.mark.parametrize("attn_layers", [(), (1,)])
def test_a_cache_continues_only_its_own_batch(attn_layers):
    """A cache continues the batch it was built with, row for row: an input with another number of
    rows (a beam search's cache given the one returned sequence, a batch-1 cache given three beams)
    is refused in one line naming both sizes, before any state is touched; the same batch goes on."""
    torch.manual_seed(0)
    model = HyenaRTFForCausalLM(tiny_config(attn_layers=list(attn_layers))).eval()
    ids = torch.randint(0, 97, (3, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        states = [None if s is None else (s.filt.clone() if hasattr(s, "filt") else s[0].clone()) for s in cache.layers]
        for rows in (1, 4):
            with pytest.raises(ValueError, match=f"holds the states of 3 sequences but the input has {rows} rows"):
                model(ids[:1].repeat(rows, 1)[:, :1], past_key_values=cache)
        after = [s.filt if hasattr(s, "filt") else s[0] for s in cache.layers]
        assert all(torch.equal(a, b) for a, b in zip(states, after)) and cache.seen_tokens == 6
        model(ids[:, :1], past_key_values=cache)  # its own batch continues
    assert cache.seen_tokens == 7
