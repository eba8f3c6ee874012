"""The MultiHyena operator (Laughing Hyena): M heads, each an outer-product state filtered by one long filter.

    p          = in_proj(u)                       (B, T, d) -> (B, 3d, T)
    q, k, v    = split(short_conv(p))             the short causal depthwise conv of Hyena, 3 x (B, d, T)
    q, k, v    -> M heads of e = d / M channels   q_t^m, k_t^m, v_t^m in R^e
    z_t^m      = k_t^m (v_t^m)^T                  (e, e) per head and time: (B, M, e, e, T)
    Z_t^m      = sum_{s=0}^{t} h_m[s] z_{t-s}^m   ONE long filter h_m per head, shared by its e^2 entries
    y_t^m      = (q_t^m)^T Z_t^m                  (e,) per head: y_t^m[j] = sum_i q_t^m[i] Z_t^m[i, j]
    out        = out_proj(concat_m y^m)           (B, T, d)

It is linear attention whose decay is a long filter: y_t^m = sum_s h_m[s] (q_t . k_{t-s}) v_{t-s}.
The filter is `make_filter(config, layer_idx, channels=M e^2, num_filters=M)`: channel
m e^2 + i e + j carries Z^m[i, j], and the e^2 channels of a head are contiguous, which is how RTF and
ImplicitFilter expand their M distinct filters. So the RTF kernel (any T, l_max and beyond), its
recurrence and its prefill serve the M e^2 channels unchanged, tap 0 carrying the feed-through.

Cost.  Parallel: one causal FFT convolution over B x M e^2 = B d e channels, O(B d e T log T), plus
the outer products and contractions, O(B d e T); the kernel is computed and transformed once per head
and broadcast over its e^2 channels. Decoding: the state of a head is e x e x n (its M e^2 channels'
modal states, HyenaState.filt of shape (B, M e^2, 2, m)), each token costs O(M e^2 n) = O(d e n),
whatever the position. (The implicit filter has no finite state: it keeps its input history,
(B, M e^2, t), and costs O(d e t) per token.)

Relation to Hyena.  With M = d (e = 1) the outer product is the product x1 * v and the contraction
the gate x0 * (.): MultiHyena is then exactly the order-2 HyenaOperator with one filter per channel,
with the same parameters. For e > 1 a head mixes its channels: y^m[j] reads every k^m[i] v^m[j]
product, where Hyena's y[c] only ever sees channel c. `filter_heads` is a different thing: it ties
the filters of groups of Hyena channels but keeps the channel-by-channel (diagonal) operator.

Left padding: as in HyenaOperator, positions where `mask` is 0 are zeroed in p and in z, so they
contribute nothing and real positions get the outputs of the unpadded sequence.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .configuration_hyena_rtf import HyenaRTFConfig
from .fftconv import fft_causal_conv
from .filters import make_filter
from .hyena import HyenaState, ShortConv, advance_state, conv_tail, filter_kernel, shift_in_


class MultiHyenaOperator(nn.Module):
    """MultiHyena mixer of layer `layer_idx` with config.multi_hyena_heads heads. Same interface as
    HyenaOperator (forward with mask / return_state / pole_check, step) and the same HyenaState."""

    def __init__(self, config: HyenaRTFConfig, layer_idx: int):
        super().__init__()
        d, w, M = config.d_model, config.short_conv_width, config.multi_hyena_heads
        if not M or d % M:
            raise ValueError(f"multi_hyena_heads ({M}) must be >= 1 and divide d_model ({d})")
        self.d_model, self.width, self.heads, self.head_dim = d, w, M, d // M
        self.rec_dtype = torch.float64 if config.recurrent_dtype == "float64" else torch.float32
        self.in_proj = nn.Linear(d, 3 * d)
        self.short_conv = ShortConv(3 * d, w)
        self.filter = make_filter(config, layer_idx, M * self.head_dim**2, M)
        self.out_proj = nn.Linear(d, d)
        self.out_proj.is_residual_proj = True

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d, ...) -> (B, M, e, ...)."""
        return x.unflatten(1, (self.heads, self.head_dim))

    def forward(
        self,
        u: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_state: bool = False,
        pole_check: str = "error",
        state: HyenaState | None = None,
    ):
        """u: (B, T, d), mask: (B, T) of 0/1 or None -> (B, T, d), or with return_state or a state,
        ((B, T, d), the HyenaState after u). state and pole_check as in HyenaOperator.forward."""
        B, T, _ = u.shape
        keep = None if mask is None else mask[:, None, :]
        p = self.in_proj(u).transpose(1, 2)  # (B, 3d, T)
        if keep is not None:
            p = p * keep.to(p.dtype)
        past = None if state is None else state.conv
        q, k, v = map(self._heads, self.short_conv(p, past).chunk(3, dim=1))  # (B, M, e, T)
        z = k.unsqueeze(3) * v.unsqueeze(2)  # (B, M, e, e, T): z[b, m, i, j, t] = k_t[i] v_t[j]
        if keep is not None:
            z = z * keep[..., None, None, :].to(z.dtype)
        z = z.flatten(2, 3)  # (B, M, e^2, T): channel m e^2 + i e + j of the filter
        h = filter_kernel(self.filter, T)[:: self.head_dim**2, None]  # (M, 1, T): one filter per head
        Z = fft_causal_conv(z, h)  # the zero-state part, (B, M, e^2, T)
        rec = filt = None
        if state is not None or return_state:  # the state part, in closed form (as HyenaOperator.forward)
            rec = self.filter("recurrence", self.rec_dtype, pole_check) if state is None else state.rec
            x = None if state is None else state.filt
            if x is not None:
                Z = Z + rec.response(x, T).to(Z.dtype).view_as(Z)
            filt = rec.advance(z.flatten(1, 2), x)
        Z = Z.to(q.dtype).reshape(B, self.heads, self.head_dim, self.head_dim, T)
        y = torch.einsum("bmit,bmijt->bmjt", q, Z).flatten(1, 2)  # (B, d, T)
        out = self.out_proj(y.transpose(1, 2))
        if rec is None:
            return out
        return out, advance_state(state, conv_tail(p, state, self.width), filt, rec)

    def step(
        self, u: torch.Tensor, state: HyenaState, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, HyenaState]:
        """One token. u: (B, d) -> (B, d), and `state` (returned as well) advanced in place, as in
        HyenaOperator.step. RTF: O(d (d + w) + M e^2 n) = O(d (d + w + e n)) per token,
        independent of the position."""
        p = self.in_proj(u)
        if mask is not None:  # a 0 makes the token a zero input, as the parallel forward does
            p = p * mask[:, None].to(p.dtype)
        qkv = self.short_conv(p[..., None], state.conv)[..., 0]  # (B, 3d): the window [state.conv, p]
        shift_in_(state.conv, p)
        q, k, v = map(self._heads, qkv.chunk(3, dim=-1))  # (B, M, e) each
        z = (k.unsqueeze(-1) * v.unsqueeze(-2)).flatten(1)  # (B, M e^2)
        if mask is not None:
            z = z * mask[:, None].to(z.dtype)
        Z = state.step_filter(z)
        Z = Z.to(q.dtype).unflatten(1, (self.heads, self.head_dim, self.head_dim))  # (B, M, e, e)
        y = torch.einsum("bmi,bmij->bmj", q, Z).flatten(1)  # (B, d)
        return self.out_proj(y), state
