"""Distillation, part 1: the target checks, the spread Hankel section and its spectrum, the order
choice, and the data-driven initialisations (ERA, Prony) (the derivations: distillation/fit.py
docstring)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.fft import irfft, rfft

from models.modal import powers

from .poles import _clamp, poles, poly_from_roots

HANKEL_SIZE = 128  # rows of the Hankel section (distillation/fit.py docstring, section 1)
RANK_RTOL = 1e-7  # singular values below this times the largest are numerical zeros (Gram: sqrt(eps))


def _check_target(target: torch.Tensor, fft_len: int) -> torch.Tensor:
    if target.dim() != 2 or target.shape[-1] < 2:
        raise ValueError(f"target must be (filters, taps) with at least 2 taps, got shape {tuple(target.shape)}")
    bad = (~torch.isfinite(target)).any(-1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"target filter {bad[0]} has non-finite taps ({len(bad)} such filters)")
    if fft_len < target.shape[-1]:
        raise ValueError(f"fft_len ({fft_len}) must be at least the number of taps ({target.shape[-1]})")
    return target.to(torch.float64)


def _check_order(order: int, L: int) -> None:
    if not 1 <= order < L:
        raise ValueError(f"order must be in [1, L) with L = {L} taps, got {order}")


def hankel_shape(L: int, hankel_size: int = HANKEL_SIZE) -> tuple[int, int, int]:
    """(rows r, stride s, columns c) of the Hankel section of L taps (distillation/fit.py docstring, section 1)."""
    N = L - 1
    rows = max(1, min(hankel_size, L // 2))
    stride = max(1, (N // 2) // max(rows - 1, 1))
    return rows, stride, N - stride * (rows - 1)


def _hankel_gram(target: torch.Tensor, rows: int, stride: int) -> torch.Tensor:
    """Gram matrices Hk Hk^T (F, r, r) of the Hankel sections Hk[i, j] = g[s i + j] of the taps
    g = target[:, 1:] (N = L - 1 of them, c = N - s (r - 1) columns: every tap is used).

    Row 0 is r correlations of length c; the others follow from the shift of the window by s,
    G[i+1, i'+1] = G[i, i'] - <g[si:si+s], g[si':si'+s]> + <g[si+c:si+c+s], g[si'+c:si'+c+s]>:
    O(r c + r^2 s) per filter instead of O(r^2 c) for the product."""
    g = target[:, 1:]
    F, N = g.shape
    c = N - stride * (rows - 1)
    G = g.new_empty(F, rows, rows)
    G[:, 0] = torch.stack([(g[:, :c] * g[:, stride * d : stride * d + c]).sum(-1) for d in range(rows)], -1)
    if rows > 1:
        head = g[:, : stride * (rows - 1)].unflatten(-1, (rows - 1, stride))  # leaving the window
        tail = g[:, c : c + stride * (rows - 1)].unflatten(-1, (rows - 1, stride))  # entering it
        D = tail @ tail.transpose(-1, -2) - head @ head.transpose(-1, -2)  # (F, r-1, r-1)
        for i in range(rows - 1):
            G[:, i + 1, 1:] = G[:, i, :-1] + D[:, i]
            G[:, i + 1, 0] = G[:, 0, i + 1]
    return G


def _hankel_svd(target: torch.Tensor, hankel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (F, r) descending and left singular vectors (F, r, r) of the Hankel sections
    (`hankel_shape`), from the symmetric eigendecomposition of their Gram matrices."""
    rows, stride, _ = hankel_shape(target.shape[-1], hankel_size)
    mu, U = torch.linalg.eigh(_hankel_gram(target, rows, stride))
    return mu.flip(-1).clamp_min(0.0).sqrt(), U.flip(-1)


def _tails(sv: torch.Tensor, m: int) -> torch.Tensor:
    """Relative Frobenius tails sqrt(sum_{i > k} sigma_i^2) / ||Hk||_F for k = 0..m-1, (F, m), from
    ALL the singular values (a reverse cumulative sum: no cancellation against ||Hk||_F^2)."""
    rest = sv.square().flip(-1).cumsum(-1).flip(-1)  # rest[:, k] = sum_{i >= k} sigma_i^2 (0-based)
    total = rest[:, :1]
    return torch.where(total > 0, (rest[:, :m] / total.clamp_min(1e-300)).sqrt(), torch.zeros_like(rest[:, :m]))


def choose_order(hankel_tail: torch.Tensor, tolerance: float, max_order: int) -> int:
    """Smallest k in [1, max_order] with hankel_tail[f, k] <= tolerance for every filter f
    (one order for the whole bank). max_order (with a warning) when none is."""
    worst = hankel_tail.amax(0)[1 : max_order + 1]
    ok = (worst <= tolerance).nonzero().flatten()
    if len(ok):
        return int(ok[0]) + 1
    warnings.warn(
        f"no order up to {max_order} has a Hankel tail below {tolerance:g} for every filter "
        f"(worst tail there {float(worst[-1]):.3g}); using order {max_order}",
        stacklevel=3,
    )
    return max_order


@dataclass
class _ERABasis:
    """The shift-invariance data of the ERA for every order up to k (distillation/fit.py docstring, section 1):
    with V^T = diag(1/sigma) U^T Hk (k x c), M1 = V^T[:, 1:] V^T[:, :-1]^T and
    M0 = V^T[:, :-1] V^T[:, :-1]^T (k x k), the order-j system is A = M1[:j, :j] M0[:j, :j]^-1,
    B = V^T[:j, 0], C = sigma_j * U[0, :j]. M0 is close to the identity (orthonormal rows less
    one column), so these normal equations are well conditioned."""

    M1: torch.Tensor
    M0: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor

    def rows(self, keep: torch.Tensor) -> _ERABasis:
        return _ERABasis(self.M1[keep], self.M0[keep], self.B[keep], self.C[keep])

    def system(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, C) of order n; orders above k are padded with unreachable states (poles at 0)."""
        k = min(n, self.B.shape[-1])
        A = torch.linalg.solve(self.M0[:, :k, :k], self.M1[:, :k, :k], left=False)
        A, B, C = A, self.B[:, :k], self.C[:, :k]
        if k < n:
            A = torch.nn.functional.pad(A, (0, n - k, 0, n - k))
            B, C = torch.nn.functional.pad(B, (0, n - k)), torch.nn.functional.pad(C, (0, n - k))
        return A, B, C

    def modes(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Poles p and residues rho (F, n) complex of the order-n ERA: h[t] ~ sum_i rho_i p_i^(t-1)."""
        A, B, C = self.system(n)
        p, V = torch.linalg.eig(A)
        rho = (C.to(V.dtype).unsqueeze(-2) @ V).squeeze(-2) * torch.linalg.solve(V, B.to(V.dtype))
        return p, rho


def _era_basis(sv: torch.Tensor, U: torch.Tensor, target: torch.Tensor, n: int) -> _ERABasis:
    """The ERA data for orders up to n (at most r - 1 and c - 1); modes below the numerical rank
    (sigma_i <= RANK_RTOL sigma_1) get zero rows, i.e. their poles go to the origin."""
    r, stride, c = hankel_shape(target.shape[-1], U.shape[-1])
    k = min(n, r - 1, c - 1)
    live = sv[:, :k] > RANK_RTOL * sv[:, :1]
    inv = torch.where(live, 1.0 / sv[:, :k].clamp_min(1e-300), torch.zeros_like(sv[:, :k]))
    Vt = _hankel_left_product(U[:, :, :k], target, stride) * inv[:, :, None]  # (F, k, c) = V^T
    M0 = Vt[:, :, :-1] @ Vt[:, :, :-1].transpose(-1, -2) + torch.diag_embed((~live).to(Vt.dtype))
    M1 = Vt[:, :, 1:] @ Vt[:, :, :-1].transpose(-1, -2)
    return _ERABasis(M1, M0, Vt[:, :, 0], U[:, 0, :k] * sv[:, :k] * live)


def _hankel_left_product(U: torch.Tensor, target: torch.Tensor, stride: int) -> torch.Tensor:
    """U^T Hk, (F, k, c): (U^T Hk)[i, j] = sum_m U[m, i] g[s m + j], the correlation of the taps
    with each column of U spread out by s (one FFT of the taps, k of U's columns), never forming
    the r x c Hankel section."""
    g = target[:, 1:]
    F, N = g.shape
    r, k = U.shape[-2:]
    c = N - stride * (r - 1)
    spread = U.new_zeros(F, k, stride * (r - 1) + 1)
    spread[..., ::stride] = U.transpose(-1, -2)
    size = N + spread.shape[-1]
    return irfft(rfft(spread, n=size).conj() * rfft(g, n=size)[:, None, :], n=size)[..., :c]


def _prony_modes(target: torch.Tensor, n: int, r_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prony: poles from the linear prediction h[t] = -sum_j a_j h[t-j] (t = n+1..L-1, least
    squares), then residues from the Vandermonde least squares h[t] ~ sum_i rho_i p_i^(t-1)."""
    L = target.shape[-1]
    if L - 1 - n < n:
        raise ValueError(f"init='prony' needs L >= 2 order + 1 taps, got L = {L} for order {n}")
    X = target[:, 1 : L - 1].unfold(-1, n, 1).flip(-1)  # rows t = n+1..L-1: [h[t-1], ..., h[t-n]]
    a = torch.linalg.lstsq(X, -target[:, n + 1 :, None]).solution[..., 0]
    p = _clamp(poles(a), r_max)
    V = powers(p, L - 1).transpose(-1, -2)  # (F, L-1, n)
    rho = torch.linalg.lstsq(V, target[:, 1:, None].to(V.dtype)).solution[..., 0]
    return p, rho


def _random_modes(target: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random stable poles (conjugate pairs, radius U(0.3, 0.95), angle U(0, pi)), zero residues."""
    g = torch.Generator().manual_seed(seed)
    F = target.shape[0]
    radius = 0.3 + 0.65 * torch.rand(F, n // 2, generator=g, dtype=torch.float64)
    p = torch.polar(radius, torch.pi * torch.rand(F, n // 2, generator=g, dtype=torch.float64))
    roots = [p, p.conj()]
    if n % 2:
        real = 1.2 * torch.rand(F, 1, generator=g, dtype=torch.float64) - 0.6
        roots.append(torch.complex(real, torch.zeros_like(real)))
    p = torch.cat(roots, -1).to(target.device)
    return p, torch.zeros_like(p)


def rtf_from_response(a: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, h0) of the RTF with denominator a (F, n) whose length-L' kernel is k (F, L'), for a k
    that obeys the recurrence of a: sum_j a_j k[t - j] = 0 for n < t < L' (a_0 = 1), as the
    truncated response of any system with those poles does.

    Why: the kernel's DFT is B~/A~ + h0, so A~ K~ = B~ + h0 A~, i.e. the CIRCULAR convolution
    q = [1, a] (*) k is [h0, b_1 + h0 a_1, ..., b_n + h0 a_n, 0, ..., 0]. Its first n + 1 entries
    (the wrap-around of the last taps included) give b and h0: O(n^2), no power of the companion
    matrix (whose entries grow like the binomial-sized coefficients of a; see `rtf_from_companion`)."""
    n, Lp = a.shape[-1], k.shape[-1]
    t = torch.arange(n + 1, device=a.device)
    idx = (t[:, None] - t[None, :]) % Lp  # [t, j] -> t - j
    a1 = torch.cat([torch.ones_like(a[:, :1]), a], -1)
    q = (k[:, idx] * a1[:, None, :]).sum(-1)  # (F, n+1)
    return q[:, 1:] - q[:, :1] * a, q[:, 0]


def rtf_from_modes(p: torch.Tensor, rho: torch.Tensor, tap0: torch.Tensor, fft_len: int):
    """(a, b, h0) of the RTF whose length-fft_len kernel is tap0 at t = 0 and
    Re sum_i rho_i p_i^(t-1) for 1 <= t < fft_len; p, rho (F, n) closed under conjugation."""
    a = poly_from_roots(p)
    k = (rho[..., None] * powers(p, fft_len - 1)).sum(-2).real
    b, h0 = rtf_from_response(a, torch.cat([tap0[:, None].to(k.dtype), k], -1))
    return a, b, h0
