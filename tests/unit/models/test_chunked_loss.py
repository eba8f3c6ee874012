"""The chunked linear + cross-entropy (models/chunked_loss.py) and the paths that use it: the model's
forward(skip_logits=True) and the trainer's loss (training/engine.py lm_loss_terms).

References are written out here: F.cross_entropy on the full logits F.linear(h, W)[:, :V], and
autograd's gradients through it, in float64. Tolerances:

- float64 against float64: the chunked loss sums the same N per-row terms in another order, and
  each term is a log-sum-exp over V exponentials of logits from d-term products, rounded in another
  order too; the difference is bounded by ~(N + V + d) eps64 relative, and N * V * eps64 (the scale
  used throughout, >= N + V + d for N, V >= 3) is a safe, still tiny (~1e-11) bound.
- bf16 autocast against the float64 reference: derived per element from the data in the test (see
  `bf16_bounds`), from bf16's unit roundoff u = 2^-8 on the products' inputs and outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.helpers import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from models import chunked_loss, modeling_hyena_rtf
from models.chunked_loss import linear_cross_entropy
from models.modeling_hyena_rtf import next_token_nll
from training.config import BatchPlan
from training.dist_env import DistEnv
from training.engine import TorchEngine, lm_loss_terms

EPS64 = torch.finfo(torch.float64).eps
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def data(n=211, d=16, c=64, v=57, dtype=torch.float64, seed=0, ignore_every=7):
    """h (n, d), a padded head W (c, d) of which v rows are classes, targets (n,) with every
    `ignore_every`-th -100. n = 211 is prime: no chunk size but 1 and n divides it."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(c, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 2).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y


def reference(h, w, y, v):
    """(loss, dloss/dh, dloss/dW) through the full logits, float64."""
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w)[:, :v], y, ignore_index=-100, reduction="sum")
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def chunked(h, w, y, v, chunk_rows, autocast=None):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = linear_cross_entropy(h, w, y, n_classes=v, chunk_rows=chunk_rows)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def close64(got, want, n, v):
    tol = n * v * EPS64 * max(1.0, want.abs().max().item())
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() <= tol, ((got - want).abs().max().item(), tol)


@pytest.mark.parametrize("chunk_rows", [1, 10, 64, 211, 1000])
def test_float64_loss_and_gradients_match_the_full_logits(chunk_rows):
    """Chunks of 10 and 64 rows do not divide 211 (a last, shorter chunk); 211 and 1000: one chunk.
    The head has 64 rows, 57 of them classes: the 7 padding rows get no probability and no gradient."""
    n, v = 211, 57
    h, w, y = data(n=n, v=v)
    loss, gh, gw = chunked(h, w, y, v, chunk_rows)
    ref_loss, ref_gh, ref_gw = reference(h, w, y, v)
    close64(loss, ref_loss, n, v)
    close64(gh, ref_gh, n, v)
    close64(gw, ref_gw, n, v)
    assert torch.equal(gw[v:], torch.zeros_like(gw[v:]))


def test_ignore_index_rows_add_nothing():
    """Ignored rows: the loss and gradients of the other rows alone, a gradient of exactly 0 on
    their hidden states; all rows ignored: a loss of 0 and zero gradients."""
    n, v = 211, 57
    h, w, y = data(n=n, v=v, ignore_every=3)
    kept = y != -100
    loss, gh, gw = chunked(h, w, y, v, 16)
    ref_loss, ref_gh, ref_gw = reference(h[kept], w, y[kept], v)
    close64(loss, ref_loss, n, v)
    close64(gh[kept], ref_gh, n, v)
    close64(gw, ref_gw, n, v)
    assert torch.equal(gh[~kept], torch.zeros_like(gh[~kept]))

    loss, gh, gw = chunked(h, w, torch.full_like(y, -100), v, 16)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def bf16_bounds(h, w, y, v):
    """First-order bounds on |chunked bf16 - exact| for the loss and both gradients (float64).

    A bf16 logit z_ij = sum_k h_ik W_jk is made from inputs rounded to bf16 (relative error u
    each) and rounded to bf16 itself (the product's output dtype): |dz_ij| <= 2u sum_k |h_ik W_jk|
    + u |z_ij| (the float32 accumulation inside, d eps32, is far below). With D_i = max_j |dz_ij|:
    - the loss: nll_i = logsumexp(z_i) - z_iy moves by at most 2 D_i; the float32 sum of N terms
      adds N eps32 sum_i nll_i.
    - the gradient factor g_ij = softmax(z_i)_j - onehot: |dp_ij| <= p_ij (e^(2 D_i) - 1); it is
      rounded to bf16 (u |g_ij|), the head (or h) rounded to bf16 (u) and the product's output too
      (u, and per chunk for dW, summed in float32): A_ij = p_ij (e^(2 D_i) - 1) + 4u |g_ij|, then
      |d dh| <= A |W| + u |dh| and |d dW| <= A^T |h| + u |dW| elementwise.
    """
    hd, wd = h.double(), w[:v].double()
    z = hd @ wd.T
    dz = 2 * U_BF16 * (hd.abs() @ wd.abs().T) + U_BF16 * z.abs()
    d_row = dz.max(dim=1).values
    valid = y != -100
    p = torch.softmax(z, dim=1)
    g = (p - F.one_hot(y.clamp(min=0), v).double()) * valid[:, None]
    nll = (torch.logsumexp(z, 1) - z.gather(1, y.clamp(min=0)[:, None]).squeeze(1)) * valid
    loss_bound = (2 * d_row * valid).sum() + len(y) * torch.finfo(torch.float32).eps * nll.sum()
    a = (p * torch.expm1(2 * d_row)[:, None] + 4 * U_BF16 * g.abs()) * valid[:, None]
    gh, gw = g @ wd, g.T @ hd
    return loss_bound.item(), a @ wd.abs() + U_BF16 * gh.abs(), a.T @ hd.abs() + U_BF16 * gw.abs()


def test_bf16_autocast_within_the_bound_of_bf16_rounding():
    """float32 parameters and activations under bf16 autocast (the trainer's bf16), 64-row chunks,
    against the float64 reference, within `bf16_bounds`; and not trivially: the error is real."""
    n, v = 211, 57
    h, w, y = data(n=n, v=v, dtype=torch.float32)
    loss, gh, gw = chunked(h, w, y, v, 64, autocast=torch.bfloat16)
    assert loss.dtype == gh.dtype == gw.dtype == torch.float32
    ref_loss, ref_gh, ref_gw = reference(h, w, y, v)
    loss_bound, gh_bound, gw_bound = bf16_bounds(h, w, y, v)
    assert abs(loss.double() - ref_loss).item() <= loss_bound
    assert ((gh.double() - ref_gh).abs() <= gh_bound).all()
    assert ((gw[:v].double() - ref_gw[:v]).abs() <= gw_bound).all()
    assert not gw[v:].any()
    assert (gh.double() - ref_gh).abs().max() > 1e-5  # bf16 was used (float32 would be ~1e-7)


class LargestTensor(TorchDispatchMode):
    """Records every op that runs (forward and backward), its output's shape and the largest tensor
    it returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops: list[str] = []
        self.shapes: list[tuple[str, tuple[int, ...]]] = []  # (op, first output's shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.__name__)
        outs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        if outs:
            self.shapes.append((func.__name__, tuple(outs[0].shape)))
        for t in outs:
            self.largest = max(self.largest, t.numel())
        return out


def test_forward_and_backward_never_hold_the_full_logits():
    """N = 512 rows, a 448-row head, chunks of 64 rows: no tensor created in the forward or the
    backward has more than 64 x 448 elements (one chunk's logits), an eighth of N x C. The backward
    recomputes nothing: every matrix product runs in the forward, three per chunk (logits, dh, dW)."""
    n, d, c, v, rows = 512, 32, 448, 400, 64
    h, w, y = data(n=n, d=d, c=c, v=v, dtype=torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    with LargestTensor() as fwd:
        loss = linear_cross_entropy(h, w, y, n_classes=v, chunk_rows=rows)
    with LargestTensor() as bwd:
        loss.backward()
    assert max(fwd.largest, bwd.largest) <= rows * c < n * v
    chunks = n // rows
    assert sum(op.startswith(("mm", "addmm")) for op in fwd.ops) == 3 * chunks
    assert not any(op.startswith(("mm", "addmm", "matmul")) for op in bwd.ops)

    # The instrument sees full logits where they are built (the unchunked loss).
    with LargestTensor() as full:
        F.cross_entropy(F.linear(h, w)[:, :v], y, reduction="sum").backward()
    assert full.largest >= n * v


def test_without_autograd_only_the_loss_is_computed():
    """Under torch.no_grad (evaluation): one product per chunk, the same loss."""
    h, w, y = data(n=211, v=57, dtype=torch.float32)
    with torch.no_grad(), LargestTensor() as rec:
        loss = linear_cross_entropy(h.requires_grad_(), w, y, n_classes=57, chunk_rows=64)
    assert sum(op.startswith("mm") for op in rec.ops) == math.ceil(211 / 64)
    assert not loss.requires_grad
    ref = F.cross_entropy(F.linear(h.detach(), w)[:, :57], y, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=211 * 57 * torch.finfo(torch.float32).eps, atol=0)


def test_bad_shapes_are_refused():
    h, w, y = data()
    with pytest.raises(ValueError, match="n_classes"):
        linear_cross_entropy(h, w, y, n_classes=w.shape[0] + 1)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, y, chunk_rows=0)


# ---------------------------------------------------------------------------------------------
# the model and the trainer
# ---------------------------------------------------------------------------------------------
def full_loss64(model, batch):
    """The unchunked loss of the trainer, in float64 from the model's own logits (float64 model):
    sum of -log softmax(logits[b, t])[batch[b, t + 1]]."""
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits.double()
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")


def test_forward_skip_logits_gives_the_same_loss_and_gradients():
    """float64 tiny model: forward(labels, skip_logits=True) gives the mean cross-entropy of the
    model's own logits (computed here in float64: forward(labels).loss upcasts to float32 only) and
    its gradients, logits None; shift_labels is the aligned form of the same targets."""
    model = tiny_model(vocab=97).double().train()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100
    n, v = ids.numel(), 97

    def loss_and_grads(loss_of):
        model.zero_grad()
        out, loss = loss_of()
        loss.backward()
        return out, loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def reference():
        out = model(input_ids=ids, use_cache=False)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return out, loss

    def run(**kw):
        out = model(input_ids=ids, use_cache=False, **kw)
        return out, out.loss

    _, ref_loss, ref_grads = loss_and_grads(reference)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    for kw in (dict(labels=labels, skip_logits=True), dict(shift_labels=shifted, skip_logits=True)):
        out, loss, grads = loss_and_grads(lambda kw=kw: run(**kw))
        assert out.logits is None
        close64(loss, ref_loss, n, v)
        assert len(grads) == len(ref_grads)
        for a, b in zip(grads, ref_grads, strict=True):
            close64(a, b, n, v)
    # Without skip_logits, shift_labels scores the logits as labels do (float32 loss, as before).
    full = model(input_ids=ids, labels=labels, use_cache=False)
    aligned = model(input_ids=ids, shift_labels=shifted, use_cache=False)
    assert full.logits is not None
    torch.testing.assert_close(aligned.loss, full.loss)
    with pytest.raises(ValueError, match="skip_logits"):
        model(input_ids=ids, skip_logits=True)


@pytest.mark.parametrize("padded_devices", [(), ("cpu",)])
def test_the_head_width_follows_the_device(monkeypatch, padded_devices):
    """The chunked loss multiplies by the head rows `logits` would: the vocabulary rows off CUDA,
    every padded row (an aligned GEMM width; the padding masked out of the softmax) on the devices
    of PADDED_HEAD_DEVICES, checked here by naming the CPU one. Same loss either way (float64)."""
    monkeypatch.setattr(modeling_hyena_rtf, "PADDED_HEAD_DEVICES", padded_devices)
    model = tiny_model(vocab=97).double().train()  # pad_vocab_size_multiple 8: 104 rows
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    with LargestTensor() as rec:
        loss = model(input_ids=ids, labels=ids, skip_logits=True, use_cache=False).loss
    # the logits' products: 2 x 23 scored positions (labels shifted), not the (46, d) one of dh
    widths = {shape[-1] for op, shape in rec.shapes if op.startswith("mm") and shape[0] == 2 * 23} - {32}
    assert widths == {104 if padded_devices else 97}
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    close64(loss.detach(), want, ids.numel(), 97)


def test_trainer_loss_is_the_unchunked_loss_and_never_builds_the_logits(monkeypatch):
    """training/engine.py: lm_loss_terms (what every engine's train_step and eval_sums call) of a
    float64 tiny model equals the unchunked sum computed from its logits; with chunks of 16 rows,
    no tensor of its forward + backward reaches B x T x V elements (the logits), while the
    unchunked loss's does. Then one TorchEngine step (float32) reports that loss, as a mean."""
    vocab = 2048  # the logits (4 x 32 x 2048) are then larger than any tensor of the tiny model
    model = tiny_model(vocab=vocab, seed=2).double().train()
    batch = torch.randint(0, vocab, (4, 33), generator=torch.Generator().manual_seed(3))
    n = batch[:, 1:].numel()
    monkeypatch.setattr(chunked_loss, "DEFAULT_CHUNK_ELEMENTS", 16 * vocab)

    with LargestTensor() as rec:
        loss_sum, count = lm_loss_terms(model, batch)
        loss_sum.backward()
    assert count == n
    close64(loss_sum.detach(), full_loss64(model, batch), n, vocab)
    assert rec.largest < n * vocab
    with LargestTensor() as rec_full:
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        next_token_nll(logits, batch[:, 1:]).backward()
    assert rec_full.largest >= n * vocab

    model = model.float()  # in place; its float64 twin (model.double(), exact) gives the reference
    expected = (full_loss64(model.double(), batch) / n).item()
    model = model.float()
    plan = BatchPlan(micro_batch_size=4, grad_accum_steps=1, world_size=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = TorchEngine(model, opt, plan, torch.device("cpu"), "fp32", DistEnv(0, 0, 1, "none"), grad_clip=1.0)
    result = engine.train_step([batch])
    # float32 model against its float64 twin: the hidden states and the head differ by float32
    # rounding, which moves the mean loss (~log V = 7.6) by far less than 1e-4 of it.
    assert abs(result.loss - expected) <= 1e-4 * expected
