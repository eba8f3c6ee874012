"""The static decode step: one token in, logits out, the state written in place; compilable whole.

    prefill    model(prompt, use_cache=True)       the parallel FFT forward -> HyenaRTFCache
               StaticHyenaRTFCache.load_(...)      its states taken over, attention keys copied into
                                                   (B, h, max_length, hd) buffers
    step       h      = embed(ids)                 ids (B,) or (B, 1)
               h      = block.step(h, state, pos)  every layer: the same per-layer step as the eager
                                                   cache (HyenaOperator / MultiHyenaOperator.step),
                                                   attention through CausalSelfAttention.step
               pos   += 1                          (1,) int64 on the device
               logits = model.logits(norm_f(h))    (B, V)

A step allocates no state, creates no host scalar and takes no data-dependent Python branch, so
`torch.compile(decode_step, fullgraph=True)` accepts it and, on CUDA with mode="reduce-overhead",
CUDA graphs can capture it: every buffer it reads or writes keeps its address (the cache marks them
static). Only RTF filters have a finite state; a model with implicit filters is refused with a
one-line error (`check_static_decoding`).

Entry points:
    StaticDecoder(model, compile=...)    .prefill(ids, mask, max_length) -> last logits (B, V),
                                         .step(ids) -> logits (B, V), the compiled step reused
                                         across prompts of the same shapes
    greedy_decode(model, ids, mask, n)   prefill, then n greedy static steps -> tokens (B, n)
    generate(..., cache=StaticHyenaRTFCache(max_length))   transformers drives the same step
                                         through the model's forward (docs/transformers.md)
"""

from __future__ import annotations

import torch

from .cache import StaticHyenaRTFCache
from .hf_compat import output_cache


class StaticDecodeUnsupported(ValueError):
    """The model has no static decode step; the message is one line naming why."""


def check_static_decoding(model) -> None:
    """Raise StaticDecodeUnsupported unless `model` is a Hyena-RTF causal LM whose Hyena layers all
    use finite-state filters (RTF or modal). Duck-typed, so the class loaded from a checkpoint
    folder's own code passes too."""
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if getattr(config, "model_type", None) != "hyena_rtf" or layers is None or not hasattr(model, "lm_head"):
        raise StaticDecodeUnsupported(
            f"{type(model).__name__} has no static decode step (only Hyena-RTF causal LMs with finite-state filters do)"
        )
    for i, block in enumerate(layers):
        if not block.is_attention and not getattr(block.mixer.filter, "finite_state", False):
            raise StaticDecodeUnsupported(
                f"layer {i} uses the {config.filter} filter, whose decoding state grows with the context; "
                "static decoding needs finite-state filters (distil the model first: distill.py)"
            )


def decode_step(model, cache: StaticHyenaRTFCache, ids: torch.Tensor) -> torch.Tensor:
    """One token for every row. model: HyenaRTFForCausalLM; cache: loaded StaticHyenaRTFCache;
    ids: (B,) or (B, 1) int64 on the model's device. Returns logits (B, vocab_size); the cache is
    advanced by one position in place. The function to torch.compile (fullgraph=True)."""
    base = model.model
    h = base.drop(base.embed(ids.reshape(-1)))  # (B, d)
    for block, state in zip(base.layers, cache.layers):
        h = block.step(h, state, cache.pos)
    cache.pos.add_(1)
    return model.logits(base.norm_f(h))


def decode_steps(model, cache: StaticHyenaRTFCache, ids: torch.Tensor) -> torch.Tensor:
    """`decode_step` over the columns of ids (B, T), in order -> logits (B, T, vocab_size). What the
    model's forward runs when given a loaded static cache (T is 1 inside generate())."""
    return torch.stack([decode_step(model, cache, ids[:, t]) for t in range(ids.shape[1])], dim=1)


def compile_options(device: torch.device) -> dict:
    """torch.compile's options for the step: on CUDA mode="reduce-overhead", so the step is
    captured as a CUDA graph and replayed; elsewhere inductor's defaults."""
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}


class StaticDecoder:
    """Prefill with the parallel forward, then decode with the static step (compiled or not).

    The same decoder serves prompt after prompt: its cache keeps its buffers whenever the batch size
    and max_length stay the same, so a compiled step is traced once and not again (a new batch
    size or max_length allocates new buffers, and the step compiles for them once).
    """

    def __init__(self, model, compile: bool = False, max_length: int | None = None, **options):
        """compile: wrap `decode_step` in torch.compile(fullgraph=True, **options), options
        defaulting to `compile_options(model.device)` (e.g. backend="eager" for a quick check).
        max_length: positions to make room for from the start (the longest prompt + new tokens), so
        that shorter prompts reuse the same buffers and compiled step."""
        check_static_decoding(model)
        self.model = model
        self.cache = StaticHyenaRTFCache(max_length)
        self.fn = decode_step
        if compile:
            # torch.compile keeps its graphs, and its limit of 8 recompilations, per code object:
            # a private copy of the step's code keeps decoders of different models apart.
            own = type(decode_step)(decode_step.__code__.replace(), decode_step.__globals__, "decode_step")
            self.fn = torch.compile(own, fullgraph=True, **(options or compile_options(model.device)))
        self.seen = 0  # host-side count of positions, for the max_length check: never read from the device

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, max_length: int | None = None
    ) -> torch.Tensor:
        """Run the prompt ids (B, T) with attention mask (B, T) through the parallel forward and load
        its state. max_length: positions the cache must hold (prompt + new tokens); needed only by
        models with attention layers. Returns the last position's logits (B, vocab_size)."""
        if max_length is not None and (self.cache.max_length or 0) < max_length:
            self.cache = StaticHyenaRTFCache(max_length)  # a longer one is kept: its graph stays valid
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        self.cache.load_(output_cache(out), mask)
        self.seen = ids.shape[1]
        return out.logits[:, -1]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per row: ids (B,) or (B, 1) -> logits (B, vocab_size). The logits of a CUDA
        graph replay are overwritten by the next step: use (or clone) them before."""
        self.cache.check_room(self.seen + 1)
        logits = self.fn(self.model, self.cache, ids)
        self.seen += 1
        return logits


@torch.inference_mode()
def greedy_decode(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    new_tokens: int,
    compile: bool = False,
    decoder: StaticDecoder | None = None,
) -> torch.Tensor:
    """Prefill with the parallel forward, then `new_tokens` greedy static steps (argmax, no stop
    token). ids, mask: (B, T) prompt and attention mask (left padding) or None. Returns the new
    tokens (B, new_tokens). Pass a `decoder` to reuse its (compiled) step across calls."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    decoder = decoder or StaticDecoder(model, compile=compile)
    tok = decoder.prefill(ids, mask, ids.shape[1] + new_tokens).argmax(-1)
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = decoder.step(tok).argmax(-1)
        out.append(tok)
    return torch.stack(out, dim=1)
