"""The Hugging Face contract, checked from the outside: what `generate()`, `Trainer`, PEFT, the Auto
classes and lm-eval do with the model, on whichever transformers release is installed. CI runs
this module under the oldest supported release and under the newest one pip resolves.

"generate() uses the cache" is checked by counting what the model is fed (the prompt once, then
one position per step), never by comparing cached with uncached generation alone: on a release
whose cache keyword the model does not know, both silently become the same full re-run.
Greedy tokens are checked with `assert_greedy`: each is a greedy choice of a full parallel forward,
which uses no cache and no generation code; sampled tokens and beams likewise (`assert_sampled`,
`assert_beams`), never as equal ids from two routes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from support.helpers import (
    REPO,
    SAMPLED_OUTPUTS,
    assert_beams,
    assert_greedy,
    assert_sampled,
    load_script,
    seeded,
    spy_on_forward,
    tiny_model,
    train_tiny_tokenizer,
)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from data_prep.tokenizer import hf_tokenizer
from export.folder import save_hf_checkpoint
from models import HyenaRTFCache, HyenaRTFConfig, HyenaRTFForCausalLM, HyenaRTFModel
from models.hf_compat import CACHE_NAMES, cache_kwargs, output_cache

pytestmark = pytest.mark.hf

VOCAB, PROMPT, NEW = 97, 9, 12


def prompt_ids(batch=2, length=PROMPT, seed=1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- generate() really decodes recurrently ---------------------------------------------------------
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20),
    "beam_search": dict(num_beams=3, do_sample=False),
    "beam_sample": dict(num_beams=3, do_sample=True, top_k=20),
}


@pytest.mark.parametrize("padded", [False, True], ids=["batch", "left_padded_batch"])
@pytest.mark.parametrize("mode", MODES)
def test_generate_feeds_the_prompt_once_then_one_token_per_step(mode, padded):
    model = tiny_model(attn_layers=[1])  # a hybrid: the KV cache of the attention layer is exercised too
    ids, mask = prompt_ids(), torch.ones(2, PROMPT, dtype=torch.long)
    if padded:
        ids[0, :4], mask[0, :4] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=NEW, **MODES[mode], **SAMPLED_OUTPUTS)
    calls = spy_on_forward(model)
    run = seeded(0, lambda: model.generate(ids, **kw))
    assert [c.positions for c in calls] == [PROMPT] + [1] * (NEW - 1)
    assert [c.seen for c in calls] == [None] + list(range(PROMPT, PROMPT + NEW - 1))
    # And what was decoded that way is right, checked against a full parallel forward (no cache, no
    # generation code) on the run's own tokens: greedy tokens are its greedy choices, sampled ones
    # were drawn from its distribution, beams carry its scores (support.helpers). The other modes
    # also run without the cache (which, the counts show, is a different computation) from the same
    # seed: both routes must draw the same random numbers, and pass the same checks. Their ids are
    # not compared: a draw or a beam score within rounding (~1e-6) of a boundary may part them.
    if mode == "greedy":
        assert_greedy(model, run.out.sequences, PROMPT, mask)
        return
    uncached_calls = spy_on_forward(model)
    uncached = seeded(0, lambda: model.generate(ids, **kw, use_cache=False))
    assert [c.positions for c in uncached_calls] == list(range(PROMPT, PROMPT + NEW))
    if mode == "sampling":
        assert_sampled(model, run, PROMPT, mask, reference=uncached)
    else:
        assert_beams(model, run, PROMPT, 3, mask=mask, sampled=mode == "beam_sample", reference=uncached)


def test_decode_step_cost_does_not_grow_with_the_prompt():
    """Counted floating-point work of each decode step, and the cache size, are the same after a
    prompt of 8 tokens and of 200 (6x l_max); the prefill's work grows with the prompt."""
    model = tiny_model()
    prefill, steps, sizes = [], [], []
    for length in (8, 200):
        calls = spy_on_forward(model)
        with torch.no_grad():
            out = model.generate(prompt_ids(1, length), max_new_tokens=6, return_dict_in_generate=True)
        assert [c.positions for c in calls] == [length] + [1] * 5
        prefill.append(calls[0].flops)
        steps += [c.flops for c in calls[1:]]
        state = output_cache(out).layers
        sizes.append([t.numel() for s in state for t in (s.conv, s.filt)])
    assert prefill[1] > 10 * prefill[0]
    assert steps[0] > 0, steps
    assert len(set(steps)) == 1, steps
    assert sizes[0] == sizes[1]


def test_an_explicit_use_cache_wins_over_the_config():
    """Trainer saves `use_cache: false`; decoding must still get its cache when it asks for one."""
    model = tiny_model(use_cache=False)
    ids = prompt_ids()
    with torch.no_grad():
        assert output_cache(model(ids)) is None  # the config's default
        assert isinstance(output_cache(model(ids, use_cache=True)), HyenaRTFCache)
        calls = spy_on_forward(model)
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, use_cache=True)
    assert [c.positions for c in calls] == [PROMPT] + [1] * (NEW - 1)
    assert_greedy(model, out, PROMPT)


def test_cache_returned_by_generate_continues_in_a_second_call():
    model = tiny_model(attn_layers=[1])
    ids = prompt_ids()
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        cache = output_cache(first)
        more = torch.cat([first.sequences, prompt_ids(2, 3, seed=7)], dim=-1)  # the user adds text
        calls = spy_on_forward(model)
        second = model.generate(more, max_new_tokens=NEW, do_sample=False, **cache_kwargs(cache))
    # The cache saw the prompt and 4 of the 5 generated tokens: the last one and the 3 added are new.
    assert [c.positions for c in calls] == [4] + [1] * (NEW - 1)
    assert second.shape[1] == more.shape[1] + NEW
    assert_greedy(model, second, more.shape[1])


def test_generate_from_inputs_embeds_equals_generate_from_ids():
    model = tiny_model()
    ids = prompt_ids()
    with torch.no_grad():
        from_ids = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        calls = spy_on_forward(model)
        from_embeds = model.generate(
            inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=NEW, do_sample=False
        )
    assert [c.positions for c in calls] == [PROMPT] + [1] * (NEW - 1)
    assert from_embeds.shape[1] == NEW
    assert_greedy(model, torch.cat([ids, from_embeds[:, -NEW:]], dim=1), PROMPT)
    assert_greedy(model, from_ids, PROMPT)


def test_the_declared_generation_modes_are_the_ones_tested_above():
    declared = set(HyenaRTFForCausalLM._supported_generation_modes)
    assert {GenerationConfig(**kw).get_generation_mode() for kw in MODES.values()} == declared


@pytest.mark.parametrize("assist", ["prompt_lookup", "assistant_model"])
def test_assisted_decoding_is_refused_by_transformers_with_its_own_message(assist):
    model = tiny_model()
    kwargs = {"prompt_lookup_num_tokens": 3} if assist == "prompt_lookup" else {"assistant_model": tiny_model(seed=1)}
    with pytest.raises(
        ValueError,
        match=r"only supports \('greedy_search', 'sample', 'beam_search', 'beam_sample'\), but got .*ASSISTED",
    ):
        with torch.no_grad():
            model.generate(prompt_ids(1), max_new_tokens=4, do_sample=False, **kwargs)


# ---- HF model conventions ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, checkpoint folder, tokenizer file): a hybrid model with a 320-token tokenizer."""
    tmp = tmp_path_factory.mktemp("hf_contract")
    tokenizer_file = train_tiny_tokenizer(tmp / "tokenizer.json")
    model = tiny_model(attn_layers=[1], vocab=320, n_layer=3, l_max=64)
    return model, save_hf_checkpoint(model, tokenizer_file, tmp / "ckpt"), tokenizer_file


def test_auto_classes_load_the_export_without_remote_code(exported):
    model, ckpt, _ = exported
    assert type(AutoConfig.from_pretrained(ckpt)) is HyenaRTFConfig  # registered by `import models`
    base = AutoModel.from_pretrained(ckpt).eval()
    lm = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert type(base) is HyenaRTFModel
    assert type(lm) is HyenaRTFForCausalLM
    tok = AutoTokenizer.from_pretrained(ckpt)
    enc = tok(["the cat sat on the mat"], return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        hidden = base(**enc).last_hidden_state
        logits = lm(**enc).logits
        assert torch.equal(logits, model(**enc).logits)
        assert torch.allclose(logits, model.lm_head(hidden)[..., :320], rtol=0, atol=1e-5)


def test_hidden_states_return_dict_and_unknown_keywords():
    model = tiny_model(n_layer=3)
    ids = prompt_ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        base = model.model(ids, output_hidden_states=True)
        as_tuple = model(ids, return_dict=False, use_cache=False)
    assert len(out.hidden_states) == 3 + 1  # embeddings, then each block (the last one after norm_f)
    assert torch.equal(out.hidden_states[0], model.model.embed(ids))
    assert torch.equal(out.hidden_states[-1], base.last_hidden_state)
    assert torch.allclose(out.logits, model.lm_head(base.last_hidden_state)[..., :VOCAB], rtol=0, atol=1e-5)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], out.logits)
    assert model(ids).hidden_states is None
    with pytest.raises(TypeError, match="use_cahce"):
        model(ids, use_cahce=True)
    with pytest.raises(ValueError, match="use_cahce"):
        model.generate(ids, max_new_tokens=2, use_cahce=True)
    with pytest.raises(ValueError, match="attention weights"):
        model(ids, output_attentions=True)


def test_resize_token_embeddings_survives_save_and_reload(tmp_path):
    model = tiny_model()
    model.resize_token_embeddings(VOCAB + 30)  # 127 tokens: not a multiple of the padding (8)
    model.save_pretrained(tmp_path / "resized")
    reloaded = HyenaRTFForCausalLM.from_pretrained(tmp_path / "resized").eval()
    ids = torch.randint(0, VOCAB + 30, (2, 7))
    with torch.no_grad():
        assert reloaded(ids).logits.shape == (2, 7, VOCAB + 30)
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_config_exposes_the_trained_length_to_hf_tools(exported):
    """lm-eval sizes its windows from max_position_embeddings / n_positions; without them it used
    2048 whatever the model was trained on."""
    lm_eval = pytest.importorskip("lm_eval.models.huggingface")
    model, _, tokenizer_file = exported
    assert model.config.max_position_embeddings == model.config.l_max == 64
    assert "max_position_embeddings" not in model.config.to_dict()  # one source of truth: l_max
    hflm = lm_eval.HFLM(pretrained=model, tokenizer=hf_tokenizer(tokenizer_file), batch_size=1)
    assert hflm.max_length == 64


def test_checkpoint_config_json_names_every_auto_class(exported):
    _, ckpt, _ = exported
    auto_map = json.loads((ckpt / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_hyena_rtf.HyenaRTFConfig",
        "AutoModel": "modeling_hyena_rtf.HyenaRTFModel",
        "AutoModelForCausalLM": "modeling_hyena_rtf.HyenaRTFForCausalLM",
    }


# ---- from a fresh process, as a user would -----------------------------------------------------
README_CHILD = textwrap.dedent(r"""
    import builtins, sys
    from_repo = sys.argv[2] == "from_repo"
    if from_repo:
        import models as models  # the repository's package: registers the Auto classes
    else:
        sys.modules["models"] = None  # only the code saved in the checkpoint may be used

    def no_prompt(*args, **kwargs):
        raise SystemExit("transformers prompted: " + " ".join(str(a) for a in args))

    builtins.input = no_prompt
    snippet = sys.argv[3]
    if from_repo:
        snippet = snippet.replace(", trust_remote_code=True", "")
    exec(snippet.replace('"runs/default/hf"', repr(sys.argv[1])))
    print("module:", type(model).__module__)
""")


def readme_snippet() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Using a checkpoint") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]


@pytest.mark.parametrize("where", ["remote_code", "from_repo"])
def test_readme_snippet_runs_without_prompts_or_deprecation_warnings(exported, tmp_path, where):
    """The README's loading and generate() lines, in a fresh process: no custom-code prompt (input()
    would end the child), no cache deprecation warning, and the model class from where it should
    come (the checkpoint's own code, or the repository's package with no flag at all)."""
    _, ckpt, _ = exported
    (tmp_path / "hf_home").mkdir()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", README_CHILD, str(ckpt), where, readme_snippet()],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for unwanted in ("deprecated", "[y/N]", "custom code", "Traceback"):
        assert unwanted not in proc.stderr, proc.stderr[-3000:]
    module = proc.stdout.split("module: ")[-1].strip()
    if where == "from_repo":
        assert module == "models.modeling_hyena_rtf"
    else:
        assert module.startswith("transformers_modules."), module
        assert module.endswith(".modeling_hyena_rtf"), module


# ---- the CLIs refuse a model that hands back no cache ------------------------------------------
def without_cache(model):
    """A model whose forward drops the cache, as ours did after a Trainer fine-tune."""
    forward = model.forward

    def forward_without_cache(*args, **kwargs):
        out = forward(*args, **kwargs)
        for name in CACHE_NAMES:
            if name in out:
                out[name] = None
        return out

    model.forward = forward_without_cache
    return model


def test_generate_cli_refuses_a_model_that_returns_no_cache(exported):
    tokenizer_file = exported[2]
    gen = load_script("generate.py")
    args = SimpleNamespace(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=4)
    tokenizer = hf_tokenizer(tokenizer_file)
    with pytest.raises(gen.UsageError, match="returned no cache"):
        gen.decode_batch(without_cache(tiny_model(vocab=320)), tokenizer, ["the cat"], args)


def test_evaluate_recurrent_mode_refuses_a_model_that_returns_no_cache():
    evaluate = load_script("evaluate_lm.py")
    with pytest.raises(evaluate.EvalError, match="returned no cache"):
        evaluate.forward_logits(without_cache(tiny_model()), prompt_ids(), "recurrent")
