"""The decoding caches of Hyena-RTF: one recurrent state per Hyena layer, a KV cache per attention layer.

    HyenaRTFCache         what `forward(use_cache=True)` builds: Hyena states written in place,
                          attention (k, v) pairs that grow by one position per token
    StaticHyenaRTFCache   the same states in buffers of fixed shape and address, attention keys and
                          values in buffers of a fixed maximum length: what the static, compiled decode
                          step (models/static_decode.py) runs on

Neither is a transformers `Cache` subclass (those are built around growing key/value tensors), but
both have the members `generate()` reads on any cache object: `get_seq_length()`,
`reorder_cache()` for beam search, and the capability flags.

How transformers drives them: docs/transformers.md of the Hyena-RTF repository.
"""

from __future__ import annotations

import torch

from .attention import StaticKV
from .hyena import HyenaState


class HyenaRTFCache:
    """Per-layer decoding state: `HyenaState` for Hyena layers, (k, v) for attention layers.

    A Hyena layer's tensors never grow (RTF filters): each decode step writes into them
    (`HyenaOperator.step`), the step the static path runs too. `seen_tokens` counts the positions
    processed so far (padding included): the model feeds `generate()`'s ids from that position on,
    so a returned cache can continue in a later `generate()` call.
    """

    # Flags transformers' generation code reads on a cache object.
    is_compileable = False  # no static shapes: generate() must not try to torch.compile around it
    is_croppable = False  # a recurrent state cannot be rolled back by k tokens (no assisted decoding)

    def __init__(self, attention_layers: list[bool], pole_check: str = "error"):
        """attention_layers: one flag per layer, True where the layer is softmax attention.
        pole_check: "error" refuses to build the recurrence of a filter with a pole on or outside
        the unit circle (its recurrent form diverges); "warn" builds it with a warning."""
        self.layers: list = [None] * len(attention_layers)
        self.pole_check = pole_check
        self.is_linear = [not a for a in attention_layers]  # recurrent (constant-size) layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def check_batch(self, batch: int) -> None:
        """ValueError (one line) unless the cache is empty or holds the states of `batch` sequences:
        row i of the input continues row i of the cache, so another batch size cannot be right (after
        beam search the rows are the beams, not the returned sequences)."""
        held = next((s.conv if isinstance(s, HyenaState) else s[0] for s in self.layers if s is not None), None)
        if held is not None and held.shape[0] != batch:
            raise ValueError(
                f"the cache holds the states of {held.shape[0]} sequences but the input has {batch} rows: a cache "
                "continues the batch it was built with, row for row (beam search leaves one row per beam); "
                "start without a cache instead"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the states of the selected beams (Hyena states in place)."""
        for i, s in enumerate(self.layers):
            if isinstance(s, HyenaState):
                s.reorder_(beam_idx.to(s.conv.device))
            elif s is not None:
                self.layers[i] = tuple(t.index_select(0, beam_idx.to(t.device)) for t in s)

    def __len__(self) -> int:
        return len(self.layers)


class StaticHyenaRTFCache:
    """Decoding state in buffers whose shapes and addresses never change, for the static step.

    layers: per Hyena layer a `HyenaState` (finite-state filters only: conv (B, 3d, w - 1), filt the
            modal state (B, C, 2, m));
            per attention layer a `StaticKV` ((B, h, max_length, hd) keys and values, (B, max_length)
            valid flags);
    pos:    (1,) int64 on the model's device: the positions seen so far, which is also where the
            next token's key goes. A device tensor, so a step creates no host scalar.

    It starts empty. The first forward call given it (by the model, or by `generate()`) runs the
    ordinary parallel prefill into a `HyenaRTFCache` and loads that here (`load_`); every later call
    decodes through `static_decode.decode_step`, which writes into these buffers. Loading a new
    prefill of the same shapes writes into the same buffers, so a compiled step, or a captured
    CUDA graph, serves the next prompt too. `max_length` (prompt + new tokens) bounds the attention
    layers' keys; a model without attention layers needs none.
    """

    is_compileable = True  # generate() may torch.compile the decode forward around this cache
    is_croppable = False

    def __init__(self, max_length: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.layers: list[HyenaState | StaticKV] | None = None
        self.pos: torch.Tensor | None = None
        self._shapes: list | None = None  # what the buffers were allocated for

    @property
    def is_loaded(self) -> bool:
        return self.layers is not None

    @property
    def seen_tokens(self) -> int:
        """Positions seen, padding included. Reads the device counter (a host synchronisation), so
        nothing in the decode loop calls it."""
        return 0 if self.pos is None else int(self.pos.item())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def check_room(self, total: int) -> None:
        """Refuse a sequence of `total` positions that would not fit the attention buffers (host ints
        only: called before the steps, not inside them)."""
        if self.max_length is not None and total > self.max_length:
            raise ValueError(
                f"the static cache holds max_length={self.max_length} positions, but {total} are asked for: "
                "build StaticHyenaRTFCache(max_length=...) for the prompt plus the new tokens"
            )

    def reserve(self, max_length: int) -> None:
        """Make room for max_length positions, keeping what the cache holds: a cache returned by one
        `generate()` was sized for that call, and continuing it in a later call needs room for the
        longer sequence. Filled attention buffers are reallocated with their keys and values copied
        (new addresses, so a compiled step traces once more for them); nothing ever shrinks. A cache
        without a bound (max_length None: no attention layers to size) stays unbounded."""
        if self.max_length is None or max_length <= self.max_length:
            return
        self.max_length = max_length
        if not self.is_loaded:
            return
        self.layers = [s if isinstance(s, HyenaState) else s.grown(max_length) for s in self.layers]
        self._shapes = [*self._shapes[:-1], max_length]  # what a later load_ of the same model reuses
        self._mark_static()

    def load_(self, cache: HyenaRTFCache, key_mask: torch.Tensor | None = None) -> None:
        """Take over a prefilled HyenaRTFCache. key_mask: (B, P) attention mask of the prompt (1 for
        real tokens), or None. The first load (or one of other shapes) allocates; later ones copy."""
        for i, s in enumerate(cache.layers):
            if isinstance(s, HyenaState) and not s.rec.finite_state:
                raise ValueError(
                    f"layer {i} uses the implicit filter, whose decoding state grows with the context; "
                    "static decoding needs finite-state filters (distil the model first: distill.py)"
                )
        attention = [s for s in cache.layers if not isinstance(s, HyenaState)]
        if attention and self.max_length is None:
            raise ValueError("a model with attention layers needs StaticHyenaRTFCache(max_length=...)")
        self.check_room(cache.seen_tokens)
        shapes = [
            (s.conv.shape, s.filt.shape, s.conv.dtype, s.filt.dtype, s.conv.device)
            if isinstance(s, HyenaState)
            else (s[0].shape[:2], s[0].shape[3], s[0].dtype, s[0].device)
            for s in cache.layers
        ] + [self.max_length]
        if shapes != self._shapes:  # allocate: take the Hyena states over, make room for the keys
            self.layers = [
                s if isinstance(s, HyenaState) else StaticKV.empty(s[0], self.max_length) for s in cache.layers
            ]
            first = cache.layers[0]
            device = first.conv.device if isinstance(first, HyenaState) else first[0].device
            self.pos = torch.zeros(1, dtype=torch.long, device=device)
            self._shapes = shapes
            self._mark_static()
        for mine, s in zip(self.layers, cache.layers):
            if isinstance(s, HyenaState):
                if mine is not s:
                    mine.copy_(s)
            else:
                mine.load_(s, key_mask)
        for s in self.layers:  # the recurrence comes by reference: it changes when the weights do
            if isinstance(s, HyenaState):
                _mark_static(*s.rec.coef)
        self.pos.fill_(cache.seen_tokens)

    def _mark_static(self) -> None:
        for s in self.layers:
            _mark_static(*((s.conv, s.filt) if isinstance(s, HyenaState) else (s.k, s.v, s.valid)))
        _mark_static(self.pos)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the states of the selected beams, in place."""
        for s in self.layers:
            s.reorder_(beam_idx.to(self.pos.device))

    def __len__(self) -> int:
        return 0 if self.layers is None else len(self.layers)


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that these tensors keep their address: a CUDA graph then reads and writes
    them where they are, instead of copying them in and refusing to capture their mutation."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)
