"""Distillation, part 2: polynomials, poles, the stability and float conditioning projections, and
the companion <-> RTF map (the derivations: distillation/fit.py docstring)."""

from __future__ import annotations

import math

import torch

from models.rtf import companion, fft_condition

CONTRACT_TRIES = 4  # contractions clamp_poles tries before it gives a denominator up
CONTRACT_STEPS, CONTRACT_XTOL = 16, 1e-7  # regula falsi steps of condition_denominators, and its s tolerance


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


def poly_from_roots(roots: torch.Tensor) -> torch.Tensor:
    """Real monic coefficients [a_1..a_n] of prod_i (1 - p_i z^-1); roots (F, n) complex, closed
    under conjugation (the imaginary parts left are rounding and are dropped)."""
    F, n = roots.shape
    coef = torch.zeros(F, n + 1, dtype=roots.dtype, device=roots.device)
    coef[:, 0] = 1.0
    for i in range(n):
        coef[:, 1 : i + 2] = coef[:, 1 : i + 2] - roots[:, i : i + 1] * coef[:, : i + 1]
    return coef[:, 1:].real.contiguous()


def poles(a: torch.Tensor) -> torch.Tensor:
    """Roots of z^n + a_1 z^(n-1) + ... + a_n, (F, n) complex128."""
    return torch.linalg.eigvals(companion(a.to(torch.float64)))


def clamp_poles(a: torch.Tensor, r_max: float) -> torch.Tensor:
    """Denominators whose every root has modulus <= r_max; rows already inside are returned
    unchanged (bit for bit), non-finite rows become 0 (all poles at the origin).

    Roots outside are pulled radially onto |p| = r_max. Forming the polynomial again moves
    clustered roots by far more than rounding (Wilkinson: at order 16 with poles near z = 1 the
    coefficients reach ~6e3 and the roots of the rounded coefficients were seen 4e-4 outside),
    so rows still outside are then contracted, a_j <- a_j s^j (every root times s exactly, a
    well-conditioned map), with s a little below r_max / radius; rows that never get inside
    become 0."""
    a = torch.where(torch.isfinite(a).all(-1, keepdim=True), a, torch.zeros_like(a))
    outside = ~schur_stable(a, r_max * (1 + 1e-12))
    if not outside.any():
        return a
    a = a.clone()
    a[outside] = poly_from_roots(_clamp(poles(a[outside]), r_max)).to(a.dtype)
    j = torch.arange(1, a.shape[-1] + 1, device=a.device, dtype=a.dtype)
    for attempt in range(CONTRACT_TRIES):
        radius = poles(a[outside]).abs().amax(-1)
        if not (radius > r_max).any():
            return a
        s = torch.where(radius > r_max, (r_max / radius) * (1 - 1e-6 * 10**attempt), torch.ones_like(radius))
        a[outside] = a[outside] * s[:, None] ** j
    radius = poles(a).abs().amax(-1)
    return torch.where((radius > r_max)[:, None], torch.zeros_like(a), a)


def condition_denominators(a: torch.Tensor, fft_len: int, max_condition: float) -> torch.Tensor:
    """Rows of a with fft_condition > max_condition contracted, a_j <- a_j s^j (every pole times
    s), with s in (0, 1) at the bound, found by Illinois regula falsi on log condition - log bound
    (bracket [0, 1]: s = 0, a = 0, has condition 1), keeping the feasible end of the bracket;
    other rows unchanged (bit for bit)."""
    bad = fft_condition(a, fft_len) > max_condition
    if not bad.any():
        return a
    ab = a[bad]
    j = torch.arange(1, a.shape[-1] + 1, device=a.device, dtype=a.dtype)

    def f(s):
        return (fft_condition(ab * s[:, None] ** j, fft_len) / max_condition).log()

    lo, hi = torch.zeros_like(ab[:, 0]), torch.ones_like(ab[:, 0])  # lo satisfies, hi does not
    f_lo, f_hi = torch.full_like(lo, -math.log(max_condition)), f(hi)
    side = torch.zeros_like(lo)
    for _ in range(CONTRACT_STEPS):
        x = (hi - f_hi * (hi - lo) / (f_hi - f_lo)).clamp(lo, hi)
        fx = f(x)
        fits = fx <= 0
        # Illinois: halve the value kept on the side that did not move twice in a row
        f_hi = torch.where(fits & (side > 0), f_hi / 2, f_hi)
        f_lo = torch.where(~fits & (side < 0), f_lo / 2, f_lo)
        lo, f_lo = torch.where(fits, x, lo), torch.where(fits, fx, f_lo)
        hi, f_hi = torch.where(fits, hi, x), torch.where(fits, f_hi, fx)
        side = torch.where(fits, torch.ones_like(side), -torch.ones_like(side))
        if bool((hi - lo < CONTRACT_XTOL).all()):
            break
    a = a.clone()
    a[bad] = ab * lo[:, None] ** j
    return a


def rtf_from_companion(a: torch.Tensor, c: torch.Tensor, tap0: torch.Tensor, fft_len: int):
    """(b, h0) of the RTF whose length-`fft_len` kernel is tap0 at t = 0 and c A^(t-1) e1 for
    1 <= t < fft_len (A = companion(a)): b = c (I - A^L'), h0 = tap0 - c A^(L'-1) e1. float64."""
    a, c, tap0 = (x.to(torch.float64) for x in (a, c, tap0))
    A = companion(a)
    P = torch.linalg.matrix_power(A, fft_len - 1)  # A^(L'-1)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    b = (c.unsqueeze(-2) @ (eye - A @ P)).squeeze(-2)
    h0 = tap0 - (c.unsqueeze(-2) @ P[..., :, :1]).flatten(1)[:, 0]
    return b, h0


def _clamp(p: torch.Tensor, r_max: float) -> torch.Tensor:
    return p * (r_max / p.abs().clamp_min(r_max))
