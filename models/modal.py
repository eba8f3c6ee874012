"""The modal (pole-residue) form of a finite-state long filter: the recurrence every RTF and modal filter
decodes with, and `ModalFilter`, a filter kind trained or distilled directly in that form.

A filter of finite order with poles lambda_k and residues r_k has the impulse response

    k_0 = d,      k_t = Re sum_k r_k lambda_k^(t-1)    (t >= 1)

with one SLOT per real pole or per conjugate pair (a pair is stored once, its factor 2 folded into
r_k; a real pole has a real r_k). Its recurrence, per channel and slot, is diagonal:

    y_t        = d u_t + Re sum_k r_k x_k,t
    x_k,t+1    = lambda_k x_k,t + u_t

The state is m complex numbers per channel, kept as real and imaginary parts, (B, C, 2, m): a step is
a few fused multiply-adds written back into that state (no new state), and runs unchanged under
torch.compile.

A real pole's state is real, so a slot of its own would leave half of the slot's two numbers at
zero. `pack_real_pairs` puts two real poles a, b in one slot instead (a real 2x2 block): the slot
stores lambda = lambda_a + i lambda_b and r = r_a + i r_b, is marked in `paired`, and steps as

    y += r_a x_1 + r_b x_2,    x_1 <- lambda_a x_1 + u,    x_2 <- lambda_b x_2 + u

so an order-n filter needs ceil(n/2) slots, n real numbers of state, whatever its real poles. The
closed forms below work on the MODES (one per pole: `modes`), a paired slot being two of them.

Over a chunk u_0 .. u_(T-1) from a state x (the chunked prefill that batching, prompt continuation
and serving engines need), everything is closed-form:

    y_t   = (k * u)_t + Re sum_k r_k lambda_k^t x_k          zero-state convolution + state response
    x_T   = lambda^T x + sum_s lambda^(T-1-s) u_s            one Vandermonde product per channel

The convolution is the parallel forward's, with the kernel the filter already holds; this module
gives the other two terms (`response`, `advance`).

Powers lambda^t are formed in float64 as blocked products lambda^(jS) lambda^i (S ~ sqrt(T)), so each
sum above is a batched matrix product and nothing is a polynomial in the coefficients: with
|lambda| < 1 every power is bounded and the form is as well conditioned as its poles and residues.

`ModalFilter` keeps |lambda| = exp(-exp(w)) < 1 by construction (no constraint to enforce), the angle
of lambda, the residues and d, all float32; its kernel, recurrence and everything above come from
the same `ModalSystem`. docs/mathematics.md (sections 1.3 to 1.8) has the derivations and why the companion
form of the coefficients is not used for decoding.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .long_filter import LongFilter

CHUNK_ELEMENTS = 1 << 22  # complex entries per block of the Vandermonde products (bounds their memory)
# The decode state is float32 while eps32 x `amplification` stays below this, else float64.
FLOAT32_STATE_RTOL = 1e-5
LOG_DECAY_MIN = -30.0  # |lambda| = exp(-exp(w)) <= exp(-exp(-30)) = 1 - 9e-14 < 1, even in float64


def _blocks(T: int) -> tuple[int, int]:
    """(S, J) with S J >= T and S ~ sqrt(T): exponent e < T is written e = j S + i, i < S, j < J."""
    S = max(1, math.isqrt(max(T - 1, 0)) + 1)
    return S, max(1, -(-T // S))


def powers(lam: torch.Tensor, count: int) -> torch.Tensor:
    """lambda^0 .. lambda^(count - 1) by a cumulative product: (..., m) -> (..., m, count)."""
    factors = lam.unsqueeze(-1).expand(*lam.shape, count).clone()
    factors[..., 0] = 1
    return torch.cumprod(factors, -1)


def blocked_powers(lam: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """small = lambda^i (..., m, S) for i < S and big = lambda^(jS) (..., J, m) for j < J, S J >= T.
    Relative error about (S + J) eps; zero poles give exact zeros (and lambda^0 = 1)."""
    S, J = _blocks(T)
    small = powers(lam, S)
    big = powers(small[..., -1] * lam, J).transpose(-1, -2)  # lambda^S = lambda^(S-1) lambda
    return small, big


def _dot(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_k c_k x_k over the slots: x (B, R, g, m), c (R, 1, m) -> (B, R, g), with no temporary of x's size."""
    return torch.matmul(x, c.transpose(-1, -2))[..., 0]


def _chunks(n: int, per_item: int) -> list[tuple[int, int]]:
    """Slices of n items (channels, or batch rows) of `per_item` entries each, at most
    CHUNK_ELEMENTS entries a slice (one item when an item alone is larger)."""
    step = max(1, CHUNK_ELEMENTS // max(per_item, 1))
    return [(c, min(n, c + step)) for c in range(0, n, step)]


@dataclass
class ModalSystem:
    """The modal system of C = R g channels: R rows of poles `lam` and residues `res` (R, m)
    complex128 and feed-through `d` (R,) float64, each row serving `group` g consecutive channels (a
    filter shared by channels is held once: a MultiHyena head's filter serves e^2 of them), and
    `dtype`, the real dtype of the decode state and of the step's coefficients.

    Inputs, outputs and states are per channel: u (B, C, T), x (B, C, 2, m). The closed forms run
    the g channels of a row as g more batch rows against the row's poles (`_fold`), and the step
    broadcasts each row's coefficients over its channels, so nothing is held per channel. lambda^t is
    never formed beyond the blocked powers, so every method is O(C m T) time and O(CHUNK_ELEMENTS)
    extra memory. The float64 tensors may carry autograd history (ModalFilter's kernel is
    differentiated through `taps`); the step's coefficients never do.
    """

    lam: torch.Tensor
    res: torch.Tensor
    d: torch.Tensor
    dtype: torch.dtype = torch.float32
    paired: torch.Tensor | None = None  # (R, m) bool: slots holding two real poles, first in each row
    group: int = 1  # consecutive channels per row
    finite_state = True  # the state has a fixed size (the implicit filter's history does not)
    coef: tuple = field(init=False, repr=False)

    def __post_init__(self):
        lr, li, rr, ri = (t.detach() for t in (self.lam.real, self.lam.imag, self.res.real, self.res.imag))
        if self.paired is None:
            # What a step reads: (R, m) real and imaginary parts of lambda and r, and d, in `dtype`.
            parts = (lr, li, rr, ri, self.d.detach())
            self.pair_columns = 0
        else:
            # The slot's 2x2 block [[a11, a12], [a21, a22]], the input's weight e2 on x_2 and the output
            # weights (c1, c2): a rotation-scaling for a conjugate pair, diag(lambda_a, lambda_b) for two
            # real poles (module docstring).
            p, zero = self.paired, torch.zeros_like(lr)
            parts = (
                lr, torch.where(p, zero, -li), torch.where(p, zero, li), torch.where(p, li, lr),
                p.to(lr.dtype), rr, torch.where(p, ri, -ri), self.d.detach(),
            )  # fmt: skip
            self.pair_columns = int(p.any(0).sum())  # paired slots come first: columns [0, k) hold them all
            self._modes = self._split_pairs()  # what every closed form reads: built once, not per chunk
        # (R, 1, m) and d (R, 1): broadcast over the g channels of each row by the step
        self.coef = tuple(t.to(self.dtype).unsqueeze(1).contiguous() for t in parts)

    @property
    def rows(self) -> int:
        return self.lam.shape[0]

    @property
    def channels(self) -> int:
        return self.rows * self.group

    @property
    def slots(self) -> int:
        return self.lam.shape[-1]

    @property
    def complex_dtype(self) -> torch.dtype:
        return torch.complex128 if self.dtype == torch.float64 else torch.complex64

    def to(self, dtype: torch.dtype) -> ModalSystem:
        """The same system with its state and step in `dtype` (float32 or float64)."""
        return ModalSystem(self.lam.detach(), self.res.detach(), self.d.detach(), dtype, self.paired, self.group)

    def expand(self, repeats: int) -> ModalSystem:
        """The same system with each row serving `repeats` times as many consecutive channels (a
        filter bank expanded to its channels): nothing is copied."""
        out = copy.copy(self)
        out.group = self.group * repeats
        return out

    def _fold(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) per channel -> (B g, R, ...): the g channels of a row as batch rows."""
        return t.unflatten(1, (self.rows, self.group)).transpose(1, 2).flatten(0, 1)

    def _unfold(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """Inverse of `_fold`: (B g, R, ...) -> (B, C, ...)."""
        return t.unflatten(0, (batch, self.group)).transpose(1, 2).flatten(1, 2)

    def modes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Poles and residues of every mode, (R, M) complex: the slots, and a paired slot's second
        real pole in one of k extra columns (M = m + k)."""
        return (self.lam, self.res) if self.paired is None else self._modes

    def _split_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, p = self.pair_columns, self.paired
        split = []
        for t in (self.lam, self.res):
            first = torch.where(p, torch.complex(t.real, torch.zeros_like(t.real)), t)
            second = torch.complex(t.imag[:, :k], torch.zeros_like(t.imag[:, :k]))
            split.append(torch.cat([first, torch.where(p[:, :k], second, torch.zeros_like(second))], -1))
        return split[0], split[1]

    def _mode_state(self, x: torch.Tensor) -> torch.Tensor:
        """The slot state x (B, R, 2, m) of rows as one complex state per mode, (B, R, M)."""
        x1, x2 = x[:, :, 0], x[:, :, 1]
        if self.paired is None:
            return torch.complex(x1, x2)
        k, p = self.pair_columns, self.paired
        first = torch.complex(x1, torch.where(p, torch.zeros_like(x2), x2))
        second = torch.where(p[:, :k], x2[..., :k], torch.zeros_like(x2[..., :k]))
        return torch.cat([first, torch.complex(second, torch.zeros_like(second))], -1)

    def _slot_state(self, xm: torch.Tensor) -> torch.Tensor:
        """Inverse of `_mode_state`: (B, R, M) complex -> (B, R, 2, m) real (a real mode's state is real)."""
        first = xm[..., : self.slots]
        second = first.imag
        if self.paired is not None:
            tail = torch.nn.functional.pad(xm[..., self.slots :].real, (0, self.slots - self.pair_columns))
            second = torch.where(self.paired, tail, second)
        return torch.stack((first.real, second), dim=2)

    def init_state(self, batch: int, device=None) -> torch.Tensor:
        """The zero state, (B, C, 2, m): real and imaginary parts of x."""
        return torch.zeros(batch, self.channels, 2, self.slots, dtype=self.dtype, device=device or self.lam.device)

    # ---- one token ----------------------------------------------------------------------------
    def step(self, u: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (B, C), x: (B, C, 2, m) -> (y (B, C) in `dtype`, x advanced IN PLACE and returned).

        y = d u + Re sum_k r_k x_k,     x_k <- lambda_k x_k + u
        """
        # Sizes from the tensors the step reads anyway: a compiled step then takes no other input
        # (reading self.lam's shape would make it one, once dynamo treats shapes as symbolic).
        B, C, _, m = x.shape
        R = self.coef[0].shape[0]
        g = C // R
        u = u.to(self.dtype).reshape(B, R, g)  # each row's coefficients broadcast over its g channels
        xg = x.view(B, R, g, 2, m)
        x1, x2 = xg[:, :, :, 0], xg[:, :, :, 1]  # (B, R, g, m) each, views of the state

        # Fused multiply-adds into two new halves, then one write each: the step is memory-bound,
        # and each elementwise temporary of the state's size costs a pass over it.
        if self.paired is None:
            lr, li, rr, ri, d = self.coef
            y = torch.addcmul(_dot(x1, rr), d, u).sub_(_dot(x2, ri))
            new1 = torch.addcmul(u.unsqueeze(-1), lr, x1).addcmul_(li, x2, value=-1)  # lr x1 - li x2 + u
            new2 = torch.mul(lr, x2).addcmul_(li, x1)  # lr x2 + li x1
        else:
            a11, a12, a21, a22, e2, c1, c2, d = self.coef  # the 2x2 blocks (module docstring)
            y = torch.addcmul(_dot(x1, c1), d, u).add_(_dot(x2, c2))
            new1 = torch.addcmul(u.unsqueeze(-1), a11, x1).addcmul_(a12, x2)
            new2 = torch.mul(e2, u.unsqueeze(-1)).addcmul_(a21, x1).addcmul_(a22, x2)
        x1.copy_(new1)
        x2.copy_(new2)
        return y.reshape(B, R * g), x

    # ---- whole chunks -------------------------------------------------------------------------
    def taps(self, T: int) -> torch.Tensor:
        """Impulse response k_0 .. k_(T-1) of each row, (R, T) float64 (differentiable in lam, res, d)."""
        if T <= 1:
            return self.d[:, None][:, :T]
        lam, res = self.modes()
        tail = self._real_part_sums(lam, res.unsqueeze(0), T - 1, torch.complex128)[0]  # (R, T - 1)
        return torch.cat([self.d[:, None], tail], dim=-1)

    def response(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """Output of the state x (B, C, 2, m) over the next T steps with no input: (B, C, T), `dtype`.

        y_t = Re sum_k r_k lambda_k^t x_k
        """
        lam, res = self.modes()
        xr = self._fold(x)  # (B g, R, 2, m)
        S, J = _blocks(T)
        out = []
        # in slices of the folded batch: a row's g channels must not make one block too large
        for b0, b1 in _chunks(xr.shape[0], J * max(lam.shape[-1], S)):
            coef = res.detach() * self._mode_state(xr[b0:b1].double())
            out.append(self._real_part_sums(lam, coef, T, self.complex_dtype))
        return self._unfold(torch.cat(out), x.shape[0]).to(self.dtype)

    def advance(self, u: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The state after the inputs u (B, C, T) from x (B, C, 2, m) or zero: (B, C, 2, m), `dtype`.

        x_T = lambda^T x + sum_s lambda^(T-1-s) u_s
        """
        ur = self._fold(u)  # (B g, R, T)
        xr = None if x is None else self._fold(x)
        J = _blocks(u.shape[-1] + 1)[1]
        out = [
            self._advance_rows(ur[b0:b1], None if xr is None else xr[b0:b1])
            for b0, b1 in _chunks(ur.shape[0], J * 2 * self.modes()[0].shape[-1])
        ]
        return self._unfold(torch.cat(out), u.shape[0]).contiguous()

    def _advance_rows(self, u: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """`advance` for inputs u (B, R, T) and states x (B, R, 2, m) of the rows themselves."""
        B, C, T = u.shape
        lam = self.modes()[0].detach()
        M = lam.shape[-1]
        small, big = blocked_powers(lam, T + 1)  # exponents 0..T: lambda^T is needed for x
        S, J = small.shape[-1], big.shape[-2]
        ctype = self.complex_dtype
        w = torch.nn.functional.pad(u.to(self.dtype).flip(-1), (0, S * J - T))  # w_e = u_(T-1-e)
        w = w.unflatten(-1, (J, S))  # (B, C, J, S)
        out = torch.empty(B, C, M, dtype=ctype, device=u.device)
        # Real matrix products against [Re lambda^i, Im lambda^i], then the block powers.
        powers = torch.cat([small.real, small.imag], dim=-2).transpose(-1, -2).to(self.dtype)  # (C, S, 2M)
        for c0, c1 in _chunks(C, B * J * 2 * M):
            wc = w[:, c0:c1].permute(1, 0, 2, 3).flatten(1, 2)  # (Cc, B J, S)
            inner = torch.bmm(wc, powers[c0:c1]).unflatten(1, (B, J))  # (Cc, B, J, 2M)
            inner = torch.complex(*inner.chunk(2, dim=-1))  # complex64 or complex128, as the state
            out[:, c0:c1] = (inner * big[c0:c1, None].to(ctype)).sum(2).transpose(0, 1)
        if x is not None:
            lam_T = big[:, T // S] * small[..., T % S]  # (C, M)
            out = out + lam_T.to(ctype) * self._mode_state(x).to(ctype)
        return self._slot_state(out).to(self.dtype).contiguous()

    @staticmethod
    def _real_part_sums(lam: torch.Tensor, coef: torch.Tensor, T: int, ctype: torch.dtype) -> torch.Tensor:
        """Re sum_k coef[b, c, k] lam_ck^t for t < T: lam (C, M), coef (B, C, M) complex -> (B, C, T) real."""
        B, C, m = coef.shape
        small, big = blocked_powers(lam if coef.requires_grad else lam.detach(), T)
        S, J = small.shape[-1], big.shape[-2]
        parts = []
        for c0, c1 in _chunks(C, B * J * max(m, S)):
            q = coef[:, c0:c1].transpose(0, 1)[:, :, None, :] * big[c0:c1, None]  # (Cc, B, J, m)
            y = torch.matmul(q.flatten(1, 2).to(ctype), small[c0:c1].to(ctype))  # (Cc, B J, S)
            parts.append(y.real.unflatten(1, (B, J)).flatten(2)[..., :T].transpose(0, 1))
        return torch.cat(parts, dim=1)


def _without_padding(system: ModalSystem, keep: torch.Tensor, width: int) -> ModalSystem:
    """`system` with only its `keep` (C, m) slots, in order, in `width` columns (rows with fewer are
    filled with lambda = r = 0): the dropped slots have a zero residue and add nothing to the output.
    Without it, a filter whose poles include a repeated one at 0 (rtf_init="zeros", zero trailing
    coefficients) kept one slot per pole, past the ceil(n/2) a serving engine sizes its state for."""
    if width >= system.slots:
        return system
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]
    unused = torch.arange(width, device=keep.device)[None] >= keep.sum(-1, keepdim=True)
    lam, res = (
        torch.where(unused, torch.zeros_like(t[:, :width]), t.gather(-1, order)) for t in (system.lam, system.res)
    )
    return ModalSystem(lam, res, system.d, system.dtype, None, system.group)


def pack_real_pairs(system: ModalSystem) -> ModalSystem:
    """The same system with its real poles two to a slot (module docstring), paired slots first in
    each row, then an odd real pole in a slot of its own, then the conjugate pairs; real slots with a
    zero residue (the padding, lambda = r = 0) are dropped. n poles take ceil(n/2) slots (at least
    one). A system with no two real poles in any row keeps its slots unpaired, without the padding."""
    if system.paired is not None:
        return system
    lam, res = system.lam.detach(), system.res.detach()
    real = (lam.imag == 0) & (res != 0)
    pairs = real.sum(-1) // 2  # (C,)
    K = int(pairs.max()) if real.numel() else 0
    odd = real.sum(-1) % 2
    cplx = lam.imag != 0
    width = max(int((pairs + odd + cplx.sum(-1)).max()) if real.numel() else 0, 1)
    C, m = lam.shape
    if K == 0:
        return _without_padding(system, real | cplx, width)
    real_first = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)
    r_lam, r_res = lam.gather(-1, real_first).real, res.gather(-1, real_first).real  # real modes first
    out_lam = lam.new_zeros(C, width + 1)  # the last column takes what is not placed (dropped below)
    out_res = res.new_zeros(C, width + 1)
    paired = torch.zeros(C, width + 1, dtype=torch.bool, device=lam.device)
    valid = torch.arange(K, device=lam.device)[None] < pairs[:, None]  # (C, K)
    zero = lam.new_zeros(())
    out_lam[:, :K] = torch.where(valid, torch.complex(r_lam[:, 0 : 2 * K : 2], r_lam[:, 1 : 2 * K : 2]), zero)
    out_res[:, :K] = torch.where(valid, torch.complex(r_res[:, 0 : 2 * K : 2], r_res[:, 1 : 2 * K : 2]), zero)
    paired[:, :K] = valid
    last = (2 * pairs).clamp_max(m - 1)[:, None]  # the odd real mode, if any, after the pairs
    col = torch.where(odd.bool(), pairs, width)[:, None]
    for out, src in ((out_lam, r_lam), (out_res, r_res)):
        out.scatter_(-1, col, torch.complex(src.gather(-1, last), torch.zeros_like(src.gather(-1, last))))
    cplx_first = torch.argsort((~cplx).to(torch.int8), dim=-1, stable=True)
    j = torch.arange(m, device=lam.device)[None]
    pos = torch.where(j < cplx.sum(-1, keepdim=True), (pairs + odd)[:, None] + j, width)
    for out, src in ((out_lam, lam), (out_res, res)):
        out.scatter_(-1, pos, src.gather(-1, cplx_first))
    return ModalSystem(out_lam[:, :width], out_res[:, :width], system.d, system.dtype, paired[:, :width], system.group)


def amplification(system: ModalSystem, taps: torch.Tensor) -> torch.Tensor:
    """Per row, how much larger the state's terms can get than the output: sum_k |r_k| / (1 - |lambda_k|)
    (the largest |r_k x_k| for inputs bounded by 1) over the l1 norm of the taps. Rounding the state
    to eps costs about eps times this, relative to the output: (C,) float64."""
    lam, res = (t.detach() for t in system.modes())
    gain = (res.abs() / (1 - lam.abs()).clamp_min(1e-300)).sum(-1)
    return gain / taps.detach()[:, 1:].abs().sum(-1).clamp_min(1e-300)


def state_dtype(amplifications: torch.Tensor, requested: torch.dtype) -> torch.dtype:
    """`requested` (the config's recurrent_dtype), promoted to float64 when a float32 state would
    lose more than FLOAT32_STATE_RTOL of the output to cancelling terms (clustered poles with large
    residues of opposite signs): `amplifications` (C,) of the layer's filters (`amplification`)."""
    if requested == torch.float64 or amplifications.numel() == 0:
        return requested
    worst = float(amplifications.max())
    return torch.float64 if worst * torch.finfo(torch.float32).eps > FLOAT32_STATE_RTOL else torch.float32


class ModalFilter(LongFilter):
    """A bank of modal filters expanded to `channels` channels like `RTF`.

    Per filter, m = ceil(state_size / 2) slots (the same real state size and about the same number
    of parameters as an order-state_size RTF):

        lambda_k = exp(-exp(w_k)) e^(i theta_k),    r_k = residue[k, 0] + i residue[k, 1],    d = h0

    Parameters `log_decay` w, `angle` theta (F, m), `residue` (F, m, 2), `h0` (F,), float32. The
    kernel is the exact truncated impulse response at every length (no aliasing, no l_max): the
    parallel form, the recurrence and the kernel past l_max are one system.
    """

    own_optimizer_group = True  # poles and residues: their own lr and no weight decay (training/optim.py)

    def __init__(self, channels: int, state_size: int, l_max: int, num_filters: int | None = None):
        super().__init__()
        num_filters = num_filters or channels
        if channels % num_filters:
            raise ValueError(f"channels ({channels}) must be a multiple of num_filters ({num_filters})")
        if state_size < 1:
            raise ValueError(f"state_size must be >= 1, got {state_size}")
        self.channels, self.num_filters, self.state_size, self.l_max = channels, num_filters, state_size, l_max
        m = -(-state_size // 2)
        # Initial decays spread from fast (|lambda| = 0.5) to slow (memory ~ l_max), angles in [0, pi].
        radius = torch.exp(torch.empty(num_filters, m).uniform_(math.log(0.5), math.log(1 - 1 / l_max)))
        self.log_decay = nn.Parameter(torch.log(-torch.log(radius)))
        self.angle = nn.Parameter(torch.empty(num_filters, m).uniform_(0.0, math.pi))
        self.residue = nn.Parameter(torch.randn(num_filters, m, 2) / math.sqrt(2 * m))
        self.h0 = nn.Parameter(torch.empty(num_filters).uniform_(-1.0, 1.0))

    @classmethod
    def from_config(cls, config, layer_idx: int, channels: int, num_filters: int | None) -> ModalFilter:
        module = cls(channels, config.state_size_of(layer_idx), config.l_max, num_filters=num_filters)
        module.layer_idx = layer_idx
        return module

    def system(self) -> ModalSystem:
        """The filter-level modal system from the parameters, float64, differentiable."""
        w = self.log_decay.double().clamp_min(LOG_DECAY_MIN)
        lam = torch.polar(torch.exp(-torch.exp(w)), self.angle.double())
        res = torch.complex(self.residue[..., 0].double(), self.residue[..., 1].double())
        return ModalSystem(lam, res, self.h0.double(), torch.float64)

    def kernel(self, T: int) -> torch.Tensor:
        """(channels, T): the first T taps of the impulse response, in float32 (float64 parameters:
        float64). Computed in float64 (a float32 phase theta t drifts by eps32 theta t)."""
        if self.needs_grad():
            k = self.system().taps(T)
        else:
            k = self.memo_taps(T, lambda n: self.system().taps(n))
        return self._expand(k.to(self.compute_dtype()))

    @torch.no_grad()
    def recurrence(self, dtype: torch.dtype = torch.float32, check: str = "error") -> ModalSystem:
        """The channel-level recurrent form (memoised until the parameters change). Every pole is
        inside the unit disk by construction, so `check` has nothing to refuse."""

        def build():
            system = self.system()
            chosen = state_dtype(amplification(system, system.taps(self.l_max)), dtype)
            return system.to(chosen).expand(self.channels // self.num_filters)

        return self.memo(("recurrence", dtype), build)

    def poles(self) -> torch.Tensor:
        """(num_filters, m) complex128, detached."""
        return self.system().lam.detach()

    def pole_radius(self) -> torch.Tensor:
        """Largest |pole| of each filter, (num_filters,) float64."""
        return self.poles().abs().amax(-1)

    @torch.no_grad()
    def load_modes(self, poles: torch.Tensor, residues: torch.Tensor, d: torch.Tensor) -> None:
        """Set the parameters from poles and residues (num_filters, m) complex (the pair factor 2
        already in the residues; |pole| < 1) and d (num_filters,)."""
        radius = poles.abs().clamp(1e-30, 1.0)
        if bool((radius >= 1).any()):
            raise ValueError("a modal filter needs every |pole| < 1")
        self.log_decay.copy_(torch.log(-torch.log(radius)).clamp_min(LOG_DECAY_MIN))
        self.angle.copy_(poles.angle())
        self.residue.copy_(torch.stack((residues.real, residues.imag), -1))
        self.h0.copy_(d)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, filters={self.num_filters}, slots={self.log_decay.shape[-1]}"
