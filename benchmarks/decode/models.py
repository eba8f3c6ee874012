"""The models benchmarks/decode/run.py compares, and what their caches hold: Hyena-RTF and Hyena with
implicit filters (this repository), Hugging Face GPT-NeoX of the same width, depth and vocabulary
(rotary, sdpa); the bytes of any of their caches; the estimate of a configuration's memory that
decode.py's guard compares with --max-memory-gb."""

from __future__ import annotations

import torch
from transformers import GPTNeoXForCausalLM

from benchmarks.common import gpt_neox_baseline
from models import HyenaRTFConfig, config_from_preset
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from models.precision import is_filter_param


def build_models(args, device, dtype, methods) -> tuple[dict, HyenaRTFConfig]:
    """{method: model} for `methods`, random, in eval mode: ours (RTF), ours with implicit filters,
    and GPT-NeoX of the same width, depth and vocabulary; only the models a method needs."""
    overrides = {k: v for k, v in (("d_model", args.d_model), ("n_layer", args.n_layer), ("l_max", args.l_max)) if v}
    config: HyenaRTFConfig = config_from_preset(args.preset, vocab_size=args.vocab_size, **overrides)
    if config.d_model % config.n_head:
        config.n_head = 1

    def ours(filt: str) -> HyenaRTFForCausalLM:
        model = HyenaRTFForCausalLM(HyenaRTFConfig(**{**config.to_dict(), "filter": filt}))
        for name, p in model.named_parameters():
            if not is_filter_param(name):  # the long filters stay float32
                p.data = p.data.to(dtype)
        return model.to(device).eval()

    models = {}
    if any(m.startswith("hyena_rtf") for m in methods):
        rtf = ours("rtf")
        models.update({m: rtf for m in methods if m.startswith("hyena_rtf")})
    if "hyena_implicit" in methods:
        models["hyena_implicit"] = ours("implicit")
    if "gpt_neox_kv" in methods:
        neox_config = gpt_neox_baseline(config, args.vocab_size, max(args.prompt_lengths) + args.new_tokens)
        models["gpt_neox_kv"] = GPTNeoXForCausalLM(neox_config).to(dtype).to(device).eval()
    return models, config


def cache_bytes(cache) -> int:
    """Bytes held by a HyenaRTFCache, a StaticHyenaRTFCache or a transformers KV cache."""
    seen, total = set(), 0

    def visit(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            if x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                total += x.nbytes
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif hasattr(x, "__dict__"):
            for y in vars(x).values():
                visit(y)

    visit(getattr(cache, "layers", cache))
    return total


def estimate_bytes(method: str, model, batch: int, prompt: int, args) -> int:
    """Rough peak of one configuration: weights, the cache at the end, one prefill piece (about 40
    activation values per token and channel live at once, float32 inside the FFTs)."""
    cfg = model.config
    d, layers, elt = cfg.hidden_size, cfg.num_hidden_layers, next(model.parameters()).element_size()
    total = batch * (prompt + args.new_tokens)
    weights = sum(p.nbytes for p in model.parameters())
    piece = min(batch * prompt, max(prompt, args.prefill_tokens)) * d * 4 * 40
    if method == "gpt_neox_kv":  # keys and values, one layer's worth more while torch.cat grows it
        return weights + piece + 2 * (layers + 1) * total * d * elt
    if method == "hyena_implicit":  # the input history of every layer, float32, and its copy per step
        return weights + piece + (layers + 1) * total * d * 4
    if method == "hyena_rtf_no_cache":
        return weights + total * d * 4 * 40
    return weights + piece
