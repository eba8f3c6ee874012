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
   filters (numbers in tests/unit/distillation/test_distill_math.py); kernel_dtype=float64 states that the RTF will
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
   with the explicit Jacobian in (Re p, Im p, Re r, Im r, D), poles clamped to r_max. Filters
   still above POLISH_RTOL memory-tap error then get `_polish_modal`: variable projection (the
   residues eliminated by least squares, Levenberg-Marquardt on p = r_max exp(-exp(w) + i phi)
   alone, so |p| < r_max without a clamp for the steps to stall on) from several ERA starts, the
   better fit kept per filter (docs/mathematics.md, section 5.1, has the measurements). Filters
   whose memory decays, then GROWS towards l_max still stall there, with several poles on r_max:
   a stable fit makes a growing envelope only by beating, a pair r_max e^(i (phi +- delta)) with
   residues +-c, whose sum -2i c r_max^t e^(i phi t) sin(delta t) swells until t = pi / (2 delta),
   and a local step never separates such a pair out of one pole. `_split_modal` therefore gives up
   the slot the fit needs least (its least-squares error rises least without it) and puts a
   beating pair, delta of 0.25 to 2 times 2 pi / L, at the angle of each of the slowest other
   slots, each start refined by the same variable projection; up to SPLIT_ROUNDS rounds, each
   from the best fit so far. On the seq_len-2048 benchmark model at order 16 this took the 10
   filters above 1e-2 (up to 0.027) to 7e-4 - 5.4e-3 and no filter got worse. Every stage judges
   a candidate as the float32 ModalFilter stores it (`_stored_loss`); a stage replaces a filter's
   fit only where that is lower.
   Last, `_residues_for_storage` rounds the poles as ModalFilter stores them (float32 log-decay and
   angle) and solves the residues again for the rounded poles, where that lowers the stored error.

Hankel bound.  An order-k fit has a rank-<= k Hankel section, so by Eckart-Young its error,
weighted by how often each tap appears in the section, cannot beat

    ||Hk(h - h_fit)||_F / ||Hk(h)||_F  >=  tail_k = sqrt(sum_{i > k} sigma_i^2) / ||Hk(h)||_F,

reported per filter as `hankel_tail[:, k]`; `tolerance` picks the smallest k with tail_k below it
for every filter of the bank. `hankel_sv` holds the sigma_i of the section (of the spread
section when s > 1, not the AAK singular values of the infinite Hankel operator).

Background: docs/mathematics.md of the Hyena-RTF repository (sections 1.3, 1.8 and 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.modal import ModalFilter, powers
from models.rtf import RTF, rational_kernel

from .hankel import (
    HANKEL_SIZE,
    _check_order,
    _check_target,
    _era_basis,
    _ERABasis,
    _hankel_svd,
    _prony_modes,
    _random_modes,
    _tails,
    choose_order,
    rtf_from_modes,
)
from .poles import _clamp, clamp_poles, condition_denominators, fft_condition
from .refine import (
    _modal_loss,
    _modal_split,
    _modal_system,
    _rtf_loss,
    _rtf_system,
    best_numerator,
    levenberg_marquardt,
    modal_kernel,
    projected_residues,
    variable_projection,
)

INITS = ("hankel", "prony", "random")
R_MAX = 0.9999  # largest pole radius a fit may have: 0.9999^2048 = 0.81, memory well past l_max
LOWER_ORDERS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)  # orders _lower_order_starts tries
POLISH_RTOL = 1e-2  # memory-tap error above which a modal fit gets the variable-projection stage
POLISH_HANKEL = 1024  # rows of the full-resolution (stride 1 at L = 2048) Hankel section of its extra start
# Angle gaps of the beating pairs `_split_modal` starts from, in units of 2 pi / L. Which minimum a
# start ends in depends on rounding: with (0.5, 2) alone one constructed filter ended at 1.7e-2 on
# torch's portable kernels and 5e-4 on AVX2; with all four, 2.0e-3 on both (and <= 7.7e-3 for
# every filter of three seeds of tests/unit/distillation/test_distill_math.py's construction).
SPLIT_GAPS = (0.25, 0.5, 1.0, 2.0)
SPLIT_ROUNDS = 3  # `_split_modal` rounds, each from the best fit so far
SPLIT_PARTNERS = 7  # `_split_modal` pairs the least needed slot's pole with at most this many others
SPLIT_INSET = 1e-4  # the beating pairs start at radius r_max (1 - SPLIT_INSET): slow, off the bound
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

    def kernel(self, T: int) -> torch.Tensor:
        """The first T <= fft_len taps of the fitted RTF's training kernel, (F, T) float64."""
        return rational_kernel(self.b, self.a, self.h0, self.fft_len)[:, :T]

    def load_into(self, module: RTF) -> None:
        load_fit(module, self)


@dataclass
class ModalFit:
    """Conjugate-pair modal fits: h[t] = 2 Re sum_i residues_i poles_i^(t-1) (t >= 1), h[0] = d.

    poles, residues: (F, order // 2) complex128; d: (F,) float64; rel_error, init_error: (F,);
    hankel_sv, hankel_tail: as in FilterFit.
    """

    poles: torch.Tensor
    residues: torch.Tensor
    d: torch.Tensor
    order: int
    rel_error: torch.Tensor
    init_error: torch.Tensor
    hankel_sv: torch.Tensor | None = None
    hankel_tail: torch.Tensor | None = None

    def kernel(self, T: int) -> torch.Tensor:
        """The first T taps, (F, T) float64."""
        return modal_kernel(self.poles, self.residues, self.d, T)

    def load_into(self, module: ModalFilter) -> None:
        """Set a ModalFilter with num_filters = F and order/2 slots to this fit (float32 storage)."""
        if module.num_filters != self.poles.shape[0] or module.log_decay.shape[-1] != self.poles.shape[-1]:
            raise ValueError(
                f"load_into needs a ModalFilter with {self.poles.shape[0]} filters of {self.poles.shape[-1]} slots"
            )
        module.load_modes(self.poles, 2 * self.residues, self.d)


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
    order: int | None = None,
    steps: int = 300,
    r_max: float = R_MAX,
    hankel_size: int = HANKEL_SIZE,
    progress: bool = False,
    tolerance: float | None = None,
    max_order: int = 64,
    polish: bool = True,
) -> ModalFit:
    """Conjugate-pair modal fit with ceil(order/2) slots (module docstring, section 6): the same ERA, the
    same Levenberg-Marquardt driver and stopping rule as `distill_filters`; then, with `polish`, the
    variable-projection stage for the filters still above POLISH_RTOL (`_polish_modal`) and the
    beating-pair stage for those still above it after that (`_split_modal`).

    Give exactly one of `order` and `tolerance`. With a tolerance the order starts at the
    smallest even k whose Hankel tail is below it for every filter (no order-k fit can do better,
    section "Hankel bound") and grows along LOWER_ORDERS until the ACHIEVED worst memory-tap error
    (`memory_error`: taps >= 1, the ones tap 0 cannot hide) is below it, or max_order is reached.
    """
    target = _check_target(target, target.shape[-1])
    F, L = target.shape
    if (order is None) == (tolerance is None):
        raise ValueError("give exactly one of order and tolerance")
    sv, U = _hankel_svd(target, hankel_size)
    if order is not None:
        return _fit_modal(target, order, steps, r_max, sv, U, progress, polish)
    _check_order(max_order, L)
    m = min(sv.shape[-1], max_order + 1)
    k = choose_order(_tails(sv, m), tolerance, min(max_order, m - 1))
    k = min(max_order - max_order % 2, k + k % 2)
    while True:
        fit = _fit_modal(target, k, steps, r_max, sv, U, progress, polish)
        larger = [o for o in LOWER_ORDERS if o % 2 == 0 and k < o <= max_order]
        if float(memory_error(fit.kernel(L), target).max()) <= tolerance or not larger:
            return fit
        k = larger[0]


def memory_error(approx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative l2 error over the memory taps t >= 1, per filter: ||approx[1:] - target[1:]|| /
    ||target[1:]||, (F,) float64. Tap 0 (the feed-through) is usually the largest and the easiest to
    fit; it would hide what the fit loses of the long memory that decoding carries."""
    target = target.double()[:, 1:]
    return (approx.double()[:, 1:] - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-300)


def _modal_start(modes, target: torch.Tensor, m: int, r_max: float) -> torch.Tensor:
    """theta = [Re p, Im p, Re res, Im res, d] (F, 4m + 1) from ERA modes (p, rho) (F, j): one slot
    per conjugate pair (its Im > 0 member) and per real pole, the m most energetic (|rho|^2 /
    (1 - |p|^2)) kept, poles clamped to r_max; the residues are then the least-squares best for
    those poles (a linear problem: h[t] = 2 Re sum res p^(t-1), t >= 1) and d = h[0]."""
    p, rho = modes
    F, L = target.shape
    real = p.imag.abs() <= 1e-12 * p.abs().clamp_min(1e-300)
    energy = rho.abs().square() / (1 - p.abs().square().clamp_max(r_max**2))
    key = torch.where(p.imag < 0, torch.full_like(energy, -1.0), energy)  # conjugates never picked
    if p.shape[-1] < m:
        key, p, real = (torch.nn.functional.pad(t, (0, m - p.shape[-1])) for t in (key, p, real))
    pick = key.topk(m, -1).indices
    p, real, unused = p.gather(-1, pick), real.gather(-1, pick), key.gather(-1, pick) < 0
    p = torch.where(unused, torch.zeros_like(p), _clamp(p, r_max))
    V = powers(p, L - 1).transpose(-1, -2)  # (F, L - 1, m): p^(t-1)
    design = torch.cat([V.real, -V.imag], -1)  # 2 Re(res V) = [Re V, -Im V] . 2 [Re res, Im res]
    sol = torch.linalg.lstsq(design, target[:, 1:, None], driver="gelsd").solution[..., 0] / 2
    res = torch.complex(sol[:, :m], torch.where(real, torch.zeros_like(sol[:, m:]), sol[:, m:]))
    return torch.cat([p.real, p.imag, res.real, res.imag, target[:, :1]], -1)


def _fit_modal(target, order: int, steps: int, r_max: float, sv, U, progress: bool, polish: bool = True) -> ModalFit:
    F, L = target.shape
    _check_order(order, L)
    m = -(-order // 2)  # slots: a conjugate pair or a real pole each
    basis = _era_basis(sv, U, target, 3 * m)  # orders up to 3m: the starts of `_polish_modal`
    theta, best = None, None
    # ERA orders from 2m down to m: a smooth filter's ERA has many real poles, each taking a whole
    # slot, so the order-2m realisation may not fit m slots while a lower one fits them all.
    for j in range(min(2 * m, basis.B.shape[-1]), max(m, 1) - 1, -1):
        candidate = _modal_start(basis.modes(j), target, m, r_max)
        loss = _modal_loss(candidate, target)
        if theta is None:
            theta, best = candidate, loss
        else:
            better = loss < best
            theta, best = torch.where(better[:, None], candidate, theta), torch.minimum(loss, best)
    norm2 = target.square().sum(-1).clamp_min(1e-300)
    init_error = (_modal_loss(theta, target) / norm2).sqrt()

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
    if polish:
        theta = _polish_modal(theta, target, m, steps, r_max, basis)
        theta = _split_modal(theta, target, m, steps, r_max)
    theta = _residues_for_storage(theta, target)
    p, res, d = _modal_split(theta)
    rel = (_modal_loss(theta, target) / norm2).sqrt()
    return ModalFit(p, res, d, order, rel, init_error, sv, _tails(sv, sv.shape[-1]))


def _polish_modal(theta, target, m: int, steps: int, r_max: float, basis, rtol: float | None = None):
    """Variable-projection stage (module docstring, section 6) for the filters whose stored
    memory-tap error (`_stored_loss`) after the joint Levenberg-Marquardt is above rtol: from
    several starts per filter (the fit's own poles; the ERA of the strided section at orders 2m and
    3m and of a full-resolution section at order 2m, each with its unstable poles clamped to r_max
    and, separately, reflected to 1 / conj(p)), `variable_projection` refines the poles alone with
    |p| < r_max by construction; per filter the best of all these and of the incoming fit is kept,
    so no filter gets worse (`_best_of_starts`)."""
    rows = _above(theta, target, POLISH_RTOL if rtol is None else rtol)
    if not len(rows) or steps <= 0:
        return theta
    sub = target[rows]
    starts = [torch.complex(theta[rows, :m], theta[rows, m : 2 * m])]
    sv, U = _hankel_svd(sub, POLISH_HANKEL)
    bases = [(basis.rows(rows), 2 * m), (basis.rows(rows), 3 * m), (_era_basis(sv, U, sub, 2 * m), 2 * m)]
    for b, j in bases:
        p, rho = b.modes(j)
        for q in (p, torch.where(p.abs() > 1, 1 / p.conj(), p)):
            th = _modal_start((q, rho), sub, m, r_max)
            starts.append(torch.complex(th[:, :m], th[:, m : 2 * m]))
    return _best_of_starts(theta, target, rows, starts, steps, r_max)


def _split_modal(theta, target, m: int, steps: int, r_max: float, rtol: float | None = None):
    """Beating-pair stage (module docstring, section 6) for the filters whose stored memory-tap error
    is still above rtol after `_polish_modal`: give up the slot the fit needs least and spend it on
    a beating partner of another slot.

    Why: the hard filters' memory decays, then grows towards l_max (an unconstrained fit wants
    |p| ~ 1.004); stable modes make such an envelope only by beating, a pair r_max e^(i (phi +- delta))
    with residues +-c, whose sum -2i c r_max^t e^(i phi t) sin(delta t) swells until
    t = pi / (2 delta). The stalled fits have several poles on r_max but no such pair, and no local
    step creates one (the two poles of a pair must move together from a coincident, degenerate
    start). So, with k the slot whose removal raises the fit's least-squares error least (residues
    re-solved without it), for each of the SPLIT_PARTNERS slowest other slots j (every other slot
    up to order 16) a start replaces poles k and j by r_max (1 - SPLIT_INSET) e^(i (phi_j -+ delta)),
    delta in SPLIT_GAPS times 2 pi / L (a beat over about the window); `variable_projection`
    refines every start and `_best_of_starts` keeps a start only where it beats the current fit. Up
    to SPLIT_ROUNDS rounds, each for the filters still above rtol and from the best fit so far (a
    first pair often lowers the error without reaching rtol; the next round's least needed slot is
    then another one). Measured on the seq_len-2048 benchmark model at order 16: its 10 filters
    above 1e-2 (0.012-0.027 stored) end at 7e-4 to 5.4e-3; from the stalled fits, 64 random starts
    at the FFT peaks of the taps near the unit circle reached only 0.014-0.023 on the worst three."""
    L = target.shape[-1]
    rtol = POLISH_RTOL if rtol is None else rtol
    hopeful = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    for _ in range(SPLIT_ROUNDS if m >= 2 and steps > 0 else 0):
        rows = _above(theta, target, rtol)
        rows = rows[hopeful[rows]]
        if not len(rows):
            break
        p = torch.complex(theta[rows, :m], theta[rows, m : 2 * m])
        taps = target[rows, 1:]
        without = [projected_residues(torch.cat([p[:, :k], p[:, k + 1 :]], -1), taps)[1] for k in range(m)]
        k = torch.stack(without, -1).argmin(-1)  # the slot the fit needs least
        every = torch.arange(len(rows), device=target.device)
        radius = torch.full_like(p.real[:, 0], r_max * (1 - SPLIT_INSET))
        # Partners: the slowest other slots (largest |p|), where a long-memory envelope lives; at
        # most SPLIT_PARTNERS of them, since a start's refinement costs O(L m^2) per step.
        slowness = p.abs()
        slowness[every, k] = -1  # never its own partner
        partners = slowness.topk(min(m - 1, SPLIT_PARTNERS), dim=-1).indices  # (rows, P)
        starts = []
        for j in partners.T:
            phi = p[every, j].angle()
            for gap in SPLIT_GAPS:
                delta = gap * 2 * torch.pi / L
                q = p.clone()
                q[every, k] = torch.polar(radius, phi - delta)
                q[every, j] = torch.polar(radius, phi + delta)
                starts.append(q)
        before = theta[rows]
        theta = _best_of_starts(theta, target, rows, starts, steps, r_max)
        hopeful[rows] = (theta[rows] != before).any(-1)  # unchanged: the next round would repeat this one
    return theta


def _above(theta, target, rtol: float) -> torch.Tensor:
    """Indices of the filters whose stored memory-tap error (`_stored_loss`) is above rtol."""
    p, res, _ = _modal_split(theta)
    taps = target[:, 1:]
    return (_stored_loss(p, res, taps) > rtol**2 * taps.square().sum(-1)).nonzero().flatten()


def _best_of_starts(theta, target, rows, starts: list, steps: int, r_max: float):
    """theta with the filters `rows` replaced by the best of `variable_projection` from each of
    `starts` (a list of (len(rows), m) poles), where it beats the current fit.

    Judged as the float32 ModalFilter will store them: a fit of beating modes can have large
    cancelling residues whose float32 rounding ruins it (measured: 1e4 relative error). The
    residues are solved for the poles as stored (`_residues_for_storage`)."""
    n = len(starts)
    sub = target[rows]
    taps = sub[:, 1:].repeat(n, 1)
    p, _, _ = variable_projection(torch.cat(starts), taps, r_max, steps)
    p = _stored_poles(p)
    res, _ = projected_residues(p, taps)
    loss = _stored_loss(p, res, taps)
    k = loss.view(n, -1).argmin(0)  # best start per filter
    pick = torch.arange(len(rows), device=target.device) + k * len(rows)
    p, res, loss = p[pick], res[pick], loss[pick]
    old_p, old_res, _ = _modal_split(theta[rows])
    better = loss < _stored_loss(old_p, old_res, sub[:, 1:])
    theta = theta.clone()
    new = torch.cat([p.real, p.imag, res.real, res.imag, sub[:, :1]], -1)
    theta[rows[better]] = new[better]
    return theta


def _residues_for_storage(theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The fit with its poles as ModalFilter stores them (`_stored_poles`) and residues solved again
    by least squares for those poles, per filter where that lowers the stored memory-tap error.

    Why: rounding a pole's angle theta to float32 moves its term at tap t by about |r| t theta eps32,
    and a fit of beating modes has large cancelling residues, so at t ~ l_max this alone can cost
    several percent. Residues solved for the rounded poles absorb it; only their own rounding
    (|r| eps32 per term) is left."""
    p, res, d = _modal_split(theta)
    taps = target[:, 1:]
    q = _stored_poles(p)
    res_q, _ = projected_residues(q, taps)
    better = _stored_loss(q, res_q, taps) < _stored_loss(p, res, taps)
    resolved = torch.cat([q.real, q.imag, res_q.real, res_q.imag, d[:, None]], -1)
    return torch.where(better[:, None], resolved, theta)


def _stored_poles(p: torch.Tensor) -> torch.Tensor:
    """The poles p (F, m) as `ModalFilter.load_modes` stores them: log(-log|p|) and the angle in
    float32, read back in float64 (as ModalFilter.system computes)."""
    w = torch.log(-torch.log(p.abs().clamp(1e-30, 1.0))).float().double()
    return torch.polar(torch.exp(-torch.exp(w)), p.angle().float().double())


def _stored_loss(p: torch.Tensor, res: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Squared memory-tap error (F,) of the modes after the float32 rounding of `ModalFilter.load_modes`
    (log(-log|p|), angle, 2 res)."""
    q = _stored_poles(p)
    r = torch.complex(res.real.float().double(), res.imag.float().double())
    h = modal_kernel(q, r, torch.zeros_like(taps[:, 0]), taps.shape[-1] + 1)[:, 1:]
    return torch.nan_to_num(h - taps, nan=float("inf")).square().sum(-1)


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
