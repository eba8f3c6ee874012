"""Laughing Hyena distillation, the maths: fit an RTF of a chosen order to every filter of a bank.

Problem.  A trained long-convolution filter bank (implicit Hyena filters, or RTFs of a higher
order) gives F target kernels h[f, 0..L-1], L = l_max. We want, per filter, an order-n RTF

    H(z) = h0 + (b1 z^-1 + ... + bn z^-n) / (1 + a1 z^-1 + ... + an z^-n)

whose TRAINING kernel (models/rtf.py: `rational_kernel(b, a, h0, L')`, L' = l_max rounded up to
even) matches the targets in relative l2 over the L taps,

    e_f = || K(a_f, b_f, h0_f)[0:L] - h_f || / || h_f ||,     K = irfft(rfft([0, b]) / rfft([1, a]) + h0, L'),

with every pole inside |z| <= r_max < 1 (so the recurrent form exists) and a denominator whose
FFT the model can evaluate in its own precision (section 5). Shapes: target (F, L) float64;
a, b (F, n); h0 (F,).

1. Hankel section and its SVD.  The taps g[t] = h[t+1] of an order-n system, g[t] = C A^t B, fill
   Hankel matrices of rank n. We use an r x c section with its rows SPREAD over the filter,

       Hk[i, j] = g[s i + j],    r = min(hankel_size, L // 2),  s = max(1, floor(((L-1) // 2) / (r-1))),
       c = (L - 1) - s (r - 1)   (every tap is used; s = 1 below L = 4 r - 3, s = 8 for L = 2048),

   because the row space is spanned by SHIFTED copies of the filter: shifts 0..127 of a filter that
   is smooth over 128 taps are nearly dependent whatever the filter does over 2048 taps, so an
   unspread 128-row section of random-init implicit filters at L = 2048 had sigma_9 / sigma_1 =
   1.5e-5 while the order-8 ERA missed by 18%; spread to shifts 0..1016 the ERA error was 1.4%.
   Any order-k system still has a rank-k section (each row is a shift of its response).
   r = 128 (hankel_size) bounds the cost: the Gram matrix Hk Hk^T (r x r) is formed in
   O(r c + r^2 s) per filter by sliding the window (`_hankel_gram`) and one batched
   torch.linalg.eigh of it (~2 ms per filter on one core) gives all r singular values (for the
   tolerance mode and the report) and the left singular vectors U. Through the Gram matrix, the
   relative singular values below ~sqrt(eps) = 1e-8 are rounding: modes below RANK_RTOL = 1e-7
   sigma_1 are treated as absent, and `hankel_tail` cannot resolve tolerances below ~1e-7.

2. ERA (Ho-Kalman) realisation.  With Hk ~ U_k S_k V_k^T, the rows of V^T = S^-1 U^T Hk (k x c,
   one FFT correlation per column of U: `_hankel_left_product`) are shift invariant along the
   columns, the unit time step: V^T[:, j+1] = A V^T[:, j]. So

       A = M1 M0^-1,   M1 = V^T[:, 1:] V^T[:, :-1]^T,   M0 = V^T[:, :-1] V^T[:, :-1]^T,
       B = V^T[:, 0],  C = sigma * U[0, :],          g[t] ~ C A^t B,

   and the order-j system for any j <= k is the leading j x j block (`_ERABasis`). M0 is the Gram
   matrix of nearly orthonormal rows, so these normal equations are well conditioned, and the
   time span used is the long one (c taps). Modes below the numerical rank get zero rows (poles
   at the origin); orders above r - 1 are padded the same way. The eigendecomposition
   A = V diag(p) V^-1 gives poles p_i and residues rho_i = (C V)_i (V^-1 B)_i: h[t] = sum_i rho_i
   p_i^(t-1) for t >= 1 (section 6 reuses them).

3. To the project's RTF parameters, aliasing included.  The kernel over t < L' is the L'-periodic
   aliasing of the impulse response of (a, b, h0), i.e. the truncated response of the corrected
   system C_corr = b (I - A_c^L')^-1 (models/rtf.py). In companion form (`rtf_from_companion`):
   to make the kernel equal c A_c^(t-1) e1 (t >= 1) and h[0] at t = 0,

       b = c (I - A_c^L'),     h0 = h[0] - c A_c^(L'-1) e1.

   The initialisation does not use that matrix power: the entries of A_c^L' grow like the
   coefficients of a (6e3 at order 16 for implicit filters) and the kernels it gave were off by
   1e33. Instead (`rtf_from_response`): for a = prod_i (1 - p_i z^-1) and the truncated modal
   response k (length L'), the kernel DFT is B/A + h0, so the CIRCULAR convolution [1, a] (*) k is
   [h0, b_1 + h0 a_1, ..., b_n + h0 a_n, 0, ..., 0]; its first n + 1 entries (wrap-around included)
   give b and h0 exactly, O(n^2). The tests check both routes against each other and numpy.

4. Refinement: Levenberg-Marquardt on (a, b, h0).  The residual r = K[0:L] - h has a Jacobian made
   of circular SHIFTS of two sequences,

       dK/db_i = S^i u,   u = irfft(1 / A~);     dK/da_j = -S^j w,   w = irfft(B~ / A~^2);     dK/dh0 = delta_0

   (A~ = rfft([1, a]), B~ = rfft([0, b]), S the one-step circular delay), so J^T J and J^T r over a
   full period are circular correlations, one FFT each: <S^i x, S^j y> = rho_xy[i - j] with
   rho_xy = irfft(conj(X) Y), <S^i x, r> = rho_xr[i], <S^i x, delta_0> = x[-i mod L'] (rows
   t in [L, L'), the tap L'-1 for odd l_max, are subtracted as outer products). ~16 FFTs of
   length L' and a (2n+1)^2 Cholesky per filter and step, never an L x (2n+1) Jacobian. Each step
   solves (J^T J + lam diag(J^T J)) d = -J^T r (Marquardt scaling: the coefficients of high orders
   differ by orders of magnitude), is kept only if the error decreases (so the current iterate is
   the best one) and adapts lam per filter from the gain ratio (Nielsen). Filters leave the batch
   once converged. Why not Adam: on the order-8 implicit-filter targets of the tests (L = 128,
   24 filters) from the same ERA start (median error 4.45e-3), 3000 Adam steps through
   rational_kernel (lr 1e-3 to 1e-6, poles clamped) never got below 4.45e-3, while LM reached
   4.40e-3 in 20 steps and 3.70e-3 in 300: in these coordinates cond(J^T J) is ~1e16 even after
   scaling, and first-order steps crawl. Every candidate is projected before it is evaluated: poles with
   |p| > r_max are pulled radially onto |p| = r_max (Schur-Cohn test every step, eigenvalues only
   for the rows that fail), then the conditioning bound of section 5. The l1 Montel constraint
   (sum |a_i| < 1) is not used: sufficient, not necessary, for stability, it excludes the slow
   poles trained filters need for order > 1 ((1 - 0.99 z^-1)^2 has sum |a_i| = 2.97), so the fit is
   loaded into an RTF with constraint "none".

5. What the model can evaluate: the conditioning bound.  The kernel is rfft(b) / rfft(a): a
   relative rounding eps of the coefficients (float32 storage, models/precision.py) or of the FFT
   moves 1 / A by up to eps * kappa, kappa = ||[1, a]||_1 / min_k |A(e^(2 pi i k / L'))|
   (`fft_condition`). Poles clustered near z = 1, exactly what smooth long filters need, make
   kappa astronomic: n poles at distance d from 1 give ~2^n / d^n (a double pole at 0.998 already
   gives 1e6, i.e. a few percent of error at DC in float32). Unchecked, order-16 fits of implicit
   filters had float32 kernels that were NaN, and at L = 2048 even float64 ones were garbage.
   So every denominator is kept at kappa <= CONDITION_RTOL / eps(kernel_dtype) by contracting all
   its poles (a_j <- a_j s^j, a well-conditioned map; s by regula falsi), and lower-order ERA
   starts padded with poles at the origin (`_lower_order_starts`: the same kappa as the lower
   order) are tried for every filter, since a lower order may meet the bound with its slow poles
   intact. CONDITION_RTOL = 0.1 was measured (implicit filters, L = 512 and 2048, orders 4 and 8):
   with it the float32 module's kernel was within 2% of the float64 error of the fit (at L = 128,
   order 16, 2.6x: 8.1e-3 against 3.1e-3); at 1 it was up to 2x worse, at 10 NaN; at 1e-3 the
   constraint cost 3-7x in error. The bound makes the float32 RTF a poor target for long smooth
   filters (numbers in tests/test_distill_math.py); kernel_dtype=float64 states that the RTF will
   keep its parameters and compute its kernel in float64.

6. Modal target (`distill_modal`, the comparison of the RTF paper's Table 3): a diagonal complex
   state space in conjugate pairs, the form Laughing Hyena and StripedHyena decode with,

       h[t] = 2 Re sum_{i=1}^{n/2} r_i p_i^(t-1)   (t >= 1),      h[0] = D,

   n/2 complex states = n real numbers of state and 2n + 1 real parameters, as an order-n RTF (n
   even). No aliasing and no coefficient conditioning: the recurrence x_i <- p_i x_i + u runs these
   taps exactly. Init: the same ERA modes, one slot per conjugate pair; a real pole also takes a
   whole slot (2 Re(r p^t) with real p is ONE real mode), so when the ERA has real poles only the
   n/2 - (number of pairs) most energetic (|rho|^2 / (1 - |p|^2)) are kept: a handicap of the
   conjugate-pair form. Refinement: the same Levenberg-Marquardt driver, steps and stopping rule,
   with the explicit Jacobian in (Re p, Im p, Re r, Im r, D), poles clamped to r_max.

Hankel bound.  An order-k fit has a rank-<= k Hankel section, so by Eckart-Young its error,
weighted by how often each tap appears in the section, cannot beat

    ||Hk(h - h_fit)||_F / ||Hk(h)||_F  >=  tail_k = sqrt(sum_{i > k} sigma_i^2) / ||Hk(h)||_F,

reported per filter as `hankel_tail[:, k]`; `tolerance` picks the smallest k with tail_k below it
for every filter of the bank. `hankel_sv` holds the sigma_i of the section (of the spread
section when s > 1, not the AAK singular values of the infinite Hankel operator).

Background: docs/mathematics.md of the Hyena-RTF repository (sections 1.3, 1.8 and 5).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fft import irfft, rfft

from .rtf import RTF, companion, rational_kernel

INITS = ("hankel", "prony", "random")
R_MAX = 0.9999  # largest pole radius a fit may have: 0.9999^2048 = 0.81, memory well past l_max
HANKEL_SIZE = 128  # rows of the Hankel section (module docstring, section 1)
RANK_RTOL = 1e-7  # singular values below this times the largest are numerical zeros (Gram: sqrt(eps))
LAMBDA0, LAMBDA_MIN, LAMBDA_MAX = 1e-3, 1e-15, 1e16  # Levenberg-Marquardt damping (scaled problem)
STALL_WINDOW, STALL_RTOL = 10, 1e-4  # a filter stops once it improved by < 1e-4 (relative) in 10 steps
EXACT = 1e-14  # relative errors below this are rounding: such a filter needs no more steps
CONTRACT_TRIES = 4  # contractions clamp_poles tries before it gives a denominator up
CONTRACT_STEPS, CONTRACT_XTOL = 16, 1e-7  # regula falsi steps of condition_denominators, and its s tolerance
LOWER_ORDERS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)  # orders _lower_order_starts tries
CONDITION_RTOL = 0.1  # bound on eps * fft_condition in the kernel dtype (module docstring, section 5)


@dataclass
class FilterFit:
    """An order-`order` RTF per target filter, in the project's parametrisation.

    a: (F, n) float64 monic denominators 1 + a_1 z^-1 + ... + a_n z^-n, every pole |p| <= r_max < 1.
    b: (F, n) float64 numerators such that RTF(a, b, h0, constraint="none", fft_len) has
       kernel(l_max) equal to the fitted taps (the aliasing of section 3 included).
    h0: (F,) float64 feed-through.  order: n.
    rel_error: (F,) ||kernel_fit - target|| / ||target|| over the L target taps.
    hankel_sv: (F, m) leading singular values of each target's Hankel section (m <= r).
    fft_len: the L' the fit was made for.  init_error: (F,) rel_error of the initialisation.
    hankel_tail: (F, m) relative Frobenius tail after k singular values, k = 0..m-1 (the bound).
    condition: (F,) `fft_condition` of each denominator (eps times it bounds the relative
       rounding of 1/A in the kernel's dtype; kept <= CONDITION_RTOL / eps(kernel_dtype)).
    """

    a: torch.Tensor
    b: torch.Tensor
    h0: torch.Tensor
    order: int
    rel_error: torch.Tensor
    hankel_sv: torch.Tensor
    fft_len: int = 0
    init_error: torch.Tensor | None = None
    hankel_tail: torch.Tensor | None = None
    condition: torch.Tensor | None = None


@dataclass
class ModalFit:
    """Conjugate-pair modal fits: h[t] = 2 Re sum_i residues_i poles_i^(t-1) (t >= 1), h[0] = d.

    poles, residues: (F, order // 2) complex128; d: (F,) float64; rel_error, init_error: (F,).
    """

    poles: torch.Tensor
    residues: torch.Tensor
    d: torch.Tensor
    order: int
    rel_error: torch.Tensor
    init_error: torch.Tensor

    def kernel(self, T: int) -> torch.Tensor:
        """The first T taps, (F, T) float64."""
        return modal_kernel(self.poles, self.residues, self.d, T)


# ---------------------------------------------------------------------------------------------
# checks and the Hankel section
# ---------------------------------------------------------------------------------------------
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
    """(rows r, stride s, columns c) of the Hankel section of L taps (module docstring, section 1)."""
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


# ---------------------------------------------------------------------------------------------
# polynomials, poles and the companion <-> RTF map
# ---------------------------------------------------------------------------------------------
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


def schur_stable(a: torch.Tensor, r_max: float) -> torch.Tensor:
    """(F,) bool: every root of z^n + a_1 z^(n-1) + ... + a_n has modulus < r_max (Schur-Cohn:
    the reflection coefficients of the step-down recursion of a_j / r_max^j are all inside (-1, 1)).
    O(n^2) vector operations, no eigenvalues: the cheap test the refinement runs every step."""
    n = a.shape[-1]
    c = a / r_max ** torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    ok = torch.isfinite(c).all(-1)
    c = torch.where(ok[:, None], c, torch.zeros_like(c))
    for m in range(n, 0, -1):
        k = c[:, m - 1]
        ok &= k.abs() < 1
        k = torch.where(ok, k, torch.zeros_like(k))  # rows already out: any finite value will do
        c = (c[:, : m - 1] - k[:, None] * c[:, : m - 1].flip(-1)) / (1 - k * k)[:, None]
    return ok


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


def fft_condition(a: torch.Tensor, fft_len: int) -> torch.Tensor:
    """||[1, a]||_1 / min_k |A(e^(2 pi i k / fft_len))|, (F,): the factor by which a relative
    rounding eps of the coefficients (storage) or of their FFT (evaluation) can grow in 1 / A on
    the kernel's frequency grid. Clustered poles near z = 1 make it huge (the numerator grows like
    2^n, the minimum like the n-th power of the distance to 1); sum |a| < 1 (Montel) keeps it
    below (1 + sum |a|) / (1 - sum |a|)."""
    a1 = torch.cat([torch.ones_like(a[:, :1]), a], -1)
    spectrum = rfft(a1, n=fft_len)
    low = (spectrum.real.square() + spectrum.imag.square()).amin(-1).sqrt()
    return a1.abs().sum(-1) / low.clamp_min(1e-300)


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


# ---------------------------------------------------------------------------------------------
# initialisations
# ---------------------------------------------------------------------------------------------
@dataclass
class _ERABasis:
    """The shift-invariance data of the ERA for every order up to k (module docstring, section 1):
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
    V = _powers(p, L - 1).transpose(-1, -2)  # (F, L-1, n)
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


def _clamp(p: torch.Tensor, r_max: float) -> torch.Tensor:
    return p * (r_max / p.abs().clamp_min(r_max))


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
    k = (rho[..., None] * _powers(p, fft_len - 1)).sum(-2).real
    b, h0 = rtf_from_response(a, torch.cat([tap0[:, None].to(k.dtype), k], -1))
    return a, b, h0


# ---------------------------------------------------------------------------------------------
# the error and its Gauss-Newton system
# ---------------------------------------------------------------------------------------------
def _rtf_loss(theta: torch.Tensor, target: torch.Tensor, fft_len: int) -> torch.Tensor:
    """||K[0:L] - target||^2 per filter, theta = [a, b, h0] (F, 2n+1)."""
    n = (theta.shape[-1] - 1) // 2
    K = rational_kernel(theta[:, n : 2 * n], theta[:, :n], theta[:, 2 * n], fft_len)[:, : target.shape[-1]]
    return (K - target).square().sum(-1)


def _rtf_system(theta: torch.Tensor, target: torch.Tensor, fft_len: int):
    """(loss, J^T J, J^T r) per filter for theta = [a, b, h0], by the circular correlations of the
    module docstring (section 4). Shapes (F,), (F, 2n+1, 2n+1), (F, 2n+1)."""
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
    powers = _powers(p, T - 1)  # (F, m, T-1): p^0 .. p^(T-2)
    h = 2.0 * (res[..., None] * powers).sum(-2).real
    return torch.cat([d[:, None].to(h.dtype), h], -1)


def _powers(p: torch.Tensor, T: int) -> torch.Tensor:
    """p^0 .. p^(T-1) along a new last axis, by cumulative products (exact at p = 0)."""
    steps = p[..., None].expand(*p.shape, T).clone()
    steps[..., 0] = 1.0
    return steps.cumprod(-1)


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
        V = _powers(p, L)  # p^0 .. p^(L-1)
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
# public entry points
# ---------------------------------------------------------------------------------------------
def _rtf_start(modes, target: torch.Tensor, fft_len: int, r_max: float, max_condition: float):
    """(theta, moved): theta = [a, b, h0] (F, 2n+1) of the RTF of the modes (p, rho), poles
    clamped to r_max and the denominator conditioned (`condition_denominators`); where that moved
    the poles (`moved`), or the conversion overflowed, the numerator is refitted for the new
    denominator (`best_numerator`)."""
    p, rho = modes
    a, b, h0 = rtf_from_modes(_clamp(p, r_max), rho, target[:, 0], fft_len)
    good = torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1) & torch.isfinite(h0)
    a_ok = condition_denominators(clamp_poles(a, r_max), fft_len, max_condition)
    moved = (a_ok != a).any(-1)
    redo = moved | ~good
    if redo.any():  # other poles than the modes': the modes' numerator no longer applies
        b[redo], h0[redo] = best_numerator(a_ok[redo], target[redo], fft_len)
    return torch.cat([a_ok, b, h0[:, None]], -1), moved


def _lower_order_starts(theta, rows, basis: _ERABasis, target, fft_len: int, r_max: float, max_condition: float):
    """Where the order-n ERA start is worse than an order-j ERA start (j < n) padded with poles at
    the origin (the same RTF, written with n coefficients: a_{j+1..n} = b_{j+1..n} = 0), take the
    latter. This matters most when `condition_denominators` had to contract the order-n poles (a
    lower order may satisfy the bound with its slow poles intact), but also where the order-n ERA
    fits spurious modes of a nearly rank-deficient section (implicit filters, L = 128: the order-32
    start was measured at 1.3e-3 against 4.7e-4 for the order-16 one); it keeps the error of the
    start non-increasing in the order. Only the filters `rows` (bool, (F,)) are tried, the orders
    of LOWER_ORDERS below n. Returns (theta, loss)."""
    n = (theta.shape[-1] - 1) // 2
    loss = _rtf_loss(theta, target, fft_len)
    if not rows.any():
        return theta, loss
    theta, loss, sub, target_r = theta.clone(), loss.clone(), basis.rows(rows), target[rows]
    best, best_loss = theta[rows], loss[rows]
    for j in [j for j in LOWER_ORDERS if j < n]:
        cand, _ = _rtf_start(sub.modes(j), target_r, fft_len, r_max, max_condition)
        pad = cand.new_zeros(cand.shape[0], n - j)
        cand = torch.cat([cand[:, :j], pad, cand[:, j : 2 * j], pad, cand[:, 2 * j :]], -1)
        new = _rtf_loss(cand, target_r, fft_len)
        better = new < best_loss
        best, best_loss = torch.where(better[:, None], cand, best), torch.where(better, new, best_loss)
    theta[rows], loss[rows] = best, best_loss
    return theta, loss


def distill_filters(
    target: torch.Tensor,
    fft_len: int,
    order: int | None = None,
    tolerance: float | None = None,
    steps: int = 300,
    init: str = "hankel",
    max_order: int = 64,
    progress: bool = False,
    r_max: float = R_MAX,
    hankel_size: int = HANKEL_SIZE,
    seed: int = 0,
    kernel_dtype: torch.dtype = torch.float32,
) -> FilterFit:
    """Fit an order-`order` RTF (or the order `tolerance` picks) to each row of target (F, L).

    target: taps h[0..L-1] (tap 0 = feed-through), L = l_max of the model; fft_len: its L'.
    Exactly one of order / tolerance. tolerance: the smallest order k <= max_order whose relative
    Hankel tail (see `FilterFit.hankel_tail`) is <= tolerance for EVERY filter: one order per bank.
    steps: at most this many Levenberg-Marquardt steps (it stops earlier once no filter improves).
    init: "hankel" (ERA), "prony" (linear prediction) or "random" (random stable poles).
    r_max: largest pole radius allowed. hankel_size: cap on the Hankel section (module docstring).
    seed: of the random init. kernel_dtype: the precision the RTF will store its parameters and
    compute its kernel in (float32: the project's rule, models/precision.py); every denominator
    is kept evaluable in it (module docstring, section 5), which limits long smooth filters.
    """
    target = _check_target(target, fft_len)
    F, L = target.shape
    if (order is None) == (tolerance is None):
        raise ValueError("give exactly one of order and tolerance")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not 0.0 < r_max < 1.0:
        raise ValueError(f"r_max must be in (0, 1), got {r_max}")
    if order is not None:
        _check_order(order, L)
    else:
        if not 0.0 < tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
        _check_order(max_order, L)
    sv_all, U = _hankel_svd(target, hankel_size)
    m = min(sv_all.shape[-1], max(order or 0, max_order) + 1)
    sv, tails = sv_all[:, :m], _tails(sv_all, m)
    if order is None:
        order = choose_order(tails, tolerance, min(max_order, m - 1))
    max_condition = CONDITION_RTOL / torch.finfo(kernel_dtype).eps
    norm2 = target.square().sum(-1)
    if init == "hankel":
        basis = _era_basis(sv_all, U, target, order)
        theta, _ = _rtf_start(basis.modes(order), target, fft_len, r_max, max_condition)
        every = torch.ones(F, dtype=torch.bool, device=target.device)
        theta, start = _lower_order_starts(theta, every, basis, target, fft_len, r_max, max_condition)
    else:
        modes = _prony_modes(target, order, r_max) if init == "prony" else _random_modes(target, order, seed)
        theta, _ = _rtf_start(modes, target, fft_len, r_max, max_condition)
        start = _rtf_loss(theta, target, fft_len)
    init_error = (start / norm2.clamp_min(1e-300)).sqrt()

    def project(th):
        a = condition_denominators(clamp_poles(th[:, :order], r_max), fft_len, max_condition)
        return torch.cat([a, th[:, order:]], -1)

    theta = levenberg_marquardt(
        theta,
        lambda th, rows: _rtf_system(th, target[rows], fft_len),
        lambda th, rows: _rtf_loss(th, target[rows], fft_len),
        project,
        norm2.clamp_min(1e-300),
        steps,
        progress,
    )
    rel = (_rtf_loss(theta, target, fft_len) / norm2.clamp_min(1e-300)).sqrt()
    return FilterFit(
        a=theta[:, :order].contiguous(),
        b=theta[:, order : 2 * order].contiguous(),
        h0=theta[:, 2 * order].contiguous(),
        order=order,
        rel_error=rel,
        hankel_sv=sv,
        fft_len=fft_len,
        init_error=init_error,
        hankel_tail=tails,
        condition=fft_condition(theta[:, :order], fft_len),
    )


def distill_modal(
    target: torch.Tensor,
    order: int,
    steps: int = 300,
    r_max: float = R_MAX,
    hankel_size: int = HANKEL_SIZE,
    progress: bool = False,
) -> ModalFit:
    """Conjugate-pair modal fit with n/2 = order/2 complex modes (module docstring, section 5):
    the same ERA, the same Levenberg-Marquardt driver and stopping rule as `distill_filters`."""
    target = _check_target(target, target.shape[-1])
    F, L = target.shape
    _check_order(order, L)
    if order % 2:
        raise ValueError(f"the conjugate-pair modal form needs an even order, got {order}")
    sv, U = _hankel_svd(target, hankel_size)
    p, rho = _era_basis(sv, U, target, order).modes(order)
    real = p.imag.abs() <= 1e-12 * p.abs().clamp_min(1e-300)
    energy = rho.abs().square() / (1 - p.abs().square().clamp_max(r_max**2))
    key = torch.where(real, energy, torch.where(p.imag > 0, torch.full_like(energy, float("inf")), -energy - 1))
    pick = key.topk(order // 2, -1).indices
    p, rho, real = p.gather(-1, pick), rho.gather(-1, pick), real.gather(-1, pick)
    p = _clamp(p, r_max)
    res = torch.where(real, rho / 2, rho)  # a real pole's slot carries the whole mode
    theta = torch.cat([p.real, p.imag, res.real, res.imag, target[:, :1]], -1)
    norm2 = target.square().sum(-1).clamp_min(1e-300)
    init_error = (_modal_loss(theta, target) / norm2).sqrt()
    m = order // 2

    def project(th):
        q = _clamp(torch.complex(th[:, :m], th[:, m : 2 * m]), r_max)
        return torch.cat([q.real, q.imag, th[:, 2 * m :]], -1)

    theta = levenberg_marquardt(
        theta,
        lambda th, rows: _modal_system(th, target[rows]),
        lambda th, rows: _modal_loss(th, target[rows]),
        project,
        norm2,
        steps,
        progress,
    )
    p, res, d = _modal_split(theta)
    return ModalFit(p, res, d, order, (_modal_loss(theta, target) / norm2).sqrt(), init_error)


def filter_bank_taps(filter_module: torch.nn.Module, length: int) -> torch.Tensor:
    """(num_filters, length) float64 taps of the DISTINCT filters of an RTF or ImplicitFilter: the
    kernel the module itself computes (in its own precision: what the layer trains and scores
    with), one row per filter (kernel() repeats each filter over channels // num_filters
    consecutive channels)."""
    with torch.no_grad():
        k = filter_module.kernel(length)
    return k[:: filter_module.channels // filter_module.num_filters].to(torch.float64).contiguous()


def load_fit(rtf: RTF, fit: FilterFit) -> None:
    """Copy fit.a, fit.b, fit.h0 into `rtf` (cast to its parameter dtype).

    rtf must have num_filters = F, num_a = F, state_size = fit.order, constraint "none" and, if the
    fit records one, the same fft_len. The parameters are usually float32 (models/precision.py):
    check rtf.pole_radius() after loading if the fit has poles very close to r_max."""
    F = fit.a.shape[0]
    problems = []
    if rtf.num_filters != F or rtf.num_a != F:
        problems.append(f"num_filters = num_a = {F} (got {rtf.num_filters}, {rtf.num_a})")
    if rtf.state_size != fit.order:
        problems.append(f"state_size = {fit.order} (got {rtf.state_size})")
    if rtf.constraint != "none":
        problems.append(f"constraint 'none' (got {rtf.constraint!r})")
    if fit.fft_len and rtf.fft_len != fit.fft_len:
        problems.append(f"fft_len = {fit.fft_len} (got {rtf.fft_len})")
    if problems:
        raise ValueError("load_fit needs an RTF with " + ", ".join(problems))
    with torch.no_grad():
        rtf.a.copy_(fit.a.to(rtf.a))
        rtf.b.copy_(fit.b.to(rtf.b))
        rtf.h0.copy_(fit.h0.to(rtf.h0))
