"""Causal long convolution by FFT.

    y[b, c, t] = sum_{s=0}^{t} k[c, s] u[b, c, t - s]

computed as irfft(rfft(u, N) * rfft(k, N))[:T] with N = 2T: zero padding to twice the length makes
the circular convolution equal the linear one on the first T outputs, so nothing from the future
wraps around. torch.fft has no bf16 path and B/A-style spectra are badly conditioned, so the
transform always runs in float32 (float64 inputs stay float64) with autocast off, and the result
is cast back to the input dtype.
"""

import torch
from torch.fft import irfft, rfft


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """u: (B, C, T) signal, k: (C, T) kernel (tap 0 is the feed-through) -> (B, C, T), dtype of u."""
    T = u.shape[-1]
    if k.shape[-1] != T:
        raise ValueError(f"kernel length {k.shape[-1]} != signal length {T}")
    dtype = torch.float64 if torch.float64 in (u.dtype, k.dtype) else torch.float32
    N = 2 * T
    with torch.autocast(u.device.type, enabled=False):
        y = irfft(rfft(u.to(dtype), n=N) * rfft(k.to(dtype), n=N), n=N)[..., :T]
    return y.to(u.dtype)
