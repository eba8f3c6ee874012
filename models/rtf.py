"""Rational Transfer Function (RTF) long-convolution filter: the kernel it trains with, and its modal form.

Each filter is a rational transfer function of order n (the state size)

    H(z) = h0 + (b1 z^-1 + ... + bn z^-n) / (1 + a1 z^-1 + ... + an z^-n)

with learned denominator `a` (monic, shared by groups of filters), strictly proper numerator `b`
and feed-through `h0`: 2n + 1 numbers per filter.

Kernel (training).  Sampling H on the L' roots of unity (L' = l_max rounded up to even) and taking
one inverse rfft gives, for t < L', the L'-periodic aliasing of the impulse response. Its cost is
O(L' log L') per filter and does not depend on n: there is no state.

Recurrent form (decoding, and every no-grad forward).  With poles lambda_k (the roots of
z^n + a1 z^(n-1) + ... + an) and residues r_k of b~(z)/A(z), b~(z) = b1 z^(n-1) + ... + bn,

    r_k = b~(lambda_k) / prod_{j != k} (lambda_k - lambda_j),

the aliased kernel above is exactly the truncated impulse response of the modal system
(models/modal.py) with

    r~_k = r_k / (1 - lambda_k^L'),       d~ = h0 + Re sum_k r~_k lambda_k^(L'-1),

no matrix or polynomial powers involved (`rtf_modal_system`). That system decodes in O(n) per token,
continues the kernel past l_max, and gives the state after any chunk in closed form. It is built in
float64 and checked tap by tap against the float64 FFT kernel; a filter whose two forms differ by
more than the conditioning of its coefficients explains is reported by a warning that names it.

Stored form (exports).  The conversion above costs O(n^3) per filter (the roots), about 0.6 s for a
768-filter layer of order 64 on one CPU core. An export runs it once and stores its result in the
checkpoint (`store_recurrence`, buffers `modal_form` and `modal_stamp`); a load that finds it
stamped with the digest of exactly these parameter values uses it instead of converting again
(`stored_conversion`). Any change of the parameters, or of the stored numbers, breaks the stamp,
and the filter converts as it would without it.

Which route `kernel(T)` takes.  When autograd would differentiate it (training), or inside
`training_route()` (the trainer's evaluations), the FFT route above (T <= l_max only: training
never runs past l_max). Otherwise the taps of the memoised modal system,
so that the parallel forward, the chunked prefill and the token-by-token decoding of a model are one
system, also for filters whose coefficients are too ill-conditioned for the FFT route (clustered
poles near the unit circle: docs/mathematics.md section 1.8). A filter with a pole on or outside the
unit circle (trained without a constraint) keeps the FFT kernel up to l_max and has no recurrence
unless asked for with a warning.

Precision.  Spectra in float32 (complex64), or float64 when the parameters or `kernel_dtype` are;
the modal system in float64; the decoding state float32 or wider (models/modal.py `state_dtype`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
from torch.fft import irfft, rfft

from .long_filter import LongFilter, in_training_route
from .modal import ModalSystem, amplification, blocked_powers, pack_real_pairs, state_dtype
from .precision import DtypeName

RTFInit = Literal["zeros", "xavier", "montel"]
RTFConstraint = Literal["none", "l1_montel"]
INITS, CONSTRAINTS, KERNEL_DTYPES = get_args(RTFInit), get_args(RTFConstraint), get_args(DtypeName)
# The modal form's taps must match the float64 FFT kernel to this relative l2 error, plus the
# rounding the coefficients' conditioning allows (`conversion_bound`).
CONVERSION_RTOL = 1e-9
# Past l_max, a filter differentiates through its closed form only when no |A'(lambda_k)| is smaller
# (`differentiable_rows`): the gradient's relative rounding stays below about 1e-6.
GRAD_MIN_DERIVATIVE = 1e-4
ZERO_CLUSTER = 1e-3  # poles this close to the origin count as one repeated pole at 0 (`_spread_zero_cluster`)


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


def fft_condition(a: torch.Tensor, fft_len: int) -> torch.Tensor:
    """kappa = ||[1, a]||_1 / min_j |A(e^(2 pi i j / L'))| per row of a (F, n): a relative rounding eps of
    the coefficients (storage) or of their FFT (evaluation) moves the kernel's 1/A by up to about
    eps kappa. Clustered poles near the unit circle make it huge (the numerator grows like 2^n,
    the minimum like the n-th power of the distance to the circle); sum |a| < 1 (Montel) keeps it
    below (1 + sum |a|) / (1 - sum |a|)."""
    den = torch.cat([torch.ones_like(a[:, :1]), a], -1)
    return den.abs().sum(-1) / rfft(den, n=fft_len).abs().amin(-1).clamp_min(1e-300)


def conversion_bound(a: torch.Tensor, fft_len: int, amplification: torch.Tensor) -> torch.Tensor:
    """The relative error allowed between the modal taps and the float64 FFT kernel, per filter: the
    FFT kernel is only good to about eps64 kappa (`fft_condition`), the modal taps to about eps64
    times their terms' cancellation (models/modal.py `amplification`); a factor 16 for the
    transforms' and products' own rounding, and no check asks for better than CONVERSION_RTOL."""
    eps = torch.finfo(torch.float64).eps
    return CONVERSION_RTOL + 16 * eps * (fft_condition(a, fft_len) + amplification.nan_to_num(math.inf))


def conversion_ok(error: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Per filter: a finite error within its bound."""
    return torch.isfinite(error) & (error <= bound)


def _power(z: torch.Tensor, e: int) -> torch.Tensor:
    """z^e elementwise by repeated squaring (log2 e products; 0^e = 0 for e >= 1, z^0 = 1)."""
    out, base = torch.ones_like(z), z
    while e:
        if e & 1:
            out = out * base
        base, e = base * base, e >> 1
    return out


def _slots(lam: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Poles and residues (F, n) complex, closed under conjugation -> one slot per real pole and per
    conjugate pair (its representative with Im > 0, residue doubled), padded with zero slots to the
    largest count: (F, m) each. LAPACK returns a real matrix's complex eigenvalues in exact pairs."""
    keep = lam.imag >= 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    m = int(keep.sum(-1).max()) if lam.shape[0] else 0
    lam_s, r_s, keep_s = (t.gather(-1, order)[:, :m] for t in (lam, r, keep))
    r_s = torch.where(lam_s.imag > 0, 2 * r_s, torch.complex(r_s.real, torch.zeros_like(r_s.real)))
    zero = torch.zeros_like(lam_s)
    return torch.where(keep_s, lam_s, zero), torch.where(keep_s, r_s, zero)


def poles_of(a: torch.Tensor) -> torch.Tensor:
    """Roots of z^n + a1 z^(n-1) + ... + an per row of a (F, n): the eigenvalues of the companion
    matrices, (F, n) complex, on a's device. Computed on the host (many small non-symmetric
    eigenproblems), where LAPACK takes the matrices one after the other on one thread, so the rows
    are split over torch's intra-op threads (each call releases the GIL)."""
    # Small dense problems, on the host: torch's CUDA eig (MAGMA's or cuSOLVER's geev) is itself a
    # hybrid CPU-GPU routine taking one matrix at a time, which its authors found slower than the
    # host's LAPACK below thousands of rows (not measured here: no GPU).
    device, a = a.device, a.cpu()
    # Filters that share a denominator (num_a < num_filters) share its roots: each is computed once.
    a, rows = torch.unique(a, dim=0, return_inverse=True) if a.shape[0] > 1 else (a, None)
    threads = torch.get_num_threads()
    if threads <= 1 or a.shape[0] < 2 * threads:
        lam = torch.linalg.eigvals(companion(a))
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(lambda part: torch.linalg.eigvals(companion(part)), a.tensor_split(threads))
            lam = torch.cat(list(parts))
    return (lam if rows is None else lam[rows]).to(device)


def rtf_modal_system(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, fft_len: int) -> ModalSystem:
    """The modal system whose truncated impulse response is the size-fft_len FFT kernel of (a, b, h0)
    (module docstring), closed form, float64, differentiable (distinct poles): a, b (F, n), h0 (F,).
    Filter level; residues of exactly repeated poles are infinite (`convert_rtf` repairs them)."""
    a, b, h0 = (t.to(torch.float64) for t in (a, b, h0))
    return _closed_form(torch.linalg.eigvals(companion(a)), b, h0, fft_len)


def _closed_form(lam: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, fft_len: int) -> ModalSystem:
    """rtf_modal_system from the poles lam (F, n) complex128 (the roots of A)."""
    n = lam.shape[-1]
    num = torch.zeros_like(lam)
    for i in range(n):  # Horner: b~(lambda) = b1 lambda^(n-1) + ... + bn
        num = num * lam + b[:, i : i + 1]
    diff = lam[:, :, None] - lam[:, None, :]  # (F, n, n): lambda_k - lambda_j
    if not diff.requires_grad:  # in place: a masked copy of this (F, n, n) tensor costs twice its product
        diff.diagonal(dim1=-2, dim2=-1).fill_(1)
    else:
        diff = torch.where(torch.eye(n, dtype=torch.bool, device=lam.device), torch.ones_like(diff), diff)
    den = diff.prod(-1)  # A'(lambda_k) = prod_(j != k) (lambda_k - lambda_j)
    r = torch.where(num == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))
    r = torch.where((den == 0) & (num != 0), torch.full_like(r, math.inf), r)
    # r~ = r / (1 - lambda^L') and its tap-0 term r~ lambda^(L'-1), written with 1/lambda for a pole
    # outside the unit circle (an unconstrained RTF), where lambda^L' would overflow.
    outside = lam.abs() > 1
    safe = torch.where(outside, 1 / torch.where(outside, lam, torch.ones_like(lam)), lam)
    p = _power(safe, fft_len - 1)  # lambda^(L'-1), or lambda^-(L'-1) outside
    gap = torch.where(outside, p - lam, torch.ones_like(p))  # (no 0 / 0 in a branch not taken: NaN gradients)
    r_alias = torch.where(outside, r * p / gap, r / (1 - p * lam))
    wrap = torch.where(outside, r / gap, r_alias * p)  # r~ lambda^(L'-1)
    d = h0 + wrap.sum(-1).real
    return ModalSystem(*_slots(lam, r_alias), d, torch.float64)


def differentiable_rows(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, fft_len: int, conversion, exact: torch.Tensor
) -> torch.Tensor:
    """(F,) bool: the filters whose taps past L' may be differentiated through the closed form
    (`rtf_modal_system` with autograd). Its values must pass the conversion's check against the
    checked taps `exact` (F, T), and every |A'(lambda_k)| = prod_(j != k) |lambda_k - lambda_j| must be
    at least GRAD_MIN_DERIVATIVE: the residues divide by A'(lambda_k), their derivatives by its
    square, so the gradient's rounding grows as the poles close in (measured against a float64
    recurrence on a pair, a triple and a double complex pair of poles: relative error 2e-7 at
    |A'| = 1.4e-4, 2e-4 at 1.4e-5, 3e-5 at 7e-7), and the backward of an exactly repeated pole is a
    singular solve."""
    lam = poles_of(a.to(torch.float64))
    taps = _closed_form(lam, *(t.to(torch.float64) for t in (b, h0)), fft_len).taps(exact.shape[-1])
    error = (taps - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-300)
    diff = lam[:, :, None] - lam[:, None, :]
    diff.diagonal(dim1=-2, dim2=-1).fill_(1)
    derivative = diff.abs().prod(-1).amin(-1) if lam.shape[-1] else error.new_ones(error.shape)
    return conversion_ok(error, conversion.bound) & (derivative >= GRAD_MIN_DERIVATIVE)


def _spread_zero_cluster(lam: torch.Tensor) -> torch.Tensor:
    """Poles (n,) with the cluster at the origin (|lambda| < ZERO_CLUSTER) replaced by p distinct poles
    rho e^(i pi (2k + 1) / p), closed under conjugation. A p-fold pole at 0 is a p-tap FIR part that
    no diagonal system holds exactly; p modes of radius rho match it with residues of size
    rho^-(p-1) (rounding: eps rho^-(p-1)) and a leak of rho^p past tap p, balanced at
    rho = eps^(1 / (2p - 1)): about sqrt(eps) either way."""
    small = lam.abs() < ZERO_CLUSTER
    p = int(small.sum())
    if p < 2:
        return torch.where(small, torch.zeros_like(lam), lam)
    rho = torch.finfo(torch.float64).eps ** (1.0 / (2 * p - 1))
    angles = math.pi * (2 * torch.arange(p, dtype=torch.float64) + 1) / p
    spread = torch.polar(torch.full_like(angles, rho), angles)
    spread = torch.where(spread.imag.abs() < 1e-12, spread.real.to(lam.dtype), spread)  # the real one, exactly
    out = lam.clone()
    out[small] = spread
    return out


def _residues_by_least_squares(lam: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The slot residues (m,) complex that best fit taps[1:] (L',) for the slot poles lam (m,):
    min || Re sum_k r_k lambda_k^(t-1) - taps[t] ||, real unknowns (Re r, Im r) per pair and Re r per
    real pole (SVD least squares: rank-deficient columns get no weight)."""
    T = taps.shape[-1]
    small, big = blocked_powers(lam[None], T - 1)
    V = (big[0][:, None, :] * small[0].T[None]).flatten(0, 1)[: T - 1]  # (T - 1, m): lambda^(t-1)
    design = torch.cat([V.real, -V.imag], dim=-1)
    sol = torch.linalg.lstsq(design, taps[1:, None], driver="gelsd").solution[:, 0]
    m = lam.shape[-1]
    return torch.complex(sol[:m], torch.where(lam.imag == 0, torch.zeros_like(sol[m:]), sol[m:]))


@dataclass
class ModalConversion:
    """What `convert_rtf` built, per filter: the system (filter level, float64), the largest |pole|
    `radius`, the relative l2 `error` of its taps against the float64 FFT kernel over [0, L'), the
    `bound` that error must meet (`conversion_bound`) and the modal terms' `amplification`."""

    system: ModalSystem
    radius: torch.Tensor
    error: torch.Tensor
    bound: torch.Tensor
    amplification: torch.Tensor

    @property
    def stable(self) -> torch.Tensor:
        return self.radius < 1.0


# Hashed into every stamp: a new layout of the stored form gets a new version, so that a form stored
# in an older layout never matches (the filter then converts from its parameters).
STORED_FORM_VERSION = b"hyena-rtf stored modal form 1"
STORED_FORM_BUFFERS = ("modal_form", "modal_stamp")  # the buffers `store_recurrence` fills


def split_float64(x: torch.Tensor) -> torch.Tensor:
    """float64 (...) -> (3, ...) float32: the 64 bits of each number as three integers of 22, 21 and 21
    bits (the first signed), each of which float32 holds exactly (|k| <= 2^22 < 2^24), so that a
    float32 round trip, or a widening to float64, keeps every bit (NaN, inf, -0.0, subnormals too)."""
    bits = x.contiguous().view(torch.int64)
    low = (1 << 21) - 1
    return torch.stack([bits >> 42, (bits >> 21) & low, bits & low]).float()


def join_float64(parts: torch.Tensor) -> torch.Tensor:
    """(3, ...) parts of split_float64 -> the float64 numbers (...), bit for bit."""
    k = parts.to(torch.int64)
    return (k[0] * (1 << 42) + k[1] * (1 << 21) + k[2]).view(torch.float64)


def pack_conversion(conversion: ModalConversion, n: int) -> torch.Tensor:
    """ModalConversion of F filters (at most n slots) -> (F, 4n + 5) float64: per filter Re lambda,
    Im lambda, Re r, Im r (n columns each, the slots zero-padded to n), then d, radius, error, bound
    and amplification."""
    s = conversion.system
    pad = (0, n - s.slots)
    slots = [torch.nn.functional.pad(t, pad) for t in (s.lam.real, s.lam.imag, s.res.real, s.res.imag)]
    scalars = [s.d, conversion.radius, conversion.error, conversion.bound, conversion.amplification]
    return torch.cat([*slots, *(t[:, None] for t in scalars)], dim=-1).to(torch.float64)


def unpack_conversion(form: torch.Tensor, n: int, slots: int) -> ModalConversion:
    """The inverse of pack_conversion for a system of `slots` slots: form (F, 4n + 5) float64."""
    lr, li, rr, ri = (form[:, j * n : j * n + slots] for j in range(4))
    d, radius, error, bound, amp = form[:, 4 * n :].unbind(-1)
    system = ModalSystem(torch.complex(lr, li), torch.complex(rr, ri), d, torch.float64)
    return ModalConversion(system, radius, error, bound, amp)


@torch.no_grad()
def convert_rtf(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, fft_len: int) -> ModalConversion:
    """`rtf_modal_system`, checked tap by tap against the float64 FFT kernel. A stable filter that misses
    its bound (repeated poles: infinite or cancelling residues) is built again from least-squares
    residues for its poles, the cluster at the origin spread (`_spread_zero_cluster`), d from tap 0;
    the better of the two is kept, and whatever error remains is reported in `error`."""
    a, b, h0 = (t.to(torch.float64) for t in (a, b, h0))
    lam_all = poles_of(a)  # (F, n): computed once, the costly part (O(n^3))
    system = _closed_form(lam_all, b, h0, fft_len)
    reference = rational_kernel(b, a, h0, fft_len)  # (F, L')
    radius = lam_all.abs().amax(-1) if a.shape[-1] else h0.new_zeros(h0.shape)

    def check(sys: ModalSystem):
        taps = sys.taps(fft_len)
        err = (taps - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-300)
        err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
        amp = amplification(sys, taps)
        return err, conversion_bound(a, fft_len, amp), amp

    error, bound, amp = check(system)
    finite = torch.isfinite(reference).all(-1)
    redo = (~conversion_ok(error, bound) & (radius < 1) & finite).nonzero().flatten().tolist()
    if not redo:
        return ModalConversion(system, radius, error, bound, amp)
    refits = []
    for f in redo:
        lam_f, _ = _slots(_spread_zero_cluster(lam_all[f])[None], torch.zeros_like(lam_all[f])[None])
        refits.append((lam_f[0], _residues_by_least_squares(lam_f[0], reference[f])))
    m = max([system.slots] + [len(lam_f) for lam_f, _ in refits])
    lam0, res0 = (torch.nn.functional.pad(t, (0, m - system.slots)) for t in (system.lam, system.res))
    lam, res, d = lam0.clone(), res0.clone(), system.d.clone()
    for f, (lam_f, res_f) in zip(redo, refits):
        lam[f], res[f], d[f] = 0, 0, reference[f, 0]
        lam[f, : len(lam_f)], res[f, : len(res_f)] = lam_f, res_f
    error2, bound2, amp2 = check(ModalSystem(lam, res, d, torch.float64))
    better = error2 < error  # only redone rows can differ
    pick = better[:, None]
    system = ModalSystem(
        torch.where(pick, lam, lam0), torch.where(pick, res, res0), torch.where(better, d, system.d), torch.float64
    )
    error, bound, amp = (torch.where(better, new, old) for new, old in ((error2, error), (bound2, bound), (amp2, amp)))
    return ModalConversion(system, radius, error, bound, amp)


def check_order(order: int, l_max: int) -> None:
    """The rule for an RTF's order n (its state size): 1 <= n < l_max. The kernel's FFT has l_max
    points, and n + 1 denominator coefficients zero-padded into fewer points would be cut off."""
    if not 1 <= order < l_max:
        raise ValueError(f"every RTF order must be in [1, l_max={l_max}), got {order}")


class RTF(LongFilter):
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
        kernel_dtype: "float32" or "float64", the precision of the FFT route that turns (a, b, h0)
            into the training kernel (parameters stay float32 either way). Dividing by A(z) on the
            unit circle loses about log10 of its condition digits (`fft_condition`).
        stored_form: hold the buffers of the stored modal form (module docstring): an exported
            checkpoint's config says so (`stored_recurrence`), so that loading it fills them.
    """

    own_optimizer_group = True  # (a, b, h0, slack): the RTF paper's own lr, no weight decay

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
        stored_form: bool = False,
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
        check_order(state_size, l_max)
        self.channels, self.num_filters, self.num_a = channels, num_filters, num_a
        self.state_size, self.l_max = state_size, l_max
        self.fft_len = fft_length(l_max)
        if kernel_dtype not in KERNEL_DTYPES:
            raise ValueError(f"rtf kernel_dtype must be one of {KERNEL_DTYPES}, got {kernel_dtype!r}")
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
        if stored_form:
            self._add_stored_form()

    @classmethod
    def from_config(cls, config, layer_idx: int, channels: int, num_filters: int | None) -> RTF:
        module = cls(
            channels,
            config.state_size_of(layer_idx),
            config.l_max,
            num_filters=num_filters,
            num_a=config.num_a,
            init=config.rtf_init,
            constraint=config.rtf_constraint,
            kernel_dtype=config.rtf_kernel_dtype,
            stored_form=config.stored_recurrence,
        )
        module.layer_idx = layer_idx
        return module

    # ---- parameters as the filters see them ---------------------------------------------------
    def denominator(self) -> torch.Tensor:
        """Constrained denominators, one row per filter: (num_filters, n), compute dtype."""
        a = self.a.to(compute_dtype(self.a))
        if self.constraint == "l1_montel":
            a = a / (a.abs().sum(-1, keepdim=True) + self.slack.to(a.dtype).abs()[:, None] + self.eps)
        return a.repeat_interleave(self.num_filters // self.num_a, dim=0)

    # ---- parallel form ------------------------------------------------------------------------
    def kernel(self, T: int) -> torch.Tensor:
        """Convolution kernel of length T, (channels, T), in float32 (float64 for float64 params).

        Differentiated (training), or inside `training_route()` (an evaluation during training):
        the first T taps of the length-L' FFT kernel, T <= l_max (past it, the closed-form modal
        system's taps, differentiable for distinct poles).
        Otherwise: the taps of the modal system (`recurrence`'s), at any T, so that every inference
        form of the model is one system; filters with a pole on or outside the unit circle keep the
        FFT kernel up to l_max (module docstring).
        """
        if self.needs_grad():
            if T <= self.l_max:
                return self._expand(self._fft_kernel(T))
            return self._expand(self._long_kernel_with_grad(T).to(self.compute_dtype()))
        if T <= self.l_max and in_training_route():  # an evaluation during training: training's kernel
            with torch.no_grad():
                return self._expand(self._fft_kernel(T))
        conversion = self.conversion()
        if T <= self.l_max and not bool(conversion.stable.all()):
            with torch.no_grad():
                return self._expand(self._fft_kernel(T))
        k = self.memo_taps(T, lambda n: conversion.system.taps(n))
        return self._expand(k.to(self.compute_dtype()))

    def _long_kernel_with_grad(self, T: int) -> torch.Tensor:
        """T > l_max taps with gradients (an eval-mode forward outside no_grad), (num_filters, T)
        float64: the closed-form modal system, differentiable through the poles (eigenvalues) and
        residues. Only filters whose closed form is both right and well-conditioned to differentiate
        go through it (`differentiable_rows`); the others get the differentiable FFT kernel up to L'
        and the checked conversion's taps after it, with no gradient through those later taps (a
        warning says so). They never enter the eigenvalue call with autograd: the backward of the
        eigenvalues of a defective matrix (a repeated pole) is a singular solve, even for a zero
        gradient."""
        conversion = self.conversion()
        exact = self.memo_taps(T, lambda n: conversion.system.taps(n))  # the no-grad route's, memoised
        a, b, h0 = self.denominator(), self.b, self.h0
        good = differentiable_rows(a.detach(), b.detach(), h0.detach(), self.fft_len, conversion, exact)
        if bool(good.all()):
            return rtf_modal_system(a, b, h0, self.fft_len).taps(T)
        warnings.warn(
            f"{self.where()}RTF filters {(~good).nonzero().flatten().tolist()[:8]} have repeated or clustered poles: "
            "past l_max their kernel taps carry no gradient",
            stacklevel=3,
        )
        head = self._fft_kernel(self.fft_len).to(torch.float64)
        taps = torch.cat([head, exact[:, self.fft_len :]], dim=-1)
        rows = good.nonzero().flatten()
        if len(rows):
            taps = taps.index_put((rows,), rtf_modal_system(a[rows], b[rows], h0[rows], self.fft_len).taps(T))
        return taps

    def _fft_kernel(self, T: int) -> torch.Tensor:
        """The first T <= l_max taps of the size-L' FFT kernel, (num_filters, T), compute dtype."""
        with torch.autocast(self.a.device.type, enabled=False):
            a = self.denominator()
            if self.kernel_dtype == "float64":
                a = a.to(torch.float64)
            k = rational_kernel(self.b.to(a.dtype), a, self.h0.to(a.dtype), self.fft_len)[:, :T]
        return k.to(compute_dtype(self.a))

    # ---- recurrent form -----------------------------------------------------------------------
    def conversion(self) -> ModalConversion:
        """The filter-level modal system and its check (`rtf_modal_system`), memoised until the
        parameters change."""

        def build() -> ModalConversion:
            stored = self.stored_conversion()
            if stored is not None:
                return stored
            a = self.denominator().to(torch.float64)
            return convert_rtf(a, self.b.to(torch.float64), self.h0.to(torch.float64), self.fft_len)

        return self.memo("conversion", build)

    # ---- the stored form (module docstring) ----------------------------------------------------
    def _add_stored_form(self) -> None:
        """modal_form (3, num_filters, 4n + 5) float32: `pack_conversion`'s float64 numbers, their
        bits in three float32 integers each (`split_float64`); modal_stamp (33,) float32: the slot
        count, then the 32 bytes of the digest (`_stored_digest`). float32 because transformers
        loads everything in a module named `filter` as float32 when a model is loaded in half
        precision (the precision rule, models/precision.py): an integer buffer there would be
        rounded. All zeros: nothing stored (no digest is zero)."""
        n, kw = self.state_size, {"dtype": torch.float32, "device": self.b.device}
        self.register_buffer("modal_form", torch.zeros(3, self.num_filters, 4 * n + 5, **kw))
        self.register_buffer("modal_stamp", torch.zeros(33, **kw))

    def _stored_digest(self, form: torch.Tensor, slots: int) -> torch.Tensor:
        """SHA-256 of the filter's shape and constraint, its parameter values and the stored numbers
        `form`, all as float64 (equal values in any dtype give one digest): (32,) float32 bytes."""
        h = hashlib.sha256(STORED_FORM_VERSION)
        shape = (self.num_filters, self.num_a, self.state_size, self.fft_len, self.constraint, self.eps, slots)
        h.update(repr(shape).encode())
        for name, t in (*sorted(self.named_parameters()), ("modal_form", form)):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).float()

    @torch.no_grad()
    def store_recurrence(self) -> None:
        """Write the modal conversion of the current parameters into the stored form (adding its
        buffers if the module has none): what an export does before saving."""
        if "modal_form" not in self._buffers:
            self._add_stored_form()
        conversion = self.conversion()
        form = split_float64(pack_conversion(conversion, self.state_size))
        slots = conversion.system.slots
        self.modal_form.copy_(form)
        self.modal_stamp.copy_(torch.cat([torch.tensor([float(slots)]), self._stored_digest(form, slots)]))

    @torch.no_grad()
    def stored_conversion(self) -> ModalConversion | None:
        """The stored modal conversion if its stamp matches the current parameters and its own
        numbers, else None (nothing stored, another model's, or parameters changed since)."""
        stamp = self._buffers.get("modal_stamp")
        if stamp is None or stamp.device.type == "meta":
            return None
        stamp = stamp.to("cpu", torch.float64)
        count = float(stamp[0])  # anything at all in a damaged or never-written buffer: NaN, inf, 1e30
        if not (math.isfinite(count) and count.is_integer() and 0 <= count <= self.state_size):
            return None
        slots = int(count)
        form = self.modal_form
        if not torch.equal(stamp[1:], self._stored_digest(form, slots).double()):
            return None
        return unpack_conversion(join_float64(form), self.state_size, slots)

    def pole_radius(self) -> torch.Tensor:
        """Largest |pole| of each filter, (num_filters,), float64."""
        return self.conversion().radius

    def recurrence(self, dtype: torch.dtype = torch.float32, check: str = "error") -> ModalSystem:
        """The channel-level modal recurrence (memoised until the parameter values change).

        check: "error" (default) refuses a filter with a pole on or outside the unit circle, "warn"
        warns, "none" skips the check. Such a filter's FFT kernel is the aliased response of an
        unstable system and its recurrence diverges past l_max. A filter whose modal taps miss the
        FFT kernel by more than `conversion_bound` is reported by a warning (unless "none").
        """
        conversion = self.conversion()
        unstable = ~conversion.stable
        if check != "none" and bool(unstable.any()):
            bad = torch.nonzero(unstable).flatten().tolist()
            msg = (
                f"{self.where()}RTF filters {bad[:8]}{'...' if len(bad) > 8 else ''} have poles on or outside "
                f"the unit circle (max |pole| = {float(conversion.radius.max()):.4f}): their recurrent form "
                "diverges. Train with rtf_constraint='l1_montel' (keeps every pole inside the unit disk), or "
                "decode with the parallel forward (use_cache=False)."
            )
            if check == "error":
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        inaccurate = conversion.stable & ~conversion_ok(conversion.error, conversion.bound)
        if check != "none" and bool(inaccurate.any()) and not self.memo("reported", lambda: [False])[0]:
            self.memo("reported", lambda: [False])[0] = True  # once per parameter version
            worst = int(torch.argmax(torch.where(inaccurate, conversion.error, -1.0)))
            warnings.warn(
                f"{self.where()}RTF filter {worst} (and {int(inaccurate.sum()) - 1} more): its modal form differs "
                f"from its FFT kernel by {float(conversion.error[worst]):.3g} (relative), more than the "
                f"{float(conversion.bound[worst]):.3g} its conditioning explains; decoding and no-grad forwards "
                "use the modal form",
                stacklevel=2,
            )

        def build() -> ModalSystem:
            system = conversion.system
            chosen = state_dtype(conversion.amplification[conversion.stable], dtype)
            # Real poles two to a slot: ceil(n / 2) slots, n numbers of state per channel.
            return pack_real_pairs(system).to(chosen).expand(self.channels // self.num_filters)

        return self.memo(("recurrence", dtype), build)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, filters={self.num_filters}, num_a={self.num_a}, "
            f"state_size={self.state_size}, l_max={self.l_max}, constraint={self.constraint}"
        )
