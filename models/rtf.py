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

    C = b (I - A^L')^-1,

and tap 0 equals h0_eff = h0 + C A^(L'-1) e1. So the kernel the network is trained with is the
exact truncated impulse response of the "corrected" system (a, C, h0_eff). That system is what the
recurrence runs (O(n) per token) and what the parallel form uses beyond l_max.

Building it without n x n matrices (models/polynomial.py).  A^N = r(A) with r = z^N mod A(z)
(Cayley-Hamilton), and a row vector times p(A) is a product modulo A(z). So r costs log2(L')
polynomial squarings, C = b prod_k (I + A^(L' 2^k)) is a few more (the factors converge doubly
exponentially when every pole is inside the unit disk), and h0_eff one: O(n log n log L') per
filter, memory O(n) per filter.

Recurrence (companion form).  The state is the delay line of v = u / A(z):

    y_t     = C . x_t + h0_eff u_t
    x_{t+1} = [u_t - a . x_t, x_t[0], ..., x_t[n-2]]

Prefill.  The state after T inputs, x_T = (v_{T-1}, ..., v_{T-n}), comes from one circular
deconvolution of size N = L' (v~ = irfft(rfft(u, N) / rfft([1, a], N))). The circular solution is
the periodic one; with zero input on [T, N) it satisfies x~_T = (I - A^N)^-1 x_T exactly, so

    x_T = (I - A^N) x~_T = x~_T - sum_k r_k A^k x~_T,

no aliasing error whatever the pole radius. A^k x~_T is x~ run k steps further with no input,
which v~ itself holds when at least n - 1 zeros follow the input: the correction is one
correlation of r with 2n - 1 values of v~. Inputs longer than N - n + 1 are processed in chunks of
that size, carrying the state by turning it into an equivalent input on the first n steps of the
next chunk.

Precision.  The kernel and spectra are computed in float32 (complex64) or in the parameters' dtype
if that is wider; the corrected system is built in float64; the recurrent state is float32 or
wider, whatever dtype the activations use.

Derivations: docs/mathematics.md of the Hyena-RTF repository (sections 1.3 to 1.7).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fft import irfft, rfft

from .polynomial import Modulus, fft_size, max_root_modulus, poly_mul, schur_stable
from .precision import Float32Parameters

INITS = ("zeros", "xavier", "montel")
CONSTRAINTS = ("none", "l1_montel")
# Self-checks of the polynomial build of the corrected system (`corrected_system`): a filter
# whose two squaring chains for z^L' mod A(z) differ by more than CHAIN_TOL (absolute, against the
# identity they are subtracted from), or whose C leaves a relative residual |b - C (I - A^L')| above
# RESIDUAL_TOL, takes the aliased-kernel route instead (observed on well-conditioned filters:
# up to 2e-13 for the chains and 3e-15 for the residual; up to 3e-8 on clustered slow poles).
CHAIN_TOL, RESIDUAL_TOL = 1e-12, 1e-12
BLOCK_ELEMENTS = 2**16  # filters per block of the build x FFT size: keeps its working set in L2


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


def state_as_input(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The input w (..., n) on steps 0..n-1 that, from a zero state, has the same future as the
    state x = (v_{-1}, ..., v_{-n}) with no input: w_t = -sum_j a_{t+j+1} x_j (a Hankel product,
    computed as one correlation). a: (C, n), x: (..., C, n)."""
    n = a.shape[-1]
    return -poly_mul(a, x.flip(-1), 2 * n - 1)[..., n - 1 :]


@dataclass
class RTFRecurrence:
    """The corrected companion system of every channel, ready for stepping and prefill.

    a: (C, n) denominator, c: (C, n) corrected numerator (row form), h0: (C,) effective feed-through,
    r: (C, n) the coefficients of z^N mod A(z), ascending (A^N = r(A)), for N = fft_len, the FFT
    size `prefill` uses. Nothing here is n x n: memory O(C n).
    """

    a: torch.Tensor
    c: torch.Tensor
    h0: torch.Tensor
    r: torch.Tensor
    fft_len: int

    @property
    def state_size(self) -> int:
        return self.a.shape[-1]

    def to(self, dtype: torch.dtype) -> RTFRecurrence:
        return RTFRecurrence(self.a.to(dtype), self.c.to(dtype), self.h0.to(dtype), self.r.to(dtype), self.fft_len)

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
        with torch.autocast(u.device.type, enabled=False):  # the FFTs below must stay float32+
            return self._prefill(u, x0)

    def _prefill(self, u: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
        B, C, T = u.shape
        n, N = self.state_size, self.fft_len
        # A chunk of at most N - n + 1 inputs leaves >= n - 1 zero inputs before the period ends,
        # so v~ after the chunk is the free run of the state (what r(A) x~ reads, below).
        chunk_len = N - n + 1
        u = u.to(self.a.dtype)
        den_f = rfft(torch.cat([torch.ones_like(self.a[:, :1]), self.a], -1), n=N)  # (C, N/2+1)
        window = torch.arange(-n, n - 1, device=u.device)  # offsets of v~_{T-n} .. v~_{T+n-2}
        x = x0.to(self.a.dtype) if x0 is not None else None
        for start in range(0, T, chunk_len):
            chunk = u[..., start : start + chunk_len]
            Tc = chunk.shape[-1]
            if x is not None:
                w = state_as_input(self.a, x)  # (B, C, n)
                k = min(n, Tc)  # inputs after Tc must stay zero for the exact prefill identity
                chunk = torch.cat([chunk[..., :k] + w[..., :k], chunk[..., k:]], -1)
            v = irfft(rfft(chunk, n=N) / den_f, n=N)  # periodic solution, (B, C, N)
            s = v[..., (Tc + window) % N]  # s_j = v~_{Tc-n+j}, j = 0..2n-2
            # x~_i = s_{n-1-i}; (A^k x~)_i = s_{n-1-i+k}, so (r(A) x~)_i = sum_k r_k s_{n-1-i+k}:
            # with i' = n-1-i a correlation of s with r, i.e. a product with r reversed.
            corr = poly_mul(self.r.flip(-1), s, 2 * n - 1)[..., n - 1 :]  # index i'
            x_new = (s[..., :n] - corr).flip(-1)  # x~ - r(A) x~ = (I - A^N) x~, (B, C, n)
            if x is not None and Tc < n:
                # Entries of the delay line older than this chunk are the old state, shifted.
                x_new = x_new + torch.nn.functional.pad(x[..., : n - Tc], (Tc, 0))
            x = x_new
        return x if x is not None else u.new_zeros(B, C, n)


def corrected_system(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, fft_len: int):
    """(C, h0_eff, r, converged) of filters (a, b, h0): a, b (F, n), h0 (F,), float64 -> C, r (F, n),
    h0_eff, converged (F,). With N = fft_len and the ring modulo A(z) (models/polynomial.py):

        r_1 = z^(N-1) mod A,  r = z^N mod A        (A^k = (z^k mod A)(A); log2 N squarings each)
        C      = b (I - r(A))^-1 = b prod_k (I + r(A)^(2^k))     (row vector)
        h0_eff = h0 + (C r_1(A))_0 = h0 + C A^(N-1) e1

    The factors A^(N 2^k) vanish doubly exponentially when every pole is inside the unit disk;
    `converged` is False where they did not (a pole on or outside the circle, or powers lost to
    rounding). Squaring modulo A(z) rounds like a matrix product only while A's coefficients are
    tame; for clustered slow poles the quotients grow and digits are lost. So the build checks
    itself: r also comes from the chain of N - 1 (no shared intermediate power), and C must satisfy
    C (I - r(A)) = b. A filter that fails a check (CHAIN_TOL, RESIDUAL_TOL) or did not converge gets
    its corrected system from its aliased kernel instead: taps 1..n of the size-N FFT kernel K are
    C A^(t-1) e1, the first n coefficients of C(z) / A_rev(z) with C(z) = sum_i C_i z^i, so
    C = A_rev K[1:n+1] mod z^n and h0_eff = K[0], exact up to the FFT's rounding whenever A(z) has
    no zero on the N-th roots of unity (O(N log N), for those filters only). Filters go in blocks
    of BLOCK_ELEMENTS // (FFT size) rows, so that the small FFTs stay in cache.
    """
    n = a.shape[-1]
    rows = max(1, BLOCK_ELEMENTS // fft_size(2 * n - 1))
    if a.shape[0] > rows:
        parts = [corrected_system(*(t[i : i + rows] for t in (a, b, h0)), fft_len) for i in range(0, a.shape[0], rows)]
        return tuple(torch.cat(p) for p in zip(*parts))
    mod = Modulus(a)
    r_1, r = mod.power_of_z(fft_len - 1), mod.power_of_z(fft_len)
    c, converged = mod.row_resolvent(b, r)
    h0_eff = h0 + mod.row_times(c, r_1)[:, 0]
    chain = (mod.times_z(r_1) - r).abs().amax(-1)
    residual = (b - c + mod.row_times(c, r)).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-300)
    bad = ~(converged & (chain <= CHAIN_TOL) & (residual <= RESIDUAL_TOL))  # NaN counts as bad
    if bool(bad.any()):
        k = rational_kernel(b[bad], a[bad], h0[bad], fft_len)
        c = c.index_put((bad,), poly_mul(torch.cat([torch.ones_like(k[:, :1]), a[bad]], -1), k[:, 1 : n + 1], n))
        h0_eff = h0_eff.index_put((bad,), k[:, 0])
    return c, h0_eff, r, converged


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
        T >  l_max: the impulse response of the same corrected system, built in float64 from
        polynomials modulo A(z) (see `_long_kernel`), so parallel and recurrent forms agree everywhere.
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
        c' = C (I - A^N) = C - C r(A), r = z^N mod A(z), cancels that, so taps 1..T-1 are exactly
        C A^(t-1) e1. Tap 0 is h0_eff. Differentiable (the gradient tests go through it).
        """
        a, c, h0, _, _ = self._corrected_system()
        N = T + (T % 2)
        mod = Modulus(a)
        c_n = c - mod.row_times(c, mod.power_of_z(N))
        k = rational_kernel(c_n, a, torch.zeros_like(h0), N)[:, :T]
        return torch.cat([h0[:, None], k[:, 1:]], dim=-1)

    # ---- recurrent form -----------------------------------------------------------------------
    def _corrected_system(self):
        """(a, C, h0_eff, r, converged) per filter in float64 (`corrected_system`)."""
        a = self.denominator().to(torch.float64)
        return (a, *corrected_system(a, self.b.to(torch.float64), self.h0.to(torch.float64), self.fft_len))

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
        a, c, h0, r, converged = self._corrected_system()
        # A filter whose powers A^(N 2^k) vanished has every pole inside the disk; the others are
        # decided by the Schur-Cohn test (O(n^2), no eigenvalues): stable but ill-conditioned
        # filters pass (their corrected system came from the kernel), unstable ones do not.
        unstable = torch.zeros_like(converged)
        if not bool(converged.all()):
            unstable[~converged] = ~schur_stable(a[~converged], 1.0)
        if check != "none" and bool(unstable.any()):
            bad = torch.nonzero(unstable).flatten().tolist()
            radius = max_root_modulus(a[unstable]).max().item()  # bisection on Schur-Cohn
            msg = (
                f"RTF filters {bad[:8]}{'...' if len(bad) > 8 else ''} have poles on or outside the "
                f"unit circle (max |pole| = {radius:.4f}): their recurrent form diverges. "
                "Train with rtf_constraint='l1_montel' (keeps every pole inside the unit disk), or "
                "decode with the parallel forward (use_cache=False)."
            )
            if check == "error":
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        # Cast per filter, then expand: the channel-level copies are made once, in the target dtype.
        a, c, h0, r = (t.to(dtype) for t in (a, c, h0, r))
        rec = RTFRecurrence(self._expand(a), self._expand(c), self._expand(h0), self._expand(r), self.fft_len)
        self._recurrence_cache = ((dtype, check), [p.clone() for p in params], rec)
        return rec

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, filters={self.num_filters}, num_a={self.num_a}, "
            f"state_size={self.state_size}, l_max={self.l_max}, constraint={self.constraint}"
        )
