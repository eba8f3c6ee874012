"""Tests of models/fftconv.py: the causal FFT convolution against a naive float64 sum.

    y[b, c, t] = sum_{s=0}^{t} k[c, s] u[b, c, t - s]

The reference is the O(T^2) double loop in numpy float64, written from that definition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.helpers import FFTSpy, np_causal_conv
from torch.utils._python_dispatch import TorchDispatchMode

from models.fftconv import fast_fft_size, fft_causal_conv


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


class FFTDispatchSpy(TorchDispatchMode):
    """Records (aten FFT op, transform length) and the input dtype of every FFT that actually runs,
    forward and backward: what autograd's own derivative of rfft would run (a complex-to-complex
    FFT) shows up here too, unlike in a torch-function spy."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("_fft_r2c", "_fft_c2r", "_fft_c2c"):
            # _fft_c2r's 4th argument is last_dim_size, the real length of the inverse transform
            size = args[3] if name == "_fft_c2r" else args[0].shape[-1]
            self.calls.append((name[5:], size))
            self.dtypes.append(args[0].dtype)
        return func(*args, **kwargs)


def five_smooth_up_to(limit: int) -> list[int]:
    """Every 2^a 3^b 5^c <= limit, by enumerating the exponents (not by factoring)."""
    out = []
    p2 = 1
    while p2 <= limit:
        p3 = p2
        while p3 <= limit:
            p5 = p3
            while p5 <= limit:
                out.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return sorted(out)


def test_fast_fft_size_is_the_next_five_smooth_number():
    smooth = five_smooth_up_to(5000)
    for m in range(0, 4097):
        assert fast_fft_size(m) == next(s for s in smooth if s >= max(m, 1)), m


@pytest.mark.parametrize(("T", "size"), [(64, 128), (129, 270), (1000, 2000), (2049, 4320)])
def test_forward_and_backward_run_three_real_transforms_each_of_the_fast_size(T, size):
    """The forward runs two real FFTs and one inverse real FFT, the backward one real FFT and two
    inverse real FFTs (u and k both need gradients), all of length fast_fft_size(2T - 1) (the
    expected sizes written out: 2T for T a power of two, 270 = 2 * 3^3 * 5 for 257, 4320 = 2^5 *
    3^3 * 5 for 4097), and no complex-to-complex FFT, which autograd's own derivative of rfft
    would run."""
    u = torch.randn(2, 3, T, requires_grad=True)
    k = torch.randn(3, T, requires_grad=True)
    with FFTDispatchSpy() as fwd:
        y = fft_causal_conv(u, k)
    with FFTDispatchSpy() as bwd:
        y.square().sum().backward()
    assert sorted(fwd.calls) == [("c2r", size), ("r2c", size), ("r2c", size)]
    assert sorted(bwd.calls) == [("c2r", size), ("c2r", size), ("r2c", size)]


def test_gradients_with_a_broadcast_kernel_gradcheck():
    """MultiHyena passes one filter per head, k (M, 1, T) against u (B, M, e, T): the kernel's
    gradient sums over the batch and the broadcast channels. gradcheck in float64 (defaults:
    eps 1e-6, atol 1e-5, rtol 1e-3), odd length 11, both arguments."""
    torch.manual_seed(1)
    u = torch.randn(2, 2, 3, 11, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_causal_conv, (u, k))


def test_gradients_match_the_naive_convolution_float64():
    """The written-out backward against autograd through the naive O(T^2) sum in float64 (torch
    ops on the definition, no FFT): 1e-12 relative to the largest gradient, FFT rounding being
    ~1e-15 times log2(N) times an O(10) sum-to-max ratio."""
    torch.manual_seed(2)
    T = 37
    u = torch.randn(3, 4, T, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, T, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, T, dtype=torch.float64)
    gu, gk = torch.autograd.grad(fft_causal_conv(u, k), (u, k), g)
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # [t, s] -> t - s
    toeplitz = torch.where(lag >= 0, k[:, lag.clamp_min(0)], 0.0)  # (C, T, T): k[c, t - s] for s <= t
    naive = torch.einsum("cts,bcs->bct", toeplitz, u)
    ru, rk = torch.autograd.grad(naive, (u, k), g)
    assert (gu - ru).abs().max() / ru.abs().max() < 1e-12
    assert (gk - rk).abs().max() / rk.abs().max() < 1e-12


def test_second_derivative_is_refused_not_wrong():
    """The backward uses spectra saved without a graph; asking for a second derivative must raise
    rather than silently drop the dependence of those spectra on u and k: at the create_graph
    backward itself, directly and through a whole model (a Hessian-vector product through
    inputs_embeds, which was 3.8e-3 off finite differences, with no error, before)."""
    u = torch.randn(1, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(fft_causal_conv(u, k).square().sum(), u, create_graph=True)
    from models import HyenaRTFConfig, HyenaRTFForCausalLM

    model = HyenaRTFForCausalLM(HyenaRTFConfig(vocab_size=32, d_model=8, n_layer=1, l_max=16, state_size=4))
    model = model.double().eval()
    ids = torch.randint(0, 32, (1, 10), generator=torch.Generator().manual_seed(0))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, emb, create_graph=True)
    (g,) = torch.autograd.grad(model(inputs_embeds=emb, labels=ids, use_cache=False).loss, emb)  # first: fine
    assert torch.isfinite(g).all()


def test_backward_transforms_run_in_float32_under_bf16_autocast():
    """The backward of a bf16 signal under CPU bf16 autocast also transforms in float32: the
    gradient FFT's input is float32, the inverse transforms' inputs complex64."""
    u = torch.randn(2, 8, 64).bfloat16().requires_grad_()
    k = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fft_causal_conv(u, k)
    with torch.autocast("cpu", dtype=torch.bfloat16), FFTDispatchSpy() as spy:
        y.float().sum().backward()
    assert spy.dtypes == [torch.float32, torch.complex64, torch.complex64]
    assert u.grad.dtype == torch.bfloat16
