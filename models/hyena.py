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

Every parameter is read inside a call of the module that owns it (the short conv's `forward`, the
long filter's `forward`, models/long_filter.py): hooks that put a module's weights in place only
for the duration of its call (accelerate's offloading to CPU or disk) then see every use.

Derivations: docs/mathematics.md of the Hyena-RTF repository (section 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .configuration_hyena_rtf import HyenaRTFConfig
from .fftconv import fft_causal_conv
from .filters import make_filter
from .rtf import RTF


@dataclass
class HyenaState:
    """Decoding state of one Hyena (or MultiHyena) layer, advanced IN PLACE by the operator's `step`.

    conv: (B, 3d, w - 1) last inputs of the short conv (activation dtype).
    filt: the long filter's state: modal (B, C, 2, m), float32 or float64; implicit: the input
          history (B, C, t).
    rec:  the filter's recurrent form built at prefill (models/long_filter.py). Keeping it here means
          a decode step does no parameter checks, and a new prompt always sees current weights.

    For a finite state neither tensor changes shape or address while decoding: a step writes into
    them (a compiled step, or a CUDA graph, can capture that). The implicit filter's history grows,
    so its `filt` is replaced at every step.
    """

    conv: torch.Tensor
    filt: torch.Tensor
    rec: object

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

    def step_filter(self, u: torch.Tensor) -> torch.Tensor:
        """One token through the long filter: u (B, C) -> y (B, C); the state advanced (in place
        for a finite state)."""
        y, self.filt = self.rec.step(u, self.filt)
        return y


def shift_in_(conv: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The short conv's input window at this step: conv (B, Ch, w - 1) holds the previous inputs,
    p (B, Ch) is the new one. Returns the window [conv, p] (B, Ch, w) and slides it into `conv`
    in place (oldest column dropped)."""
    window = torch.cat([conv, p.unsqueeze(-1)], dim=-1)
    conv.copy_(window[..., 1:])
    return window


CONV1D_DEVICES = ("cuda",)  # where `short_causal_conv` calls F.conv1d instead of w multiply-adds


def short_causal_conv(p: torch.Tensor, conv: nn.Conv1d, past: torch.Tensor | None = None) -> torch.Tensor:
    """The short causal depthwise convolution of width w, p: (B, Ch, T) -> (B, Ch, T):

        q[b, c, t] = bias[c] + sum_{j=0}^{w-1} weight[c, 0, j] p[b, c, t - (w - 1) + j]

    where p before t = 0 is `past` (B, Ch, w - 1), the inputs of an earlier chunk, or zero.

    the same as conv(p)[..., :T] for `conv` = nn.Conv1d(Ch, Ch, w, groups=Ch, padding=w - 1), whose
    parameters it reads (so checkpoints are unchanged), computed as w shifted multiply-adds. Why not
    the module: on CPU the backward of a grouped nn.Conv1d is pathologically slow with more than one
    thread (12.8 s of a 46 s training step at length 2048, d 256, two threads; benchmarks/train/profile_step.py).
    On the devices of CONV1D_DEVICES (CUDA) the convolution itself runs: cuDNN's depthwise kernel."""
    T, w = p.shape[-1], conv.kernel_size[0]
    padded = F.pad(p, (w - 1, 0)) if past is None else torch.cat([past.to(p.dtype), p], -1)  # (B, Ch, T + w - 1)
    if p.device.type in CONV1D_DEVICES:
        # On a GPU the shifted multiply-adds read and write the (B, Ch, T) activation w times; one
        # depthwise cuDNN convolution does it in one pass (same sums, another order of rounding).
        return F.conv1d(padded, conv.weight.to(p.dtype), conv.bias.to(p.dtype), groups=p.shape[1])
    weight = conv.weight[:, 0, :, None].to(p.dtype)  # (Ch, w, 1)
    q = torch.addcmul(conv.bias[:, None].to(p.dtype), padded[..., :T], weight[:, 0])
    for j in range(1, w):
        # In place (addcmul's backward never reads q): an output per tap is a fresh block of
        # memory, and touching fresh pages can cost more than the multiply-add (benchmarks/serve.py).
        q.addcmul_(padded[..., j : j + T], weight[:, j])
    return q


def short_conv_step(window: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """The newest column of `short_causal_conv` from the last w inputs: window (B, Ch, w) -> (B, Ch)."""
    return (window * conv.weight[:, 0, :]).sum(-1) + conv.bias


class ShortConv(nn.Conv1d):
    """The short causal depthwise convolution of width w over Ch channels as a module: the parameters
    of nn.Conv1d(Ch, Ch, w, groups=Ch, padding=w - 1) (the checkpoint keys are unchanged), the
    computation of `short_causal_conv`. The operators call it, never read its weight themselves, so
    that a hook on it (accelerate's offloading) is in place whenever the weight is used."""

    def __init__(self, channels: int, width: int):
        super().__init__(channels, channels, kernel_size=width, groups=channels, padding=width - 1)

    def forward(self, p: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """p (B, Ch, T), past: the inputs before p (B, Ch, w - 1) or None for zeros -> (B, Ch, T).
        One decode step is T = 1 with the state's last inputs as `past`."""
        return short_causal_conv(p, self, past)


def filter_kernel(filt: nn.Module, T: int | torch.SymInt) -> torch.Tensor:
    """The long filter's kernel of length T (channels, T), computed inside a call of the filter
    (LongFilter.forward). Under torch.export with a dynamic length (T symbolic), what cannot be traced is
    refused in one line, before torch fails deep inside the filter: only the RTF filter's FFT
    kernel has no data-dependent step, and the RTF filter takes that route for T < l_max with
    gradients on (the no-grad route, and longer kernels, come from its modal form)."""
    if isinstance(T, torch.SymInt) and torch.compiler.is_exporting():
        if not isinstance(filt, RTF):
            raise ValueError(
                f"torch.export with a dynamic length supports RTF filters only, not {type(filt).__name__}: "
                "export with a fixed length"
            )
        if not filt.needs_grad():
            raise ValueError(
                "torch.export with a dynamic length traces the RTF kernel's FFT route, taken with gradients on: "
                "export outside torch.no_grad() / inference_mode, with the parameters requiring grad"
            )
        if not statically_known_true(T < filt.l_max):
            raise ValueError(
                f"torch.export with a dynamic length: bound it below the trained length, "
                f"torch.export.Dim(..., max={filt.l_max - 1}) (longer kernels come from the modal form, "
                "which has data-dependent steps)"
            )
    return filt("kernel", T)


class HyenaOperator(nn.Module):
    def __init__(self, config: HyenaRTFConfig, layer_idx: int):
        super().__init__()
        d, w = config.d_model, config.short_conv_width
        self.d_model, self.width = d, w
        self.rec_dtype = torch.float64 if config.recurrent_dtype == "float64" else torch.float32
        self.in_proj = nn.Linear(d, 3 * d)
        self.short_conv = ShortConv(3 * d, w)
        self.filter = make_filter(config, layer_idx, d, config.filter_heads)
        self.out_proj = nn.Linear(d, d)
        self.out_proj.is_residual_proj = True

    def _gate_inputs(self, u: torch.Tensor, mask: torch.Tensor | None, past: torch.Tensor | None = None):
        """u: (B, T, d) -> p (B, 3d, T) pre-conv, x0 (B, d, T), z (B, d, T). past: the short conv's
        inputs before u (B, 3d, w - 1), or None for zeros."""
        p = self.in_proj(u).transpose(1, 2)
        if mask is not None:
            p = p * mask[:, None, :].to(p.dtype)
        x0, x1, v = self.short_conv(p, past).chunk(3, dim=1)
        z = x1 * v
        if mask is not None:
            z = z * mask[:, None, :].to(z.dtype)
        return p, x0, z

    def forward(
        self,
        u: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_state: bool = False,
        pole_check: str = "error",
        state: HyenaState | None = None,
    ):
        """u: (B, T, d), mask: (B, T) of 0/1 or None -> (B, T, d), or with return_state or a state,
        ((B, T, d), the HyenaState after u).

        state: continue from this state (a chunk after a prompt): the short conv reads its last
        inputs, the long filter adds the state's response and advances it in closed form, so a
        chunked run equals one run over the whole sequence. The state is advanced in place.
        pole_check: what building the filter's recurrence does with an unstable filter.
        """
        p, x0, z = self._gate_inputs(u, mask, None if state is None else state.conv)
        yf = fft_causal_conv(z, filter_kernel(self.filter, u.shape[1]))  # the zero-state part
        if state is None and not return_state:
            return self.out_proj((x0 * yf).transpose(1, 2))
        # The state part, in closed form: the stored state's response over the chunk, and the state after it.
        rec = self.filter("recurrence", self.rec_dtype, pole_check) if state is None else state.rec
        x = None if state is None else state.filt
        if x is not None:
            yf = yf + rec.response(x, u.shape[1]).to(yf.dtype)
        out = self.out_proj((x0 * yf.to(x0.dtype)).transpose(1, 2))
        return out, advance_state(state, conv_tail(p, state, self.width), rec.advance(z, x), rec)

    def step(
        self, u: torch.Tensor, state: HyenaState, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, HyenaState]:
        """One token. u: (B, d) -> (B, d), and `state` (returned as well) advanced in place.
        mask: (B,) 0/1 or None; a 0 makes the token a zero input, as the parallel forward does.
        Cost O(d (d + w + n)), independent of the position. For a finite state it allocates no
        state and makes no host synchronisation, so the same code serves the eager cache and the
        static, compiled decode step (models/static_decode.py)."""
        p = self.in_proj(u)
        if mask is not None:
            p = p * mask[:, None].to(p.dtype)
        q = self.short_conv(p[..., None], state.conv)[..., 0]  # (B, 3d): the window [state.conv, p]
        shift_in_(state.conv, p)
        x0, x1, v = q.chunk(3, dim=-1)
        z = x1 * v
        if mask is not None:
            z = z * mask[:, None].to(z.dtype)
        y = x0 * state.step_filter(z).to(x0.dtype)
        return self.out_proj(y), state


def conv_tail(p: torch.Tensor, state: HyenaState | None, width: int) -> torch.Tensor:
    """The short conv's last w - 1 inputs after the chunk p (B, Ch, T): from p, and from the
    state's (or zeros) when the chunk is shorter than w - 1."""
    past = p.new_zeros(*p.shape[:-1], width - 1) if state is None else state.conv.to(p.dtype)
    window = torch.cat([past, p], dim=-1)
    return window[..., window.shape[-1] - (width - 1) :]


def advance_state(state: HyenaState | None, conv: torch.Tensor, filt: torch.Tensor, rec) -> HyenaState:
    """A new HyenaState, or `state` updated in place (a finite state keeps its tensors' addresses;
    a history that grew is replaced)."""
    if state is None:
        return HyenaState(conv, filt, rec)
    state.conv.copy_(conv)
    if state.filt.shape == filt.shape:
        state.filt.copy_(filt)
    else:
        state.filt = filt
    return state
