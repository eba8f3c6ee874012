"""One harness for the decoding contract: every filter kind x every operator x every cache.

For each combination a tiny float64 model is built through the registry (`models/filters.FILTERS`,
so a new filter kind is tested here by adding it to the registry) and its cached decoding is
compared with its own parallel forward through the Hugging Face API: a prefill, a chunk that
continues the state, then one token per call, on a sequence that runs past l_max.

    filter     every key of FILTERS (rtf, modal, implicit)
    operator   Hyena (one filter per channel), Hyena with shared filter heads, MultiHyena, and a
               hybrid (one attention layer)
    cache      the dynamic HyenaRTFCache the model returns, and StaticHyenaRTFCache (fixed buffers)

Tolerance: the models are float64 end to end, so cached and parallel logits differ by rounding
only: each recurrent state term rounds by eps64 = 1.1e-16 per step and is amplified by at most the
filter's modal cancellation factor (a few hundred for these random filters, `decode_tolerance`);
the FFT path rounds by ~log2(FFT length) * eps64. 1e-9 relative is a million-fold margin over that
and ten million times below the 1e-2 or so a wrong state gives (a dropped or doubled tap).
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import decode_tolerance

from models import HyenaRTFConfig, HyenaRTFForCausalLM
from models.cache import StaticHyenaRTFCache
from models.filters import FILTERS
from models.hf_compat import cache_kwargs, output_cache

VOCAB, L_MAX, T = 48, 24, 40  # T > L_MAX: the cached and parallel forms both run past l_max
OPERATORS = {
    "hyena": {},
    "hyena-shared-heads": {"filter_heads": 4},
    "multihyena": {"multi_hyena_heads": 4},
    "hybrid": {"attn_layers": [1]},
}
CACHES = ("dynamic", "static")


def model_for(filter_kind: str, operator: str) -> HyenaRTFForCausalLM:
    torch.manual_seed(0)
    config = HyenaRTFConfig(
        vocab_size=VOCAB,
        pad_vocab_size_multiple=8,
        d_model=16,
        n_layer=2,
        n_head=2,
        l_max=L_MAX,
        state_size=4,
        filter=filter_kind,
        rtf_kernel_dtype="float64",  # the long filters' kernels and states too, not only the weights
        recurrent_dtype="float64",
        initializer_range=0.3,
        **OPERATORS[operator],
    )
    return HyenaRTFForCausalLM(config).double().eval()


@torch.no_grad()
def cached_logits(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Logits of ids (B, T) fed as [prefill | chunk | 1 | 1 | ...] through `cache` (None: the model
    makes its dynamic cache on the first call)."""
    cuts = [0, 10, 16, *range(17, ids.shape[1] + 1)]
    pieces = []
    for start, end in zip(cuts[:-1], cuts[1:]):
        out = model(input_ids=ids[:, start:end], use_cache=True, **cache_kwargs(cache))
        cache = output_cache(out)
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("filter_kind", sorted(FILTERS))
def test_cached_decoding_equals_the_parallel_forward(filter_kind, operator, cache_kind):
    model = model_for(filter_kind, operator)
    if cache_kind == "static" and not all(getattr(m, "finite_state", True) for m in model.modules()):
        # The static cache holds fixed-size states; an implicit filter's state is its whole input
        # history, and the model refuses the static cache with a one-line error instead.
        with pytest.raises((ValueError, TypeError), match="finite-state filters"):
            cached_logits(model, torch.ones(1, T, dtype=torch.long), StaticHyenaRTFCache(max_length=T))
        return
    ids = torch.randint(1, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parallel = model(input_ids=ids, use_cache=False).logits
    cache = StaticHyenaRTFCache(max_length=T) if cache_kind == "static" else None
    cached = cached_logits(model, ids, cache)
    err = float((cached - parallel).abs().max() / parallel.abs().max())
    bound = max(1e-9, decode_tolerance(model, 2.0**-52))
    assert err <= bound, f"{filter_kind} x {operator} x {cache_kind}: relative logits error {err:.3g} > {bound:.3g}"
