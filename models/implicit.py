"""Hyena's implicit long filter: positional features -> sine MLP -> exponential decay window.

    h[c, t] = MLP(z_t)[c] * exp(-delta_c * t / l_max),    t = 0 .. T-1
    z_t     = [t / l_max, cos(2 pi f_j t / l_max), sin(2 pi f_j t / l_max)]_{j=1..bands}

The MLP uses sin(w * x) activations with a learnable frequency w per unit. Decay rates delta_c are
spread over channels so that some filters are short and some long. A learned feed-through D is
added to tap 0, so the kernel carries the whole filter and the Hyena operator never adds D again.
This is the baseline the RTF paper compares against; it has no finite-state recurrence, so its
decoding keeps the history of its input (see `ImplicitFilter.step`).

Background: docs/mathematics.md of the Hyena-RTF repository (section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .fftconv import fft_causal_conv
from .long_filter import LongFilter


class Sine(nn.Module):
    """sin(w * x) with a learnable frequency per feature."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(w)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(LongFilter):
    """Implicitly parametrised filters, expanded to `channels` channels like `RTF`.

    Args: channels; l_max (positions are normalised by it; longer kernels extrapolate the MLP);
    num_filters (None: one per channel); order (MLP width); bands (sinusoid frequencies);
    w (initial sine frequency); fast_decay / slow_decay (the decay windows fall to `target` at
    these fractions of l_max).
    """

    finite_state = False  # decoding keeps the input history

    def __init__(
        self,
        channels: int,
        l_max: int,
        num_filters: int | None = None,
        order: int = 64,
        bands: int = 8,
        w: float = 1.0,
        fast_decay: float = 0.3,
        slow_decay: float = 1.5,
        target: float = 1e-2,
    ):
        super().__init__()
        num_filters = num_filters or channels
        if channels % num_filters:
            raise ValueError(f"channels ({channels}) must be a multiple of num_filters ({num_filters})")
        self.channels, self.num_filters, self.l_max, self.bands = channels, num_filters, l_max, bands
        emb = 1 + 2 * bands
        self.mlp = nn.Sequential(
            nn.Linear(emb, order),
            Sine(order, w),
            nn.Linear(order, order),
            Sine(order, w),
            nn.Linear(order, num_filters, bias=False),
        )
        # exp(-delta * s) = target at s = decay fraction of l_max: the rates span these two ends.
        self.decay_range = (math.log(1 / target) / slow_decay, math.log(1 / target) / fast_decay)
        self.d = nn.Parameter(torch.randn(num_filters))

    @classmethod
    def from_config(cls, config, layer_idx: int, channels: int, num_filters: int | None) -> ImplicitFilter:
        module = cls(
            channels, config.l_max, num_filters=num_filters, order=config.implicit_order, bands=config.implicit_bands
        )
        module.layer_idx = layer_idx
        return module

    def decay_rates(self, device, dtype) -> torch.Tensor:
        """delta_c, (num_filters,): computed from the hyper-parameters rather than kept in a buffer,
        because a non-persistent buffer is not restored by `from_pretrained` (which builds the
        model on the meta device and loads only the saved tensors)."""
        return torch.linspace(*self.decay_range, self.num_filters, device=device, dtype=dtype)

    def features(self, T: int, device, dtype=torch.float32) -> torch.Tensor:
        """Positional features (T, 1 + 2 bands) and normalised positions s = t / l_max (T,)."""
        s = torch.arange(T, device=device, dtype=dtype) / self.l_max
        f = torch.arange(1, self.bands + 1, device=device, dtype=dtype)
        ang = 2 * math.pi * s[:, None] * f[None, :]
        return torch.cat([s[:, None], torch.cos(ang), torch.sin(ang)], dim=-1), s

    def kernel(self, T: int) -> torch.Tensor:
        """(channels, T) in float32 (float64 for float64 parameters)."""
        dtype = torch.float64 if self.d.dtype == torch.float64 else torch.float32
        with torch.autocast(self.d.device.type, enabled=False):
            z, s = self.features(T, self.d.device, dtype)
            mlp_dtype = self.mlp[0].weight.dtype
            h = self.mlp(z.to(mlp_dtype)).to(dtype).transpose(0, 1)  # (filters, T)
            h = h * torch.exp(-self.decay_rates(self.d.device, dtype)[:, None] * s.to(dtype)[None, :])
            h = torch.cat([h[:, :1] + self.d.to(dtype)[:, None], h[:, 1:]], dim=-1)
        return h.repeat_interleave(self.channels // self.num_filters, dim=0)

    def recurrence(self, dtype: torch.dtype = torch.float32, check: str = "error") -> HistoryRecurrence:
        """The 'recurrent' form of a filter without a finite state: its input history (`check` has
        nothing to refuse: there is no recurrence that could diverge)."""
        return HistoryRecurrence(self, torch.promote_types(dtype, torch.float32))


@dataclass
class HistoryRecurrence:
    """Decoding without a finite state: the state is the whole input so far, (B, C, t), and a token
    costs O(t). Same interface as models/modal.ModalSystem (models/long_filter.py)."""

    filter: ImplicitFilter
    dtype: torch.dtype
    finite_state = False

    def init_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.filter.channels, 0, dtype=self.dtype, device=device)

    def response(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """The outputs of the history x (B, C, t) over the next T steps with no input, (B, C, T):
        y_(t+j) = sum_(s < t) k[t + j - s] x_s, the tail of the convolution of [x, 0] with the kernel."""
        t = x.shape[-1]
        padded = torch.nn.functional.pad(x, (0, T))
        return fft_causal_conv(padded, self.filter.kernel(t + T).to(x.dtype))[..., t:]

    def advance(self, u: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The history after u (B, C, T): x + u (or u alone)."""
        return u.to(self.dtype) if x is None else torch.cat([x, u.to(x.dtype)], dim=-1)

    def step(self, u: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (B, C). Appends u and returns y_t = sum_s k[s] u_{t-s} and the longer history."""
        history = torch.cat([x, u.to(x.dtype).unsqueeze(-1)], dim=-1)
        k = self.filter.kernel(history.shape[-1]).to(history.dtype)
        return (history.flip(-1) * k).sum(-1), history
