"""Rational Transfer Function (RTF) long-convolution filter: kernel, recurrence, prefill.

Each filter is a rational transfer function of order n (the state size)

    H(z) = h0 + (b1 z^-1 + ... + bn z^-n) / (1 + a1 z^-1 + ... + an z^-n)

with learned denominator `a` (monic, shared by groups of filters), strictly proper numerator `b`
and feed-through `h0`: 2n + 1 numbers per filter.

Kernel (training).  Sampling H on the L' roots of unity (L' = l_max rounded up to even) and taking
one inverse rfft gives, for t < L', the L'-periodic aliasing of the impulse response. Its cost is
O(L' log L') per filter and does not depend on n: there is no state.

What that kernel exactly is.  With the companion realisation (A, e1, b, h0),

    A = [[-a1 ... -an], [I_{n-1}  0]],    x_{t+1} = A x_t + e1 u_t,    y_t = b . x_t + h0 u_t,

the aliased response sum_m h[t + m L'] equals, for 1 <= t < L', C A^(t-1) e1 with the ROW vector

    C = b (I - A^L')^-1             (solve (I - A^L')^T C^T = b^T),

and tap 0 equals h0_eff = h0 + C A^(L'-1) e1. So the kernel the network is trained with is the
exact truncated impulse response of the "corrected" system (a, C, h0_eff). That system is what the
recurrence runs (O(n) per token) and what the parallel form uses beyond l_max.

Recurrence (companion form).  The state is the delay line of v = u / A(z):

    y_t     = C . x_t + h0_eff u_t
    x_{t+1} = [u_t - a . x_t, x_t[0], ..., x_t[n-2]]

Prefill.  The state after T inputs, x_T = (v_{T-1}, ..., v_{T-n}), comes from one circular
deconvolution of size N = L' (v~ = irfft(rfft(u, N) / rfft([1, a], N))). The circular solution is
the periodic one; with zero input on [T, N) it satisfies x~_T = (I - A^N)^-1 x_T exactly, so

    x_T = (I - A^N) x~_T,

no aliasing error whatever the pole radius. Inputs longer than N are processed in chunks of N,
carrying the state by turning it into an equivalent input on the first n steps of the next chunk.

Precision.  The kernel and spectra are computed in float32 (complex64) or in the parameters' dtype
if that is wider; the corrected system is built in float64; the recurrent state is float32 or
wider, whatever dtype the activations use.

Derivations: docs/mathematics.md of the Hyena-RTF repository (section 1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fft import irfft, rfft

from .precision import Float32Parameters

INITS = ("zeros", "xavier", "montel")
CONSTRAINTS = ("none", "l1_montel")


def fft_length(l_max: int) -> int:
    """L', the kernel FFT size of a filter trained at length l_max: l_max rounded up to even."""
    return l_max + (l_max % 2)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is promoted to float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def companion(a: torch.Tensor) -> torch.Tensor:
    """Companion matrices of monic denominators. a: (..., n) -> (..., n, n), first row -a."""
    n = a.shape[-1]
    A = torch.zeros(*a.shape, n, dtype=a.dtype, device=a.device)
    A[..., 0, :] = -a
    if n > 1:
        idx = torch.arange(n - 1, device=a.device)
        A[..., idx + 1, idx] = 1.0
    return A


def rational_kernel(num: torch.Tensor, a: torch.Tensor, h0: torch.Tensor, fft_len: int) -> torch.Tensor:
    """Length-`fft_len` aliased impulse response of h0 + num(z)/A(z) by one rfft per polynomial.

    num: (H, n) strictly proper numerator, a: (H, n) monic denominator, h0: (H,).
    Returns (H, fft_len). Everything in the dtype of `num`.
    """
    H, n = num.shape
    zero = num.new_zeros(H, 1)
    num_f = rfft(torch.cat([zero, num], -1), n=fft_len)  # (H, fft_len/2 + 1)
    den_f = rfft(torch.cat([torch.ones_like(zero), a], -1), n=fft_len)
    return irfft(num_f / den_f + h0[:, None], n=fft_len)


@dataclass
class RTFRecurrence:
    """The corrected companion system of every channel, ready for stepping and prefill.

    a: (C, n) denominator, c: (C, n) corrected numerator (row form), h0: (C,) effective feed-through,
    m: (C, n, n) the prefill matrix I - A^N for N = fft_len, fft_len: the N used by `prefill`.
    """

    a: torch.Tensor
    c: torch.Tensor
    h0: torch.Tensor
    m: torch.Tensor
    fft_len: int

    @property
    def state_size(self) -> int:
        return self.a.shape[-1]

    def to(self, dtype: torch.dtype) -> RTFRecurrence:
        return RTFRecurrence(self.a.to(dtype), self.c.to(dtype), self.h0.to(dtype), self.m.to(dtype), self.fft_len)

    def step(self, u: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token. u: (B, C), x: (B, C, n) -> y: (B, C), next x: (B, C, n). O(n) per channel."""
        u = u.to(x.dtype)
        y = (x * self.c).sum(-1) + self.h0 * u
        v = u - (x * self.a).sum(-1)
        return y, torch.cat([v.unsqueeze(-1), x[..., :-1]], dim=-1)

    def prefill(self, u: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """State after all of u (B, C, T), starting from x0 (B, C, n) or zero. Returns (B, C, n).

        Exact up to rounding for any T, provided A(z) has no zero on the N-th roots of unity
        (true when every pole lies strictly inside the unit disk).
        """
        with torch.autocast(u.device.type, enabled=False):  # the matmuls below must stay float32+
            return self._prefill(u, x0)

    def _prefill(self, u: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
        B, C, T = u.shape
        n, N = self.state_size, self.fft_len
        u = u.to(self.a.dtype)
        den_f = rfft(torch.cat([torch.ones_like(self.a[:, :1]), self.a], -1), n=N)  # (C, N/2+1)
        x = x0.to(self.a.dtype) if x0 is not None else None
        for start in range(0, T, N):
            chunk = u[..., start : start + N]
            Tc = chunk.shape[-1]
            if x is not None:
                # Initial state (v_{-1}, ..., v_{-n}) acts on v_t, t < n, as the extra input
                # w_t = -sum_{j} a_{t+j+1} v_{-(j+1)}: a Hankel product.
                a_pad = torch.cat([self.a, torch.zeros_like(self.a)], -1)  # (C, 2n)
                hankel = a_pad.unfold(-1, n, 1)[:, :n, :]  # (C, n, n): [t, j] -> a_{t+j+1}
                w = -(hankel @ x.unsqueeze(-1)).squeeze(-1)  # (B, C, n)
                k = min(n, Tc)  # inputs after Tc must stay zero for the exact prefill identity
                chunk = torch.cat([chunk[..., :k] + w[..., :k], chunk[..., k:]], -1)
            v = irfft(rfft(chunk, n=N) / den_f, n=N)  # periodic solution, (B, C, N)
            idx = (Tc - 1 - torch.arange(n, device=u.device)) % N
            x_new = (self.m @ v[..., idx].unsqueeze(-1)).squeeze(-1)  # (B, C, n)
            if x is not None and Tc < n:
                # Entries of the delay line older than this chunk are the old state, shifted.
                x_new = x_new + torch.nn.functional.pad(x[..., : n - Tc], (Tc, 0))
            x = x_new
        return x if x is not None else u.new_zeros(B, C, n)


class RTF(Float32Parameters):
    """A bank of RTF filters expanded to `channels` channels (filter i serves channels
    [i * channels/num_filters, (i+1) * channels/num_filters)).

    Args:
        channels: number of convolved channels (d_model in Hyena).
        state_size: n, the order of numerator and denominator.
        l_max: the training length; the kernel FFT size is L' = l_max rounded up to even.
        num_filters: distinct filters (None: one per channel; fewer ties filters across channels).
        num_a: distinct denominators shared by groups of filters (None: one per filter).
        init: "zeros" (identity: a = b = 0, h0 = 1), "xavier" (a, b ~ U(+-1/sqrt(n))) or
            "montel" (xavier, then a rescaled to sum|a| = 1/2 so every pole starts inside |z| < 1).
        constraint: "none" or "l1_montel": a <- a / (sum|a| + |s| + eps) with a learnable slack s,
            which keeps sum|a| < 1 and hence every pole inside the unit disk.
        kernel_dtype: "float32" or "float64", the precision of the FFT that turns (a, b, h0) into
            the kernel (parameters stay float32 either way). Dividing by A(z) on the unit circle
            loses about log10 of its condition digits; slow poles clustered near z = 1, which
            distilled filters have, need float64 there for the parallel form to match the
            recurrence (built in float64 regardless).
    """

    def __init__(
        self,
        channels: int,
        state_size: int,
        l_max: int,
        num_filters: int | None = None,
        num_a: int | None = None,
        init: str = "xavier",
        constraint: str = "l1_montel",
        eps: float = 1e-4,
        kernel_dtype: str = "float32",
    ):
        super().__init__()
        num_filters = num_filters or channels
        num_a = num_a or num_filters
        if init not in INITS:
            raise ValueError(f"rtf init must be one of {INITS}, got {init!r}")
        if constraint not in CONSTRAINTS:
            raise ValueError(f"rtf constraint must be one of {CONSTRAINTS}, got {constraint!r}")
        if channels % num_filters or num_filters % num_a:
            raise ValueError(
                f"need channels ({channels}) % num_filters ({num_filters}) == 0 and num_filters % num_a ({num_a}) == 0"
            )
        if not 1 <= state_size < l_max:
            raise ValueError(f"state_size must be in [1, l_max), got {state_size} with l_max {l_max}")
        self.channels, self.num_filters, self.num_a = channels, num_filters, num_a
        self.state_size, self.l_max = state_size, l_max
        self.fft_len = fft_length(l_max)
        if kernel_dtype not in ("float32", "float64"):
            raise ValueError(f"rtf kernel_dtype must be 'float32' or 'float64', got {kernel_dtype!r}")
        self.constraint, self.eps, self.kernel_dtype = constraint, eps, kernel_dtype
        n = state_size
        self.a = nn.Parameter(torch.zeros(num_a, n))
        self.b = nn.Parameter(torch.zeros(num_filters, n))
        self.h0 = nn.Parameter(torch.ones(num_filters))
        if constraint == "l1_montel":
            self.slack = nn.Parameter(torch.ones(num_a))
        if init != "zeros":
            bound = 1.0 / math.sqrt(n)
            nn.init.uniform_(self.a, -bound, bound)
            nn.init.uniform_(self.b, -bound, bound)
            nn.init.uniform_(self.h0, -1.0, 1.0)
        if init == "montel":
            with torch.no_grad():
                self.a.mul_(0.5 / self.a.abs().sum(-1, keepdim=True).clamp_min(1e-12))
        self._recurrence_cache: tuple | None = None

    # ---- parameters as the filters see them ---------------------------------------------------
    def denominator(self) -> torch.Tensor:
        """Constrained denominators, one row per filter: (num_filters, n), compute dtype."""
        a = self.a.to(compute_dtype(self.a))
        if self.constraint == "l1_montel":
            a = a / (a.abs().sum(-1, keepdim=True) + self.slack.to(a.dtype).abs()[:, None] + self.eps)
        return a.repeat_interleave(self.num_filters // self.num_a, dim=0)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        """Filter-level tensor (num_filters, ...) -> channel-level (channels, ...)."""
        return t.repeat_interleave(self.channels // self.num_filters, dim=0)

    # ---- parallel form ------------------------------------------------------------------------
    def kernel(self, T: int) -> torch.Tensor:
        """Convolution kernel of length T, (channels, T), in float32 (float64 for float64 params).

        T <= l_max: the first T taps of the length-L' FFT kernel (what training uses).
        T >  l_max: the impulse response of the same corrected system, built from a small n x n
        float64 solve (see `_long_kernel`), so parallel and recurrent forms agree everywhere.
        """
        with torch.autocast(self.a.device.type, enabled=False):
            if T <= self.l_max:
                a = self.denominator()
                if self.kernel_dtype == "float64":
                    a = a.to(torch.float64)
                k = rational_kernel(self.b.to(a.dtype), a, self.h0.to(a.dtype), self.fft_len)[:, :T]
                k = k.to(compute_dtype(self.a))
            else:
                k = self._long_kernel(T).to(compute_dtype(self.a))
        return self._expand(k)

    def _long_kernel(self, T: int) -> torch.Tensor:
        """Kernel of the corrected system (a, C, h0_eff) for T > l_max, (num_filters, T), float64.

        A size-N FFT of numerator c' aliases it to c' (I - A^N)^-1 A^(t-1) e1; choosing
        c' = C (I - A^N) cancels that, so taps 1..T-1 are exactly C A^(t-1) e1. Tap 0 is h0_eff.
        """
        a, c, h0, _ = self._corrected_system()
        N = T + (T % 2)
        eye = torch.eye(self.state_size, dtype=a.dtype, device=a.device)
        c_n = (c.unsqueeze(-2) @ (eye - torch.linalg.matrix_power(companion(a), N))).squeeze(-2)
        k = rational_kernel(c_n, a, torch.zeros_like(h0), N)[:, :T]
        return torch.cat([h0[:, None], k[:, 1:]], dim=-1)

    # ---- recurrent form -----------------------------------------------------------------------
    def _corrected_system(self):
        """(a, C, h0_eff, I - A^L') per filter in float64. C solves (I - A^L')^T C^T = b^T."""
        a = self.denominator().to(torch.float64)
        b = self.b.to(torch.float64)
        A = companion(a)
        eye = torch.eye(self.state_size, dtype=torch.float64, device=a.device)
        A_pow = torch.linalg.matrix_power(A, self.fft_len - 1)  # A^(L'-1)
        m = eye - A @ A_pow  # I - A^L'
        c = torch.linalg.solve(m.transpose(-1, -2), b.unsqueeze(-1)).squeeze(-1)
        h0 = self.h0.to(torch.float64) + (c.unsqueeze(-2) @ A_pow[..., :, 0:1]).squeeze(-1).squeeze(-1)
        return a, c, h0, m

    def pole_radius(self) -> torch.Tensor:
        """Largest |pole| of each filter, (num_filters,), float64 (roots of z^n + a1 z^(n-1) + ...)."""
        return torch.linalg.eigvals(companion(self.denominator().detach().double())).abs().amax(-1)

    @torch.no_grad()
    def recurrence(self, dtype: torch.dtype = torch.float32, check: str = "error") -> RTFRecurrence:
        """The channel-level recurrent form (memoised until the parameter values change).

        check: "error" (default) refuses a filter with a pole on or outside the unit circle, "warn"
        warns, "none" skips the check. Such a filter's FFT kernel is the aliased response of an
        unstable system and its recurrence diverges past l_max.
        """
        # Keyed on the parameter values themselves: optimizers (DeepSpeed ZeRO among them) may
        # write through `.data`, which changes neither the version counter nor the address.
        params = [p.detach() for p in self.parameters()]
        memo = self._recurrence_cache
        if (
            memo is not None
            and memo[0] == (dtype, check)
            and len(memo[1]) == len(params)
            and all(m.device == p.device and torch.equal(m, p) for m, p in zip(memo[1], params))
        ):
            return memo[2]
        if check != "none":
            radius = self.pole_radius()
            if (radius >= 1.0).any():
                bad = torch.nonzero(radius >= 1.0).flatten().tolist()
                msg = (
                    f"RTF filters {bad[:8]}{'...' if len(bad) > 8 else ''} have poles on or outside the "
                    f"unit circle (max |pole| = {radius.max().item():.4f}): their recurrent form diverges. "
                    "Train with rtf_constraint='l1_montel' (keeps every pole inside the unit disk), or "
                    "decode with the parallel forward (use_cache=False)."
                )
                if check == "error":
                    raise ValueError(msg)
                warnings.warn(msg, stacklevel=2)
        a, c, h0, m = self._corrected_system()
        rec = RTFRecurrence(self._expand(a), self._expand(c), self._expand(h0), self._expand(m), self.fft_len)
        rec = rec.to(dtype)
        self._recurrence_cache = ((dtype, check), [p.clone() for p in params], rec)
        return rec

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, filters={self.num_filters}, num_a={self.num_a}, "
            f"state_size={self.state_size}, l_max={self.l_max}, constraint={self.constraint}"
        )
