"""Polynomial arithmetic behind the RTF companion form, batched over filters, with no n x n matrix.

A denominator is the row a = (a1, ..., an) of the monic polynomial

    A(z) = z^n + a1 z^(n-1) + ... + an,          A = companion(a): first row -a, ones below the diagonal.

Polynomials of degree < n are tensors (..., n) of their coefficients in ASCENDING powers
(p[..., k] multiplies z^k). What this module gives, for a batch of denominators (F, n):

- `poly_mul(x, y, m)`: the first m coefficients of x y, by one zero-padded float FFT;
- `series_inverse(p, m)`: the first m coefficients of the power series 1 / p(z) (p(0) = 1);
- `Modulus(a)`: arithmetic in the quotient ring modulo A(z): products, z^N mod A(z), and the
  companion matrix acting on ROW vectors through that ring (no matrix is formed);
- `schur_stable(a, r_max)`, `max_root_modulus(a)`: the Schur-Cohn test for "every root of A(z)
  has modulus < r_max", and the largest root modulus by bisection on it.

Why polynomials.  By Cayley-Hamilton A(A) = 0, so any power A^N equals r(A) with r = z^N mod A(z)
(degree < n): n numbers per filter instead of n^2. And the companion matrix acts on row vectors as
multiplication by z modulo A(z): with X_c(z) = sum_i c_i z^(n-1-i) (the row read backwards),

    (c A)_i = -c_0 a_(i+1) + c_(i+1)      <=>      X_(c A) = z X_c  mod A(z),

(the coefficient of z^n in z X_c is c_0, and z^n = -(a1 z^(n-1) + ... + an) modulo A), hence
X_(c p(A)) = X_c p  mod A(z) for every polynomial p. `Modulus.row_times` uses exactly this.

Reduction modulo a monic A without a loop over n.  For P of degree <= 2n-2, P = Q A + R with
deg Q <= n-2, deg R < n. Reversing the coefficient order (z -> 1/z, times z^(2n-2)) turns this into
rev(P) = rev(Q) A_rev + z^(n-1) rev(R) with A_rev(z) = 1 + a1 z + ... + an z^n, so

    rev(Q) = rev(P) / A_rev  mod z^(n-1),      R = P - Q A  (its low n coefficients),

and 1 / A_rev is a power series whose coefficients are the impulse response of 1 / A(z)
(v_0 = 1, v_t = -a1 v_(t-1) - ... - an v_(t-n)): computed once per denominator, then each
reduction is two more FFT products.

Underflow.  Powers of a stable A shrink like |lambda|^N and soon reach subnormal floats, which
the CPU handles about a hundred times slower than normal ones. Every remainder sets coefficients
of modulus below TINY = 1e-150 to zero (their gradient passes through): that is 134 orders of
magnitude under float64's resolution of the O(1) quantities they are added to (I - A^N, 1 + r).

Accuracy.  The FFT products round with an error of about eps log2(size) times the norms of their
factors, like a matrix product of the same size. The reduction, though, subtracts Q A from P: when
the quotient Q is much larger than the remainder (large coefficients of A, i.e. clustered poles
near the unit circle) digits cancel, and powers computed by squaring can lose several more digits
than the companion matrix powers would. The caller checks its results (models/rtf.py,
`corrected_system`); tests/test_rtf_polynomial.py measures both against float64 references.
"""

from __future__ import annotations

import torch
from torch.fft import irfft, rfft

TINY = 1e-150  # remainder coefficients below this are set to 0 (see "Underflow" above)


def fft_size(length: int) -> int:
    """The power of two >= max(length, 2) used for a product with `length` coefficients."""
    return 1 << max(length - 1, 1).bit_length()


def poly_mul(x: torch.Tensor, y: torch.Tensor, m: int) -> torch.Tensor:
    """First m coefficients of the product x y. x: (..., p), y: (..., q), broadcast -> (..., m).

    One zero-padded rfft of size >= p + q - 1 per factor: no wrap-around, so the result is the
    linear product (m <= p + q - 1)."""
    size = fft_size(x.shape[-1] + y.shape[-1] - 1)
    return irfft(rfft(x, n=size) * rfft(y, n=size), n=size)[..., :m]


def series_inverse(p: torch.Tensor, m: int) -> torch.Tensor:
    """First m coefficients of 1 / p(z) as a power series; p: (..., k) with p[..., 0] = 1.

    Newton's iteration g <- g (2 - p g) doubles the number of correct coefficients each time: if
    g is right mod z^k then p g = 1 + z^k e(z), and the next k coefficients are -(g e) mod z^k.
    log2(m) steps of two products each, no loop over m."""
    g = torch.ones_like(p[..., :1])
    k = 1
    while k < m:
        size = min(2 * k, m)
        e = poly_mul(p[..., :size], g, size)[..., k:]  # coefficients k .. size-1 of p g
        g = torch.cat([g, -poly_mul(g, e, size - k)], dim=-1)
        k = size
    return g[..., :m]


def _flush(p: torch.Tensor) -> torch.Tensor:
    """p with entries below TINY set to 0; the gradient passes through unchanged (a coefficient
    that is exactly 0, z^N mod z (z - c) say, still has a derivative)."""
    return p - torch.where(p.abs() < TINY, p, torch.zeros_like(p)).detach()


class Modulus:
    """Arithmetic modulo A(z) = z^n + a1 z^(n-1) + ... + an for a batch of denominators a (..., n).

    Every operand and result is a polynomial of degree < n, (..., n) ascending, in a's dtype.
    The spectra of 1/A_rev (first n-1 taps) and of A(z) - z^n are computed once here."""

    def __init__(self, a: torch.Tensor):
        self.a, self.n = a, a.shape[-1]
        self.size = fft_size(2 * self.n - 1)  # holds every product below without wrap-around
        one = torch.ones_like(a[..., :1])
        self._inv_rev = rfft(series_inverse(torch.cat([one, a], -1), self.n - 1), n=self.size)
        self._low = rfft(a.flip(-1), n=self.size)  # A(z) - z^n = an + ... + a1 z^(n-1)

    def monomial(self, k: int) -> torch.Tensor:
        """z^k for 0 <= k < n (already reduced), (..., n)."""
        return torch.nn.functional.pad(torch.ones_like(self.a[..., :1]), (k, self.n - 1 - k))

    def reduce(self, P: torch.Tensor) -> torch.Tensor:
        """P mod A for P (..., 2n-1) (degree <= 2n-2): the quotient from the reversed series."""
        n, size = self.n, self.size
        if n == 1:
            return _flush(P)
        q_rev = irfft(rfft(P[..., n:].flip(-1), n=size) * self._inv_rev, n=size)[..., : n - 1]
        qa = irfft(rfft(q_rev.flip(-1), n=size) * self._low, n=size)[..., :n]
        return _flush(P[..., :n] - qa)

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x y mod A. x, y: (..., n), broadcast."""
        fx = rfft(x, n=self.size)
        fy = fx if y is x else rfft(y, n=self.size)
        return self.reduce(irfft(fx * fy, n=self.size)[..., : 2 * self.n - 1])

    def times_z(self, x: torch.Tensor) -> torch.Tensor:
        """z x mod A: shift up, and the coefficient pushed to z^n comes back as -x_(n-1) (A - z^n)."""
        shifted = torch.nn.functional.pad(x[..., :-1], (1, 0))
        return shifted - x[..., -1:] * self.a.flip(-1)

    def power_of_z(self, N: int) -> torch.Tensor:
        """r = z^N mod A(z) (so A^N = r(A)): square-and-multiply over the bits of N. The leading
        bits whose value stays below n need no reduction (z^k, k < n, is its own remainder), so
        the chain starts there: log2(N / n) + 1 squarings and at most as many shifts."""
        if N < 0:
            raise ValueError(f"power_of_z needs N >= 0, got {N}")
        bits, k = bin(N)[2:], 0
        while bits and 2 * k + int(bits[0]) < self.n:
            k, bits = 2 * k + int(bits[0]), bits[1:]
        r = self.monomial(k)
        for bit in bits:
            r = self.mul(r, r)
            if bit == "1":
                r = self.times_z(r)
        return r

    def row_times(self, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The row vector c p(A), (..., n), for c (..., n) and p (..., n): X_(c p(A)) = X_c p mod A,
        X_c being c read backwards (module docstring)."""
        return self.mul(c.flip(-1), p).flip(-1)

    def row_resolvent(
        self, b: torch.Tensor, r: torch.Tensor, tol: float = 1e-20, max_doublings: int = 48
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """c = b (I - r(A))^-1 for a row vector b, when r(A) has spectral radius < 1.

        (I - M)^-1 = (I + M)(I + M^2)(I + M^4) ... since (I - M) prod_(k<K) (I + M^(2^k)) = I - M^(2^K),
        so c = b prod_k (I + r_k(A)) with r_0 = r, r_(k+1) = r_k^2 mod A: each factor squares the
        error, and with r = z^N mod A the error after K factors is ~ |lambda_max|^(N 2^K). The
        product stops when every max|r_k| <= tol (the factors left multiply c by 1 + O(tol)).

        Returns (c, converged): converged (...,) is False for rows whose r_k did not fall below tol
        in `max_doublings` factors (48: enough for a spectral radius up to 1 - 46 / 2^48 ~ 1 - 2e-13
        when r = z^2, closer still for larger N) or became non-finite. Either r(A) has an
        eigenvalue of modulus >= 1 (with r = z^N: a pole on or outside the unit circle), or the
        powers were lost to rounding (coefficients of A so ill-conditioned that squaring modulo A
        amplifies errors faster than the powers decay). Their c is not meaningful; the caller
        decides what to do with them."""
        x, rk = b.flip(-1), r
        done = rk.abs().amax(-1) <= tol
        for _ in range(max_doublings):
            live = ~done & torch.isfinite(rk).all(-1)  # a row that overflowed will not come back
            if not bool(live.any()):
                break
            x = torch.where(live[..., None], x + self.mul(x, rk), x)
            rk = self.mul(rk, rk)
            done = done | (rk.abs().amax(-1) <= tol)
        return x.flip(-1), done


def schur_stable(a: torch.Tensor, r_max: float | torch.Tensor) -> torch.Tensor:
    """(...,) bool: every root of z^n + a1 z^(n-1) + ... + an has modulus < r_max (Schur-Cohn:
    the reflection coefficients of the step-down recursion of a_j / r_max^j are all inside (-1, 1)).
    r_max: a number or a tensor (...,), one radius per row. O(n^2) vector operations, no
    eigenvalues; non-finite rows are reported unstable."""
    n = a.shape[-1]
    r_max = torch.as_tensor(r_max, dtype=a.dtype, device=a.device)[..., None]
    c = a / r_max ** torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    ok = torch.isfinite(c).all(-1)
    c = torch.where(ok[..., None], c, torch.zeros_like(c))
    for m in range(n, 0, -1):
        k = c[..., m - 1]
        ok &= k.abs() < 1
        k = torch.where(ok, k, torch.zeros_like(k))  # rows already out: any finite value will do
        c = (c[..., : m - 1] - k[..., None] * c[..., : m - 1].flip(-1)) / (1 - k * k)[..., None]
    return ok


def max_root_modulus(a: torch.Tensor, steps: int = 32) -> torch.Tensor:
    """Largest root modulus of z^n + a1 z^(n-1) + ... + an, (...,), by bisection on `schur_stable`
    between 0 and Cauchy's bound 1 + max|a_j| (no root lies beyond it): after `steps` halvings the
    interval is (1 + max|a|) 2^-steps wide. No n x n matrix; O(steps n^2) vector operations."""
    lo = torch.zeros_like(a[..., 0])
    hi = 1 + a.abs().amax(-1)
    for _ in range(steps):
        mid = (lo + hi) / 2
        inside = schur_stable(a, mid)
        lo, hi = torch.where(inside, lo, mid), torch.where(inside, mid, hi)
    return hi
