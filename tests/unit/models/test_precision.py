"""The float32 rule for the long filters (models/precision.py), checked from the outside for both
filter kinds and every way a user casts a model: `.to()`, `from_pretrained(dtype=...)`, a
half-precision export read back with safetensors, the generation CLI's cast, the trainer's check.

Which parameters are "the filters" is decided here independently of the code under test: by the
module's class (RTF, ImplicitFilter), never by the parameter names the rule itself uses.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from export.folder import save_hf_checkpoint
from models import HyenaRTFConfig, HyenaRTFForCausalLM
from models.implicit import ImplicitFilter
from models.precision import (
    FILTER_MODULE,
    Float32Parameters,
    cast_keeping_filters,
    check_filters_float32,
    dtype_from_name,
)
from models.rtf import RTF

FILTERS = (RTF, ImplicitFilter)


def tiny(filter_kind: str) -> HyenaRTFForCausalLM:
    torch.manual_seed(0)
    cfg = HyenaRTFConfig(
        vocab_size=64, d_model=16, n_layer=2, l_max=16, state_size=4, n_head=2, filter=filter_kind, implicit_order=8
    )
    return HyenaRTFForCausalLM(cfg).eval()


def filter_param_names(model) -> set[str]:
    """Names of the parameters inside RTF / ImplicitFilter modules, found by class."""
    return {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, FILTERS)
        for name, _ in module.named_parameters()
    }


def assert_filters_float32_rest(dtype, named_dtypes: dict[str, torch.dtype], filters: set[str]):
    assert filters, "the model has no filter parameters: the check would be vacuous"
    assert filters <= set(named_dtypes)
    for name, got in named_dtypes.items():
        assert got == (torch.float32 if name in filters else dtype), name


@pytest.mark.parametrize("kind", ["rtf", "implicit"])
def test_to_half_keeps_both_filter_kinds_float32(kind):
    """A half-precision cast leaves the filters' parameters float32 and unrounded (the same values)."""
    model = tiny(kind)
    filters = filter_param_names(model)
    values = {n: p.detach().clone() for n, p in model.named_parameters() if n in filters}
    for dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
        assert_filters_float32_rest(dtype, {n: p.dtype for n, p in model.named_parameters()}, filters)
    model.half().float()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(p, values[n]) for n, p in model.named_parameters() if n in filters)


@pytest.mark.parametrize("kind", ["rtf", "implicit"])
def test_to_half_keeps_the_filters_accumulated_gradients(kind):
    """Gradients accumulated before a half-precision cast stay float32 and unrounded on the filters
    (the next backward adds to them), and are cast as usual elsewhere."""
    model = tiny(kind).train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    filters = filter_param_names(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in filters}
    model.half()
    for n, p in model.named_parameters():
        if n in filters:
            assert p.grad.dtype == torch.float32 and torch.equal(p.grad, grads[n]), n
        elif p.grad is not None:
            assert p.grad.dtype == torch.float16, n


def test_float64_filters_stay_float64():
    model = tiny("rtf").double()
    assert all(p.dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("kind", ["rtf", "implicit"])
def test_half_export_and_from_pretrained_keep_filters_float32(kind, tmp_path):
    model = tiny(kind)
    filters = filter_param_names(model)
    folder = save_hf_checkpoint(model, None, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    names = {"BF16": torch.bfloat16, "F32": torch.float32}
    stored = {k: names[v] for k, v in stored.items() if k in dict(model.named_parameters())}
    assert_filters_float32_rest(torch.bfloat16, stored, filters)

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert_filters_float32_rest(torch.bfloat16, {n: p.dtype for n, p in loaded.named_parameters()}, filters)
    for name, p in loaded.named_parameters():
        if name in filters:  # kept bit for bit, not rounded through bfloat16
            assert torch.equal(p, model.get_parameter(name)), name
    # config.json says what the weights are (it said float32, the model's dtype in memory), so
    # dtype="auto" loads them as stored instead of doubling them to float32.
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    auto = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert_filters_float32_rest(torch.bfloat16, {n: p.dtype for n, p in auto.named_parameters()}, filters)


@pytest.mark.parametrize("kind", ["rtf", "implicit"])
def test_cast_keeping_filters_and_the_float32_check(kind):
    model = tiny(kind)
    filters = filter_param_names(model)
    cast_keeping_filters(model, torch.bfloat16)
    assert_filters_float32_rest(torch.bfloat16, {n: p.dtype for n, p in model.named_parameters()}, filters)
    check_filters_float32(model)  # passes
    name = sorted(filters)[0]
    model.get_parameter(name).data = model.get_parameter(name).data.half()
    with pytest.raises(RuntimeError, match=f"filter parameter {name} is torch.float16"):
        check_filters_float32(model)


@pytest.mark.parametrize("kind", ["rtf", "implicit"])
def test_every_float32_module_is_a_hyena_filter(kind):
    """The class-based rule (Float32Parameters) and the name-based ones (FILTER_MODULE) pick the
    same modules: each Float32Parameters module is an operator's `filter`, and vice versa."""
    model = tiny(kind)
    by_class = {name for name, m in model.named_modules() if isinstance(m, Float32Parameters)}
    by_name = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == FILTER_MODULE}
    assert by_class == by_name
    assert len(by_class) == model.config.n_layer


def test_dtype_names():
    assert dtype_from_name("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose from float32, bfloat16, float16"):
        dtype_from_name("int8")


@pytest.mark.parametrize("kind", ["rtf", "implicit"])
def test_a_saved_model_reloads_with_the_same_logits(kind, tmp_path):
    """Everything the forward depends on survives save_pretrained / from_pretrained, including what
    is derived rather than stored (an implicit filter's decay rates came back as garbage while they
    were a non-persistent buffer)."""
    model = tiny(kind)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.arange(1, 13)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
