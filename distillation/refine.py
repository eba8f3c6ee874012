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
