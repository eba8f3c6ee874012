"""The memory estimate made before a model is built (training/memory.py) and the refusal it drives.

The estimate extrapolates from fake one- and two-layer models; the references here are real models
built in full and run forward once, counted by the same rule (parameters; bytes autograd saves).
Both are integer counts of the same tensors, so they must agree exactly, not within a tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch
from support.train_utils import TINY, error_line
from torch._subclasses.fake_tensor import FakeTensor

import train
from models.configuration_hyena_rtf import HyenaRTFConfig
from training import build as training_build
from training import memory
from training.config import gpt_neox_config, instantiate
from training.engine import lm_loss_terms

CASES = {
    "hyena rtf": dict(d_model=32, n_layer=3, state_size=4),
    "attention layer and per-layer orders": dict(
        d_model=32, n_layer=4, attn_layers=[2], state_size=4, state_sizes=[4, 6, 4, 8]
    ),
    "multihyena": dict(d_model=32, n_layer=2, state_size=4, multi_hyena_heads=4),
    "implicit": dict(d_model=32, n_layer=2, state_size=4, filter="implicit"),
    "modal": dict(d_model=32, n_layer=2, state_size=4, filter="modal"),
}


def real_counts(config, batch: int, seq_len: int) -> tuple[int, int]:
    """Parameters and saved-for-backward bytes of a real model of `config` in a training step's loss
    (training/engine.py: the chunked loss for Hyena-RTF; no extrapolation)."""
    torch.manual_seed(0)
    model = instantiate(config)
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    tokens = torch.zeros(batch, seq_len + 1, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss_terms(model, tokens)
    return sum(p.numel() for p in model.parameters()), saved


@pytest.mark.parametrize("case", list(CASES))
def test_the_estimate_counts_what_a_real_model_holds(case):
    config = HyenaRTFConfig(vocab_size=300, n_head=4, l_max=64, **CASES[case])
    est = memory.estimate(config, batch=2, seq_len=64, bf16=False)
    params, saved = real_counts(config, 2, 64)
    assert est.params == params
    assert est.activations == saved
    assert est.states == 16 * params  # fp32 weight + gradient + two AdamW moments, unsharded


def test_the_estimate_of_the_gpt_neox_baseline_counts_its_parameters():
    config = gpt_neox_config(dict(vocab_size=300, d_model=32, n_layer=3, n_head=4, l_max=64))
    est = memory.estimate(config, batch=2, seq_len=64, bf16=False)
    assert est.params == real_counts(config, 2, 64)[0]


def test_zero_shards_moments_then_gradients():
    config = HyenaRTFConfig(vocab_size=300, d_model=32, n_layer=2, state_size=4, l_max=64)
    p = memory.estimate(config, 1, 64, bf16=False).params
    for stage, per_param in ((0, 16), (1, 4 + 4 + 8 / 4), (2, 4 + 4 / 4 + 8 / 4)):
        assert memory.estimate(config, 1, 64, bf16=False, world_size=4, zero_stage=stage).states == p * per_param


def test_a_million_layers_is_estimated_without_building_them():
    config = HyenaRTFConfig(vocab_size=300, d_model=32, n_layer=1_000_000, state_size=4, l_max=64)
    small = HyenaRTFConfig(vocab_size=300, d_model=32, n_layer=1, state_size=4, l_max=64)
    est, one = memory.estimate(config, 1, 64, bf16=False), memory.estimate(small, 1, 64, bf16=False)
    per_layer = memory.estimate(HyenaRTFConfig(**{**small.to_dict(), "n_layer": 2}), 1, 64, bf16=False).params
    assert est.params == one.params + (1_000_000 - 1) * (per_layer - one.params)


@pytest.mark.parametrize(
    "override, named",
    [("model.n_layer=1000000", "model.n_layer"), (f"model.d_model={12 * 10**8}", "model.d_model")],
)
def test_a_model_too_large_for_the_machine_is_one_line_before_anything_is_built(
    corpus, tmp_path, capsys, monkeypatch, override, named
):
    built = []

    def build(config):  # a real (not fake-tensor) model being built is what the refusal prevents
        built.append(not isinstance(torch.empty(0), FakeTensor))
        return instantiate(config)

    for module in (training_build, memory):  # the run's model, and the estimate's fake one
        monkeypatch.setattr(module, "instantiate", build)
    out = tmp_path / "run"
    assert train.main([*TINY, f"data.dir={corpus}", f"train.out_dir={out}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err == error_line(err)
    assert named in err and ("GiB" in err or "overflows" in err)
    assert not any(built)  # refused from the estimate: no real model was allocated
    assert not (out / "checkpoints").exists()


def test_a_model_that_fits_is_not_refused(corpus, tmp_path):
    assert train.main([*TINY, f"data.dir={corpus}", f"train.out_dir={tmp_path}", "train.max_steps=1"]) == 0
    assert os.path.isdir(tmp_path / "checkpoints")


def test_a_model_the_estimate_cannot_trace_trains_with_a_warning(corpus, tmp_path, capsys, monkeypatch):
    """The estimate is a safety net: when fake tensors cannot run a model (a data-dependent step in
    some future layer), the run goes on unchecked, with a warning, instead of failing."""

    def untraceable(*_a, **_k):
        raise RuntimeError("data-dependent output")

    monkeypatch.setattr(memory, "_fake_run", untraceable)
    assert train.main([*TINY, f"data.dir={corpus}", f"train.out_dir={tmp_path}", "train.max_steps=1"]) == 0
    assert "memory estimate unavailable (RuntimeError: data-dependent output); not checked" in capsys.readouterr().err
