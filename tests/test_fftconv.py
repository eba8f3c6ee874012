"""Tests of models/fftconv.py: the causal FFT convolution against a naive float64 sum.

    y[b, c, t] = sum_{s=0}^{t} k[c, s] u[b, c, t - s]

The reference is the O(T^2) double loop in numpy float64, written from that definition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FFTSpy, np_causal_conv

from hyena_rtf.models.fftconv import fft_causal_conv


def circular_conv_same_length(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A deliberately WRONG convolution (FFT size T, no zero padding): the future wraps around."""
    T = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=T) * torch.fft.rfft(k, n=T), n=T)


def max_change_before(conv, u, k, t0, seed=12345):
    """(max |change| of outputs at t < t0, max |change| at t >= t0) when the inputs at t >= t0
    are replaced by fresh random values."""
    g = torch.Generator().manual_seed(seed)
    u2 = u.clone()
    u2[..., t0:] = torch.randn(u2[..., t0:].shape, generator=g, dtype=u.dtype)
    d = (conv(u2, k) - conv(u, k)).abs()
    return d[..., :t0].max().item() if t0 > 0 else 0.0, d[..., t0:].max().item()


@pytest.mark.parametrize("T", [1, 2, 7, 64, 129])
def test_matches_naive_convolution_float64(T):
    """Float64 inputs: equal to the naive sum to 1e-12 relative to max|y|. The FFT's rounding is
    ~ eps64 log2(2T) times sum|k||u| <= ~30 max|y| here, i.e. ~1e-14; a convolution off by one tap
    or missing the zero padding differs by O(1) (checked with the circular variant)."""
    rng = np.random.default_rng(T)
    u = rng.standard_normal((2, 3, T))
    k = rng.standard_normal((3, T)) * np.exp(-0.05 * np.arange(T))
    ref = np_causal_conv(u, k)
    y = fft_causal_conv(torch.from_numpy(u), torch.from_numpy(k))
    assert y.dtype == torch.float64
    assert y.shape == (2, 3, T)
    scale = np.abs(ref).max()
    assert np.abs(y.numpy() - ref).max() / scale < 1e-12
    if T > 2:
        wrong = circular_conv_same_length(torch.from_numpy(u), torch.from_numpy(k)).numpy()
        assert np.abs(wrong - ref).max() / scale > 1e-2


def test_matches_naive_convolution_float32_and_returns_input_dtype():
    """Float32 and bf16 signals: output in the signal's dtype, matching the float64 reference to
    float32 rounding (1e-5 relative: eps32 1.2e-7 times log2(2T) and the O(10) ratio of
    sum|k||u| to max|y|) and bf16 output rounding (1e-2: bf16 has 8 bits of mantissa, 3.9e-3)."""
    rng = np.random.default_rng(0)
    u = rng.standard_normal((2, 4, 200))
    k = rng.standard_normal((4, 200)) * np.exp(-0.02 * np.arange(200))
    ref = np_causal_conv(u, k)
    scale = np.abs(ref).max()
    y32 = fft_causal_conv(torch.from_numpy(u).float(), torch.from_numpy(k).float())
    assert y32.dtype == torch.float32
    assert np.abs(y32.double().numpy() - ref).max() / scale < 1e-5
    ub = torch.from_numpy(u).bfloat16()
    y16 = fft_causal_conv(ub, torch.from_numpy(k).float())
    assert y16.dtype == torch.bfloat16
    ref16 = np_causal_conv(ub.double().numpy(), k)  # the bf16-rounded input is what it sees
    assert np.abs(y16.double().numpy() - ref16).max() / scale < 1e-2


@pytest.mark.parametrize("t0", [0, 1, 50, 99])
def test_causality(t0):
    """Changing inputs at t >= t0 leaves outputs at t < t0 unchanged (to float64 rounding, 1e-12
    relative: an FFT spreads rounding over all outputs, so exact equality cannot be asked) and
    does change outputs at t >= t0. The same check flags the circular (unpadded) convolution,
    whose outputs before t0 move by O(1)."""
    torch.manual_seed(t0)
    u = torch.randn(2, 3, 100, dtype=torch.float64)
    k = torch.randn(3, 100, dtype=torch.float64)
    before, after = max_change_before(fft_causal_conv, u, k, t0)
    assert before <= 1e-12 * after
    assert after > 1e-2
    if t0 > 0:
        wrong_before, _ = max_change_before(circular_conv_same_length, u, k, t0)
        assert wrong_before > 1e-2


def test_gradcheck():
    """torch.autograd.gradcheck in float64 (defaults: eps 1e-6, atol 1e-5, rtol 1e-3) with
    respect to both the signal and the kernel, odd length 9."""
    torch.manual_seed(0)
    u = torch.randn(2, 2, 9, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_causal_conv, (u, k))


def test_fft_runs_in_float32_under_bf16_autocast():
    """Under CPU bf16 autocast, a bf16 signal and a float32 kernel are transformed in float32
    (rfft inputs float32, irfft input complex64), output bf16 and finite."""
    u = torch.randn(2, 8, 64).bfloat16()
    k = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16), FFTSpy() as spy:
        y = fft_causal_conv(u, k)
    assert spy.dtypes == [torch.float32, torch.float32, torch.complex64]
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y.float()).all()


def test_kernel_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="kernel length"):
        fft_causal_conv(torch.randn(1, 2, 10), torch.randn(2, 9))
