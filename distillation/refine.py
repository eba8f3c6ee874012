"""Distillation, part 3: the tap errors of the RTF and modal targets, their Gauss-Newton systems, and
the batched Levenberg-Marquardt driver (the derivations: distillation/fit.py docstring)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fft import irfft, rfft

from models.modal import powers
from models.rtf import rational_kernel

LAMBDA0, LAMBDA_MIN, LAMBDA_MAX = 1e-3, 1e-15, 1e16  # Levenberg-Marquardt damping (scaled problem)
STALL_WINDOW, STALL_RTOL = 10, 1e-4  # a filter stops once it improved by < 1e-4 (relative) in 10 steps
EXACT = 1e-14  # relative errors below this are rounding: such a filter needs no more steps


def _rtf_loss(theta: torch.Tensor, target: torch.Tensor, fft_len: int) -> torch.Tensor:
    """||K[0:L] - target||^2 per filter, theta = [a, b, h0] (F, 2n+1)."""
    n = (theta.shape[-1] - 1) // 2
    K = rational_kernel(theta[:, n : 2 * n], theta[:, :n], theta[:, 2 * n], fft_len)[:, : target.shape[-1]]
    return (K - target).square().sum(-1)


def _rtf_system(theta: torch.Tensor, target: torch.Tensor, fft_len: int):
    """(loss, J^T J, J^T r) per filter for theta = [a, b, h0], by the circular correlations of the
    distillation/fit.py docstring (section 4). Shapes (F,), (F, 2n+1, 2n+1), (F, 2n+1)."""
    F, L = target.shape
    n = (theta.shape[-1] - 1) // 2
    a, b, h0 = theta[:, :n], theta[:, n : 2 * n], theta[:, 2 * n]
    zero, one = theta.new_zeros(F, 1), theta.new_ones(F, 1)
    Uf = 1.0 / rfft(torch.cat([one, a], -1), n=fft_len)
    Wf = rfft(torch.cat([zero, b], -1), n=fft_len) * Uf * Uf
    r = rational_kernel(b, a, h0, fft_len)[:, :L] - target
    Rf = rfft(r, n=fft_len)
    corr = irfft(
        torch.stack([Uf.conj() * Uf, Wf.conj() * Wf, Uf.conj() * Wf, Uf.conj() * Rf, Wf.conj() * Rf, Uf, Wf]),
        n=fft_len,
    )
    ruu, rww, ruw, rur, rwr, u, w = corr
    i = torch.arange(1, n + 1, device=theta.device)
    lag = (i[:, None] - i[None, :]) % fft_len  # [i, j] -> i - j
    G = theta.new_zeros(F, 2 * n + 1, 2 * n + 1)
    G[:, :n, :n] = rww[:, lag]  # <S^i w, S^j w>
    G[:, n : 2 * n, n : 2 * n] = ruu[:, lag]
    G[:, n : 2 * n, :n] = -ruw[:, lag]  # <S^i u, -S^j w>
    G[:, :n, n : 2 * n] = G[:, n : 2 * n, :n].transpose(-1, -2)
    G[:, :n, 2 * n] = G[:, 2 * n, :n] = -w[:, fft_len - i]
    G[:, n : 2 * n, 2 * n] = G[:, 2 * n, n : 2 * n] = u[:, fft_len - i]
    G[:, 2 * n, 2 * n] = 1.0
    if fft_len > L:  # rows t = L..L'-1 are not fitted: remove them from the full-period sums
        t = torch.arange(L, fft_len, device=theta.device)
        idx = (t[:, None] - i[None, :]) % fft_len  # (L'-L, n)
        E = torch.cat([-w[:, idx], u[:, idx], theta.new_zeros(F, len(t), 1)], -1)
        G = G - E.transpose(-1, -2) @ E
    g = torch.cat([-rwr[:, 1 : n + 1], rur[:, 1 : n + 1], r[:, :1]], -1)
    return r.square().sum(-1), G, g


def best_numerator(a: torch.Tensor, target: torch.Tensor, fft_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, h0) minimising ||K(a, b, h0)[0:L] - target|| for fixed denominators a (F, n): the
    kernel is linear in (b, h0), so this is the (b, h0) block of the Gauss-Newton system at
    b = h0 = 0 (exact for a linear problem), solved by Cholesky with a 1e-12 relative ridge."""
    n = a.shape[-1]
    theta = torch.cat([a, torch.zeros_like(a), torch.zeros_like(a[:, :1])], -1)
    _, G, g = _rtf_system(theta, target, fft_len)
    G, g = G[:, n:, n:], g[:, n:]
    scale = G.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
    Gs = G / (scale[:, :, None] * scale[:, None, :]) + 1e-12 * torch.eye(n + 1, dtype=G.dtype, device=G.device)
    chol, info = torch.linalg.cholesky_ex(Gs)
    x = -torch.cholesky_solve((g / scale)[..., None], chol)[..., 0] / scale
    ok = ((info == 0) & torch.isfinite(x).all(-1))[:, None]  # else: zero numerator, h0 = tap 0
    x = torch.where(ok, x, torch.cat([torch.zeros_like(a), target[:, :1]], -1))
    return x[:, :n], x[:, n]


def modal_kernel(p: torch.Tensor, res: torch.Tensor, d: torch.Tensor, T: int) -> torch.Tensor:
    """h[0] = d, h[t] = 2 Re sum_i res_i p_i^(t-1) for 1 <= t < T; (F, T) float64."""
    table = powers(p, T - 1)  # (F, m, T-1): p^0 .. p^(T-2)
    h = 2.0 * (res[..., None] * table).sum(-2).real
    return torch.cat([d[:, None].to(h.dtype), h], -1)


def _modal_split(theta: torch.Tensor):
    m = (theta.shape[-1] - 1) // 4
    p = torch.complex(theta[:, :m], theta[:, m : 2 * m])
    res = torch.complex(theta[:, 2 * m : 3 * m], theta[:, 3 * m : 4 * m])
    return p, res, theta[:, 4 * m]


def _modal_loss(theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, res, d = _modal_split(theta)
    return (modal_kernel(p, res, d, target.shape[-1]) - target).square().sum(-1)


def _modal_system(theta: torch.Tensor, target: torch.Tensor, chunk: int = 1 << 22):
    """(loss, J^T J, J^T r) of the modal error with the explicit Jacobian, in chunks of filters
    (at most `chunk` Jacobian entries each), theta = [Re p, Im p, Re r, Im r, D] (F, 4m+1)."""
    F, L = target.shape
    P = theta.shape[-1]
    losses, Gs, gs = [], [], []
    step = max(1, chunk // (L * P))
    t1 = torch.arange(L - 1, device=theta.device, dtype=torch.float64)  # t - 1 for t = 1..L-1
    for s in range(0, F, step):
        p, res, d = _modal_split(theta[s : s + step])
        V = powers(p, L)  # p^0 .. p^(L-1)
        dV = t1 * torch.cat([torch.zeros_like(V[..., :1]), V[..., : L - 2]], -1)  # (t-1) p^(t-2)
        V = V[..., : L - 1]
        rdV = res[..., None] * dV
        h = torch.cat([d[:, None], 2.0 * (res[..., None] * V).sum(-2).real], -1)
        r = h - target[s : s + step]
        J = torch.cat(
            [2 * rdV.real, -2 * rdV.imag, 2 * V.real, -2 * V.imag], -2
        )  # (f, 4m, L-1): d h[t] / d (Re p, Im p, Re r, Im r)
        J = torch.nn.functional.pad(J, (1, 0))  # tap 0 depends on D only
        J = torch.cat([J, torch.zeros_like(J[:, :1])], -2)
        J[:, -1, 0] = 1.0
        losses.append(r.square().sum(-1))
        Gs.append(J @ J.transpose(-1, -2))
        gs.append((J @ r[..., None])[..., 0])
    return torch.cat(losses), torch.cat(Gs), torch.cat(gs)


# ---------------------------------------------------------------------------------------------
# Levenberg-Marquardt, batched over filters
# ---------------------------------------------------------------------------------------------
def levenberg_marquardt(
    theta: torch.Tensor,
    system: Callable,
    loss: Callable,
    project: Callable,
    norm2: torch.Tensor,
    steps: int,
    progress: bool = False,
) -> torch.Tensor:
    """Minimise loss per row of theta (F, P); every row is an independent problem.

    system(theta_rows, rows) -> (loss, J^T J, J^T r) and loss(theta_rows, rows) -> (F_rows,) for
    the filters `rows` (an index tensor); project(theta_rows) -> theta_rows (the feasible set);
    norm2: (F,) ||target||^2 for the relative tests. A step is kept only where it lowers the loss,
    so the returned theta is the best iterate seen. A filter leaves the active set once its
    relative error is rounding (EXACT), its damping saturates (no step helps: a stationary point
    up to rounding), or it improved by less than STALL_RTOL over STALL_WINDOW steps; the work of
    a step is proportional to the active filters.
    """
    F, P = theta.shape
    theta = theta.clone()
    rows = torch.arange(F, device=theta.device)
    lam = theta.new_full((F,), LAMBDA0)
    nu = theta.new_full((F,), 2.0)
    cur, G, g = system(theta, rows)
    past = cur.clone()
    eye = torch.eye(P, dtype=theta.dtype, device=theta.device)
    bar = _progress_bar(steps, progress)
    for it in range(1, steps + 1):
        th, Gr, gr, lr, cr = theta[rows], G[rows], g[rows], lam[rows], cur[rows]
        # Marquardt scaling to a unit diagonal; a parameter the error does not depend on (a zero
        # column, e.g. Im p of a real modal pole) keeps a finite scale and gets no step.
        diag = Gr.diagonal(dim1=-2, dim2=-1)
        scale = torch.maximum(diag, 1e-20 * diag.amax(-1, keepdim=True)).clamp_min(1e-300).sqrt()
        Gs = Gr / (scale[:, :, None] * scale[:, None, :])
        gs = gr / scale
        chol, info = torch.linalg.cholesky_ex(Gs + lr[:, None, None] * eye)
        ds = -torch.cholesky_solve(gs[..., None], chol)[..., 0]
        ds = torch.where(((info == 0) & torch.isfinite(ds).all(-1))[:, None], ds, torch.zeros_like(ds))
        trial = project(th + ds / scale)
        new = loss(trial, rows)
        predicted = (ds * (lr[:, None] * ds - gs)).sum(-1)  # ||r||^2 - ||r + J d||^2 (GN model)
        gain = (cr - new) / predicted.clamp_min(1e-300)
        ok = (new < cr) & torch.isfinite(new)
        lam[rows] = torch.where(ok, lr * torch.clamp(1 - (2 * gain - 1) ** 3, min=1 / 3), lr * nu[rows]).clamp(
            LAMBDA_MIN, LAMBDA_MAX
        )
        nu[rows] = torch.where(ok, torch.full_like(lr, 2.0), nu[rows] * 2)
        moved = rows[ok]
        if len(moved):
            theta[moved] = trial[ok]
            cur[moved], G[moved], g[moved] = system(theta[moved], moved)
        keep = ((cur[rows] / norm2[rows]).sqrt() > EXACT) & (lam[rows] < LAMBDA_MAX)
        if it % STALL_WINDOW == 0:
            keep &= past[rows] - cur[rows] > STALL_RTOL * past[rows]
            past = cur.clone()
        rows = rows[keep]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=len(rows), median_rel_error=f"{float((cur / norm2).sqrt().median()):.3g}")
        if not len(rows):
            break
    if bar is not None:
        bar.close()
    return theta


def _progress_bar(steps: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="refining", unit="step", leave=False)


# ---------------------------------------------------------------------------------------------
# variable projection for the modal target: the residues eliminated, poles only
# ---------------------------------------------------------------------------------------------
SVD_RTOL = 1e-13  # singular values of the pole design below this (relative) are dropped: rank deficiency


def poles_from_coordinates(z: torch.Tensor, r_max: float) -> torch.Tensor:
    """p = r_max exp(-exp(w) + i phi) for z = [w, phi] (F, 2m): |p| < r_max for every finite z, so
    the refinement needs no projection (and never sits on a clamp where its steps are cut)."""
    m = z.shape[-1] // 2
    return r_max * torch.exp(torch.complex(-torch.exp(z[:, :m]), z[:, m:]))


def coordinates_from_poles(p: torch.Tensor, r_max: float) -> torch.Tensor:
    """The inverse of `poles_from_coordinates`; radii are first clamped to [1e-6, 1 - 1e-12] r_max
    (a pole at the origin or on r_max has no finite coordinate)."""
    ratio = (p.abs() / r_max).clamp(1e-6, 1 - 1e-12)
    return torch.cat([torch.log(-torch.log(ratio)), p.angle()], -1)


def _pole_design(p: torch.Tensor, N: int):
    """V = p^0 .. p^(N-1) (F, m, N) and the truncated SVD of the real design Phi = [Re V, -Im V]^T
    (F, N, 2m) of h[t] = Phi c (t >= 1), c = 2 [Re res, Im res]: (V, Phi, Uk, coefficient map)
    with Uk the retained left singular vectors (zero columns for dropped ones) and the map
    W diag(1/s) (F, 2m, 2m), so that c = map Uk^T h and the projection is Uk Uk^T."""
    V = powers(p, N)
    Phi = torch.cat([V.real, -V.imag], -2).transpose(-1, -2).nan_to_num(0.0, 0.0, 0.0)
    U, s, Wh = torch.linalg.svd(Phi, full_matrices=False)
    keep = s > SVD_RTOL * s[..., :1]
    Uk = U * keep[..., None, :]
    inv = torch.where(keep, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    return V, Uk, Wh.transpose(-1, -2) * inv[..., None, :]


def projected_residues(p: torch.Tensor, taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(res, loss): the least-squares residues for the poles p (F, m) against the memory taps
    (F, N) (taps t >= 1; 2 Re sum res p^(t-1)), and the squared error left, (F, m) complex, (F,)."""
    _, Uk, cmap = _pole_design(p, taps.shape[-1])
    Uh = Uk.transpose(-1, -2) @ taps[..., None]
    c = (cmap @ Uh)[..., 0] / 2
    m = p.shape[-1]
    loss = ((Uk @ Uh)[..., 0] - taps).square().sum(-1)  # explicit: ||h||^2 - ||Uk^T h||^2 cancels
    return torch.complex(c[:, :m], c[:, m:]), loss


def _vp_residual(z: torch.Tensor, taps: torch.Tensor, r_max: float):
    p = poles_from_coordinates(z, r_max)
    V, Uk, cmap = _pole_design(p, taps.shape[-1])
    Uh = Uk.transpose(-1, -2) @ taps[..., None]
    r = (Uk @ Uh)[..., 0] - taps  # the fit minus the taps: -(I - P) h
    return p, V, Uk, (cmap @ Uh)[..., 0], r


def _vp_loss(z: torch.Tensor, taps: torch.Tensor, r_max: float, chunk: int = 1 << 22) -> torch.Tensor:
    step = max(1, chunk // (taps.shape[-1] * z.shape[-1]))
    return torch.cat(
        [_vp_residual(z[s : s + step], taps[s : s + step], r_max)[-1].square().sum(-1) for s in range(0, len(z), step)]
    )


def _vp_system(z: torch.Tensor, taps: torch.Tensor, r_max: float, chunk: int = 1 << 22):
    """(loss, J^T J, J^T r) of the projected residual r(z) = P(z) h - h for z = [w, phi], with
    Kaufman's Jacobian J = (I - P) dPhi/dz c (the term of dP that the least-squares optimality
    makes second order dropped): (F,), (F, 2m, 2m), (F, 2m)."""
    F, N = taps.shape
    m = z.shape[-1] // 2
    losses, Gs, gs = [], [], []
    step = max(1, chunk // (N * 4 * m))
    t = torch.arange(N, device=z.device, dtype=z.dtype)
    for s in range(0, F, step):
        zs = z[s : s + step]
        p, V, Uk, c, r = _vp_residual(zs, taps[s : s + step], r_max)
        res = torch.complex(c[:, :m], c[:, m:]) / 2
        dV = t * torch.cat([torch.zeros_like(V[..., :1]), V[..., :-1]], -1)  # d p^t / dp = t p^(t-1)
        dp = torch.cat([-torch.exp(zs[:, :m]) * p, 1j * p], -1)  # dp/dw, dp/dphi
        X = 2 * (res.repeat(1, 2)[..., None] * dV.repeat(1, 2, 1) * dp[..., None]).real  # (f, 2m, N)
        X = X.transpose(-1, -2)
        J = X - Uk @ (Uk.transpose(-1, -2) @ X)
        losses.append(r.square().sum(-1))
        Gs.append(J.transpose(-1, -2) @ J)
        gs.append((J.transpose(-1, -2) @ r[..., None])[..., 0])
    return torch.cat(losses), torch.cat(Gs), torch.cat(gs)


def variable_projection(
    p: torch.Tensor, taps: torch.Tensor, r_max: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Golub-Pereyra variable projection for h[t] ~ 2 Re sum res p^(t-1) (taps (F, N), t >= 1):
    the residues are eliminated by least squares for given poles, and `levenberg_marquardt` runs on
    the pole coordinates alone (`poles_from_coordinates`: |p| < r_max by construction), from the
    poles p (F, m). Returns (poles, residues, squared error) of the best iterate."""
    z = coordinates_from_poles(p, r_max)
    z = levenberg_marquardt(
        z,
        lambda th, rows: _vp_system(th, taps[rows], r_max),
        lambda th, rows: _vp_loss(th, taps[rows], r_max),
        lambda th: th,
        taps.square().sum(-1).clamp_min(1e-300),
        steps,
    )
    p = poles_from_coordinates(z, r_max)
    res, loss = projected_residues(p, taps)
    return p, res, loss
