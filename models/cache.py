"""The decoding cache of Hyena-RTF: one recurrent state per Hyena layer, a KV cache per attention layer.

It is not a transformers `Cache` subclass (those are built around growing key/value tensors), but it
has the members `generate()` reads on any cache object: `get_seq_length()`, `reorder_cache()` for
beam search, and the capability flags below.

How transformers drives it: docs/transformers.md of the Hyena-RTF repository.
"""

from __future__ import annotations

import torch

from .hyena import HyenaState


class HyenaRTFCache:
    """Per-layer decoding state: `HyenaState` for Hyena layers, (k, v) for attention layers.

    A Hyena layer's tensors never grow. `seen_tokens` counts the positions processed so far (padding
    included): the model feeds `generate()`'s ids from that position on, so a returned cache can
    continue in a later `generate()` call.
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

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the states of the selected beams (in place)."""
        for i, s in enumerate(self.layers):
            if isinstance(s, HyenaState):
                self.layers[i] = s.index_select(beam_idx.to(s.conv.device))
            elif s is not None:
                self.layers[i] = tuple(t.index_select(0, beam_idx.to(t.device)) for t in s)

    def __len__(self) -> int:
        return len(self.layers)
