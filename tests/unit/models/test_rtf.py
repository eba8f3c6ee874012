"""Mathematical tests of the RTF filter (models/rtf.py) against independent float64 references.

Every reference here is written in numpy float64 from the definitions below (and in models/rtf.py);
nothing below calls the code under test to compute an expected value.

    H(z) = h0 + (b1 z^-1 + ... + bn z^-n) / (1 + a1 z^-1 + ... + an z^-n)

The FFT kernel of length L' (= l_max rounded up to even) is the impulse response of the
"corrected" companion system (a, C, h0_eff) with the ROW vector C = b (I - A^L')^-1 and
h0_eff = h0 + C A^(L'-1) e1. The reference computes C with numpy.linalg.solve on the transposed
system and then runs the difference equation

    v_t = u_t - a1 v_{t-1} - ... - an v_{t-n},      y_t = c1 v_{t-1} + ... + cn v_{t-n} + h0_eff u_t

on an impulse, which is the definition of the impulse response of that system (no FFT, no
companion-matrix powers in the recursion itself).

Test systems are built from chosen roots (numpy.poly) with one pole (pair) at radius 0.999, the
hard case for the truncation correction, and the others at random radii in [0.5, 0.95]. Angles are
stratified over (0, pi) so the polynomial coefficients stay O(1): clustered roots of high order
give huge coefficients and an ill-conditioned companion recursion, which would make the float64
REFERENCE itself wrong (we measured cond(I - A^L') ~ 3e12 and O(1) reference errors for clustered
roots at n = 16); the test asserts the conditioning it relies on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support.helpers import FFTSpy, filter_chunk, np_causal_conv

from models.fftconv import fft_causal_conv
from models.modal import amplification
from models.rtf import RTF, poles_of, rational_kernel

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps


# ---------------------------------------------------------------------------------------------
# numpy float64 references
# ---------------------------------------------------------------------------------------------
def make_denominator(n: int, rng: np.random.Generator, edge: float = 0.999) -> np.ndarray:
    """Monic real denominator [a1..an] whose largest pole has radius `edge` (one conjugate pair,
    or the single real pole when n == 1), the others at radius U(0.5, 0.95), stratified angles."""
    pairs = n // 2
    theta = np.pi * (np.arange(pairs) + rng.uniform(0.1, 0.9, pairs)) / max(pairs, 1)
    radius = rng.uniform(0.5, 0.95, pairs)
    if pairs:
        radius[rng.integers(pairs)] = edge
    roots = np.concatenate([radius * np.exp(1j * theta), radius * np.exp(-1j * theta)])
    if n % 2:
        r = edge if pairs == 0 else rng.uniform(0.5, 0.95)
        roots = np.append(roots, r * rng.choice([-1.0, 1.0]))
    return np.real(np.poly(roots))[1:]


def np_companion(a: np.ndarray) -> np.ndarray:
    n = len(a)
    A = np.zeros((n, n))
    A[0] = -a
    A[np.arange(1, n), np.arange(n - 1)] = 1.0
    return A


def np_corrected(a, b, h0, fft_len, form="row"):
    """(C, h0_eff, cond(I - A^L')) of the system the length-`fft_len` FFT kernel realises.

    form="row": the correct C = b (I - A^L')^-1, solved as (I - A^L')^T C^T = b^T.
    form="column": the public RTF code's mistake, x = (I - A^L')^-1 b^T used as C.
    form="none": no correction (C = b, h0_eff = h0).
    """
    n = len(a)
    A = np.array(np_companion(a))
    P = np.linalg.matrix_power(A, fft_len - 1)  # A^(L'-1)
    M = np.eye(n) - A @ P  # I - A^L'
    if form == "row":
        c = np.linalg.solve(M.T, b)
    elif form == "column":
        c = np.linalg.solve(M, b)
    else:
        return np.asarray(b, float), float(h0), np.linalg.cond(M)
    return c, float(h0 + c @ P[:, 0]), np.linalg.cond(M)


def np_impulse_response(a, c, h0, T) -> np.ndarray:
    """First T taps of the impulse response of (a, c, h0) by the difference equation."""
    n = len(a)
    v = np.zeros(T + n)  # v[t + n] = v_t, zeros before t = 0
    y = np.zeros(T)
    for t in range(T):
        u = 1.0 if t == 0 else 0.0
        past = v[t : t + n][::-1]  # v_{t-1}, ..., v_{t-n}
        y[t] = c @ past + h0 * u
        v[t + n] = u - a @ past
    return y


def np_fft_error_bound(a, b, fft_len, eps) -> float:
    """First-order rounding bound (absolute, per tap) of rfft -> divide -> irfft in precision eps.

    The rffts of [1, a] and [0, b] carry absolute errors ~ eps log2(L') ||.||_1; dividing by A(w)
    turns them into eps log2 L' (|B(w)| ||[1,a]||_1 / |A(w)|^2 + ||b||_1 / |A(w)|); the irfft
    averages the spectrum (a tap is (1/L') sum_w), so the bound is twice the mean of that over
    the half spectrum. Near the unit circle |A(w)| is small and the bound grows accordingly.
    """
    w = np.exp(-2j * np.pi * np.arange(fft_len // 2 + 1) / fft_len)
    Aw = np.polyval(np.r_[1.0, a][::-1], w)
    Bw = np.polyval(np.r_[0.0, b][::-1], w)
    spec = np.abs(Bw) * (1 + np.abs(a).sum()) / np.abs(Aw) ** 2 + np.abs(b).sum() / np.abs(Aw)
    return 2 * eps * math.log2(fft_len) * float(spec.mean())


def set_filter(rtf: RTF, a, b, h0) -> None:
    """Write numpy coefficients into a single-denominator RTF (rows broadcast if 1-D)."""
    with torch.no_grad():
        rtf.a.copy_(torch.as_tensor(np.atleast_2d(a), dtype=rtf.a.dtype))
        rtf.b.copy_(torch.as_tensor(np.atleast_2d(b), dtype=rtf.b.dtype))
        rtf.h0.copy_(torch.as_tensor(np.atleast_1d(h0), dtype=rtf.h0.dtype))


def stored(p: torch.Tensor) -> np.ndarray:
    """The values the module actually holds (after rounding to its dtype), as float64 numpy."""
    return p.detach().double().numpy()


def random_system_rtf(n, l_max, dtype, seed, channels=1):
    """An RTF with constraint="none" holding `channels` random systems with a pole at 0.999."""
    rng = np.random.default_rng(seed)
    rtf = RTF(channels, n, l_max, init="zeros", constraint="none").to(dtype)
    a = np.stack([make_denominator(n, rng) for _ in range(channels)])
    b = rng.uniform(-1, 1, (channels, n)) / math.sqrt(n)
    h0 = rng.uniform(-1, 1, channels)
    set_filter(rtf, a, b, h0)
    return rtf


# (n, l_max): n in {1, 2, 16, 64}, odd and even l_max (odd l_max -> L' = l_max + 1).
SYSTEMS = [(1, 37), (1, 64), (2, 37), (2, 256), (16, 63), (16, 255), (64, 255), (64, 256)]


# ---------------------------------------------------------------------------------------------
# 1. kernel == impulse response of the corrected companion system
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,l_max", SYSTEMS)
def test_kernel_is_impulse_response_of_row_corrected_system_float64(n, l_max):
    """Float64 parameters: kernel(T) == difference-equation response of (a, C_row, h0_eff) for
    T = l_max // 2 + 1 (odd or even), l_max, and 3 l_max + 1 (past the training length).

    Tolerance 1e-10 relative to max|h| up to l_max (the FFT route): the a-priori rounding bound of
    the float64 FFT path is <= 1.2e-11 for these systems (np_fft_error_bound, asserted below), the
    reference's own error is ~ cond(I - A^L') eps64 <= 1e3 * 2.2e-16 (cond asserted < 1e3).
    Observed: <= 5e-13. Past l_max the taps come from the modal form, whose terms cancel by up to
    its `amplification` (6e7 for the order-64 system: residues of 63-factor partial fractions), so
    the tolerance there is max(1e-10, 64 eps64 amplification) (observed 3.4e-7 against 1e-6).
    The wrong corrections miss by > 1e-2 (test below), far above either tolerance.
    """
    rtf = random_system_rtf(n, l_max, torch.float64, seed=1000 * n + l_max)
    a, b, h0 = stored(rtf.a)[0], stored(rtf.b)[0], stored(rtf.h0)[0]
    fft_len = l_max + l_max % 2
    c, h0_eff, cond = np_corrected(a, b, h0, fft_len)
    assert cond < 1e3, "test system too ill-conditioned for a float64 reference"
    # numpy root finding of a degree-64 polynomial is itself only accurate to ~1e-5 here
    assert np.abs(np.roots(np.r_[1, a])).max() == pytest.approx(0.999, abs=1e-4)
    system = rtf.conversion().system
    modal_tol = max(1e-10, 64 * EPS64 * float(amplification(system, system.taps(fft_len)).max()))
    for T in (l_max // 2 + 1, l_max, 3 * l_max + 1):
        k = stored(rtf.kernel(T))[0]
        ref = np_impulse_response(a, c, h0_eff, T)
        assert k.shape == (T,)
        scale = np.abs(ref).max()
        assert np_fft_error_bound(a, b, fft_len, EPS64) / scale < 1e-10 / 5
        err = np.abs(k - ref).max() / scale
        tol = 1e-10 if T <= l_max else modal_tol
        assert err < tol, f"n={n} l_max={l_max} T={T}: relative error {err:.2e} > {tol:.2e}"


@pytest.mark.parametrize("n,l_max", [(2, 256), (16, 255), (64, 256)])
def test_float64_kernel_of_float32_parameters(n, l_max):
    """kernel_dtype="float64" (distilled models): float32 parameters, kernel FFT in float64, result
    returned in float32. Against the same float64 difference-equation reference as above, built
    from the float32-rounded coefficients, it is exact up to the final rounding to float32:
    tolerance 1e-6 of max|h| (float32 eps 6e-8 per tap, plus the float64 path's <= 1e-11). The
    float32 kernel of the same module misses by more on these near-unit poles (observed: float64
    path 3e-8 to 4e-8, float32 path 4e-7 to 3e-5), which the test also checks, so the option is
    not a no-op."""
    rtf = random_system_rtf(n, l_max, torch.float32, seed=1000 * n + l_max)
    wide = random_system_rtf(n, l_max, torch.float32, seed=1000 * n + l_max)
    wide.kernel_dtype = "float64"
    a, b, h0 = stored(wide.a)[0], stored(wide.b)[0], stored(wide.h0)[0]
    c, h0_eff, _ = np_corrected(a, b, h0, l_max + l_max % 2)
    ref = np_impulse_response(a, c, h0_eff, l_max)
    scale = np.abs(ref).max()
    k = wide.kernel(l_max)
    assert k.dtype == torch.float32
    err = np.abs(stored(k)[0] - ref).max() / scale
    assert err < 1e-6, f"n={n} l_max={l_max}: relative error {err:.2e}"
    narrow = np.abs(stored(rtf.kernel(l_max))[0] - ref).max() / scale
    assert narrow > 2 * err


@pytest.mark.parametrize("n,l_max", SYSTEMS)
def test_kernel_is_impulse_response_float32_parameters(n, l_max):
    """The training dtype: float32 parameters, float32 (complex64) FFT. Compared with the float64
    reference built from the float32-ROUNDED coefficients the module holds.

    Tolerance: 4x the first-order float32 rounding bound of rfft/divide/irfft (np_fft_error_bound,
    between 2e-4 and 2e-2 of max|h| here because |A(w)| ~ 1e-3 near the 0.999 pole; observed
    errors are 1e-7 to 7e-5, far below it: the bound is pessimistic). Past l_max the kernel comes
    from a float64 solve and is only rounded to float32 at the end. The test also checks that the
    uncorrected and column-form references miss by more than twice this tolerance, so it cannot
    pass for the wrong formula.
    """
    rtf = random_system_rtf(n, l_max, torch.float32, seed=1000 * n + l_max)
    a, b, h0 = stored(rtf.a)[0], stored(rtf.b)[0], stored(rtf.h0)[0]
    fft_len = l_max + l_max % 2
    c, h0_eff, _ = np_corrected(a, b, h0, fft_len)
    for T in (l_max // 2 + 1, l_max, 3 * l_max + 1):
        k = rtf.kernel(T)
        assert k.dtype == torch.float32
        ref = np_impulse_response(a, c, h0_eff, T)
        scale = np.abs(ref).max()
        tol = 4 * np_fft_error_bound(a, b, fft_len, EPS32) / scale
        assert tol < 0.05
        err = np.abs(stored(k)[0] - ref).max() / scale
        assert err < tol, f"n={n} l_max={l_max} T={T}: relative error {err:.2e} > {tol:.2e}"
        # Not vacuous at this tolerance: the wrong corrections are outside it.
        for form in ("none",) + (("column",) if n > 1 else ()):
            c_w, h0_w, _ = np_corrected(a, b, h0, fft_len, form=form)
            wrong = np.abs(stored(k)[0] - np_impulse_response(a, c_w, h0_w, T)).max() / scale
            assert wrong > 2 * tol, (form, wrong, tol)


@pytest.mark.parametrize("n,l_max", [(2, 37), (2, 256), (16, 63), (16, 255), (64, 255)])
def test_column_form_and_uncorrected_numerator_do_not_match(n, l_max):
    """The reference can tell the right correction from the two wrong ones.

    With a pole at radius 0.999, the kernel differs from the response of
    - the uncorrected system (C = b, h0) by roughly |lambda|^L' / (1 - |lambda|^L') times the
      weight of the slow mode: 0.09 to 0.9 of max|h| for these systems;
    - the column-form system (the public RTF code: C = ((I - A^L')^-1 b^T)^T) by 0.4 to 1e4 of max|h|.
    We assert both errors exceed 1e-2, eight orders of magnitude above the 1e-10 tolerance the row
    form passes, so a test using either wrong formula as reference, or a kernel built from it, fails.
    (n = 1 is excluded: for a scalar system row and column forms coincide.)
    """
    rtf = random_system_rtf(n, l_max, torch.float64, seed=1000 * n + l_max)
    a, b, h0 = stored(rtf.a)[0], stored(rtf.b)[0], stored(rtf.h0)[0]
    fft_len = l_max + l_max % 2
    T = l_max
    k = stored(rtf.kernel(T))[0]
    errors = {}
    for form in ("row", "column", "none"):
        c, h0_eff, _ = np_corrected(a, b, h0, fft_len, form=form)
        ref = np_impulse_response(a, c, h0_eff, T)
        errors[form] = np.abs(k - ref).max() / np.abs(ref).max()
    assert errors["row"] < 1e-10, errors
    assert errors["column"] > 1e-2, errors
    assert errors["none"] > 1e-2, errors


def test_kernel_of_several_channels_each_match():
    """Batched filters (4 channels, each its own system) are not mixed up by the batched rfft."""
    rtf = random_system_rtf(5, 40, torch.float64, seed=7, channels=4)
    k = stored(rtf.kernel(40))
    for i in range(4):
        a, b, h0 = stored(rtf.a)[i], stored(rtf.b)[i], stored(rtf.h0)[i]
        c, h0_eff, _ = np_corrected(a, b, h0, 40)
        ref = np_impulse_response(a, c, h0_eff, 40)
        assert np.abs(k[i] - ref).max() / np.abs(ref).max() < 1e-10  # as in the float64 test


# ---------------------------------------------------------------------------------------------
# 2. recurrence == convolution; prefill == stepping
# ---------------------------------------------------------------------------------------------
def step_through(rec, u, x=None):
    """Run the recurrence's `step` (the one decoding runs) over u (B, C, T). Returns outputs
    (B, C, T) and the final state."""
    B, C, T = u.shape
    x = rec.init_state(B) if x is None else x.clone()
    ys = []
    for t in range(T):
        y, x = rec.step(u[..., t], x)
        ys.append(y)
    return torch.stack(ys, -1), x


@pytest.mark.parametrize("T", [17, 48, 49, 150])
def test_recurrence_steps_match_fft_convolution_float64(T):
    """Stepping the float64 recurrence T times == a naive numpy convolution with the reference
    kernel (the difference equation of the corrected companion system, np_corrected), for T below
    (17), at (48, 49 > l_max odd) and far above (150 > 3 L') l_max = 48, 3 channels of order 6
    with poles at 0.999.

    Tolerance 1e-10 relative to max|y|: the reference's rounding is ~ cond(I - A^L') eps T <= 1e-11
    (cond asserted < 1e3); the modal recursion rounds each state by eps and its residues are O(1)
    for these well-separated poles (`amplification` < 1e3, asserted), so ~1e-13. The recurrence of
    the UNCORRECTED system (C = b, h0: what the kernel would be without its aliasing) misses by
    > 1e-2 (checked), so the test tells the two apart.
    """
    torch.manual_seed(0)
    rtf = random_system_rtf(6, 48, torch.float64, seed=T, channels=3)
    u = torch.randn(2, 3, T, dtype=torch.float64)
    rec = rtf.recurrence(torch.float64)
    assert float(amplification(rec, rec.taps(48)).max()) < 1e3
    y_rec, _ = step_through(rec, u)
    refs, wrongs = [], []
    for i in range(3):
        a, b, h0 = stored(rtf.a)[i], stored(rtf.b)[i], stored(rtf.h0)[i]
        c, h0_eff, cond = np_corrected(a, b, h0, 48)
        assert cond < 1e3
        refs.append(np_impulse_response(a, c, h0_eff, T))
        wrongs.append(np_impulse_response(a, b, h0, T))
    y_ref = np_causal_conv(u.numpy(), np.stack(refs))
    scale = np.abs(y_ref).max()
    assert np.abs(y_rec.numpy() - y_ref).max() / scale < 1e-10
    assert np.abs(y_rec.numpy() - np_causal_conv(u.numpy(), np.stack(wrongs))).max() / scale > 1e-2


@pytest.mark.parametrize("T", [30, 200])
def test_recurrence_float32_matches_convolution(T):
    """The default decoding dtype (float32 state/coefficients) on Montel-constrained xavier
    filters (the LM default), T below and above l_max = 64, against the float64 kernel.

    Tolerance 16 eps32 max(amplification, 1) relative to max|y|: a float32 state rounds each of
    its terms by eps32 = 1.2e-7, and the output sums them with a cancellation of at most
    `amplification` (52 for these filters; the state would be float64 past 84, FLOAT32_STATE_RTOL);
    errors decay with the poles, so they do not add up over T. Observed ~1e-7 against 1e-4.
    """
    torch.manual_seed(1)
    rtf = RTF(8, 16, 64)
    u = torch.randn(2, 8, T)
    rec = rtf.recurrence(torch.float32)
    assert rec.dtype == torch.float32
    tol = 16 * EPS32 * max(float(amplification(rec, rec.taps(64)).max()), 1.0)
    with torch.no_grad():
        y_ref = fft_causal_conv(u.double(), rtf.double().kernel(T))
    y_rec, _ = step_through(rec, u)
    assert y_rec.dtype == torch.float32
    err = (y_rec.double() - y_ref).abs().max().item() / y_ref.abs().max().item()
    assert err < tol


@pytest.mark.parametrize("T", [1, 3, 20, 30, 60, 75])
def test_advance_equals_stepped_state(T):
    """ModalSystem.advance(u) (the closed-form prefill) == the state after stepping through u, for
    T = 1, short, T = L' (30), 2 L', 2.5 L', poles at radius 0.999.

    Tolerance 1e-12 relative to max|x|: both run the same diagonal system in float64; the blocked
    powers carry ~(S + J) eps relative error and the steps ~T eps, both far below 1e-12 at T <= 75.
    """
    torch.manual_seed(T)
    rtf = random_system_rtf(5, 30, torch.float64, seed=T, channels=3)
    rec = rtf.recurrence(torch.float64)
    u = torch.randn(2, 3, T, dtype=torch.float64)
    _, x_step = step_through(rec, u)
    x_pre = rec.advance(u)
    scale = x_step.abs().max().item()
    assert (x_pre - x_step).abs().max().item() / scale < 1e-12


@pytest.mark.parametrize("T1,T2", [(10, 3), (7, 25), (40, 70), (1, 1)])
def test_chunk_from_a_state_equals_stepping(T1, T2):
    """A chunk u2 from x1, the state after u1 (the kernel's convolution + response(x1), then advance),
    gives the outputs and the state of stepping through u1 then u2: the initial-state response and
    the state's own decay included; T2 of 1 and 3 tokens, T2 < L' and T2 > 2 L' (70 > 2 * 26);
    n = 8, l_max = 25 (odd -> L' = 26). Same tolerance reasoning as above (the zero-state part adds
    one float64 FFT convolution, ~1e-14).
    Dropping the state's response is caught (> 1e-2)."""
    torch.manual_seed(T1 + T2)
    rtf = random_system_rtf(8, 25, torch.float64, seed=T1 * 100 + T2, channels=2)
    rec = rtf.recurrence(torch.float64)
    u = torch.randn(3, 2, T1 + T2, dtype=torch.float64)
    y_step, x_step = step_through(rec, u)
    with torch.no_grad():  # the kernel of inference: the modal system's taps
        _, x1 = filter_chunk(rtf.kernel(T1), rec, u[..., :T1])
        y2, x2 = filter_chunk(rtf.kernel(T2), rec, u[..., T1:], x1)
        y_cold, _ = filter_chunk(rtf.kernel(T2), rec, u[..., T1:])
    scale = x_step.abs().max().item()
    assert (x2 - x_step).abs().max().item() / scale < 1e-12
    y_scale = y_step.abs().max().item()
    assert (y2 - y_step[..., T1:]).abs().max().item() / y_scale < 1e-12
    assert (y_cold - y_step[..., T1:]).abs().max().item() / y_scale > 1e-2


def test_recurrence_cache_follows_parameter_updates_through_data():
    """After the parameters change, recurrence() must describe the NEW filters: stepping it must
    reproduce the new kernel, for updates under no_grad (what torch optimizers do) and through
    .data (DeepSpeed), which does not bump the version counter."""
    torch.manual_seed(0)
    rtf = RTF(2, 3, 16).double()
    u = torch.randn(1, 2, 16, dtype=torch.float64)
    rtf.recurrence(torch.float64)  # fill the memo
    for update in (lambda: rtf.b.mul_(2), lambda: rtf.b.data.mul_(2)):
        with torch.no_grad():
            update()
            y, _ = step_through(rtf.recurrence(torch.float64), u)
            y_fft = fft_causal_conv(u, rtf._expand(rtf._fft_kernel(16)))
        assert (y - y_fft).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------
# 4. precision under bf16 autocast
# ---------------------------------------------------------------------------------------------


def test_bf16_autocast_keeps_parameters_and_fft_in_float32():
    """Under CPU bf16 autocast: the RTF parameters stay float32; every rfft input is float32 and
    every irfft input complex64 (float64/complex128 for the kernel past l_max, which is built from
    the float64 corrected system); the kernel is float32; the convolution of a bf16 signal is
    finite and bf16. CPU torch accepts some bf16 FFTs, so the spy, not an error, is what catches
    a bf16 FFT. Exact dtype checks: no tolerance involved."""
    torch.manual_seed(0)
    rtf = RTF(16, 8, 64)
    u = torch.randn(2, 16, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16), FFTSpy() as spy:
        k = rtf.kernel(64)
        y = fft_causal_conv(u, k)
    with torch.autocast("cpu", dtype=torch.bfloat16), FFTSpy() as spy_long:
        k_long = rtf.kernel(100)  # past l_max: built in float64 from the corrected system
    assert all(p.dtype == torch.float32 for p in rtf.parameters())
    assert k.dtype == torch.float32
    assert k_long.dtype == torch.float32
    assert torch.isfinite(k_long).all()
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y.float()).all()
    rffts = [d for name, d in spy.calls if "rfft" in name and "irfft" not in name]
    irffts = [d for name, d in spy.calls if "irfft" in name]
    assert len(rffts) == 4, spy.calls  # 2 for the kernel, 2 for the conv
    assert len(irffts) == 2, spy.calls
    assert set(rffts) == {torch.float32}, spy.calls
    assert set(irffts) == {torch.complex64}, spy.calls
    assert {d for _, d in spy_long.calls} <= {torch.float64, torch.complex128}, spy_long.calls
    # Not vacuous: the spy does see a bf16 FFT when one happens.
    with FFTSpy() as spy2:
        try:
            torch.fft.rfft(u)
        except RuntimeError:  # some CPU builds refuse bf16 FFTs; the call is recorded first
            pass
    assert spy2.calls == [("fft_rfft", torch.bfloat16)]


# ---------------------------------------------------------------------------------------------
# 5. gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [10, 15])
def test_gradcheck_kernel_wrt_a_b_h0_slack(T):
    """torch.autograd.gradcheck (float64, finite differences eps 1e-6, atol 1e-5, rtol 1e-3:
    gradcheck's defaults, adequate for a smooth O(1) function) of RTF.kernel(T) with respect
    to a, b, h0 and the Montel slack, T = 10 <= l_max (FFT path) and T = 15 > l_max = 11
    (the corrected long-kernel path through the n x n solve). 2 channels, 2 denominators, n = 3."""
    torch.manual_seed(0)
    rtf = RTF(2, 3, 11, init="xavier", constraint="l1_montel").double()
    names = ["a", "b", "h0", "slack"]
    params = tuple(getattr(rtf, nm).detach().clone().requires_grad_(True) for nm in names)

    class KernelOf(torch.nn.Module):  # functional_call needs a forward()
        def __init__(self):
            super().__init__()
            self.rtf = rtf

        def forward(self):
            return self.rtf.kernel(T)

    wrapper = KernelOf()

    def kernel(*p):
        return torch.func.functional_call(wrapper, {f"rtf.{nm}": t for nm, t in zip(names, p)}, ())

    assert torch.autograd.gradcheck(kernel, params)

    # Not vacuous: gradcheck rejects a function whose backward is wrong (gradient scaled by 2).
    class Doubled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    assert not torch.autograd.gradcheck(lambda *p: Doubled.apply(kernel(*p)), params, raise_exception=False)


def test_gradients_reach_every_rtf_parameter():
    """A float32 loss through the kernel and the convolution gives finite, non-zero gradients to
    a, b, h0 and slack, both for T <= l_max and T > l_max (exact zeros would mean a detach)."""
    torch.manual_seed(0)
    for T in (32, 50):
        rtf = RTF(4, 4, 32, num_a=2)
        u = torch.randn(2, 4, T)
        fft_causal_conv(u, rtf.kernel(T)).pow(2).sum().backward()
        for name in ("a", "b", "h0", "slack"):
            g = getattr(rtf, name).grad
            assert g is not None, (T, name)
            assert torch.isfinite(g).all(), (T, name)
            assert (g != 0).all(), (T, name)


def continued_kernel(rtf: RTF, T: int) -> torch.Tensor:
    """An independent differentiable reference past l_max: the float64 FFT kernel up to L', then the
    homogeneous recurrence k_t = -(a1 k_(t-1) + ... + an k_(t-n)) that every later tap of the aliased
    system obeys (all its modes are roots of A). (F, T); no eigenvalues involved."""
    a = rtf.denominator().double()
    head = rational_kernel(rtf.b.double(), a, rtf.h0.double(), rtf.fft_len)
    taps = list(head.unbind(-1))
    for t in range(rtf.fft_len, T):
        taps.append(-sum(a[:, i] * taps[t - 1 - i] for i in range(a.shape[-1])))
    return torch.stack(taps, -1)


def test_gradients_past_l_max_with_repeated_poles():
    """A backward through taps past l_max works when filters have repeated poles (here a triple pole
    at 0 beside one at 0.9, and a = 0, rtf_init="zeros": four poles at 0), whose eigenvalue backward
    would be a singular solve. Those filters are named in a warning and their gradient is that of
    the FFT kernel up to L' alone; the filter with distinct poles gets the full gradient, equal to
    that of `continued_kernel` (float64 throughout: 1e-9 relative, the closed form's gradient at
    |A'| of order 0.1 being good to about 1e-13)."""
    torch.manual_seed(0)
    rtf = RTF(3, 4, 16, constraint="none").double()
    with torch.no_grad():
        distinct = np.poly([0.8, -0.5, 0.3 + 0.4j, 0.3 - 0.4j])[1:].real
        rtf.a.copy_(torch.from_numpy(np.stack([[-0.9, 0, 0, 0], [0, 0, 0, 0], distinct])))
    T = 40
    w = torch.randn(3, T, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"filters \[0, 1\] have repeated or clustered poles"):
        (rtf.kernel(T) * w).sum().backward()
    got = {name: getattr(rtf, name).grad.clone() for name in ("a", "b", "h0")}
    rtf.zero_grad()
    tail = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)[:, None]  # which rows keep their tail's gradient
    weight = torch.cat([w[:, : rtf.fft_len], w[:, rtf.fft_len :] * tail], dim=-1)
    (continued_kernel(rtf, T) * weight).sum().backward()
    for name, g in got.items():
        want = getattr(rtf, name).grad
        assert torch.allclose(g, want, rtol=1e-9, atol=1e-12), (name, (g - want).abs().max())
    assert (got["a"][2] != 0).all()


# ---------------------------------------------------------------------------------------------
# 7. initialisation and the Montel constraint
# ---------------------------------------------------------------------------------------------
def np_roots_radius(a_rows: np.ndarray) -> np.ndarray:
    return np.array([np.abs(np.roots(np.r_[1.0, row])).max() for row in a_rows])


@pytest.mark.parametrize("n", [2, 16, 64])
def test_l1_montel_keeps_every_pole_inside_the_unit_disk(n):
    """xavier + l1_montel: every pole of 64 random filters (numpy roots of the constrained
    denominator, recomputed here as a / (sum|a| + |slack| + eps)) is strictly inside the unit disk,
    also after the slack is driven to 0 (sum|a'| < 1 still holds, by eps). Without the constraint the
    same raw xavier coefficients put a pole outside at n >= 16 (asserted: the check can fail)."""
    torch.manual_seed(n)
    rtf = RTF(64, n, 1024)
    a_raw, slack = stored(rtf.a), stored(rtf.slack)
    a = a_raw / (np.abs(a_raw).sum(-1, keepdims=True) + np.abs(slack)[:, None] + rtf.eps)
    assert np.allclose(stored(rtf.denominator()), a, rtol=1e-6, atol=1e-7)
    assert np_roots_radius(a).max() < 1.0
    a0 = a_raw / (np.abs(a_raw).sum(-1, keepdims=True) + rtf.eps)  # slack -> 0: the worst case
    assert np_roots_radius(a0).max() < 1.0
    if n >= 16:
        assert np_roots_radius(a_raw).max() > 1.0


def test_montel_init_and_zeros_init():
    """init="montel" rescales a to sum|a| = 1/2, so every pole is inside the unit disk (if |z| >= 1
    were a root, |z|^n <= sum|a_j| |z|^(n-j) <= |z|^(n-1)/2 would force |z| <= 1/2; checked with numpy
    roots); init="zeros" is the identity filter: kernel [1, 0, 0, ...] exactly, so the
    convolution returns its input."""
    torch.manual_seed(0)
    rtf = RTF(32, 16, 128, init="montel", constraint="none")
    assert np.allclose(np.abs(stored(rtf.a)).sum(-1), 0.5, rtol=1e-6)
    assert np_roots_radius(stored(rtf.a)).max() < 1.0
    ident = RTF(8, 4, 40, init="zeros", constraint="none")
    for T in (40, 41, 64):
        k = ident.kernel(T)
        expected = torch.zeros(8, T)
        expected[:, 0] = 1
        assert torch.allclose(k, expected, atol=1e-7)  # float32 FFT of an exact impulse
    u = torch.randn(2, 8, 40)
    assert torch.allclose(fft_causal_conv(u, ident.kernel(40)), u, atol=1e-5)


def test_recurrence_refuses_a_pole_outside_the_unit_circle():
    """A filter with a pole at 1.05 (constraint none) makes recurrence() raise a ValueError that
    names the problem and the remedy; check="warn" warns instead; a stable filter passes."""
    rtf = random_system_rtf(4, 32, torch.float64, seed=3, channels=2)
    rtf.recurrence(torch.float64)  # stable: accepted
    a = np.real(np.poly([1.05, 0.5, 0.3 + 0.2j, 0.3 - 0.2j]))[1:]
    with torch.no_grad():
        rtf.a[1] = torch.as_tensor(a)
    with pytest.raises(ValueError) as info:
        rtf.recurrence(torch.float64)
    msg = str(info.value)
    assert "unit circle" in msg
    assert "l1_montel" in msg
    assert "[1]" in msg
    assert "1.05" in msg
    with pytest.warns(UserWarning, match="unit circle"):
        rtf.recurrence(torch.float64, check="warn")


# ---------------------------------------------------------------------------------------------
# 8. sharing and tying
# ---------------------------------------------------------------------------------------------
def test_num_a_and_filter_tying_shapes_and_kernels():
    """channels 12, num_filters 6 (each filter serves 2 consecutive channels), num_a 3 (each
    denominator shared by 2 consecutive filters): parameter shapes follow, tied channels get
    bit-identical kernels, filters sharing a denominator get identical constrained denominators,
    and each channel's kernel matches the numpy reference of ITS filter (so a wrong expansion
    order, e.g. repeat instead of repeat_interleave, is caught)."""
    torch.manual_seed(0)
    rtf = RTF(12, 5, 40, num_filters=6, num_a=3).double()
    assert rtf.a.shape == (3, 5)
    assert rtf.slack.shape == (3,)
    assert rtf.b.shape == (6, 5)
    assert rtf.h0.shape == (6,)
    den = stored(rtf.denominator())
    assert den.shape == (6, 5)
    assert np.array_equal(den[0], den[1])
    assert np.array_equal(den[4], den[5])
    assert not np.allclose(den[1], den[2])
    k = stored(rtf.kernel(40))
    assert k.shape == (12, 40)
    for ch in range(12):
        f = ch // 2
        assert np.array_equal(k[ch], k[2 * f])
        a, b, h0 = den[f], stored(rtf.b)[f], stored(rtf.h0)[f]
        c, h0_eff, _ = np_corrected(a, b, h0, 40)
        ref = np_impulse_response(a, c, h0_eff, 40)
        assert np.abs(k[ch] - ref).max() / np.abs(ref).max() < 1e-10
    assert not np.allclose(k[1], k[2])
    with pytest.raises(ValueError):
        RTF(12, 5, 40, num_filters=5)


def test_shared_denominators_are_factored_once(monkeypatch):
    """num_a = 3 denominators for 6 filters: the recurrence build solves 3 eigenproblems (counted),
    and every filter's modal taps still match the numpy reference of ITS filter (1e-10, as above)."""
    torch.manual_seed(1)
    rtf = RTF(12, 5, 40, num_filters=6, num_a=3).double()
    solved, eigvals = [], torch.linalg.eigvals
    monkeypatch.setattr(torch.linalg, "eigvals", lambda A: solved.append(A.shape[0]) or eigvals(A))
    with torch.no_grad():
        rtf.recurrence(torch.float64)
        k = stored(rtf.kernel(40))  # no grad: the modal system's taps
    assert sum(solved) == 3
    den = stored(rtf.denominator())
    for f in range(6):
        c, h0_eff, _ = np_corrected(den[f], stored(rtf.b)[f], stored(rtf.h0)[f], 40)
        ref = np_impulse_response(den[f], c, h0_eff, 40)
        assert np.abs(k[2 * f] - ref).max() / np.abs(ref).max() < 1e-10


def test_roots_split_over_threads_belong_to_their_rows_and_the_caller_keeps_its_threads():
    """With 2 intra-op threads `poles_of` splits the rows over a thread pool (the other tests run on
    one thread, where it does not). Every row's n roots, multiplied out (numpy, float64), must give
    back that row's polynomial [1, a]: a row's roots in another row's place would miss by O(1). And
    the caller keeps its thread count.

    Tolerance: the eigenvalues are backward stable for the companion matrix C (error ~ n eps ||C||
    in C), which maps to a coefficient error of about n eps ||C||^2 (Edelman and Murakami; here
    ||C||_F^2 = n - 1 + ||a||^2 ~ 16). Multiplying the roots out in float64 rounds each coefficient
    relative to the partial products it sums, at most prod_k (1 + |lambda_k|) (~3e4 here: the
    result is small by cancellation). So 4 n eps (||C||_F^2 + prod_k (1 + |lambda_k|)): 1.6e-10 to 3.4e-10;
    measured at most 1.4e-13."""
    torch.manual_seed(3)
    a = 0.2 * torch.randn(64, 16, dtype=torch.float64)  # 64 rows >= 2 x threads: the pool is used
    torch.set_num_threads(2)  # the autouse fixture restores 1 after the test
    lam = poles_of(a)
    assert torch.get_num_threads() == 2
    n, eps = a.shape[-1], torch.finfo(torch.float64).eps
    for row in range(a.shape[0]):
        coef = np.poly(lam[row].numpy())
        growth = float((1 + lam[row].abs()).prod())
        bound = 4 * n * eps * (n - 1 + float(a[row].square().sum()) + growth)
        assert np.abs(coef - np.r_[1.0, a[row].numpy()]).max() < bound, row


# ---------------------------------------------------------------------------------------------
# benchmark smoke test
# ---------------------------------------------------------------------------------------------
@pytest.mark.integration  # seconds: outside the unit tier
def test_kernel_scaling_benchmark_runs_one_tiny_configuration(tmp_path):
    """benchmarks/kernel_scaling.py runs a tiny sweep and writes JSON + PNG with one row per
    (method, length, state size) (implicit: one per length, no state size), and records an S4D
    configuration over the memory cap as skipped instead of running it."""
    import json

    from benchmarks import kernel_scaling

    out = tmp_path / "ks"
    kernel_scaling.main(
        [
            "--device",
            "cpu",
            "--d-model",
            "4",
            "--lengths",
            "128",
            "--states",
            "4,64",
            "--repeats",
            "1",
            "--max-bytes",
            "300000",
            "--out",
            str(out),
        ]
    )
    data = json.loads((tmp_path / "ks.json").read_text())
    assert (tmp_path / "ks.png").stat().st_size > 0
    rows = {(r["method"], r["length"], r["state_size"]): r for r in data["rows"]}
    assert set(rows) == {("rtf", 128, 4), ("rtf", 128, 64), ("s4d", 128, 4), ("s4d", 128, 64), ("implicit", 128, None)}
    for key in [("rtf", 128, 4), ("rtf", 128, 64), ("s4d", 128, 4), ("implicit", 128, None)]:
        assert not rows[key]["skipped"]
        assert rows[key]["time_ms"] > 0
        assert rows[key]["peak_bytes"] >= 0
    # 4 * 8 bytes * d 4 * 32 modes * L 128 = 524 KB estimated > 300 KB cap
    assert rows[("s4d", 128, 64)]["skipped"]
    assert "time_ms" not in rows[("s4d", 128, 64)]
    assert data["memory_method"]
    assert data["machine"]["torch"] == torch.__version__
