"""The Hugging Face gaps of issue 20, each checked through what a user calls: a folder saved by a
process that imported the project loads elsewhere, offloading hooks see every weight, a dynamic
torch.export, continuing a static cache returned by generate(), and trl's position_ids.

References: the in-memory model's own forward in float64 (a different code path from each feature
under test: no hooks, no export, no cache) and `assert_greedy`: every generated token is a greedy choice
of a full parallel forward over the tokens before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from support.helpers import NO_PROJECT, assert_greedy, spy_on_forward, tiny_model, train_tiny_tokenizer
from transformers import AutoModelForCausalLM

from export.folder import save_hf_checkpoint
from models import StaticHyenaRTFCache
from models.hf_compat import cache_kwargs, output_cache

pytestmark = pytest.mark.hf

VOCAB = 97


def ids_of(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_child(code: str, *args: str, tmp_path) -> str:
    """Run `code` in a fresh Python with its own modules cache and no network; its stdout."""
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ---- 1. save_pretrained in a process that imported the project --------------------------------
SAVE_CHILD = textwrap.dedent(r"""
    import sys, warnings
    import models  # the no-flag path: the Auto classes know Hyena-RTF
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    src, saved, trained = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(src)  # no trust_remote_code: the installed code
    assert type(model).__module__ == "models.modeling_hyena_rtf", type(model).__module__
    model.save_pretrained(saved)
    Trainer(model=model, args=TrainingArguments(output_dir=trained + "_run", report_to=[])).save_model(trained)
""")

LOAD_CHILD = NO_PROJECT + textwrap.dedent(r"""
    import json
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(json.loads(sys.argv[1]))
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        filters = [m for m in model.modules() if hasattr(m, "stored_conversion")]
        stored = bool(filters) and all(m.stored_conversion() is not None for m in filters)
        with torch.no_grad():
            logits = model(ids).logits
        print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(), "stored": stored}))
""")


def test_a_folder_saved_after_a_no_flag_load_holds_its_code_and_loads_in_a_fresh_process(tmp_path):
    """An export loaded by a process that imported the project, then saved by save_pretrained and by
    Trainer.save_model: each folder's config.json names the code (auto_map) and the code is there,
    so a fresh process that has never seen the project loads it with trust_remote_code=True and
    computes the logits of the original model. (Before: auto_map and no code, an error there.) Both
    saves carry the filters' stored modal form, valid for their parameters, which the folder's own
    copy of the code finds (no root finding at load: models/rtf.py, "Stored form")."""
    model = tiny_model(attn_layers=[1], vocab=320)
    src = save_hf_checkpoint(model, train_tiny_tokenizer(tmp_path / "tokenizer.json"), tmp_path / "export")
    saved, trained = tmp_path / "saved", tmp_path / "trained"
    run_child(SAVE_CHILD, str(src), str(saved), str(trained), tmp_path=tmp_path)
    ids = ids_of(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    for folder in (saved, trained):
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        for entry in auto_map.values():
            assert (folder / f"{entry.split('.')[0]}.py").is_file(), (folder, entry)
    lines = run_child(LOAD_CHILD, json.dumps(ids.tolist()), str(saved), str(trained), tmp_path=tmp_path)
    outs = [json.loads(line) for line in lines.splitlines()]
    assert len(outs) == 2
    for out in outs:
        assert out["module"].startswith("transformers_modules."), out["module"]
        assert out["stored"] is True
        torch.testing.assert_close(torch.tensor(out["logits"]), expected, rtol=0, atol=1e-5)


def test_whatever_auto_map_a_save_writes_names_files_beside_it(tmp_path):
    """The rule in the test process too, whatever earlier tests registered: a model built here and
    one whose config carries a foreign auto_map (a Hub folder's "repo--module.Class" entries) are
    saved with no auto_map, or with one whose every module file is in the folder."""
    for name, auto_map in (("built", None), ("hub", {"AutoModelForCausalLM": "someone/repo--modeling_x.X"})):
        model = tiny_model()
        if auto_map:
            model.config.auto_map = auto_map
        model.save_pretrained(tmp_path / name)
        written = json.loads((tmp_path / name / "config.json").read_text()).get("auto_map") or {}
        assert bool(written) or not auto_map, name
        for entry in written.values():
            assert "--" not in entry and (tmp_path / name / f"{entry.split('.')[0]}.py").is_file(), (name, entry)


# ---- 2. offloading hooks see every parameter ----------------------------------------------------
def offload_with_hooks(model: torch.nn.Module) -> int:
    """What accelerate's CPU / disk offloading does, with plain torch hooks: every parameter of every
    module is replaced by one on the meta device, a forward pre-hook puts the stored values in
    place for the duration of the module's call, a forward hook takes them away again. A weight
    read outside its module's call finds a meta tensor and fails. Returns the modules hooked."""
    hooked = 0
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        stored = {name: p.detach().clone() for name, p in own.items()}

        def load(mod, args, stored=stored):
            for name, value in stored.items():
                mod._parameters[name] = torch.nn.Parameter(value, requires_grad=False)

        def unload(mod, args, output, stored=stored):
            for name, value in stored.items():
                mod._parameters[name] = torch.nn.Parameter(value.to("meta"), requires_grad=False)

        unload(module, (), None)
        module.register_forward_pre_hook(load)
        module.register_forward_hook(unload)
        hooked += 1
    return hooked


@pytest.mark.parametrize("heads", [None, 4], ids=["hyena", "multihyena"])
def test_a_model_whose_weights_exist_only_inside_module_calls_computes_the_same(heads):
    """float64: the forward, a cached prefill and decode steps with every weight swapped in by hooks
    equal the same model's with its weights in place (rtol 1e-12), and greedy generate() gives the
    parallel forward's greedy tokens."""
    kw = dict(attn_layers=[1], n_layer=3, multi_hyena_heads=heads)
    reference, model = tiny_model(**kw).double(), tiny_model(**kw).double()
    assert offload_with_hooks(model) > 0
    ids = ids_of(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-12, atol=1e-12)
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6
    assert_greedy(reference, out, ids.shape[1])


def test_accelerate_disk_and_cpu_offload_through_device_map(tmp_path):
    """from_pretrained(device_map=..., offload_folder=...) with a Hyena and an attention block on
    disk: logits equal the model in memory (atol 1e-6, float32: the same operations), and greedy
    generate() gives the parallel forward's greedy tokens."""
    pytest.importorskip("accelerate", reason="accelerate is not installed: the hooks test above covers the principle")
    model = tiny_model(attn_layers=[2], n_layer=3)
    model.save_pretrained(tmp_path / "ckpt")
    device_map = {
        "model.embed": "cpu",
        "model.drop": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm_f": "cpu",
        "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert offloaded.model.layers[1].mixer.short_conv.weight.device.type == "meta"
    assert offloaded.model.layers[1].mixer.filter.a.device.type == "meta"
    ids = ids_of(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
        out = offloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 5
    assert_greedy(model, out, ids.shape[1])


# ---- 3. torch.export with a dynamic length ------------------------------------------------------
class Logits(torch.nn.Module):
    """model(ids).logits, the parallel forward, as torch.export wants it (tensors in, a tensor out)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


@pytest.mark.parametrize("heads", [None, 4], ids=["hyena", "multihyena"])
def test_torch_export_with_a_dynamic_length_runs_every_length(heads):
    """Exported once at length 9 with Dim(max=l_max - 1), the program computes the logits of the
    eager forward at other lengths: float64, rtol 1e-10 (the transform sizes differ: 2T there,
    5-smooth here)."""
    model = tiny_model(multi_hyena_heads=heads).double()
    length = torch.export.Dim("length", min=2, max=model.config.l_max - 1)
    program = torch.export.export(Logits(model), (ids_of(2, 9),), dynamic_shapes=({1: length},))
    for T in (2, 5, 17, 31):
        ids = ids_of(2, T, seed=T)
        torch.testing.assert_close(program.module()(ids), model(ids, use_cache=False).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "case,match",
    [
        ("past_l_max", r"Dim\(\.\.\., max=31\)"),
        ("no_grad", "outside torch.no_grad"),
        ("implicit", "RTF filters only"),
    ],
)
def test_torch_export_refuses_what_it_cannot_trace_in_one_line(case, match):
    model = tiny_model(filter="implicit" if case == "implicit" else "rtf")
    length = torch.export.Dim("length", min=2, max=64 if case == "past_l_max" else 31)
    with torch.set_grad_enabled(case != "no_grad"), pytest.raises(ValueError, match=match) as error:
        torch.export.export(Logits(model), (ids_of(2, 9),), dynamic_shapes=({1: length},))
    assert "\n" not in str(error.value).split("\n\n")[0]


# ---- 4. continuing a static cache returned by generate() ----------------------------------------
@pytest.mark.parametrize("attn", [None, [1]], ids=["hyena", "hybrid"])
@pytest.mark.parametrize("pads", [(0, 0), (3, 0)], ids=["batch", "left_padded_prompt"])
def test_a_static_cache_from_generate_continues_in_a_second_call(attn, pads):
    """generate(cache_implementation="static") returns a cache sized for that call; a second
    generate() given it and the whole sequence so far (plus text the user adds) feeds only the new
    positions, then one token per step, and gives the parallel forward's greedy tokens."""
    model = tiny_model(attn_layers=attn)
    ids, mask = ids_of(2, 9), torch.ones(2, 9, dtype=torch.long)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = 0, 0
    with torch.no_grad():
        first = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            cache_implementation="static",
            return_dict_in_generate=True,
        )
        cache = output_cache(first)
        assert isinstance(cache, StaticHyenaRTFCache)
        more = torch.cat([first.sequences, ids_of(2, 3, seed=7)], dim=1)
        more_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
        calls = spy_on_forward(model)
        second = model.generate(
            more, attention_mask=more_mask, max_new_tokens=8, do_sample=False, **cache_kwargs(cache)
        )
    assert [c.positions for c in calls] == [4] + [1] * 7  # the last generated token, the 3 added, then steps
    assert second.shape[1] == more.shape[1] + 8
    assert_greedy(model, second, more.shape[1], more_mask)


def test_padding_among_new_tokens_of_a_static_cache_is_refused():
    model = tiny_model()
    with torch.no_grad():
        first = model.generate(
            ids_of(2, 9), max_new_tokens=3, do_sample=False, cache_implementation="static", return_dict_in_generate=True
        )
        more = torch.cat([first.sequences, ids_of(2, 3, seed=7)], dim=1)
        mask = torch.ones_like(more)
        mask[0, -3] = 0
        with pytest.raises(ValueError, match="padding among the new tokens"):
            model.generate(more, attention_mask=mask, max_new_tokens=2, **cache_kwargs(output_cache(first)))


# ---- 5. position_ids, as trl's collator passes them ---------------------------------------------
def test_counting_position_ids_are_accepted_and_change_nothing():
    """trl without packing: right-padded rows, an attention mask, position_ids arange padded with 0,
    labels -100 on padding. The same loss and logits as without position_ids; left-padded rows
    with Hugging Face's cumsum positions too, and the continuation of a cached prefix."""
    model = tiny_model().double()
    lengths = (9, 5)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    positions = torch.zeros(2, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n], mask[row, :n], positions[row, :n] = ids_of(1, n, seed=row)[0], 1, torch.arange(n)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, labels=labels)
        trl = model(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions)
        assert torch.equal(trl.loss, plain.loss) and torch.equal(trl.logits, plain.logits)
        left = mask.flip(-1)
        hf_positions = (left.cumsum(-1) - 1).masked_fill(left == 0, 1)
        assert torch.equal(
            model(ids, attention_mask=left, position_ids=hf_positions).logits, model(ids, attention_mask=left).logits
        )
        chunks = []
        for extra in ({}, {"position_ids": torch.arange(6, 9)[None]}):  # the continuation of a prefix
            prefix = model(ids[:, :6], use_cache=True)
            chunks.append(model(ids[:, 6:], **extra, **cache_kwargs(output_cache(prefix))).logits)
        assert torch.equal(*chunks)


def test_packed_position_ids_are_refused_with_how_to_turn_packing_off():
    """trl's padding-free packing: one row of concatenated documents, position_ids restarting at 0
    at each, the first label of each document -100, no attention mask. Refused in one line."""
    model = tiny_model()
    ids = ids_of(1, 12)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    labels = ids.clone()
    labels[positions == 0] = -100
    with pytest.raises(ValueError, match=r"packing=False") as error:
        model(input_ids=ids, labels=labels, position_ids=positions)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="restart"):
        model.model(input_ids=ids, position_ids=positions)  # AutoModel's decoder too
