"""Tests of the order-2 Hyena operator (models/hyena.py) against a numpy float64 re-implementation.

    p          = W_in u + b_in                         (3d channels)
    x0, x1, v  = split(short_conv(p))                  causal depthwise conv of width w
    y          = x0 * (h * (x1 * v))                   h: long filter, tap 0 carries the feed-through
    out        = W_out y + b_out

The reference reads the module's weights and recomputes everything (including the RTF and
implicit kernels) in numpy float64 from the definitions; it never calls the module's methods.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support.helpers import FFTSpy, np_causal_conv

from models.configuration_hyena_rtf import HyenaRTFConfig
from models.hyena import HyenaOperator, short_causal_conv, short_conv_step
from models.rtf import RTF


def P(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def make_op(filt="rtf", d=8, n=6, l_max=40, seed=0, dtype=torch.float64, **kw) -> HyenaOperator:
    torch.manual_seed(seed)
    cfg = HyenaRTFConfig(
        vocab_size=16,
        d_model=d,
        n_layer=1,
        l_max=l_max,
        state_size=n,
        filter=filt,
        implicit_order=16,
        implicit_bands=3,
        recurrent_dtype="float64",
        **kw,
    )
    op = HyenaOperator(cfg, 0).to(dtype)
    # Non-trivial biases and short-conv taps so that every term of the formula matters.
    with torch.no_grad():
        for p in op.parameters():
            if p.dim() == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return op


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------
def np_rtf_kernel(rtf: RTF, T: int) -> np.ndarray:
    """(channels, T) kernel: the L'-periodic aliasing of the impulse response of
    h0 + b(z)/A(z) (Montel-constrained A), by the difference equation run over as many periods
    as it takes the response to fall below 1e-17 of its peak, then folded modulo L'."""
    a = P(rtf.a)
    if rtf.constraint == "l1_montel":
        a = a / (np.abs(a).sum(-1, keepdims=True) + np.abs(P(rtf.slack))[:, None] + rtf.eps)
    a = np.repeat(a, rtf.num_filters // rtf.num_a, axis=0)
    b, h0, Lp, n = P(rtf.b), P(rtf.h0), rtf.fft_len, rtf.state_size
    out = np.zeros((rtf.num_filters, T))
    for f in range(rtf.num_filters):
        v = np.zeros(n)  # v_{t-1}, ..., v_{t-n}
        folded = np.zeros(Lp)
        t, peak = 0, 0.0
        while True:
            y = b[f] @ v + (h0[f] if t == 0 else 0.0)
            v_t = (1.0 if t == 0 else 0.0) - a[f] @ v
            v = np.r_[v_t, v[:-1]]
            folded[t % Lp] += y
            peak = max(peak, abs(y))
            t += 1
            if t % Lp == 0 and np.abs(v).max() < 1e-17 * max(peak, 1e-300):
                break
            assert t < 1000 * Lp, "filter does not decay"
        out[f] = folded[:T]
    return np.repeat(out, rtf.channels // rtf.num_filters, axis=0)


def np_implicit_kernel(filt, T: int) -> np.ndarray:
    """Hyena's implicit filter from its definition: features [t/L, cos(2 pi f t/L), sin(...)],
    MLP Linear -> sin(w x) -> Linear -> sin(w x) -> Linear, times exp(-delta t/L), plus D at tap 0.
    The decay rates use ImplicitFilter's defaults: exp(-delta s) reaches 1e-2 at s = 1.5 (slowest
    filter) and s = 0.3 (fastest), rates evenly spaced between."""
    s = np.arange(T) / filt.l_max
    f = np.arange(1, filt.bands + 1)
    z = np.concatenate([s[:, None], np.cos(2 * np.pi * s[:, None] * f), np.sin(2 * np.pi * s[:, None] * f)], 1)
    lin1, sin1, lin2, sin2, lin3 = filt.mlp
    h = np.sin(P(sin1.freq) * (z @ P(lin1.weight).T + P(lin1.bias)))
    h = np.sin(P(sin2.freq) * (h @ P(lin2.weight).T + P(lin2.bias)))
    h = (h @ P(lin3.weight).T).T  # (filters, T)
    deltas = np.linspace(np.log(100) / 1.5, np.log(100) / 0.3, filt.num_filters)
    h = h * np.exp(-deltas[:, None] * s[None, :])
    h[:, 0] += P(filt.d)
    return np.repeat(h, filt.channels // filt.num_filters, axis=0)


def np_hyena(op: HyenaOperator, u: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """u (B, T, d) -> (B, T, d), float64, given the long kernel (d, T)."""
    B, T, d = u.shape
    w = op.width
    p = (u @ P(op.in_proj.weight).T + P(op.in_proj.bias)).transpose(0, 2, 1)  # (B, 3d, T)
    W = P(op.short_conv.weight)[:, 0, :]  # (3d, w); conv1d is a correlation
    pp = np.concatenate([np.zeros((B, 3 * d, w - 1)), p], -1)
    q = sum(W[:, j, None] * pp[..., j : j + T] for j in range(w)) + P(op.short_conv.bias)[:, None]
    x0, x1, v = q[:, :d], q[:, d : 2 * d], q[:, 2 * d :]
    y = x0 * np_causal_conv(x1 * v, kernel)
    return y.transpose(0, 2, 1) @ P(op.out_proj.weight).T + P(op.out_proj.bias)


# ---------------------------------------------------------------------------------------------
# 6. feed-through counted once
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [17, 40])
def test_rtf_operator_matches_reference_with_h0_counted_once(T):
    """Float64 operator with an RTF filter == numpy y = x0 * (h * z) with h0 in tap 0 of h, to
    1e-10 relative to max|out| (float64 rounding through two matmuls, a width-3 conv and an FFT
    convolution is ~1e-14; the RTF kernel reference folds the impulse response until it is 1e-17
    of its peak). Adding h0 a second time (the public wrapper's 2*h0) misses by > 1e-2."""
    op = make_op("rtf", 8, 6, 40, seed=T)
    u = np.random.default_rng(T).standard_normal((2, T, 8))
    k = np_rtf_kernel(op.filter, T)
    ref = np_hyena(op, u, k)
    out = P(op(torch.from_numpy(u)))
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() / scale < 1e-10
    k2 = k.copy()
    k2[:, 0] += P(op.filter.h0)  # the 2*h0 mistake (one filter per channel here)
    assert np.abs(out - np_hyena(op, u, k2)).max() / scale > 1e-2


def test_implicit_operator_matches_reference_with_d_counted_once():
    """Same claim for the implicit filter: its D sits in tap 0 exactly once (adding D twice
    misses by > 1e-2). Also checks the implicit kernel against its definition.

    Tolerance 1e-6 (not 1e-10): ImplicitFilter.features builds the positions and sinusoids in
    float32 even for a float64 module (by design: the MLP input precision does not matter for
    training), so the kernel carries float32 rounding of arguments up to 2 pi bands ~ 20,
    i.e. ~ 20 * 6e-8 ~ 1e-6 absolute on O(1) features; observed 7e-9 relative."""
    op = make_op("implicit", 8, 6, 40, seed=3)
    u = np.random.default_rng(3).standard_normal((2, 30, 8))
    k = np_implicit_kernel(op.filter, 30)
    assert np.abs(P(op.filter.kernel(30)) - k).max() / np.abs(k).max() < 1e-6
    ref = np_hyena(op, u, k)
    out = P(op(torch.from_numpy(u)))
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() / scale < 1e-6
    k2 = k.copy()
    k2[:, 0] += P(op.filter.d)
    assert np.abs(out - np_hyena(op, u, k2)).max() / scale > 1e-2


def test_operator_with_tied_filter_heads():
    """filter_heads=2 with d=8: the RTF has 2 filters, each tied across 4 consecutive channels,
    and the operator still matches the reference built from the expanded kernel."""
    op = make_op("rtf", 8, 4, 24, seed=5, filter_heads=2, num_a=1)
    assert op.filter.b.shape == (2, 4)
    assert op.filter.a.shape == (1, 4)
    k = np_rtf_kernel(op.filter, 24)
    assert np.array_equal(k[0], k[3])
    assert np.array_equal(k[4], k[7])
    assert not np.allclose(k[3], k[4])
    u = np.random.default_rng(5).standard_normal((1, 24, 8))
    ref = np_hyena(op, u, k)
    assert np.abs(P(op(torch.from_numpy(u))) - ref).max() / np.abs(ref).max() < 1e-10


# ---------------------------------------------------------------------------------------------
# 3. causality
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("filt", ["rtf", "implicit"])
@pytest.mark.parametrize("t0", [1, 20, 39])
def test_operator_is_causal(filt, t0):
    """Changing u at t >= t0 leaves the operator's outputs at t < t0 unchanged (float64; 1e-12
    relative, since FFT rounding touches every output) and changes them at t >= t0. The check is
    not vacuous: an operator fed the time-reversed input would fail it (asserted)."""
    op = make_op(filt, 8, 6, 40, seed=t0)
    torch.manual_seed(100 + t0)
    u = torch.randn(2, 40, 8, dtype=torch.float64)
    u2 = u.clone()
    u2[:, t0:] = torch.randn(2, 40 - t0, 8, dtype=torch.float64)
    d = (op(u2) - op(u)).abs()
    assert d[:, :t0].max() < 1e-12 * d[:, t0:].max()
    assert d[:, t0:].max() > 1e-3
    d_rev = (op(u2.flip(1)) - op(u.flip(1))).abs()
    assert d_rev[:, :t0].max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 4. precision under bf16 autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filt", ["rtf", "implicit"])
def test_bf16_autocast_forward_and_backward(filt):
    """Float32 operator under CPU bf16 autocast: the projections run in bf16 (so the test is
    really under autocast), every FFT input is float32/complex64, the RTF parameters stay float32
    and get float32 gradients, outputs and gradients are finite, and the output is close to the
    float32 forward (5e-2 relative: bf16 keeps 8 mantissa bits, 3.9e-3 per rounding, a few
    roundings through in_proj, the gating products and out_proj)."""
    op = make_op(filt, 16, 8, 64, seed=1, dtype=torch.float32)
    u = torch.randn(2, 64, 16)
    ref = op(u)
    with torch.autocast("cpu", dtype=torch.bfloat16), FFTSpy() as spy:
        out = op(u)
        out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16
    assert set(spy.dtypes) <= {torch.float32, torch.complex64}, spy.dtypes
    assert len(spy.dtypes) >= 3, spy.dtypes
    assert torch.isfinite(out.float()).all()
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 5e-2
    for name, p in op.filter.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.grad is not None, name
        assert p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------------------------
# recurrent decoding of one operator, and left padding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("filt", ["rtf", "implicit"])
@pytest.mark.parametrize("prompt,total", [(1, 12), (10, 40), (30, 70)])
def test_prefill_then_step_matches_parallel_forward(filt, prompt, total):
    """forward(prompt, return_state) then step() token by token gives the same outputs as one
    parallel forward over the whole sequence, also past l_max = 40 where the parallel form uses
    the modal form's long kernel. RTF: float64 with recurrent_dtype float64, 1e-9 relative (the
    modal recursion over <= 70 steps adds ~ amplification eps t). Implicit:
    its decoding history and kernel are float32 whatever the module dtype (ImplicitFilter.prefill
    / step), so 1e-6 (float32 rounding, observed ~4e-8). The state holds only the last w - 1 = 2
    short-conv inputs (its size does not grow)."""
    op = make_op(filt, 8, 6, 40, seed=prompt)
    torch.manual_seed(prompt)
    u = torch.randn(2, total, 8, dtype=torch.float64)
    full = op(u)
    out, state = op(u[:, :prompt], return_state=True)
    assert state.conv.shape == (2, 24, 2)
    steps = [out]
    for t in range(prompt, total):
        y, state = op.step(u[:, t], state)
        steps.append(y[:, None])
    rec = torch.cat(steps, 1)
    tol = 1e-9 if filt == "rtf" else 1e-6
    assert (rec - full).abs().max() / full.abs().max() < tol
    if filt == "rtf":
        # The modal state: real and imaginary parts of ceil(6 / 2) = 3 slots or more (real poles take
        # a slot each), per channel; it does not grow with the prompt.
        assert state.filt.shape[:3] == (2, 8, 2) and 3 <= state.filt.shape[3] <= 6


@pytest.mark.parametrize("filt", ["rtf", "implicit"])
def test_chunks_from_a_state_match_the_parallel_forward_and_reuse_the_kernel(filt, monkeypatch):
    """forward(chunk, state=S) over chunks of 12, 5 and 23 tokens (past l_max = 40) equals one parallel
    forward, within the tolerances of the test above; and a chunk takes its zero-state convolution
    from the filter's memoised kernel: counted, no modal system recomputes its taps for it (they are
    O(C m T) complex128 work per chunk otherwise)."""
    from models.modal import ModalSystem

    op = make_op(filt, 8, 6, 40, seed=3)
    torch.manual_seed(3)
    u = torch.randn(2, 40, 8, dtype=torch.float64)
    with torch.no_grad():
        full = op(u)
        out, state = op(u[:, :12], return_state=True)
        op.filter.kernel(40)  # the memo holds the longest kernel computed so far
        calls = []
        taps = ModalSystem.taps
        monkeypatch.setattr(ModalSystem, "taps", lambda self, T: calls.append(T) or taps(self, T))
        outs = [out]
        for a, b in ((12, 17), (17, 40)):
            y, state = op(u[:, a:b], state=state)
            outs.append(y)
    assert calls == []
    tol = 1e-9 if filt == "rtf" else 1e-6
    assert (torch.cat(outs, 1) - full).abs().max() / full.abs().max() < tol


def test_left_padding_mask_gives_the_unpadded_outputs():
    """With mask 0 on 5 leading pad positions (arbitrary embeddings there), the outputs at the
    real positions equal those of the unpadded sequence (1e-12 relative, float64)."""
    op = make_op("rtf", 8, 6, 40, seed=9)
    torch.manual_seed(9)
    u = torch.randn(1, 20, 8, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 5, 8, dtype=torch.float64) * 10, u], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 20)], 1)
    ref = op(u)
    out = op(padded, mask)[:, 5:]
    assert (out - ref).abs().max() / ref.abs().max() < 1e-12
    assert (op(padded)[:, 5:] - ref).abs().max() / ref.abs().max() > 1e-3  # the mask matters


@pytest.mark.parametrize("width", [1, 3, 4])
def test_short_causal_conv_is_the_depthwise_conv1d_module(width):
    """The shifted multiply-adds compute what the nn.Conv1d they read their weights from computes
    (so checkpoints trained with either are the same model), in float64 to rounding (1e-13), and the
    decode step's one-column version gives each column from the last `width` inputs."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, kernel_size=width, groups=6, padding=width - 1).double()
    p = torch.randn(2, 6, 11, dtype=torch.float64)
    q = short_causal_conv(p, conv)
    torch.testing.assert_close(q, conv(p)[..., :11], rtol=0, atol=1e-13)
    padded = torch.nn.functional.pad(p, (width - 1, 0))
    for t in range(11):
        torch.testing.assert_close(short_conv_step(padded[..., t : t + width], conv), q[..., t], rtol=0, atol=1e-13)


@pytest.mark.parametrize("with_past", [False, True])
def test_short_causal_conv_gradients_gradcheck(with_past):
    """The taps after the first are added in place into the output (no fresh block per tap), which
    autograd must differentiate as the out-of-place sum: gradcheck in float64 (defaults: eps 1e-6,
    atol 1e-5, rtol 1e-3) against finite differences, for the input, the earlier chunk's inputs,
    the weight and the bias (read from the module as the operators pass it)."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 4, 7, generator=g, dtype=torch.float64)]  # p (B, Ch, T)
    inputs += [torch.randn(4, 1, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    if with_past:
        inputs.append(torch.randn(2, 4, 2, generator=g, dtype=torch.float64))
    inputs = [t.requires_grad_() for t in inputs]

    def f(p, weight, bias, past=None):
        return short_causal_conv(p, SimpleNamespace(weight=weight, bias=bias, kernel_size=(3,)), past)

    assert torch.autograd.gradcheck(f, tuple(inputs))
