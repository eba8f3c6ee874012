"""The model variants the quality benchmarks compare, each defined once, as the train.py model-section
overrides that make it. benchmarks/quality/run.py passes them to train.py; in-process users (the
synthetic-task suite) get exactly the same model from `build_variant`.

    rtf16       Hyena, RTF long filters of order 16 (the default model's operator)
    rtf64       Hyena, RTF long filters of order 64 (the RTF paper's WikiText-103 order)
    implicit    Hyena with Hyena's own implicit MLP filters: the baseline RTF claims to beat
    multihyena  MultiHyena (Laughing Hyena) with RTF-16 filters and 16 heads
    hybrid      Hyena-RTF-16 with softmax attention in one layer of every four (layers 2, 6, 10, ...)
    gpt_neox    a Transformer: Hugging Face GPT-NeoX (rotary positions, SDPA), training/config.py

Why 16 MultiHyena heads: each head filters the e^2 outer products of its e = d_model / M channels,
so the filter bank grows as d_model^2 / M and the cost with it. At the CPU benchmarks' width 128,
M = 16 gives heads of e = 8 channels and trains at about 1.5x the step time of rtf16 (d 128, 4
layers, seq 256, batch 8, one thread, 2026-12-04: 1.9 s against 1.3 s a step on a loaded machine);
M = 8 or 4 cost 2x and more, M = 32 (e = 4) is close to the plain operator. A wider model
keeps e = 8 by raising M (benchmarks/quality/run.py's gpu-125m preset does: M = 96 at d 768).

Why layers 2, 6, 10, ...: Hyena-RTF's attention layers have no positional embedding of their own
(models/attention.py), so each one sits after two Hyena layers, which carry position.

Every variant sets the mixer fully (filter, order, heads, attention layers), so a `base` that
sets them too (say model.state_size=256) is overridden by the variant. For gpt_neox, base keys
GPT-NeoX has no use for (training/config.py: HYENA_ONLY_KEYS) are dropped from the base,
since train.py refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import REPO
from models.configuration_hyena_rtf import HyenaRTFConfig
from training.build import build_model
from training.config import HYENA_ONLY_KEYS, load_config, model_defaults, resolve_model_kwargs

DEFAULT_CONFIG = REPO / "configs" / "default.yaml"  # train.py's default --config
HYBRID_EVERY = 4  # one attention layer in this many
MULTI_HYENA_HEADS = 16

# name -> model overrides. "{attn_layers}" is filled in by `variant_overrides` from n_layer.
VARIANTS: dict[str, tuple[str, ...]] = {
    "rtf16": ("model.filter=rtf", "model.state_size=16"),
    "rtf64": ("model.filter=rtf", "model.state_size=64"),
    "implicit": ("model.filter=implicit",),
    "multihyena": ("model.filter=rtf", "model.state_size=16", f"model.multi_hyena_heads={MULTI_HYENA_HEADS}"),
    "hybrid": ("model.filter=rtf", "model.state_size=16", "model.attn_layers={attn_layers}"),
    "gpt_neox": ("model.arch=gpt_neox",),
}

# Hyena-RTF order 16 with one thing changed: the hypotheses tried for why it trains worse than the
# implicit filter at equal budget (docs/quality.md has the numbers). Not part of the
# default comparison; quality.py runs them when named in --variants.
_RTF16 = VARIANTS["rtf16"]
ABLATIONS: dict[str, tuple[str, ...]] = {
    "rtf16_rtf_lr3e-3": (*_RTF16, "optim.rtf_lr=3e-3"),  # the filters' own lr (1e-3, the paper's) x3
    "rtf16_rtf_lr1e-2": (*_RTF16, "optim.rtf_lr=1e-2"),  # x10: about the lr of everything else
    "rtf16_rtf_lr3e-2": (*_RTF16, "optim.rtf_lr=3e-2"),  # x30
    "rtf16_init_zeros": (*_RTF16, "model.rtf_init=zeros"),  # identity filters at the start
    "rtf16_init_montel": (*_RTF16, "model.rtf_init=montel"),  # xavier rescaled inside the Montel bound
    "rtf16_unconstrained": (*_RTF16, "model.rtf_constraint=none"),  # a free (no l1 Montel map)
    # the RTF paper's released WikiText-103 setting: zero init, no constraint
    "rtf16_paper": (*_RTF16, "model.rtf_init=zeros", "model.rtf_constraint=none"),
    "rtf4": ("model.filter=rtf", "model.state_size=4"),  # a smaller state
}
KNOWN = {**VARIANTS, **ABLATIONS}  # every name variant_overrides resolves


def hybrid_layers(n_layer: int) -> list[int]:
    """The attention layers of the hybrid: 2, 6, 10, ... below n_layer. ValueError when there is
    none (n_layer < 3): the variant would be rtf16 under another name."""
    layers = list(range(2, n_layer, HYBRID_EVERY))
    if not layers:
        raise ValueError(f"the hybrid variant needs n_layer >= 3 (attention at layer 2), got n_layer={n_layer}")
    return layers


def variant_overrides(name: str, n_layer: int) -> list[str]:
    """The train.py overrides of variant `name` (a VARIANTS or ABLATIONS name) for a model of n_layer
    layers. KeyError naming the choices for an unknown name."""
    if name not in KNOWN:
        raise KeyError(f"unknown variant {name!r} (choose from {', '.join(KNOWN)})")
    fill = {"attn_layers": "[" + ",".join(map(str, hybrid_layers(n_layer))) + "]"} if name == "hybrid" else {}
    return [o.format(**fill) for o in KNOWN[name]]


def _is_hyena_only(override: str) -> bool:
    key, _, _ = override.partition("=")
    return key.startswith("model.") and key.removeprefix("model.") in HYENA_ONLY_KEYS


def base_overrides(name: str, base: Sequence[str]) -> list[str]:
    """`base` as variant `name` takes it: for gpt_neox without its Hyena-only model keys (see the
    module docstring), else unchanged."""
    return [o for o in base if not (name == "gpt_neox" and _is_hyena_only(o))]


def run_overrides(name: str, base: Sequence[str], n_layer: int) -> list[str]:
    """`base` then the variant's overrides: the command-line overrides of the variant's train.py
    run (`base_overrides`, then `variant_overrides`)."""
    return [*base_overrides(name, base), *variant_overrides(name, n_layer)]


def resolved_n_layer(base: Sequence[str], config: str | Path = DEFAULT_CONFIG) -> int:
    """The depth train.py gives a model configured by `base` on top of the YAML `config`
    (an explicit model.n_layer, else the model.preset's, else HyenaRTFConfig's default)."""
    cfg = load_config(str(config), list(base), check_model=False)  # the variant's keys come later
    kwargs = resolve_model_kwargs(cfg.model, vocab_size=1, seq_len=cfg.data.seq_len)
    return kwargs.get("n_layer") or model_defaults(HyenaRTFConfig)["n_layer"]


def build_variant(
    name: str, vocab_size: int, seq_len: int, base: Sequence[str] = (), seed: int = 0, after: Sequence[str] = ()
) -> torch.nn.Module:
    """Exactly the model `python train.py <run_overrides> <after> data.seq_len=... train.seed=...`
    builds (configs/default.yaml, then base, then the variant, then `after`; training.build.build_model),
    initialised from `seed`, on the CPU, in training mode. base: e.g. ["model.d_model=128",
    "model.n_layer=4"]; after: overrides of the variant's own keys, for a sweep over one of them
    (the synthetic suite's copying task: rtf64 with model.state_size=16 ... 256)."""
    run = [*base, f"data.seq_len={seq_len}", f"train.seed={seed}"]
    cfg = load_config(str(DEFAULT_CONFIG), [*run_overrides(name, run, resolved_n_layer(run)), *after])
    return build_model(cfg, vocab_size, torch.device("cpu"))


def parameter_count(model: torch.nn.Module) -> int:
    """Trainable parameters, a tied embedding and LM head counted once (what train.py reports):
    the count the benchmarks compare ("equal parameters within 5%")."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
