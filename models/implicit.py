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

import math

import torch
import torch.nn as nn

from .precision import Float32Parameters


class Sine(nn.Module):
    """sin(w * x) with a learnable frequency per feature."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(w)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(Float32Parameters):
    """Implicitly parametrised filters, expanded to `channels` channels like `RTF`.

    Args: channels; l_max (positions are normalised by it; longer kernels extrapolate the MLP);
    num_filters (None: one per channel); order (MLP width); bands (sinusoid frequencies);
    w (initial sine frequency); fast_decay / slow_decay (the decay windows fall to `target` at
    these fractions of l_max).
    """

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

    # ---- decoding: no finite state, so keep the input history -------------------------------
    def prefill(self, u: torch.Tensor) -> torch.Tensor:
        """The 'state' is the whole input so far, (B, C, T), float32 or wider."""
        return u.to(torch.promote_types(u.dtype, torch.float32))

    def step(self, u: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (B, C). Appends u and returns y_t = sum_s k[s] u_{t-s}: O(t) per token."""
        history = torch.cat([history, u.to(history.dtype).unsqueeze(-1)], dim=-1)
        k = self.kernel(history.shape[-1]).to(history.dtype)
        y = (history.flip(-1) * k).sum(-1)
        return y, history
