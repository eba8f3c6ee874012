"""The RTF recurrence built from polynomials modulo A(z) (models/polynomial.py, models/rtf.py),
against independent float64 references and against the n x n matrix build it replaced.

References, none of which calls the code under test:
- exact rational long division (fractions.Fraction, the floats' exact values) for z^N mod A(z);
- numpy matrix powers of the companion matrix for large N;
- the difference equation run in numpy (impulse responses, the state after a prompt), and the
  aliased kernel K[t] = sum_m h[t + m N] from a long run of it (the well-conditioned reference of
  docs/mathematics.md section 1.8);
- `old_corrected_system` below: the matrix_power + transposed-solve build that models/rtf.py used
  before (kept here, and only here, as the baseline).

Test systems come from tests/test_rtf.py (stratified roots, one pole pair at the edge radius), and
"clustered" ones put 4 slow pole pairs at radius 0.9999 and angles 0.03..0.4, which is where
squaring modulo A(z) loses digits and the build takes its aliased-kernel route.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from test_rtf import make_denominator, np_companion, random_system_rtf, step_through
from torch.utils._python_dispatch import TorchDispatchMode

from hyena_rtf.models import rtf as rtf_module
from hyena_rtf.models.fftconv import fft_causal_conv
from hyena_rtf.models.polynomial import TINY, Modulus, max_root_modulus, schur_stable, series_inverse
from hyena_rtf.models.rtf import RTF, RTFRecurrence, corrected_system


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def exact_power_of_z(a: np.ndarray, N: int) -> np.ndarray:
    """z^N mod (z^n + a1 z^(n-1) + ... + an), ascending, by exact rational long division."""
    n = len(a)
    low = [Fraction(float(x)) for x in a[::-1]]  # A(z) - z^n, ascending
    r = [Fraction(0)] * n
    r[0] = Fraction(1)
    for _ in range(N):  # r <- z r mod A: shift up, then z^n = -(A - z^n)
        top = r[-1]
        r = [Fraction(0)] + r[:-1]
        r = [x - top * y for x, y in zip(r, low)]
    return np.array([float(x) for x in r])


def np_poly_of_matrix(p: np.ndarray, A: np.ndarray) -> np.ndarray:
    """sum_k p_k A^k by Horner's rule, numpy float64."""
    out = np.zeros_like(A)
    for coef in p[::-1]:
        out = out @ A + coef * np.eye(len(A))
    return out


def np_aliased_kernel(a, b, h0, N, radius) -> np.ndarray:
    """K[t] = sum_m h[t + m N], t < N: h from the difference equation run until |pole|^M < e^-40."""
    n = len(a)
    M = N * math.ceil(40 / -math.log(radius) / N + 1)
    v = np.zeros(M + n)  # v[t + n] = impulse response of 1 / A(z) at t
    for t in range(M):
        v[t + n] = (1.0 if t == 0 else 0.0) - a @ v[t : t + n][::-1]
    h = np.r_[h0, np.convolve(v[n:], b)[: M - 1]]
    return h.reshape(-1, N).sum(0)


def np_response(a, c, h0, T) -> np.ndarray:
    """First T taps of the impulse response of (a, c, h0) by the difference equation."""
    n = len(a)
    v, y = np.zeros(T + n), np.zeros(T)
    for t in range(T):
        past = v[t : t + n][::-1]
        y[t] = c @ past + (h0 if t == 0 else 0.0)
        v[t + n] = (1.0 if t == 0 else 0.0) - a @ past
    return y


def np_state_after(a: np.ndarray, u: np.ndarray, x0: np.ndarray | None = None) -> np.ndarray:
    """Delay-line state (v_{T-1}, ..., v_{T-n}) of v = u / A(z) after u (B, C, T), numpy loop."""
    B, C, T = u.shape
    n = a.shape[-1]
    x = np.zeros((B, C, n)) if x0 is None else x0.copy()
    for t in range(T):
        v = u[..., t] - (x * a).sum(-1)
        x = np.concatenate([v[..., None], x[..., :-1]], -1)
    return x


def old_corrected_system(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, N: int):
    """The build this code replaced (float64): C solves (I - A^N)^T C^T = b^T, h0 + C A^(N-1) e1,
    with the companion matrix A and torch.linalg.matrix_power. Returns (C, h0_eff, I - A^N)."""
    n = a.shape[-1]
    A = torch.zeros(*a.shape, n, dtype=a.dtype)
    A[..., 0, :] = -a
    A[..., torch.arange(1, n), torch.arange(n - 1)] = 1.0
    P = torch.linalg.matrix_power(A, N - 1)
    m = torch.eye(n, dtype=a.dtype) - A @ P
    c = torch.linalg.solve(m.transpose(-1, -2), b.unsqueeze(-1)).squeeze(-1)
    return c, h0 + (c.unsqueeze(-2) @ P[..., :, :1]).squeeze(-1).squeeze(-1), m


def clustered_denominator(n: int, seed: int, radius: float = 0.9999, slow: int = 4) -> np.ndarray:
    """[a1..an] with `slow` pole pairs at `radius`, angles 0.03..0.4, the rest as make_denominator."""
    rng = np.random.default_rng(seed)
    pairs = n // 2
    theta = np.pi * (np.arange(pairs) + rng.uniform(0.1, 0.9, pairs)) / pairs
    rad = rng.uniform(0.5, 0.95, pairs)
    theta[:slow], rad[:slow] = np.linspace(0.03, 0.4, slow), radius
    roots = rad * np.exp(1j * theta)
    return np.real(np.poly(np.r_[roots, roots.conj()]))[1:]


# ---------------------------------------------------------------------------------------------
# 1. z^N mod A(z) and the ring arithmetic
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 16, 64])
def test_power_of_z_matches_exact_long_division(n):
    """Modulus.power_of_z(N) == z^N mod A(z) by exact rational long division, for N = 0, 1, n - 1,
    n, odd 37 and 255, even 64 and 256, denominators with a pole pair at 0.999.

    Tolerance 1e-11 absolute (the coefficients are O(1): max |r| <= 7 here): each squaring rounds
    like a float64 FFT product of O(1) polynomials (~ eps log2(size) n) and the errors compound
    over <= 8 squarings; observed <= 4e-14. N < n is exact (no squaring at all), which is asserted."""
    rng = np.random.default_rng(n)
    a = np.stack([make_denominator(n, rng) for _ in range(3)])
    mod = Modulus(torch.tensor(a))
    for N in sorted({0, 1, n - 1, n, 37, 64, 255, 256}):
        r = mod.power_of_z(N).numpy()
        ref = np.stack([exact_power_of_z(row, N) for row in a])
        err = np.abs(r - ref).max()
        if N < n:
            assert err == 0, (n, N, err)
        assert err < 1e-11, (n, N, err)


@pytest.mark.parametrize("n,N", [(2, 2048), (16, 2047), (64, 2048), (64, 4097)])
def test_power_of_z_large_N_matches_matrix_power(n, N):
    """A^N = r(A) for r = power_of_z(N), large N (odd and even), against numpy's matrix_power of the
    companion matrix, with r(A) = sum_k r_k A^k by Horner in numpy. Tolerance 1e-11 of max|A^N|,
    at least 1e-13 absolute: numpy's repeated squaring rounds at ~ n eps max|A^k|^2 per squaring
    (12 squarings) and so does ours; observed <= 8e-13 relative."""
    rng = np.random.default_rng(N + n)
    a = np.stack([make_denominator(n, rng, edge=0.9995) for _ in range(2)])
    r = Modulus(torch.tensor(a)).power_of_z(N).numpy()
    for row, rr in zip(a, r):
        A = np_companion(row)
        ref = np.linalg.matrix_power(A, N)
        err = np.abs(np_poly_of_matrix(rr, A) - ref).max()
        assert err < max(1e-11 * np.abs(ref).max(), 1e-13), (n, N, err, np.abs(ref).max())


def test_series_inverse_product_and_row_times():
    """series_inverse([1, a], m) is the impulse response of 1 / A(z) (difference equation, 1e-13:
    observed 2e-15 for these O(1) taps); Modulus.mul(x, y) is x y mod A (the product reduced by
    exact rational long division of each power, 1e-13; observed 1.5e-15); Modulus.row_times(c, p) is the ROW vector
    c p(A) (numpy, p(A) by Horner; 1e-12 relative: both sides round a degree-15 matrix polynomial;
    observed 5e-15), and differs from the column form p(A) c^T by O(1), so the test can tell them
    apart."""
    rng = np.random.default_rng(0)
    n = 16
    a = np.stack([make_denominator(n, rng) for _ in range(2)])
    at = torch.tensor(a)
    v = series_inverse(torch.cat([torch.ones(2, 1, dtype=at.dtype), at], -1), 40).numpy()
    impulse = np.r_[1.0, np.zeros(n - 1)]  # c = e1: y_t = v_{t-1}
    for row, vv in zip(a, v):
        assert np.abs(vv - np_response(row, impulse, 0.0, 41)[1:]).max() < 1e-13
    mod = Modulus(at)
    x, y, c = (rng.uniform(-1, 1, (2, n)) for _ in range(3))
    prod = mod.mul(torch.tensor(x), torch.tensor(y)).numpy()
    rows = mod.row_times(torch.tensor(c), torch.tensor(y)).numpy()
    for i in range(2):
        ref = sum(coef * exact_power_of_z(a[i], k) for k, coef in enumerate(np.convolve(x[i], y[i])))
        assert np.abs(prod[i] - ref).max() < 1e-13
        py = np_poly_of_matrix(y[i], np_companion(a[i]))
        ref_row = c[i] @ py
        assert np.abs(rows[i] - ref_row).max() < 1e-12 * np.abs(ref_row).max()
        assert np.abs(rows[i] - py @ c[i]).max() > 1e-3 * np.abs(ref_row).max()


def test_remainders_underflow_to_zero_not_to_subnormals():
    """Powers of a well-damped A shrink below float64's normal range; the remainders are flushed
    to exact zeros (below TINY = 1e-150) instead of becoming subnormal numbers, which the CPU
    handles ~100x slower. Checked on what the build would use: z^4096 mod A, poles <= 0.5."""
    roots = 0.5 * np.exp(1j * np.linspace(0.3, 2.8, 4))
    a = torch.tensor(np.real(np.poly(np.r_[roots, roots.conj()]))[None, 1:])
    r = Modulus(a).power_of_z(4096)
    assert r.abs().max() < TINY  # true size 0.5^4096 ~ 1e-1233: all flushed
    assert bool((r == 0).all())
    tiny = Modulus(a).power_of_z(200)  # ~ 1e-60: kept, and normal
    assert bool(((tiny == 0) | (tiny.abs() >= np.finfo(np.float64).tiny)).all())
    assert tiny.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# 2. the corrected system: new build vs the old one vs the aliased kernel
# ---------------------------------------------------------------------------------------------
# Relative errors (max over taps 0..N-1 / max|K|) of the impulse response of (a, C, h0_eff) against
# the aliased reference K, and of C against C_ref = A_rev K[1:n+1] mod z^n, worst of the 3 seeds
# each test below uses, seen when this test was written (float64, one CPU):
#     system                          taps: old    new   |   C: old    new
#     n 1,  N 256,  r 0.999            9.3e-15  9.9e-15  |  7.9e-15  8.4e-15
#     n 2,  N 256,  r 0.999            4.8e-14  3.0e-14  |  1.9e-14  2.7e-14
#     n 16, N 256,  r 0.999            3.8e-15  5.7e-15  |  7.6e-15  1.2e-14
#     n 16, N 1024, r 0.999            2.1e-15  3.2e-15  |  7.0e-15  1.0e-14
#     n 64, N 256,  r 0.999            1.5e-13  6.9e-13  |  1.4e-13  1.2e-12
#     n 64, N 1024, r 0.999            5.8e-14  2.8e-13  |  1.3e-13  1.2e-12
#     n 64, N 2048, r 0.999            2.5e-14  1.2e-13  |  5.1e-14  6.8e-13
#     n 64, N 512,  r 0.99             1.1e-15  4.6e-15  |  9.6e-15  7.3e-14
#     n 64, N 2048, clustered, seed 0  3.4e-08  1.1e-10  |  (taps 0..399; aliased-kernel route)
#     n 64, N 2048, clustered, seed 1  5.0e-12  3.0e-12  |
# The polynomial build is up to ~5x further from the reference than the matrix build on the
# well-conditioned systems (both within ~1e3 eps), and closer on clustered slow poles, where
# squaring loses digits in both and the new build notices and switches route.
WELL_CONDITIONED = [(1, 255, 0.999), (2, 255, 0.999), (16, 255, 0.999), (16, 1023, 0.999), (64, 255, 0.999)]
WELL_CONDITIONED += [(64, 1023, 0.999), (64, 2047, 0.999), (64, 511, 0.99)]


@pytest.mark.parametrize("n,l_max,radius", WELL_CONDITIONED)
def test_corrected_system_against_aliased_reference_and_old_build(n, l_max, radius, monkeypatch):
    """The polynomial route is the one measured (rational_kernel, the fallback, is never called).
    Bounds: the new taps within 2e-12 of K (observed <= 6.9e-13; the reference's own error is
    ~1e-14, the build's self-checks cap its chains and residual at 1e-12); the new C within 1e-11 of
    C_ref and of the old build's C (observed <= 1.2e-12 and <= 1.1e-12). Not vacuous: dropping the
    correction (C = b) misses by > 1e-3 on every one of these systems (observed >= 2.4e-3)."""
    monkeypatch.setattr(rtf_module, "rational_kernel", None)  # a call would raise
    for seed in range(3):
        rng = np.random.default_rng(1000 * n + seed)
        a = make_denominator(n, rng, edge=radius)
        b, h0 = rng.uniform(-1, 1, n) / math.sqrt(n), rng.uniform(-1, 1)
        N = l_max + l_max % 2
        K = np_aliased_kernel(a, b, h0, N, radius)
        scale = np.abs(K).max()
        c_ref = np.convolve(np.r_[1.0, a], K[1 : n + 1])[:n]
        at, bt, ht = (torch.tensor(np.atleast_1d(x))[None] for x in (a, b, h0))
        with torch.no_grad():
            c, h, r, converged = corrected_system(at, bt, ht[:, 0], N)
        c_old, h_old, _ = old_corrected_system(at, bt, ht[:, 0], N)
        c, h, c_old = c[0].numpy(), h.item(), c_old[0].numpy()
        taps = np.abs(np_response(a, c, h, N) - K).max() / scale
        assert bool(converged.all())
        assert taps < 2e-12, (seed, taps)
        assert np.abs(c - c_ref).max() / np.abs(c_ref).max() < 1e-11
        assert np.abs(c - c_old).max() / np.abs(c_old).max() < 1e-11
        assert abs(h - h_old.item()) / scale < 1e-11
        assert np.abs(np_response(a, b, h0, N) - K).max() / scale > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_clustered_slow_poles_take_the_aliased_kernel_route(seed, monkeypatch):
    """n = 64, 4 slow pole pairs at 0.9999, N = 2048: squaring modulo A(z) loses digits here, the
    build's self-check sees it and builds this filter from its aliased kernel (counted: one
    rational_kernel call, for this filter only), and the result is within 1e-9 of the reference
    K over 400 taps (observed 1.1e-10 and 3.0e-12; the old matrix build: 3.4e-8 and 5.0e-12;
    the reference itself was checked once against 60-digit mpmath residues: within 2e-12). A well-conditioned
    filter in the same bank does not take that route."""
    calls = []
    real = rtf_module.rational_kernel

    def counting(num, a, h0, fft_len):
        calls.append(num.shape[0])
        return real(num, a, h0, fft_len)

    monkeypatch.setattr(rtf_module, "rational_kernel", counting)
    n, N = 64, 2048
    a = np.stack([clustered_denominator(n, seed), make_denominator(n, np.random.default_rng(seed))])
    rng = np.random.default_rng(seed + 10)
    b, h0 = rng.uniform(-1, 1, (2, n)) / math.sqrt(n), np.array([0.5, -0.3])
    with torch.no_grad():
        c, h, _, _ = corrected_system(*(torch.tensor(x) for x in (a, b, h0)), N)
    assert calls == [1]
    K = np_aliased_kernel(a[0], b[0], h0[0], N, 0.9999)
    err = np.abs(np_response(a[0], c[0].numpy(), h[0].item(), 400) - K[:400]).max() / np.abs(K).max()
    assert err < 1e-9, err


# ---------------------------------------------------------------------------------------------
# 3. prefill: x_T = x~_T - r(A) x~_T against stepping the difference equation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [5, 30, 40, 100])
@pytest.mark.parametrize("from_state", [False, True], ids=["from_zero", "from_state"])
def test_prefill_matches_the_difference_equation(T, from_state):
    """n = 16, l_max = 40 (N = 40, chunks of N - n + 1 = 25): T = 5 < n, 30 (< N but two chunks),
    40 = N, 100 > 2N; from a zero state and from a random one; poles at 0.999. Reference: the
    delay-line recursion in numpy. Tolerance 1e-9 relative to max|x| (the circular deconvolution
    near |pole| 0.999 amplifies rounding by 1/min|A(w)| ~ 1e3; observed <= 7e-15). Not vacuous:
    the periodic solution without the r(A) correction misses by > 1e-2 (checked for T <= N;
    observed >= 0.59)."""
    rtf = random_system_rtf(16, 40, torch.float64, seed=T, channels=3)
    rec = rtf.recurrence(torch.float64)
    rng = np.random.default_rng(T)
    u = rng.standard_normal((2, 3, T))
    x0 = rng.standard_normal((2, 3, 16)) if from_state else None
    ref = np_state_after(rec.a.numpy(), u, x0)
    got = rec.prefill(torch.tensor(u), None if x0 is None else torch.tensor(x0)).numpy()
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() / scale < 1e-9
    if T <= rec.fft_len and not from_state:
        uncorrected = RTFRecurrence(rec.a, rec.c, rec.h0, torch.zeros_like(rec.r), rec.fft_len)
        assert np.abs(uncorrected.prefill(torch.tensor(u)).numpy() - ref).max() / scale > 1e-2


def test_prefill_float32_recurrence():
    """The default decoding dtype: a float32 recurrence of l1_montel filters (n 16, l_max 64)
    prefills to within 1e-5 of the float64 numpy recursion of its own (float32-rounded)
    coefficients, T = 150 (three chunks); float32 rounding of FFT-sized sums, observed 1.8e-7."""
    torch.manual_seed(0)
    rec = RTF(8, 16, 64).recurrence(torch.float32)
    u = np.random.default_rng(0).standard_normal((2, 8, 150)).astype(np.float32)
    ref = np_state_after(rec.a.double().numpy(), u.astype(np.float64))
    got = rec.prefill(torch.tensor(u)).double().numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# 4. structure: nothing n x n, per channel or per filter, anywhere
# ---------------------------------------------------------------------------------------------
class ShapeSpy(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns (views and temporaries included)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out

    def square(self, n: int) -> list[tuple[int, ...]]:
        return [s for s in self.shapes if len(s) >= 2 and s[-1] == s[-2] == n]


def test_no_n_by_n_tensor_in_the_recurrence_its_build_or_its_use():
    """n = 5 with channels 6, filters 3, batch 2, T 7, N 20, FFT sizes 16 and 20: no other size is 5,
    so any tensor whose two trailing dims are (5, 5) is an n x n matrix. None in the fields of
    RTFRecurrence, none created while building it (stable filters, and with check="warn" an
    unstable one, which also runs the radius bisection and the aliased-kernel route), none while
    prefilling from a state, and none in the long kernel. Not vacuous: the same spy sees them in
    the old matrix_power build."""
    n = 5
    torch.manual_seed(0)
    rtf = RTF(6, n, 19, num_filters=3, init="montel", constraint="none").double()
    with ShapeSpy() as build:
        rec = rtf.recurrence(torch.float64)
    for name, value in vars(rec).items():
        if isinstance(value, torch.Tensor):
            assert value.shape[-2:] != (n, n), name
            assert value.numel() <= rtf.channels * n, name  # O(channels n)
    u = torch.randn(2, 6, 7, dtype=torch.float64)
    with ShapeSpy() as use:
        rec.prefill(u, rec.prefill(u))
        rtf.kernel(50)
    a = np.real(np.poly([1.05, 0.5, 0.3 + 0.2j, 0.3 - 0.2j, -0.4]))[1:]
    with torch.no_grad():
        rtf.a[1] = torch.tensor(a)
    with ShapeSpy() as unstable, pytest.warns(UserWarning, match="unit circle"):
        rtf.recurrence(torch.float64, check="warn")
    assert build.shapes and use.shapes and unstable.shapes
    assert build.square(n) == [] and use.square(n) == [] and unstable.square(n) == []
    with ShapeSpy() as old:
        old_corrected_system(rtf.denominator().detach(), rtf.b.detach(), rtf.h0.detach(), rtf.fft_len)
    assert old.square(n)


# ---------------------------------------------------------------------------------------------
# 5. stability: refused on or outside the unit circle, with the same message
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "roots,radius,kernel_exists",
    [
        ([-1.0, 0.5, 0.2], "1.0000", False),
        ([np.exp(0.7j), np.exp(-0.7j), 0.3], "1.0000", True),
        ([1.001, 0.3, -0.6], "1.0010", True),
    ],
    ids=["on_circle_at_nyquist", "on_circle_pair", "outside"],
)
def test_poles_on_or_outside_the_circle_are_refused(roots, radius, kernel_exists):
    """A pole on the circle (exactly: -1, or a pair e^(+-0.7i)) or outside (1.001) in filter 2 of 3:
    recurrence() raises ValueError naming filter [2], the largest radius (Schur-Cohn bisection,
    4 decimals) and the remedy; check="warn" warns and still builds; check="none" builds silently.
    Where the FFT kernel exists (A(z) has no zero on the N-th roots of unity; z = -1 is one), the
    recurrence built with "warn" reproduces it within l_max, its corrected system coming from the
    aliased kernel: 1e-8 relative, observed 3e-15."""
    rtf = random_system_rtf(3, 31, torch.float64, seed=5, channels=3)
    with torch.no_grad():
        rtf.a[2] = torch.tensor(np.real(np.poly(roots))[1:])
    with pytest.raises(ValueError) as info:
        rtf.recurrence(torch.float64)
    msg = str(info.value)
    assert "RTF filters [2] have poles on or outside the unit circle" in msg
    assert f"max |pole| = {radius}" in msg
    assert "l1_montel" in msg and "use_cache=False" in msg
    with pytest.warns(UserWarning, match="unit circle"):
        rec = rtf.recurrence(torch.float64, check="warn")
    rtf.recurrence(torch.float64, check="none")
    if kernel_exists:
        u = torch.randn(1, 3, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        y, _ = step_through(rec, u)
        y_fft = fft_causal_conv(u, rtf.kernel(31))
        assert (y - y_fft).abs().max() / y_fft.abs().max() < 1e-8


def test_schur_cohn_and_root_radius_against_numpy_roots():
    """schur_stable(a, 1) agrees with numpy's roots on 300 random denominators of orders 1..64
    (stratified roots at radii 0.9 .. 1.05, clear of the circle by >= 1e-4), and max_root_modulus
    is within 1e-8 of numpy's largest |root| (bisection width (1 + max|a|) 2^-32 ~ 1e-9; numpy's
    roots of these well-separated polynomials are accurate to ~1e-12; observed 7e-10)."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 16, 64):
        for edge in (0.9, 0.999, 0.9999, 1.0001, 1.001, 1.05):
            a = np.stack([make_denominator(n, rng, edge=edge) for _ in range(10)])
            roots = np.array([np.abs(np.roots(np.r_[1.0, row])).max() for row in a])
            at = torch.tensor(a)
            assert np.array_equal(schur_stable(at, 1.0).numpy(), roots < 1), (n, edge)
            assert np.abs(max_root_modulus(at).numpy() - roots).max() < 1e-8, (n, edge)


def test_build_uses_no_fft_kernel_for_stable_well_conditioned_filters(monkeypatch):
    """The polynomial route is the one that runs for trained-like filters: building the recurrence
    of 64 l1_montel filters of order 64 calls rational_kernel (the aliased-kernel route) zero
    times, and the result still reproduces the kernel (recurrence vs FFT convolution, 1e-10;
    observed 4e-16)."""
    calls = []
    monkeypatch.setattr(rtf_module, "rational_kernel", lambda *a: calls.append(a) or None)
    torch.manual_seed(0)
    rtf = RTF(64, 64, 256).double()
    rec = rtf.recurrence(torch.float64)
    assert calls == []
    monkeypatch.undo()
    u = torch.randn(1, 64, 300, dtype=torch.float64)
    y, _ = step_through(rec, u)
    y_fft = fft_causal_conv(u, rtf.kernel(300))
    assert (y - y_fft).abs().max() / y_fft.abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------
# benchmark smoke test
# ---------------------------------------------------------------------------------------------
def test_recurrence_build_benchmark_runs_the_tiny_layer(tmp_path):
    """benchmarks/recurrence_build.py on the tiny preset, one repeat: JSON with one row per method
    (times; bytes exactly C (3n + 1) floats for a, c, r, h0 against C (n + 1)^2 for a, c, h0 and
    the old n x n prefill matrices), the two builds' C agreeing (float64, 1e-10), the machine
    named, and the PNG."""
    import json

    from benchmarks import recurrence_build

    recurrence_build.main(["--layers", "tiny", "--repeats", "1", "--out", str(tmp_path / "rb")])
    data = json.loads((tmp_path / "rb.json").read_text())
    assert (tmp_path / "rb.png").stat().st_size > 0
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"polynomial", "matrix (old)"}
    assert all(r["time_ms"] > 0 and not r["skipped"] for r in rows.values())
    n = rows["polynomial"]["state_size"]
    assert rows["polynomial"]["bytes"] == 4 * rows["polynomial"]["channels"] * (3 * n + 1)
    assert rows["matrix (old)"]["bytes"] == 4 * rows["polynomial"]["channels"] * (n + 1) ** 2
    assert data["agreement"]["tiny"] < 1e-10
    assert data["machine"]["torch"] == torch.__version__
