"""The stored modal form of exported checkpoints (models/rtf.py, "Stored form"), from the outside.

The contract: an export carries every RTF filter's modal conversion, and loading the export decodes
with exactly that conversion without computing it again (no root finding: `poles_of`, the O(n^3)
part, is counted), in every dtype a user loads it in. Whatever does not match (parameters changed
after the export, a stored number altered, nothing stored) is never used: the filter converts from
its parameters as it would without the stored form. "Exactly" is bitwise here: the stored numbers
are the conversion's float64 numbers, their bits kept in float32 integers, so equality is the
property, not a rounding accident.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.helpers import assert_greedy, slow_poles, tiny_model

import models.rtf as rtf
from export.folder import save_hf_checkpoint
from hf.loading import MODEL_LOAD_REPORT, check_weights_match
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from models.precision import cast_keeping_filters
from models.rtf import RTF, join_float64, split_float64


@pytest.fixture
def root_finding():
    """Counts the calls of the conversion's root finding (the O(n^3) part) while the test runs."""
    calls = []
    real = rtf.poles_of
    with mock.patch.object(rtf, "poles_of", lambda a: calls.append(a.shape[0]) or real(a)):
        yield calls


def same_numbers(x: torch.Tensor, y: torch.Tensor) -> bool:
    """The same float64 bits everywhere (NaN payloads and -0.0 included)."""
    return x.shape == y.shape and torch.equal(x.contiguous().view(torch.int64), y.contiguous().view(torch.int64))


def rtf_filters(model) -> list[RTF]:
    return [m for m in model.modules() if isinstance(m, RTF)]


def assert_same_conversion(got, want) -> None:
    """Every number of two ModalConversions equal (NaN equal to NaN), and the same slots."""
    assert got.system.lam.shape == want.system.lam.shape
    for g, w in (
        (got.system.lam, want.system.lam),
        (got.system.res, want.system.res),
        (got.system.d, want.system.d),
        (got.radius, want.radius),
        (got.error, want.error),
        (got.bound, want.bound),
        (got.amplification, want.amplification),
    ):
        assert same_numbers(*(torch.view_as_real(t) if t.is_complex() else t for t in (g, w)))


def cold_conversion(f: RTF):
    """The conversion of f's parameters, computed from them alone (a fresh filter without the stored form)."""
    fresh = RTF(f.channels, f.state_size, f.l_max, f.num_filters, f.num_a, constraint=f.constraint)
    fresh.load_state_dict({k: v for k, v in f.state_dict().items() if not k.startswith("modal_")})
    return fresh.conversion()


def exported(tmp_path, model, dtype=None):
    out = tmp_path / "export"
    save_hf_checkpoint(model, None, out, dtype=dtype)
    return out


def test_split_float64_keeps_every_bit():
    """float64 numbers of every kind (random bits: any sign, exponent, NaN payload; and the special
    values) survive split_float64 -> join_float64 bit for bit, also through what loading does to a
    float32 buffer (a float32 -> float64 -> float32 trip)."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**62), 2**62, (20_000,), generator=g, dtype=torch.int64) * 2
    bits[::2] += 1  # odd patterns too: every bit position set and clear somewhere
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-320, 1e300, float("inf"), -float("inf"), float("nan"), 1 / 3])
    x = torch.cat([bits.view(torch.float64), special.double()])
    parts = split_float64(x)
    assert parts.dtype == torch.float32 and parts.shape == (3, *x.shape)
    assert same_numbers(join_float64(parts), x)
    assert same_numbers(join_float64(parts.double().float()), x)


@pytest.mark.parametrize("load_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_an_export_decodes_with_its_stored_form_in_any_dtype(tmp_path, root_finding, load_dtype):
    """Loading an export (through the loading report users' tools get) finds no missing or unused
    weights, converts nothing (no root finding), holds exactly the conversion the parameters give,
    and its cached decoding is a greedy decoding of its own parallel forward. transformers loads a
    half-precision model's `filter` modules in float32, which keeps the stored numbers exact."""
    model = slow_poles(tiny_model(seed=3))
    folder = exported(tmp_path, model)
    assert json.loads((folder / "config.json").read_text())["stored_recurrence"] is True
    root_finding.clear()
    loaded, info = HyenaRTFForCausalLM.from_pretrained(folder, dtype=load_dtype, **MODEL_LOAD_REPORT)
    check_weights_match(folder, info)
    loaded.eval()
    filters = rtf_filters(loaded)
    assert filters and all(f.stored_conversion() is not None for f in filters)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(0))  # past l_max = 32
    out = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert root_finding == []
    if load_dtype in (torch.float32, torch.float64):
        assert_greedy(loaded, out, ids.shape[1])
    for f in filters:
        assert_same_conversion(f.conversion(), cold_conversion(f))


def test_a_half_precision_export_stores_the_form_of_its_stored_parameters(tmp_path, root_finding):
    """A bfloat16 export keeps the filters float32 (the precision rule), so its stored form is the
    conversion of exactly the parameters in the file, and dtype="auto" loads it unconverted."""
    folder = exported(tmp_path, tiny_model(seed=4), dtype=torch.bfloat16)
    root_finding.clear()
    loaded = HyenaRTFForCausalLM.from_pretrained(folder, dtype="auto").eval()
    assert next(loaded.parameters()).dtype == torch.bfloat16
    conversions = [(f, f.conversion()) for f in rtf_filters(loaded)]
    assert root_finding == []
    for f, conversion in conversions:
        assert_same_conversion(conversion, cold_conversion(f))


def test_changed_parameters_are_converted_again(tmp_path, root_finding):
    """A parameter changed after loading (fine-tuning, an edit) breaks the stamp: the filter converts
    its new parameters, and saving the model stores their form, which the next load uses."""
    folder = exported(tmp_path, tiny_model(seed=5))
    loaded = HyenaRTFForCausalLM.from_pretrained(folder).eval()
    f = rtf_filters(loaded)[0]
    with torch.no_grad():
        f.b[0, 0] += 1e-3
    root_finding.clear()
    assert f.stored_conversion() is None
    assert_same_conversion(f.conversion(), cold_conversion(f))
    assert root_finding  # converted from the parameters
    loaded.save_pretrained(tmp_path / "tuned")
    root_finding.clear()
    again = HyenaRTFForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    g = rtf_filters(again)[0]
    assert torch.equal(g.b, f.b) and g.stored_conversion() is not None
    conversion = g.conversion()
    assert root_finding == []
    assert_same_conversion(conversion, cold_conversion(g))


def load_altered(tmp_path, root_finding, what: str, edit) -> tuple[HyenaRTFForCausalLM, RTF]:
    """An export whose first filter's `modal_{what}` tensor `edit` changed in model.safetensors (a
    corrupted or hand-edited file), loaded; that filter, checked to convert from its parameters."""
    folder = exported(tmp_path, tiny_model(seed=6))
    weights = load_file(folder / "model.safetensors")
    edit(weights[next(k for k in weights if k.endswith(f"filter.modal_{what}"))])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = HyenaRTFForCausalLM.from_pretrained(folder).eval()
    root_finding.clear()
    altered = rtf_filters(loaded)[0]
    assert altered.stored_conversion() is None
    assert_same_conversion(altered.conversion(), cold_conversion(altered))
    assert root_finding
    return loaded, altered


@pytest.mark.parametrize("what", ["form", "stamp"])
def test_an_altered_stored_form_is_not_used(tmp_path, root_finding, what):
    """One stored number changed: the digest no longer matches, the load converts from the
    parameters, and decoding is that of the parameters (greedy against the parallel forward)."""
    loaded, _ = load_altered(tmp_path, root_finding, what, lambda t: t.view(-1)[7].add_(1.0))
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    assert_greedy(loaded, loaded.generate(ids, max_new_tokens=5, do_sample=False), ids.shape[1])


@pytest.mark.parametrize("count", [float("nan"), float("inf"), 1e30, -1.0, 1.5])
def test_a_stamp_whose_slot_count_is_not_a_count_is_not_used(tmp_path, root_finding, count):
    """The stamp's first number is the slot count; whatever else a damaged file (or a buffer that
    loading left unwritten) holds there is a stamp that does not match: the filter converts, and
    nothing raises."""
    load_altered(tmp_path, root_finding, "stamp", lambda t: t.view(-1)[0].fill_(count))


def test_a_checkpoint_without_the_stored_form_still_loads_and_converts(tmp_path, root_finding):
    """A model saved without the stored form (a checkpoint from before it, or a plain save_pretrained
    of a model built here) has neither the buffers nor the config flag: it loads with no missing or
    unused weights and converts at its first decode."""
    model = tiny_model(seed=7)
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["stored_recurrence"] is False
    assert not any("modal_" in k for k in load_file(tmp_path / "plain" / "model.safetensors"))
    loaded, info = HyenaRTFForCausalLM.from_pretrained(tmp_path / "plain", **MODEL_LOAD_REPORT)
    check_weights_match(tmp_path / "plain", info)
    root_finding.clear()
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    assert_greedy(loaded.eval(), loaded.generate(ids, max_new_tokens=4, do_sample=False), ids.shape[1])
    assert root_finding


@pytest.mark.parametrize("cast", ["module", "cli"])
def test_a_cast_after_loading_keeps_the_stored_form(tmp_path, root_finding, cast):
    """Casting a loaded model to bfloat16, as a module (`.to`) or as the command lines do
    (`cast_keeping_filters`), leaves the filters as they were: float32 parameters, and the stored
    form's numbers untouched, so it is still used."""
    folder = exported(tmp_path, tiny_model(seed=8))
    loaded = HyenaRTFForCausalLM.from_pretrained(folder).eval()
    if cast == "module":
        loaded = loaded.to(torch.bfloat16)
    else:
        cast_keeping_filters(loaded, torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    root_finding.clear()
    conversions = []
    for f in rtf_filters(loaded):
        assert f.a.dtype == torch.float32 and f.modal_form.dtype == torch.float32
        assert f.stored_conversion() is not None
        conversions.append((f, f.conversion()))
    assert root_finding == []
    for f, conversion in conversions:
        assert_same_conversion(conversion, cold_conversion(f))
