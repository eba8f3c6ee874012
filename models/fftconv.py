"""Causal long convolution by FFT.

    y[b, c, t] = sum_{s=0}^{t} k[c, s] u[b, c, t - s]

computed as irfft(rfft(u, N) * rfft(k, N))[:T]. Any N >= 2T - 1 makes the circular convolution
equal the linear one on the first T outputs (the taps that wrap around land on zero padding), so
N is the smallest 5-smooth size (prime factors 2, 3, 5 only, which every FFT library handles at
full speed) >= 2T - 1: 2T for a power-of-two T, and no slow prime-length transform otherwise.
A symbolic T under torch.export (a dynamic length) gets N = 2T instead (`fft_size`): exact for
every length the exported graph will see, where searching for the 5-smooth size would pin the
graph to the traced length.

torch.fft has no bf16 path and B/A-style spectra are badly conditioned, so the transform always
runs in float32 (float64 inputs stay float64) with autocast off, and the result is cast back to
the input dtype.

Backward is written out (`_CausalFFTConv`), with the spectra of u and k saved from the forward:

    grad_u[b, c, s] = sum_{t >= s} g[b, c, t] k[c, t - s]  = irfft(rfft(g, N) * conj(rfft(k, N)))[:T]
    grad_k[c, s]    = sum_b sum_{t >= s} g[b, c, t] u[b, c, t - s]
                    = irfft(sum_b rfft(g, N) * conj(rfft(u, N)))[:T]

(circular correlations; with N >= 2T - 1 the lags that wrap around again meet only zero padding).
That is one real FFT and two inverse real FFTs, against autograd's own derivative of the forward,
which zero-fills a size-N gradient for the slice and differentiates each rfft by a complex FFT of
the full size: on CPU the backward took about twice the forward before this.
"""

from __future__ import annotations

import functools

import torch
from torch.fft import irfft, rfft


@functools.lru_cache(maxsize=256)
def fast_fft_size(m: int) -> int:
    """Smallest n >= max(m, 1) of the form 2^a 3^b 5^c."""
    n = max(int(m), 1)
    while True:
        r = n
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return n
        n += 1


def fft_size(T: int | torch.SymInt) -> int | torch.SymInt:
    """The transform size for a causal convolution of length T: fast_fft_size(2T - 1) for a concrete
    T; 2T for a symbolic one under torch.export. Any size >= 2T - 1 is exact; the search for a
    5-smooth size branches on T's value (the exported graph would be pinned to one length) and is
    memoised, which a symbolic int cannot be (it is unhashable). torch.compile keeps the search: it
    traces through the memo and recompiles per length, with fast transform sizes."""
    if isinstance(T, torch.SymInt) and torch.compiler.is_exporting():
        return 2 * T
    return fast_fft_size(2 * T - 1)


class _CausalFFTConv(torch.autograd.Function):
    """y = irfft(rfft(u, N) * rfft(k, N), N)[..., :T] with the backward of the module docstring.
    u and k are float32 or float64 already (the caller casts); k broadcasts against u."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        T = u.shape[-1]
        u_f, k_f = rfft(u, n=n), rfft(k, n=n)
        ctx.fft_size, ctx.length = n, T
        if not any(ctx.needs_input_grad[:2]) and u_f.shape == torch.broadcast_shapes(u_f.shape, k_f.shape):
            # Inference: nothing to save, so the product goes into u's spectrum (one fresh block
            # of memory fewer per call, see models/hyena.py short_causal_conv).
            return irfft(u_f.mul_(k_f), n=n)[..., :T].contiguous()
        ctx.save_for_backward(u_f, k_f)
        # Contiguous: the gate multiplies (and saves) y, and a view would keep all N columns alive.
        return irfft(u_f * k_f, n=n)[..., :T].contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is being built
            # The saved spectra carry no graph, so the second derivative would silently miss every
            # term through them (3.8e-3 off finite differences on a float64 model): refuse instead.
            raise RuntimeError(
                "fft_causal_conv has no second derivative (create_graph=True, e.g. a Hessian-vector "
                "product or a gradient penalty): differentiate once, or use finite differences of gradients"
            )
        u_f, k_f = ctx.saved_tensors
        n, T = ctx.fft_size, ctx.length
        with torch.autocast(g.device.type, enabled=False):
            g_f = rfft(g.to(u_f.real.dtype), n=n)
            grad_u = grad_k = None
            if ctx.needs_input_grad[0]:
                grad_u = irfft((g_f * k_f.conj()).sum_to_size(u_f.shape), n=n)[..., :T]
            if ctx.needs_input_grad[1]:
                grad_k = irfft((g_f * u_f.conj()).sum_to_size(k_f.shape), n=n)[..., :T]
        return grad_u, grad_k, None


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """u: (B, C, T) signal, k: (C, T) kernel (tap 0 is the feed-through) -> (B, C, T), dtype of u.
    k may be any shape that broadcasts against u (MultiHyena passes one filter per head)."""
    T = u.shape[-1]
    if k.shape[-1] != T:
        raise ValueError(f"kernel length {k.shape[-1]} != signal length {T}")
    dtype = torch.float64 if torch.float64 in (u.dtype, k.dtype) else torch.float32
    with torch.autocast(u.device.type, enabled=False):
        y = _CausalFFTConv.apply(u.to(dtype), k.to(dtype), fft_size(T))
    return y.to(u.dtype)
