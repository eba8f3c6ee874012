"""The modal (pole-residue) form (models/modal.py) and the RTF -> modal conversion (models/rtf.py), against
independent references: numpy complex128 loops of the definitions, and mpmath at 60 digits for the
conversion of ill-conditioned RTFs.

    k_0 = d,   k_t = Re sum_k r_k lambda_k^(t-1);     x_k <- lambda_k x_k + u,   y = d u + Re sum_k r_k x_k

Tolerances are derived from the conditioning and written beside each assertion: eps times the
number of rounded operations a value went through, times the cancellation between the state's terms
(`amplification`), never a figure observed on one machine.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from support.helpers import filter_chunk

from models.modal import ModalFilter, ModalSystem, amplification, blocked_powers, pack_real_pairs, state_dtype
from models.rtf import RTF, convert_rtf, rational_kernel

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def random_system(C: int, m: int, seed: int, radius_max: float = 0.9999) -> ModalSystem:
    """C channels of m slots: conjugate-pair slots, a real pole, a negative real pole and a zero
    slot (padding), poles up to radius_max."""
    g = torch.Generator().manual_seed(seed)
    radius = 0.3 + (radius_max - 0.3) * torch.rand(C, m, generator=g, dtype=torch.float64)
    radius[:, 0] = radius_max
    angle = math.pi * torch.rand(C, m, generator=g, dtype=torch.float64)
    angle[:, 1], angle[:, 2] = 0.0, math.pi  # a real pole, a negative real pole
    lam = torch.polar(radius, angle)
    lam[:, 2] = torch.complex(-radius[:, 2], torch.zeros_like(radius[:, 2]))
    res = torch.complex(
        torch.randn(C, m, generator=g, dtype=torch.float64), torch.randn(C, m, generator=g, dtype=torch.float64)
    )
    res[:, 1:3] = res[:, 1:3].real + 0j  # real poles carry real residues
    lam[:, -1], res[:, -1] = 0, 0  # a padding slot
    return ModalSystem(lam, res, torch.randn(C, generator=g, dtype=torch.float64), torch.float64)


def np_taps(system: ModalSystem, T: int) -> np.ndarray:
    lam, res, d = (t.detach().numpy() for t in (system.lam, system.res, system.d))
    t = np.arange(T - 1)
    taps = (res[:, :, None] * lam[:, :, None] ** t).sum(1).real  # lambda^0 = 1, also for lambda = 0
    return np.concatenate([d[:, None], taps], axis=1)


def np_run(system: ModalSystem, u: np.ndarray, x0: np.ndarray | None = None):
    """Outputs (B, C, T) and final state (B, C, m) complex of the diagonal recursion, one step at a time."""
    lam, res, d = (t.detach().numpy() for t in (system.lam, system.res, system.d))
    B, C, T = u.shape
    x = np.zeros((B, C, lam.shape[-1]), complex) if x0 is None else x0.copy()
    y = np.zeros((B, C, T))
    for t in range(T):
        y[..., t] = d * u[..., t] + (res * x).sum(-1).real
        x = lam * x + u[..., t, None]
    return y, x


def as_complex(x: torch.Tensor) -> np.ndarray:
    return torch.complex(x[:, :, 0].double(), x[:, :, 1].double()).numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ---------------------------------------------------------------------------------------------
# 1. the modal system's operations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 17, 300])
def test_taps_chunk_advance_and_response_match_the_numpy_recursion(T):
    """Every closed form of ModalSystem against the step-by-step numpy recursion, float64: taps,
    chunk from zero and from a state (outputs and state), response, advance, and `step` itself.

    Tolerance: each value is a sum of terms of size up to max|r| max|x| (resp. |lambda|^t), each
    rounded over about S + J + T operations (blocked powers, the recursion), so 8 (S + J + T) eps64
    times the ratio of the largest term to the output's scale (`scale` below, computed per check)."""
    system = random_system(C=5, m=6, seed=T)
    g = torch.Generator().manual_seed(100 + T)
    u = torch.randn(2, 5, T, generator=g, dtype=torch.float64)
    x0 = system.advance(torch.randn(2, 5, 40, generator=g, dtype=torch.float64))  # some state
    S, J = blocked_powers(system.lam, T + 1)[0].shape[-1], blocked_powers(system.lam, T + 1)[1].shape[-2]
    ops = 8 * (S + J + T) * EPS64
    lam_abs = system.lam.abs().numpy()

    taps = np_taps(system, T)
    term = np.abs(system.res.numpy()).sum(-1).max()
    assert rel(system.taps(T).numpy(), taps) <= ops * term / np.abs(taps).max()

    y_ref, x_ref = np_run(system, u.numpy(), as_complex(x0))
    y, x = filter_chunk(system.taps(T), system, u, x0)
    gain = term * (np.abs(as_complex(x0)).max() + np.abs(u.numpy()).sum(-1).max() / (1 - lam_abs.max()))
    assert rel(y.numpy(), y_ref) <= ops * gain / np.abs(y_ref).max() + 1e-14
    assert rel(as_complex(x), x_ref) <= ops  # the state's terms do not cancel: |x| bounds them
    y_zero, x_zero = np_run(system, u.numpy())
    assert rel(as_complex(system.advance(u)), x_zero) <= ops
    assert rel(system.response(x0, T).numpy(), y_ref - y_zero) <= ops * gain / np.abs(y_ref - y_zero).max()

    state = x0.clone()
    steps = [system.step(u[..., t], state)[0] for t in range(T)]
    assert rel(torch.stack(steps, -1).numpy(), y_ref) <= ops * gain / np.abs(y_ref).max() + 1e-14
    assert rel(as_complex(state), x_ref) <= ops


@pytest.mark.parametrize("T", [1, 17, 300])
def test_real_poles_packed_two_to_a_slot_run_the_same_system(T):
    """pack_real_pairs on 5 channels of 3 real poles (one negative), 2 conjugate pairs and a padding
    slot: 7 poles in ceil(7 / 2) = 4 slots, and the packed system's taps, its chunk from a state
    (convolution + response, then advance) and its steps give the numpy recursion of the unpacked
    system, twice in a row (so the state after the first chunk is right too). Tolerance as in the
    test above: 8 (S + J + T) eps64 times the largest term over the output's scale."""
    system = random_system(C=5, m=6, seed=10 + T)
    lam, res = system.lam.clone(), system.res.clone()
    lam[:, 3], res[:, 3] = 0.7 + 0j, res[:, 3].real + 0j  # a third real pole
    system = ModalSystem(lam, res, system.d, torch.float64)
    packed = pack_real_pairs(system)
    assert packed.slots == 4 and packed.pair_columns == 1
    g = torch.Generator().manual_seed(T)
    u0, u1, u2 = (torch.randn(2, 5, n, generator=g, dtype=torch.float64) for n in (40, T, T))
    S, J = (blocked_powers(system.lam, T + 41)[i].shape[k] for i, k in ((0, -1), (1, -2)))
    ops = 8 * (S + J + T + 40) * EPS64
    term = np.abs(res.numpy()).sum(-1).max()
    gain = term * np.abs(u0.numpy()).sum(-1).max() / (1 - system.lam.abs().max().item()) * 4

    assert rel(packed.taps(T).numpy(), np_taps(system, T)) <= ops * term
    _, x_ref = np_run(system, u0.numpy())
    x = packed.advance(u0)
    step_state = x.clone()
    for u in (u1, u2):
        y_ref, x_ref = np_run(system, u.numpy(), x_ref)
        y, x = filter_chunk(packed.taps(T), packed, u, x)
        steps = torch.stack([packed.step(u[..., t], step_state)[0] for t in range(T)], -1)
        scale = max(np.abs(y_ref).max(), 1e-300)
        assert rel(y.numpy(), y_ref) <= ops * gain / scale + 1e-14
        assert rel(steps.numpy(), y_ref) <= ops * gain / scale + 1e-14


@pytest.mark.parametrize("init", ["zeros", "trailing zeros"])
@pytest.mark.parametrize("n", [3, 4, 7])
def test_poles_at_zero_take_no_more_than_half_the_order_in_slots(init, n):
    """An RTF whose poles include a repeated one at 0 (rtf_init="zeros": all n; or zero trailing
    denominator coefficients) kept one slot per pole when no row had two real poles to pair, past
    the ceil(n / 2) a serving engine sizes its state for (vLLM refused such a checkpoint). The
    padding (real slots with a zero residue) is dropped, and the decoded taps are those of the
    unpacked conversion: float32 recurrence against float64 taps, 1e-6 of the largest tap."""
    torch.manual_seed(n)
    rtf = RTF(4, n, 32, init="zeros" if init == "zeros" else "xavier")
    if init != "zeros":
        with torch.no_grad():
            rtf.a[:, 1:] = 0
    rec = rtf.recurrence(torch.float32, "error")
    assert rec.slots <= math.ceil(n / 2), rec.slots
    want = rtf.conversion().system.taps(80)  # (filters, T), float64, nothing dropped
    got = rec.taps(80).double()
    assert (got - want).abs().max() <= 1e-6 * want.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk", [None, 64])
def test_a_row_serving_several_channels_runs_each_channel(monkeypatch, packed, chunk):
    """A system of 3 rows expanded to 4 channels each (`expand`: a filter bank's filters serving
    consecutive channels, as MultiHyena's heads do) against the numpy recursion of the 12 channels
    written out (each row's poles, residues and d repeated): chunk from a state, response, advance and
    steps, with real poles packed or not, and with CHUNK_ELEMENTS cut to 64 so that a row's channels
    are split over several pieces. Nothing per channel is held: the coefficients stay per row.
    Tolerance as in the first test: 8 (S + J + T) eps64 times the largest term over the scale."""
    if chunk is not None:
        monkeypatch.setattr("models.modal.CHUNK_ELEMENTS", chunk)
    rows = random_system(C=3, m=6, seed=21)
    if packed:
        lam, res = rows.lam.clone(), rows.res.clone()
        lam[:, 3], res[:, 3] = 0.6 + 0j, res[:, 3].real + 0j
        rows = pack_real_pairs(ModalSystem(lam, res, rows.d, torch.float64))
        assert rows.paired is not None
    system = rows.expand(4)
    assert system.channels == 12 and system.rows == 3 and all(c.shape[0] == 3 for c in system.coef)
    written_out = ModalSystem(*(t.repeat_interleave(4, dim=0) for t in (rows.lam, rows.res, rows.d)), torch.float64)
    if packed:  # numpy runs the modes: a paired slot's two real poles as two columns
        lam_m, res_m = (t.repeat_interleave(4, dim=0) for t in rows.modes())
        written_out = ModalSystem(lam_m, res_m, rows.d.repeat_interleave(4), torch.float64)
    T = 37
    g = torch.Generator().manual_seed(5)
    u0, u = (torch.randn(2, 12, n, generator=g, dtype=torch.float64) for n in (25, T))
    x0 = system.advance(u0)
    _, x0_ref = np_run(written_out, u0.numpy())
    S, J = (blocked_powers(rows.lam, T + 26)[i].shape[k] for i, k in ((0, -1), (1, -2)))
    ops = 8 * (S + J + T + 25) * EPS64
    term = np.abs(written_out.res.numpy()).sum(-1).max()
    gain = term * np.abs(u.numpy()).sum(-1).max() / (1 - written_out.lam.abs().max().item()) * 4
    y_ref, x_ref = np_run(written_out, u.numpy(), x0_ref)
    y, x = filter_chunk(system.taps(T).repeat_interleave(4, dim=0), system, u, x0)
    scale = np.abs(y_ref).max()
    assert rel(y.numpy(), y_ref) <= ops * gain / scale
    state = x0.clone()
    steps = torch.stack([system.step(u[..., t], state)[0] for t in range(T)], -1)
    assert rel(steps.numpy(), y_ref) <= ops * gain / scale
    # the final states, through what they do next (their response, no input): a paired slot's state
    # is two real modes, so states are compared by their effect, not their layout
    after_ref, _ = np_run(written_out, np.zeros((2, 12, 20)), x_ref)
    for got in (x, state):
        assert rel(system.response(got, 20).numpy(), after_ref) <= ops * gain / np.abs(after_ref).max()


def test_the_step_runs_in_place_and_allocates_no_state():
    system = random_system(C=3, m=4, seed=0).to(torch.float32)
    x = system.init_state(2)
    address = x.data_ptr()
    y, x2 = system.step(torch.randn(2, 3), x)
    assert x2 is x and x.data_ptr() == address and y.dtype == torch.float32 and x.shape == (2, 3, 2, 4)


def test_float32_state_error_is_bounded_by_the_amplification():
    """The default float32 state against the float64 recursion: error <= 16 eps32 amplification
    (state_dtype keeps float32 only below FLOAT32_STATE_RTOL / eps32)."""
    system = random_system(C=4, m=5, seed=3, radius_max=0.99)
    u = torch.randn(1, 4, 500, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y64, _ = filter_chunk(system.taps(500), system, u)
    amp = float(amplification(system, system.taps(500)).max())
    single = system.to(torch.float32)
    x = single.init_state(1)
    y32 = torch.stack([single.step(u[..., t].float(), x)[0] for t in range(500)], -1)
    assert rel(y32.double().numpy(), y64.numpy()) <= 16 * EPS32 * max(amp, 1.0)


def test_cancelling_residues_promote_the_state_to_float64():
    """Two poles 1e-6 apart with residues +-1e6 (a near-double pole): a float32 state would lose
    eps32 x 1e6 x ... of the output, so state_dtype promotes it; well separated poles stay float32."""
    lam = torch.tensor([[0.9 + 0j, 0.9 + 1e-6 + 0j]], dtype=torch.complex128)
    near = ModalSystem(
        lam, torch.tensor([[1e6 + 0j, -1e6 + 0j]], dtype=torch.complex128), torch.zeros(1, dtype=torch.float64)
    )
    tame = ModalSystem(
        torch.tensor([[0.5 + 0j, -0.5 + 0j]], dtype=torch.complex128),
        torch.ones(1, 2, dtype=torch.complex128),
        torch.zeros(1, dtype=torch.float64),
    )
    assert state_dtype(amplification(near, near.taps(64)), torch.float32) == torch.float64
    assert state_dtype(amplification(tame, tame.taps(64)), torch.float32) == torch.float32
    assert state_dtype(amplification(tame, tame.taps(64)), torch.float64) == torch.float64


# ---------------------------------------------------------------------------------------------
# 2. the trainable modal filter
# ---------------------------------------------------------------------------------------------
def test_modal_filter_kernel_is_its_impulse_response_and_differentiable():
    """kernel(T) == numpy taps of (exp(-exp(w)) e^(i theta), residue, h0) at T below and far above
    l_max (no aliasing: the same system everywhere), its recurrence runs the same taps, and
    gradcheck passes for every parameter (float64)."""
    torch.manual_seed(0)
    f = ModalFilter(6, 8, l_max=32, num_filters=3).double()
    lam = torch.polar(torch.exp(-torch.exp(f.log_decay.detach())), f.angle.detach())
    res = torch.complex(f.residue.detach()[..., 0], f.residue.detach()[..., 1])
    ref = ModalSystem(lam, res, f.h0.detach(), torch.float64)
    for T in (5, 32, 100):
        k = f.kernel(T).detach().numpy()
        assert k.shape == (6, T)
        assert rel(k[::2], np_taps(ref, T)) <= 64 * T * EPS64
    rec = f.recurrence(torch.float64)
    x = rec.init_state(1)  # the recurrence stepped through an impulse gives the same taps
    y = torch.stack([rec.step(torch.ones(1, 6, dtype=torch.float64) * (t == 0), x)[0] for t in range(100)], -1)
    assert rel(y[0].numpy(), f.kernel(100).detach().numpy()) <= 64 * 100 * EPS64
    params = tuple(p.detach().clone().requires_grad_() for p in f.parameters())
    names = [n for n, _ in f.named_parameters()]

    def kernel(*ps):
        with torch.nn.utils.stateless._reparametrize_module(f, dict(zip(names, ps))):
            return f.kernel(40)

    assert torch.autograd.gradcheck(kernel, params)


def test_modal_filter_poles_stay_inside_the_unit_disk_for_any_parameter():
    f = ModalFilter(2, 4, l_max=16)
    with torch.no_grad():
        f.log_decay.fill_(-1e4)  # the slowest decay a float can say: |lambda| rounds to 1 without the clamp
    assert float(f.pole_radius().max()) < 1.0
    assert torch.isfinite(f.kernel(5000)).all()


# ---------------------------------------------------------------------------------------------
# 3. RTF -> modal conversion against a 60-digit reference
# ---------------------------------------------------------------------------------------------
def mp_aliased_kernel(a: np.ndarray, b: np.ndarray, h0: float, fft_len: int) -> np.ndarray:
    """The exact L'-periodic aliased kernel of the float64 coefficients (a, b, h0), at 60 digits:
    roots of z^n + a1 z^(n-1) + ... (mpmath.polyroots), residues of b~/A in closed form, and
    k_t = sum_k r_k lambda_k^(t-1) / (1 - lambda_k^L'), k_0 = h0 + sum_k r_k lambda_k^(L'-1) / (1 - lambda_k^L')."""
    with mpmath.workdps(60):
        n = len(a)
        roots = mpmath.polyroots([mpmath.mpf(1)] + [mpmath.mpf(float(x)) for x in a], maxsteps=2000, extraprec=600)
        k = [mpmath.mpf(0)] * fft_len
        k[0] = mpmath.mpf(float(h0))
        for j, lam in enumerate(roots):
            num = sum(mpmath.mpf(float(b[i])) * lam ** (n - 1 - i) for i in range(n))
            r = num / mpmath.fprod([lam - roots[i] for i in range(n) if i != j]) / (1 - lam**fft_len)
            power = mpmath.mpf(1)
            for t in range(1, fft_len):
                k[t] += r * power
                power *= lam
            k[0] += r * power
        return np.array([float(mpmath.re(v)) for v in k])


def mp_aliased_by_recursion(a: np.ndarray, b: np.ndarray, h0: float, fft_len: int, tol: float = 1e-40) -> np.ndarray:
    """The same aliased kernel by the difference equation at 60 digits, summed period by period until
    a period adds less than `tol`: no roots at all, so exact for repeated poles (slow for poles
    near the unit circle, hence only used for radii <= 0.995)."""
    with mpmath.workdps(60):
        n = len(a)
        a_mp, b_mp = [mpmath.mpf(float(x)) for x in a], [mpmath.mpf(float(x)) for x in b]
        v = [mpmath.mpf(0)] * n  # v_{t-1}, ..., v_{t-n}
        k = [mpmath.mpf(0)] * fft_len
        t = 0
        while True:
            added = mpmath.mpf(0)
            for j in range(fft_len):
                u = 1 if t == 0 else 0
                y = sum(bi * vi for bi, vi in zip(b_mp, v)) + (mpmath.mpf(float(h0)) if u else 0)
                v = [u - sum(ai * vi for ai, vi in zip(a_mp, v))] + v[:-1]
                k[j] += y
                added += abs(y)
                t += 1
            if added < tol:
                return np.array([float(x) for x in k])


def poly(roots) -> np.ndarray:
    return np.real(np.poly(np.asarray(roots)))[1:]


def pair(radius, angle):
    z = radius * np.exp(1j * angle)
    return [z, np.conj(z)]


ADVERSARIAL = {
    # one pole at 0.9999, the rest spread: the hard case for aliasing and decay past l_max
    "edge": (poly(pair(0.9999, 0.3) + pair(0.8, 1.3) + pair(0.6, 2.4) + [0.5, -0.7]), 1024),
    # 4 conjugate pairs within 1e-3 of each other near the unit circle
    "cluster": (poly(sum((pair(0.9999 - 2e-4 * k, 0.7 + 3e-4 * k) for k in range(4)), []) + [0.3, -0.4]), 512),
    # double roots (a real one and a pair): no modal form with distinct poles in exact arithmetic
    "repeated": (poly([0.99, 0.99] + pair(0.95, 1.0) * 2), 256),
    # an FIR part: a 3-fold pole at the origin
    "fir": (poly([0.995, 0.0, 0.0, 0.0]), 256),
    # order 1
    "order1": (np.array([-0.9999]), 8192),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_conversion_meets_its_stated_bound_against_60_digits(name):
    """convert_rtf's modal taps against the 60-digit aliased kernel of the same float64
    coefficients, within the bound the conversion itself states (`conversion_bound`: eps64 times
    the FFT kernel's conditioning plus the modal terms' cancellation), over [0, L'). That bound is
    what its warning reports against, so this checks that the report is honest. It is tight where
    the coefficients are well conditioned (asserted <= 1e-8 for "edge" and "order1"); for the
    4-pair cluster kappa is 5e13, and neither the FFT kernel (1.4e-3 off the 60-digit one) nor
    any float64 computation from these coefficients is better than about 1e-3 (measured 5e-3,
    bound 0.18): a filter like that is as precise as its coefficients, in any form."""
    a, fft_len = ADVERSARIAL[name]
    rng = np.random.default_rng(len(name))
    b = rng.uniform(-1, 1, len(a)) / math.sqrt(len(a))
    h0 = 0.3
    slow = np.abs(np.roots(np.r_[1.0, a])).max() > 0.995
    ref = (mp_aliased_kernel if slow else mp_aliased_by_recursion)(a, b, h0, fft_len)
    t = lambda v: torch.tensor(np.atleast_2d(v), dtype=torch.float64)  # noqa: E731
    conversion = convert_rtf(t(a), t(b), torch.tensor([h0], dtype=torch.float64), fft_len)
    taps = conversion.system.taps(fft_len)[0].numpy()
    err = float(np.linalg.norm(taps - ref) / np.linalg.norm(ref))
    bound = float(conversion.bound[0])
    if name in ("edge", "order1"):
        assert bound <= 1e-8
    assert err <= bound, f"{name}: {err:.3g} > stated bound {bound:.3g}"
    assert bool(torch.isfinite(conversion.system.res).all())


def test_montel_filters_convert_to_rounding():
    """The default trained kind (xavier init, l1 Montel constraint): every filter's modal taps equal
    its float64 FFT kernel to 1e-9 relative (the conversion's floor; their conditioning is O(1):
    sum |a| < 1 keeps min |A| on the circle >= 1 - sum |a|), orders 1 to 64."""
    for n in (1, 2, 16, 64):
        torch.manual_seed(n)
        rtf = RTF(32, n, 256).double()
        with torch.no_grad():
            a, b, h0 = rtf.denominator(), rtf.b, rtf.h0
            conversion = convert_rtf(a, b, h0, rtf.fft_len)
            ref = rational_kernel(b, a, h0, rtf.fft_len)
        err = (conversion.system.taps(rtf.fft_len) - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert float(err.max()) <= 1e-9, (n, float(err.max()))


def test_modal_filter_parameters_get_the_filter_optimizer_group():
    """Like the RTF's, a modal filter's poles, residues and h0 get optim.rtf_lr and no weight decay
    (own_optimizer_group), and nothing else does."""
    from models import HyenaRTFConfig, HyenaRTFForCausalLM
    from training.optim import param_groups

    model = HyenaRTFForCausalLM(
        HyenaRTFConfig(vocab_size=64, d_model=8, n_layer=1, l_max=32, state_size=4, filter="modal")
    )
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, rtf_lr=7e-3, weight_decay=0.1)}
    own = {id(p) for m in model.modules() if isinstance(m, ModalFilter) for p in m.parameters()}
    assert {id(p) for p in groups["rtf"]["params"]} == own and len(own) == 4
    assert groups["rtf"]["peak_lr"] == 7e-3 and groups["rtf"]["weight_decay"] == 0.0
