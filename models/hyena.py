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
    """Decoding state of one Hyena layer.

    conv: (B, 3d, w - 1) last inputs of the short conv (activation dtype).
    filt: RTF: (B, d, n) companion state (float32 or float64); implicit: (B, d, t) input history.
    rec:  the RTF recurrence built at prefill (None for the implicit filter). Keeping it here means
          a decode step does no parameter checks, and a new prompt always sees current weights.
    """

    conv: torch.Tensor
    filt: torch.Tensor
    rec: RTFRecurrence | None = None

    def index_select(self, idx: torch.Tensor) -> HyenaState:
        return HyenaState(self.conv.index_select(0, idx), self.filt.index_select(0, idx), self.rec)


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
        T = u.shape[1]
        p = self.in_proj(u).transpose(1, 2)
        if mask is not None:
            p = p * mask[:, None, :].to(p.dtype)
        x0, x1, v = self.short_conv(p)[..., :T].chunk(3, dim=1)
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
        """One token. u: (B, d) -> (B, d). Cost O(d (d + w + n)), independent of the position."""
        p = self.in_proj(u)  # (B, 3d)
        window = torch.cat([state.conv, p.unsqueeze(-1)], dim=-1)  # (B, 3d, w)
        q = (window * self.short_conv.weight[:, 0, :]).sum(-1) + self.short_conv.bias
        x0, x1, v = q.chunk(3, dim=-1)
        z = x1 * v
        if state.rec is not None:
            yf, filt = state.rec.step(z, state.filt)
        else:
            yf, filt = self.filter.step(z, state.filt)
        y = x0 * yf.to(x0.dtype)
        return self.out_proj(y), HyenaState(window[..., 1:], filt, state.rec)
