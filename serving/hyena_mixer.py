"""A Hyena (or MultiHyena) mixer whose decoding state lives in vLLM's state cache.

Per request and layer vLLM keeps one fixed-size slot holding two tensors:

    conv  (3d, w - 1)     the short convolution's last w - 1 inputs (model dtype)
    filt  (C, 2, m_max)   the long filter's modal state x, real and imaginary parts, stored in
                          float64; C = d for Hyena, M e^2 for MultiHyena; slots past the filter's
                          m are kept at zero

A forward pass receives the tokens of several requests at once: vLLM orders them decodes first
(one token each), then prefill chunks (any length, each possibly resuming from a stored state).

    decode     one recurrent step per request, batched:  y = d u + Re sum_k r_k x_k,  x <- lambda x + u
    prefill    the parallel form from the stored state x (or zero), exact for every chunk:
                 y_t = (k * u)_t + Re sum_k r_k lambda_k^t x_k       FFT convolution + state response
                 x'  = lambda^T x + sum_s lambda^(T-1-s) u_s         closed form (ModalSystem.advance)

so a prompt split into chunks (chunked prefill), or resumed from a cached prefix, gives the outputs
and the state of one pass over the whole prompt. The arithmetic is the project's own: the short
convolution (`short_causal_conv`, `short_conv_step`), the filter's kernel and its modal recurrence
(`LongFilter.recurrence`: `response`, `advance`, `step`), so vLLM and `generate()` compute the same
numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from models.fftconv import fft_causal_conv
from models.filters import make_filter
from models.hyena import short_causal_conv, short_conv_step

from .servable import refuse, unstable_refusal


def filter_channels(config) -> int:
    """Channels the long filter convolves: d for Hyena, M e^2 for MultiHyena (e = d / M)."""
    heads = config.multi_hyena_heads
    return config.d_model if not heads else heads * (config.d_model // heads) ** 2


def max_slots(config, layer_idx: int) -> int:
    """An upper bound on the modal slots m of a layer's filter, known before its weights are:
    ceil(n / 2) for order n (a modal filter has that many; an RTF's n poles take a slot per
    conjugate pair and one per two real poles, models/modal.py `pack_real_pairs`)."""
    return math.ceil(config.state_size_of(layer_idx) / 2)


def state_dtype(config) -> torch.dtype:
    """The dtype the modal state is stored in: float64, whatever the recurrence computes in.

    The recurrence's own dtype (config.recurrent_dtype, float32 by default) is promoted to float64
    per layer when its filters are ill-conditioned (models/modal.state_dtype), which only the
    weights tell, and vLLM sizes the cache from the config before reading them. A float64 slot
    holds either exactly (a float32 state round-trips unchanged), so the steps are the project's
    own in both cases. A float32 slot under a promoted layer rounds the state at every token: on the
    tests' slow-pole model that moved sampled-token log-probabilities by 4e-3 (1e-6 in float64). The
    price is 8 bytes per state entry instead of 4: 16 C m_max bytes per Hyena layer and request."""
    return torch.float64


def state_shapes(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-request state shapes of every Hyena layer: conv (3d, w - 1), filt (C, 2, m_max). vLLM
    pages all state layers alike, so layers whose orders differ (a distilled checkpoint's
    `state_sizes`) all get the largest slot count."""
    conv = (3 * config.d_model, config.short_conv_width - 1)
    hyena = [i for i in range(config.n_layer) if i not in config.attn_layers]
    return conv, (filter_channels(config), 2, max((max_slots(config, i) for i in hyena), default=1))


class HyenaMixer(MambaBase, nn.Module):
    """The mixer of one Hyena layer, with the parameters of the project's HyenaOperator (or
    MultiHyenaOperator) under the same names: in_proj, short_conv, filter, out_proj.

    vLLM finds state-keeping layers by their MambaBase type (and binds `kv_cache` to them).
    MambaBase is an abstract class, not an nn.Module: without nn.Module among the bases the
    layer's parameters would not be registered as the model's, and would never be loaded."""

    def __init__(self, config, layer_idx: int, model_dtype: torch.dtype, prefix: str):
        super().__init__()
        d, w = config.d_model, config.short_conv_width
        self.config, self.layer_idx, self.prefix = config, layer_idx, prefix
        self.d_model, self.width = d, w
        self.heads = config.multi_hyena_heads  # None: the order-2 Hyena operator
        self.head_dim = d // self.heads if self.heads else 1
        self.model_dtype = model_dtype
        self.in_proj = nn.Linear(d, 3 * d)
        self.short_conv = nn.Conv1d(3 * d, 3 * d, kernel_size=w, groups=3 * d, padding=w - 1)
        channels = filter_channels(config)
        num_filters = self.heads if self.heads else config.filter_heads
        # float32 whatever the model's dtype, as the project keeps every filter (models/precision.py)
        self.filter = make_filter(config, layer_idx, channels, num_filters).float()
        self.out_proj = nn.Linear(d, d)
        self.rec = None  # the filter's modal recurrence, built once the weights are loaded

        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix}")
        context[prefix] = self  # how vLLM finds the layer to bind its state cache and metadata
        self.kv_cache = (torch.tensor([]),)

    # ---- what vLLM asks of a state-keeping layer ------------------------------------------------
    def get_state_shape(self):
        return state_shapes(self.config)

    def get_state_dtype(self):
        return self.model_dtype, state_dtype(self.config)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        # The short-conv backend's metadata (slots, prefill offsets, which prefills resume from a
        # state) is all this layer needs; it says nothing about the state's contents.
        return MambaAttentionBackendEnum.SHORT_CONV

    # ---- after loading ---------------------------------------------------------------------------
    @torch.no_grad()
    def build_recurrence(self) -> None:
        """The filter's modal system from the loaded weights, as the project's cache builds it (a
        filter with a pole on or outside the unit circle is refused in one line)."""
        wanted = torch.float64 if self.config.recurrent_dtype == "float64" else torch.float32
        pole_radius = getattr(self.filter, "pole_radius", None)  # RTFs; a modal filter's are inside by construction
        radius = float(pole_radius().max()) if pole_radius is not None else 0.0
        if radius >= 1.0:
            refuse(unstable_refusal(self.layer_idx, radius))
        self.rec = self.filter.recurrence(wanted, "error")
        slots = self.get_state_shape()[1][-1]
        if self.rec.slots > slots:
            raise ValueError(f"layer {self.layer_idx}: the filter has {self.rec.slots} modal slots, more than {slots}")

    # ---- the operator's algebra, for (B, 3d) step inputs and (B, 3d, T) chunks -------------------
    def _gate(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Short-conv output q (B, 3d, ...) -> the filter input z (B, C, ...) and what `_combine`
        needs. Hyena: z = x1 * v. MultiHyena: z = k v^T per head, flattened (channel m e^2 + i e + j)."""
        a, k, v = q.chunk(3, dim=1)
        if not self.heads:
            return k.mul_(v), a  # in place: q is this step's own (fewer fresh blocks: `forward`)
        a, k, v = (t.unflatten(1, (self.heads, self.head_dim)) for t in (a, k, v))  # (B, M, e, ...)
        return (k.unsqueeze(3) * v.unsqueeze(2)).flatten(1, 3), a

    def _combine(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The gate after the filter: Hyena x0 * y; MultiHyena y^m_j = sum_i q^m_i Z^m_ij. -> (B, d, ...)."""
        y = y.to(a.dtype)
        if not self.heads:
            return y.mul_(a)
        Z = y.unflatten(1, (self.heads, self.head_dim, self.head_dim))  # (B, M, e, e, ...)
        return torch.einsum("bmi...,bmij...->bmj...", a, Z).flatten(1, 2)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, d) the normalised hidden states of this step's tokens (decodes first, then the
        prefill chunks, then padding) -> (N, d). Reads and writes the requests' state slots.

        Inside, tokens are columns: p^T = W_in x^T + b (3d, N), so that a request's chunk is a
        (3d, T) block whose rows are time series, the layout of the short conv and the FFT; the
        matrix products take the transposes for free (a token-major chunk cost two transposing
        copies per layer, more than its short convolution). The gate and the state response are
        applied in place, into blocks this step made: on CPU every fresh block of memory is paid
        in page faults when first written (benchmarks/serve.py counts them)."""
        meta = get_forward_context().attn_metadata
        meta = meta.get(self.prefix) if isinstance(meta, dict) else None
        pt = torch.addmm(self.in_proj.bias[:, None], self.in_proj.weight, x.T)  # (3d, N)
        if meta is None:  # vLLM's profiling run: no slots yet; only the shapes and memory matter
            z, a = self._gate(short_causal_conv(pt[None], self.short_conv))
            out = self._combine(a, fft_causal_conv(z, self.filter.kernel(z.shape[-1])))[0]
            return torch.addmm(self.out_proj.bias, out.T, self.out_proj.weight.T)
        out = torch.zeros(self.d_model, x.shape[0], dtype=pt.dtype, device=pt.device)  # (d, N)
        conv_cache, filt_cache = self.kv_cache
        decodes = meta.num_decode_tokens
        if decodes:
            slots = meta.state_indices_tensor_d[:decodes]  # rows past `decodes`: graph padding
            slots = (slots[:, 0] if slots.dim() > 1 else slots).long()
            out[:, :decodes] = self._decode(pt[:, :decodes].T, slots, conv_cache, filt_cache).T
        if meta.num_prefills:
            starts = (meta.query_start_loc_p + decodes).tolist()
            slots = meta.state_indices_tensor_p.tolist()
            resume = meta.has_initial_states_p.tolist()
            for i, slot in enumerate(slots):
                s, e = starts[i], starts[i + 1]
                out[:, s:e] = self._prefill(pt[:, s:e], slot, resume[i], conv_cache, filt_cache)
        return torch.addmm(self.out_proj.bias, out.T, self.out_proj.weight.T)  # (N, d)

    def _decode(self, p: torch.Tensor, slots: torch.Tensor, conv_cache, filt_cache) -> torch.Tensor:
        """One token of each of B requests: p (B, 3d) -> (B, d); their slots advanced."""
        m, rec = self.rec.slots, self.rec
        conv = conv_cache[slots]  # (B, 3d, w - 1): gathered copies, written back below
        filt = filt_cache[slots][..., :m].to(rec.dtype)  # (B, C, 2, m)
        window = torch.cat([conv.to(p.dtype), p.unsqueeze(-1)], dim=-1)  # (B, 3d, w)
        z, a = self._gate(short_conv_step(window, self.short_conv))
        y, filt = rec.step(z, filt)
        conv_cache[slots] = window[..., 1:].to(conv_cache.dtype)
        filt_cache[slots, :, :, :m] = filt.to(filt_cache.dtype)
        return self._combine(a, y)

    def _prefill(self, p: torch.Tensor, slot: int, resume: bool, conv_cache, filt_cache) -> torch.Tensor:
        """A chunk of T tokens of one request, from its stored state if `resume`, else from zero:
        p (3d, T) -> (d, T); its slot holds the state after the chunk."""
        m, rec, T = self.rec.slots, self.rec, p.shape[-1]
        u = p[None]  # (1, 3d, T)
        past = conv_cache[slot][None].to(p.dtype) if resume else None
        z, a = self._gate(short_causal_conv(u, self.short_conv, past))
        # A chunk as HyenaOperator.forward runs it (models/long_filter.py): the convolution with the
        # filter's memoised kernel, plus the stored state's response; the state after it in closed form.
        y = fft_causal_conv(z, self.filter.kernel(T))
        x = filt_cache[slot][None, ..., :m].to(rec.dtype) if resume else None
        if resume:  # + the stored state's response
            y.add_(rec.response(x, T).to(y.dtype))
        filt = rec.advance(z, x)  # the state after the chunk, in closed form
        keep = self.width - 1  # the short conv's last inputs, from this chunk, or earlier ones too
        if T < keep:
            u = torch.cat([u.new_zeros(1, u.shape[1], keep) if past is None else past, u], dim=-1)
        conv_cache[slot] = u[0, :, u.shape[-1] - keep :].to(conv_cache.dtype)
        filt_cache[slot] = 0
        filt_cache[slot, :, :, :m] = filt[0].to(filt_cache.dtype)
        return self._combine(a, y)[0]
