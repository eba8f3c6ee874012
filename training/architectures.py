"""The architectures a run can train (`model.arch`), and the one mapping from the training config's
model section to each one's Hugging Face config.

    model.arch=hyena_rtf   (default) HyenaRTFForCausalLM; every key of the model section applies
    model.arch=gpt_neox    transformers' own GPTNeoXForCausalLM: the Transformer baseline, trained by
                           the same loop, data, schedule, engines, checkpoints and export

The model section is derived from HyenaRTFConfig.__init__ (training/model_schema.py). GPT-NeoX uses
the keys the two architectures share, mapped as

    d_model -> hidden_size                       n_layer -> num_hidden_layers
    n_head -> num_attention_heads                mlp_ratio * d_model -> intermediate_size
    l_max -> max_position_embeddings             dropout -> hidden_dropout and attention_dropout
    vocab_size (the tokenizer's, unpadded), layer_norm_eps, initializer_range,
    tie_word_embeddings, use_cache, bos/eos/pad_token_id -> the same names

A shared key left unset takes HyenaRTFConfig's default, so both architectures have the same width,
depth and heads unless told otherwise; a `model.preset` gives GPT-NeoX its shared keys only. The
embeddings are tied, as in Hyena-RTF, so that parameter counts compare. The rest is fixed as in
Pythia, which are GPTNeoXConfig's own defaults: rotary position embeddings on 25% of each head's
dimensions (base 10000), the parallel residual x + attn(ln1(x)) + mlp(ln2(x)), GELU, biases,
normal(0, initializer_range) init. Attention runs through PyTorch SDPA.

Every other key (HYENA_ONLY_KEYS: state_size, filter, attn_layers, multi_hyena_heads, ...) has no
meaning for GPT-NeoX; training/config.py refuses one set explicitly together with
model.arch=gpt_neox.
"""

from __future__ import annotations

from typing import Any

from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedConfig, PreTrainedModel

from models.configuration_hyena_rtf import HyenaRTFConfig
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from training.model_schema import DEFAULT_ARCH, model_defaults

ARCHS = (DEFAULT_ARCH, "gpt_neox")

# Model-section keys GPT-NeoX uses (the mapping is `gpt_neox_config`); every other key is Hyena-only.
SHARED_KEYS = (
    "vocab_size",
    "d_model",
    "n_layer",
    "n_head",
    "mlp_ratio",
    "l_max",
    "layer_norm_eps",
    "dropout",
    "initializer_range",
    "tie_word_embeddings",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_HYENA_DEFAULTS = model_defaults(HyenaRTFConfig)
HYENA_ONLY_KEYS = tuple(k for k in _HYENA_DEFAULTS if k not in SHARED_KEYS)


def gpt_neox_config(kwargs: dict[str, Any]) -> GPTNeoXConfig:
    """The GPTNeoXConfig of resolved model-section values (the module docstring's mapping). Keys
    outside SHARED_KEYS are not read; shared keys missing from `kwargs` take HyenaRTFConfig's
    defaults. ValueError when the heads do not divide the width."""
    v = {k: kwargs[k] if kwargs.get(k) is not None else _HYENA_DEFAULTS[k] for k in SHARED_KEYS}
    if v["d_model"] % v["n_head"]:
        raise ValueError(f"d_model ({v['d_model']}) must be divisible by n_head ({v['n_head']})")
    return GPTNeoXConfig(
        vocab_size=v["vocab_size"],
        hidden_size=v["d_model"],
        num_hidden_layers=v["n_layer"],
        num_attention_heads=v["n_head"],
        intermediate_size=v["mlp_ratio"] * v["d_model"],
        max_position_embeddings=v["l_max"],
        hidden_dropout=v["dropout"],
        attention_dropout=v["dropout"],
        layer_norm_eps=v["layer_norm_eps"],
        initializer_range=v["initializer_range"],
        tie_word_embeddings=v["tie_word_embeddings"],
        use_cache=v["use_cache"],
        # GPTNeoXConfig's own defaults are 0 and 2 (the 20B tokenizer's); the export sets the
        # ids of the run's tokenizer, as it does for Hyena-RTF.
        bos_token_id=v["bos_token_id"],
        eos_token_id=v["eos_token_id"],
        pad_token_id=v["pad_token_id"],
        use_parallel_residual=True,  # Pythia; the rotary fraction and base are left at Pythia's defaults
        attn_implementation="sdpa",
    )


def model_config(arch: str, kwargs: dict[str, Any]) -> PreTrainedConfig:
    """The Hugging Face config of `arch` from resolved model-section values (training/config.py:
    resolve_model_kwargs). ValueError / TypeError for an invalid combination."""
    if arch == "gpt_neox":
        return gpt_neox_config(kwargs)
    if arch == DEFAULT_ARCH:
        return HyenaRTFConfig(**kwargs)
    raise ValueError(f"unknown architecture {arch!r} (choose one of {', '.join(ARCHS)})")


def arch_of(config: PreTrainedConfig) -> str:
    """The `model.arch` of a model config."""
    return "gpt_neox" if isinstance(config, GPTNeoXConfig) else DEFAULT_ARCH


def build(config: PreTrainedConfig) -> PreTrainedModel:
    """A freshly initialised causal LM of `config` (initialised from torch's global generator)."""
    return GPTNeoXForCausalLM(config) if isinstance(config, GPTNeoXConfig) else HyenaRTFForCausalLM(config)


def section_values(config: PreTrainedConfig) -> dict[str, Any]:
    """The model-section values `config` was built from (what the effective config records):
    every key for Hyena-RTF, the shared keys for GPT-NeoX (its Hyena-only keys stay unset)."""
    if isinstance(config, GPTNeoXConfig):
        d = config.hidden_size
        return {
            "vocab_size": config.vocab_size,
            "d_model": d,
            "n_layer": config.num_hidden_layers,
            "n_head": config.num_attention_heads,
            "mlp_ratio": config.intermediate_size // d,
            "l_max": config.max_position_embeddings,
            "layer_norm_eps": config.layer_norm_eps,
            "dropout": config.hidden_dropout,
            "initializer_range": config.initializer_range,
            "tie_word_embeddings": config.tie_word_embeddings,
            "use_cache": config.use_cache,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }
    out = {}
    for key in _HYENA_DEFAULTS:
        value = getattr(config, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def attention_shape(config: PreTrainedConfig) -> tuple[int, int]:
    """(number of softmax-attention layers, model width): what the attention term of the
    FLOPs-per-token estimate needs (training/metrics.py)."""
    if isinstance(config, GPTNeoXConfig):
        return config.num_hidden_layers, config.hidden_size
    return len(config.attn_layers or []), config.d_model
