"""The order-2 Hyena operator with an RTF (or implicit) long filter.

    p          = in_proj(u)                       (B, T, d) -> (B, 3d, T)
    x0, x1, v  = split(short_conv(p))             causal depthwise conv of width w, 3 x (B, d, T)
    z          = x1 * v                           (B, d, T)
    y          = x0 * (h * z)                     h: long filter, * = causal FFT convolution
    out        = out_proj(y)                      (B, T, d)

The long filter's kernel already carries its feed-through in tap 0 (h0 for RTF, D for the implicit
filter), so it is counted exactly once. Decoding keeps, per layer, the last w - 1 columns of p
and the filter state: nothing grows with the sequence for RTF.

Left padding: positions where `mask` is 0 are zeroed in p and in z. A causal, time-invariant
operator then sees exactly the zeros it would see before the start of an unpadded sequence, so
real positions get the same outputs as the prompt alone.

Derivations: docs/mathematics.md of the Hyena-RTF repository (section 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configuration_hyena_rtf import HyenaRTFConfig
from .fftconv import fft_causal_conv
from .implicit import ImplicitFilter
from .rtf import RTF, RTFRecurrence


@dataclass
class HyenaState:
    """Decoding state of one Hyena (or MultiHyena) layer, advanced IN PLACE by the operator's `step`.

    conv: (B, 3d, w - 1) last inputs of the short conv (activation dtype).
    filt: RTF: (B, C, n) companion state (float32 or float64); implicit: (B, C, t) input history.
    rec:  the RTF recurrence built at prefill (None for the implicit filter). Keeping it here means
          a decode step does no parameter checks, and a new prompt always sees current weights.

    For RTF neither tensor changes shape or address while decoding: a step writes into them (a
    compiled step, or a CUDA graph, can capture that). The implicit filter's history grows, so its
    `filt` is replaced at every step.
    """

    conv: torch.Tensor
    filt: torch.Tensor
    rec: RTFRecurrence | None = None

    def __post_init__(self):
        # The prefill hands over views into larger tensors (the padded projection); a state that is
        # written in place owns its memory.
        self.conv, self.filt = self.conv.contiguous(), self.filt.contiguous()

    def reorder_(self, idx: torch.Tensor) -> None:
        """Keep rows `idx` (beam search), in place: the tensors keep their shapes and addresses."""
        self.conv.copy_(self.conv.index_select(0, idx))
        self.filt.copy_(self.filt.index_select(0, idx))

    def copy_(self, other: HyenaState) -> None:
        """Take over `other`'s values (same shapes) without reallocating; the recurrence by reference."""
        self.conv.copy_(other.conv)
        self.filt.copy_(other.filt)
        self.rec = other.rec

    def step_filter_(self, u: torch.Tensor) -> torch.Tensor:
        """One step of the RTF recurrence on this state, in place. u: (B, C) -> y: (B, C), float32+.

            y = c . x + h0 u,      x <- [u - a . x, x[0], ..., x[n-2]]

        (the corrected companion system of `RTFRecurrence`, whose channel-level a, c (C, n) and
        h0 (C,) it reads). The shifted delay line goes through one temporary and is copied back,
        because an overlapping in-place shift is not allowed."""
        x, rec = self.filt, self.rec
        u = u.to(x.dtype)
        y = (x * rec.c).sum(-1) + rec.h0 * u
        v = u - (x * rec.a).sum(-1)
        x.copy_(torch.cat([v.unsqueeze(-1), x[..., :-1]], dim=-1))
        return y


def shift_in_(conv: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The short conv's input window at this step: conv (B, Ch, w - 1) holds the previous inputs,
    p (B, Ch) is the new one. Returns the window [conv, p] (B, Ch, w) and slides it into `conv`
    in place (oldest column dropped)."""
    window = torch.cat([conv, p.unsqueeze(-1)], dim=-1)
    conv.copy_(window[..., 1:])
    return window


def short_causal_conv(p: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """The short causal depthwise convolution of width w, p: (B, Ch, T) -> (B, Ch, T):

        q[b, c, t] = bias[c] + sum_{j=0}^{w-1} weight[c, 0, j] p[b, c, t - (w - 1) + j]   (p = 0 before t = 0)

    the same as conv(p)[..., :T] for `conv` = nn.Conv1d(Ch, Ch, w, groups=Ch, padding=w - 1), whose
    parameters it reads (so checkpoints are unchanged), computed as w shifted multiply-adds. Why not
    the module: on CPU the backward of a grouped nn.Conv1d is pathologically slow with more than one
    thread (12.8 s of a 46 s training step at length 2048, d 256, two threads; benchmarks/train_profile.py)."""
    T, w = p.shape[-1], conv.kernel_size[0]
    padded = F.pad(p, (w - 1, 0))  # (B, Ch, T + w - 1)
    weight = conv.weight[:, 0, :, None].to(p.dtype)  # (Ch, w, 1)
    q = torch.addcmul(conv.bias[:, None].to(p.dtype), padded[..., :T], weight[:, 0])
    for j in range(1, w):
        q = torch.addcmul(q, padded[..., j : j + T], weight[:, j])
    return q


def short_conv_step(window: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """The newest column of `short_causal_conv` from the last w inputs: window (B, Ch, w) -> (B, Ch)."""
    return (window * conv.weight[:, 0, :]).sum(-1) + conv.bias


def make_filter(config: HyenaRTFConfig, layer_idx: int, channels: int, num_filters: int | None) -> nn.Module:
    """The long filter of layer `layer_idx`: `channels` convolved channels served by `num_filters`
    distinct filters (None: one per channel)."""
    if config.filter == "rtf":
        return RTF(
            channels,
            config.state_size_of(layer_idx),
            config.l_max,
            num_filters=num_filters,
            num_a=config.num_a,
            init=config.rtf_init,
            constraint=config.rtf_constraint,
            kernel_dtype=config.rtf_kernel_dtype,
        )
    return ImplicitFilter(
        channels, config.l_max, num_filters=num_filters, order=config.implicit_order, bands=config.implicit_bands
    )


class HyenaOperator(nn.Module):
    def __init__(self, config: HyenaRTFConfig, layer_idx: int):
        super().__init__()
        d, w = config.d_model, config.short_conv_width
        self.d_model, self.width = d, w
        self.rec_dtype = torch.float64 if config.recurrent_dtype == "float64" else torch.float32
        self.in_proj = nn.Linear(d, 3 * d)
        self.short_conv = nn.Conv1d(3 * d, 3 * d, kernel_size=w, groups=3 * d, padding=w - 1)
        self.filter = make_filter(config, layer_idx, d, config.filter_heads)
        self.out_proj = nn.Linear(d, d)
        self.out_proj.is_residual_proj = True

    def _gate_inputs(self, u: torch.Tensor, mask: torch.Tensor | None):
        """u: (B, T, d) -> p (B, 3d, T) pre-conv, x0 (B, d, T), z (B, d, T)."""
        p = self.in_proj(u).transpose(1, 2)
        if mask is not None:
            p = p * mask[:, None, :].to(p.dtype)
        x0, x1, v = short_causal_conv(p, self.short_conv).chunk(3, dim=1)
        z = x1 * v
        if mask is not None:
            z = z * mask[:, None, :].to(z.dtype)
        return p, x0, z

    def forward(
        self, u: torch.Tensor, mask: torch.Tensor | None = None, return_state: bool = False, pole_check: str = "error"
    ):
        """u: (B, T, d), mask: (B, T) of 0/1 or None -> (B, T, d) [and the HyenaState after u].
        pole_check: what building the RTF recurrence does with an unstable filter (RTF.recurrence)."""
        T = u.shape[1]
        p, x0, z = self._gate_inputs(u, mask)
        y = x0 * fft_causal_conv(z, self.filter.kernel(T))
        out = self.out_proj(y.transpose(1, 2))
        if not return_state:
            return out
        tail = F.pad(p, (self.width - 1, 0))[..., T:]  # last w - 1 columns, zeros before the start
        if isinstance(self.filter, RTF):
            rec = self.filter.recurrence(self.rec_dtype, pole_check)
            return out, HyenaState(tail, rec.prefill(z), rec)
        return out, HyenaState(tail, self.filter.prefill(z))

    def step(self, u: torch.Tensor, state: HyenaState) -> tuple[torch.Tensor, HyenaState]:
        """One token. u: (B, d) -> (B, d), and `state` (returned as well) advanced in place.
        Cost O(d (d + w + n)), independent of the position. For RTF it allocates no state and
        makes no host synchronisation, so the same code serves the eager cache and the static,
        compiled decode step (models/static_decode.py)."""
        window = shift_in_(state.conv, self.in_proj(u))  # (B, 3d, w)
        x0, x1, v = short_conv_step(window, self.short_conv).chunk(3, dim=-1)
        z = x1 * v
        if state.rec is not None:
            yf = state.step_filter_(z)
        else:  # the implicit filter has no finite state: its history grows
            yf, state.filt = self.filter.step(z, state.filt)
        y = x0 * yf.to(x0.dtype)
        return self.out_proj(y), state
