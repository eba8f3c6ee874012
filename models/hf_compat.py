"""The one place that knows how the running transformers release names the decoding cache.

transformers before 5.24 hands the cache to a model as `past_key_values=` and reads it back from
`outputs.past_key_values`. 5.24 renamed both to `cache`: `generate()` passes `cache=` and reads
`outputs.cache`; the old name is still accepted by the output classes, with a deprecation warning.
A model that listens only for one name silently gets no cache from the other release, and every
generation step re-runs the whole sequence.

The release is recognised by a feature, not by its version string: whether the library's own
`CausalLMOutputWithPast` has a `cache` field. Everything else in the project (the model, the CLIs,
the tests) goes through the three helpers below, so supporting a new release means editing this
file only.

The release history behind it: docs/transformers.md of the Hyena-RTF repository.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

# The keyword the running release passes the cache under, and the output field it reads it from.
CACHE_NAME: str = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Every name a caller may use (the current one first). A model accepts all of them.
CACHE_NAMES: tuple[str, ...] = tuple(dict.fromkeys((CACHE_NAME, "cache", "past_key_values")))


def pick_cache(cache: Any = None, past_key_values: Any = None) -> Any:
    """The cache a caller passed, under whichever name; both at once is an error."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """{name: cache} for calling any Hugging Face model, or building its output, on this release."""
    return {CACHE_NAME: cache}


def output_cache(output: Any) -> Any:
    """The cache a model output (or `generate(return_dict_in_generate=True)` result) carries, or
    None. Reads the field by the running release's name, so no deprecation warning is raised."""
    return getattr(output, CACHE_NAME, None)
