"""Linear head + cross-entropy in chunks of rows, without the (N, V) logits.

    nll = sum_{i : y_i != ignore_index} ( logsumexp_j z_ij - z_{i, y_i} ),   z = h W^T   (N, C)

h (N, d) hidden states, W (C, d) the head's weight, y (N,) targets; only the first `n_classes`
columns of z are classes (C > n_classes: the padding rows of a padded head, left out of the
softmax). The loss is taken over blocks of `chunk_rows` rows, so no more than one block's logits
(chunk_rows, C) exist at a time, in the forward and in the backward.

The gradient is computed in the forward, block by block, while the block's logits are at hand
(dnll/dz = softmax(z) - onehot(y), zero on ignored rows):

    dh_block = dz_block W          (chunk_rows, d)
    dW      += dz_block^T h_block  (C, d), accumulated in float32

and the backward only scales the two by the incoming gradient (a scalar). Recomputing the logits
in the backward instead would cost one more (N, d) x (d, C) product, as large as the forward's;
keeping dh and dW costs (N + C) d numbers, a small fraction of the N C logits. Without autograd
(torch.no_grad, or inputs that need no gradient) only the loss is computed.

Precision follows the unchunked loss (`next_token_nll` on `F.linear` logits): the products run
in the compute dtype (autocast's lower precision where autocast is on, else the inputs' dtype),
each block's logits are upcast to float32 before the log-softmax, the loss is a float32 sum
(float64 inputs stay float64 throughout).
"""

from __future__ import annotations

import torch

# One block's float32 logits hold at most this many numbers by default (2**25: 128 MiB, 667 rows
# at a 50,304 vocabulary). Large enough for the products to run at full speed, small next to the
# (N, V) logits of a micro-batch (8 x 2048 tokens: 3.3 GB in float32).
DEFAULT_CHUNK_ELEMENTS = 2**25


def default_chunk_rows(n_columns: int) -> int:
    """Rows per block so that a block's logits (rows, n_columns) hold at most DEFAULT_CHUNK_ELEMENTS
    numbers (read at call time), at least one row."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, n_columns))


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed NLL of softmax(h W^T) (see the module docstring); the gradients wrt h and W are made
    in the forward when `with_grad`, and scaled by the output's gradient in the backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, n_classes, chunk_rows, ignore_index, compute_dtype, with_grad):
        n_rows, n_cols = h.shape[0], weight.shape[0]
        want_h, want_w = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)  # one cast of the head, as autocast makes for F.linear
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # float32, or float64 inputs' float64
        total = torch.zeros((), dtype=acc_dtype, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        # float32 whatever the compute dtype: a sum over many blocks rounded in bf16 would lose bits
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=h.device) if want_w else None
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            hc = h[start:stop].to(compute_dtype)
            y = targets[start:stop]
            valid = y != ignore_index
            y_safe = torch.where(valid, y, 0)  # an index for gather on ignored rows, masked below
            z = (hc @ w.t()).to(acc_dtype)  # (rows, C); a no-op cast in float32 and float64
            if n_cols > n_classes:
                z[:, n_classes:] = float("-inf")  # padding columns: exp(-inf) = 0, no gradient either
            z_y = z.gather(1, y_safe[:, None]).squeeze(1)
            z_max = z.amax(dim=1, keepdim=True)
            p = z.sub_(z_max).exp_()  # in place: z is not needed any more, one (rows, C) buffer in all
            s = p.sum(dim=1, keepdim=True)
            nll = (z_max + s.log()).squeeze(1) - z_y
            total += torch.where(valid, nll, 0.0).sum()
            if want_h or want_w:
                p.div_(s)  # softmax
                p.scatter_add_(1, y_safe[:, None], -valid[:, None].to(p.dtype))  # - onehot(y), valid rows
                p.mul_(valid[:, None])  # ignored rows contribute nothing
                dz = p.to(compute_dtype)
                if want_h:
                    grad_h[start:stop] = dz @ w
                if want_w and dz.dtype == acc_dtype:
                    grad_w.addmm_(dz.t(), hc)
                elif want_w:
                    grad_w += dz.t() @ hc  # lower precision product, summed over blocks in float32
            del z, p
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    n_classes: int | None = None,
    chunk_rows: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """sum_i -log softmax(h_i W^T [:n_classes])[targets_i] in float32, rows with target
    `ignore_index` skipped: what F.cross_entropy(F.linear(h, W)[:, :n_classes].float(), targets,
    reduction="sum") gives, computed in blocks of `chunk_rows` rows (default: `default_chunk_rows`),
    so that neither the forward nor the backward holds the (N, C) logits.

    h (N, d) hidden states; weight (C, d) head weight, C >= n_classes (default C): columns past
    n_classes are padding, left out of the softmax; targets (N,) in [0, n_classes) or ignore_index.
    Differentiable wrt h and weight (not double-differentiable). -> a float32 scalar (float64 for
    float64 inputs).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h (N, d) and weight (C, d) expected, got {tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"targets (N,) = ({h.shape[0]},) expected, got {tuple(targets.shape)}")
    n_classes = weight.shape[0] if n_classes is None else n_classes
    if not 0 < n_classes <= weight.shape[0]:
        raise ValueError(f"n_classes={n_classes} must be in [1, {weight.shape[0]}] (the weight's rows)")
    chunk_rows = default_chunk_rows(weight.shape[0]) if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be positive")
    device = h.device.type
    # The dtype F.linear would multiply in: autocast's where it is on (the Function below runs with
    # autocast off, its casts are explicit), else the inputs' common dtype.
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(
            h, weight, targets, n_classes, chunk_rows, ignore_index, compute_dtype, with_grad
        )
