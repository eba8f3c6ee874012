"""benchmarks/variants.py: each variant is the model its overrides promise, built as train.py builds
it, with a parameter count that counts a tied embedding once."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from benchmarks.variants import (
    ABLATIONS,
    VARIANTS,
    build_variant,
    hybrid_layers,
    parameter_count,
    run_overrides,
    variant_overrides,
)
from models.configuration_hyena_rtf import HyenaRTFConfig
from models.modeling_hyena_rtf import HyenaRTFForCausalLM

# The synthetic suite's kind of base: it sets a state size, which every RTF variant overrides.
BASE = ["model.d_model=32", "model.n_layer=4", "model.n_head=4", "model.state_size=256"]

# What each variant must be, by the config values that define it (Hyena-RTF variants).
EXPECTED = {
    "rtf16": dict(filter="rtf", state_size=16, multi_hyena_heads=None, attn_layers=[]),
    "rtf64": dict(filter="rtf", state_size=64, multi_hyena_heads=None, attn_layers=[]),
    "implicit": dict(filter="implicit", multi_hyena_heads=None, attn_layers=[]),
    "multihyena": dict(filter="rtf", state_size=16, multi_hyena_heads=16, attn_layers=[]),
    "hybrid": dict(filter="rtf", state_size=16, multi_hyena_heads=None, attn_layers=[2]),
}


def test_the_variants_are_the_six_compared():
    assert list(VARIANTS) == ["rtf16", "rtf64", "implicit", "multihyena", "hybrid", "gpt_neox"]
    assert set(EXPECTED) | {"gpt_neox"} == set(VARIANTS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_hyena_variant_is_the_model_its_overrides_say(name):
    model = build_variant(name, vocab_size=300, seq_len=128, base=BASE, seed=3)
    assert type(model) is HyenaRTFForCausalLM
    got = {k: getattr(model.config, k) for k in EXPECTED[name]}
    assert got == EXPECTED[name]
    assert (model.config.d_model, model.config.n_layer, model.config.l_max) == (32, 4, 128)


def test_rtf16_is_the_directly_built_model_with_the_same_seed():
    """The whole chain (default.yaml, base, variant, build_model) against HyenaRTFConfig written out:
    configs/default.yaml's n_head 4 and l_max = seq_len, the base's width and depth, order 16."""
    model = build_variant("rtf16", vocab_size=300, seq_len=128, base=BASE, seed=3)
    torch.manual_seed(3)
    direct = HyenaRTFForCausalLM(
        HyenaRTFConfig(vocab_size=300, d_model=32, n_layer=4, n_head=4, l_max=128, state_size=16)
    )
    a, b = model.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_gpt_neox_drops_the_hyena_keys_of_the_base():
    assert run_overrides("gpt_neox", [*BASE, "optim.lr=1e-3"], 4) == [
        "model.d_model=32",
        "model.n_layer=4",
        "model.n_head=4",
        "optim.lr=1e-3",
        "model.arch=gpt_neox",
    ]
    model = build_variant("gpt_neox", vocab_size=300, seq_len=128, base=BASE)
    assert type(model) is GPTNeoXForCausalLM
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_attention_heads) == (32, 4, 4)


def test_hybrid_layers_are_one_in_four_after_two_hyena_layers():
    assert hybrid_layers(4) == [2]
    assert hybrid_layers(12) == [2, 6, 10]
    assert hybrid_layers(24) == [2, 6, 10, 14, 18, 22]
    assert variant_overrides("hybrid", 12)[-1] == "model.attn_layers=[2,6,10]"
    with pytest.raises(ValueError, match="n_layer >= 3"):
        hybrid_layers(2)
    with pytest.raises(KeyError, match="unknown variant 'mamba'"):
        variant_overrides("mamba", 4)


def test_parameter_count_counts_the_tied_embedding_once():
    """GPT-NeoX at d 32, 4 layers, vocabulary 300: V d + L (12 d^2 + 13 d) + 2 d (closed form; see
    tests/integration/training/test_train_arch.py)."""
    model = build_variant("gpt_neox", vocab_size=300, seq_len=128, base=BASE)
    d, n_layer = 32, 4
    assert parameter_count(model) == 300 * d + n_layer * (12 * d * d + 13 * d) + 2 * d


# Each ablation of the Quality investigation: rtf16 with exactly this changed in the model config.
ABLATED = {
    "rtf16_init_zeros": {"rtf_init": "zeros"},
    "rtf16_init_montel": {"rtf_init": "montel"},
    "rtf16_unconstrained": {"rtf_constraint": "none"},
    "rtf16_paper": {"rtf_init": "zeros", "rtf_constraint": "none"},
    "rtf4": {"state_size": 4},
}


@pytest.mark.parametrize("name", list(ABLATED))
def test_each_model_ablation_is_rtf16_with_one_change(name):
    ref = build_variant("rtf16", vocab_size=300, seq_len=128, base=BASE, seed=3).config.to_dict()
    got = build_variant(name, vocab_size=300, seq_len=128, base=BASE, seed=3).config.to_dict()
    assert {k: v for k, v in got.items() if ref.get(k) != v} == ABLATED[name]


def test_filter_lr_ablations_add_only_the_filter_lr():
    lr_names = {n for n in ABLATIONS if "_rtf_lr" in n}
    assert lr_names | set(ABLATED) == set(ABLATIONS)
    for name in lr_names:
        lr = name.split("_rtf_lr")[1]
        assert variant_overrides(name, 4) == [*variant_overrides("rtf16", 4), f"optim.rtf_lr={lr}"]
