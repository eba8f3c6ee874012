"""model.arch=gpt_neox: train.py trains Hugging Face's GPTNeoXForCausalLM with the same loop, resumes
it exactly, exports a plain transformers folder that loads without trust_remote_code in a fresh
process, which evaluate_lm.py and generate.py use; the Hyena-only keys are refused by name; the
model is exactly the GPT-NeoX the mapping of training/config.py promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from support.helpers import NO_PROJECT, naive_greedy
from support.train_utils import (
    REPO,
    TINY,
    assert_learned,
    assert_same_run,
    child_env,
    error_line,
    run_cmd,
    run_one_thread,
    torch_threads,
)
from tokenizers import Tokenizer
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import train
from data_prep.tokenizer import hf_tokenizer
from export.from_training import model_from_checkpoint
from training.build import build_model
from training.config import load_config
from training.metrics import read_metrics
from training.trainer import run

pytestmark = pytest.mark.hf  # the export's contract with transformers, under every supported release

# TINY without its one Hyena-only key, as a 4-head Transformer (head width 8).
NEOX = [o for o in TINY if not o.startswith("model.state_size=")] + ["model.arch=gpt_neox", "model.n_head=4"]
VOCAB = 512  # the tiny corpus' BPE (tests/_train_utils.make_corpus)
PROMPT = "def main(argv=None):\n    return"


def neox(corpus, out_dir, *extra):
    return load_config(None, [*NEOX, f"data.dir={corpus}", f"train.out_dir={out_dir}", *extra])


def curve(out_dir):
    recs = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    return [r["step"] for r in recs], [r["loss"] for r in recs], [r["grad_norm"] for r in recs]


def expected_config() -> GPTNeoXConfig:
    """What NEOX must map to, written out by hand from the module docstring of
    training/config.py: d 32, 2 layers, 4 heads, MLP 4 x 32, l_max = seq_len 64, tied
    embeddings, no dropout, no token ids until the export sets the tokenizer's."""
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_parallel_residual=True,
    )


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 10-step GPT-NeoX run, exported at the end to OUT/hf."""
    out = tmp_path_factory.mktemp("neox")
    return out, run_one_thread(neox(corpus, out, "checkpoint.export_at_end=true"))


def test_gpt_neox_run_trains_and_records_its_arch(reference):
    out, summary = reference
    steps, losses, _ = curve(out)
    assert_learned(steps, losses)
    assert summary["val_ppl"] < VOCAB  # better than uniform over the vocabulary
    saved = load_config(str(out / "checkpoints" / "step_00000010" / "config.yaml"))  # the effective config
    assert saved.model.arch == "gpt_neox"
    assert (saved.model.d_model, saved.model.n_head, saved.model.mlp_ratio, saved.model.l_max) == (32, 4, 4, 64)
    assert saved.model.state_size is None  # a Hyena-only key stays unset
    state = torch.load(out / "checkpoints" / "step_00000010" / "model.pt")
    assert all(k.startswith(("gpt_neox.", "lm_head.")) for k in state)


def test_interrupted_and_resumed_run_reproduces_losses_exactly(corpus, reference, tmp_path):
    ref_out, _ = reference
    with torch_threads(1):  # as the reference
        first = run(neox(corpus, tmp_path, "train.stop_after_steps=3"))
        assert first["step"] == 3
        second = run(neox(corpus, tmp_path))  # checkpoint.resume=auto picks step 3 up
    assert second["step"] == 10
    assert_same_run(tmp_path, ref_out)  # bit for bit: losses, grad norms, evaluations, weights


def test_the_model_is_the_expected_gpt_neox_and_its_count_is_the_closed_form(corpus):
    """build_model (what train.py and benchmarks/variants.py build) against GPTNeoXForCausalLM
    built directly from the hand-written config with the same seed: same class, same config
    values, bit-identical initial weights; the parameter count against the closed form
    V d + L (12 d^2 + 13 d) + 2 d (tied embedding; per layer two LayerNorms 4d, QKV 3d^2 + 3d,
    output d^2 + d, MLP 8d^2 + 5d; final LayerNorm 2d)."""
    cfg = neox(corpus, "unused")
    model = build_model(cfg, VOCAB, torch.device("cpu"))
    torch.manual_seed(cfg.train.seed)
    direct = GPTNeoXForCausalLM(expected_config())
    assert type(model) is GPTNeoXForCausalLM
    ours, theirs = model.config.to_dict(), direct.config.to_dict()
    assert {k: ours[k] for k in theirs if k != "_attn_implementation_autoset"} == {
        k: v for k, v in theirs.items() if k != "_attn_implementation_autoset"
    }
    assert ours["rope_parameters"]["partial_rotary_factor"] == 0.25  # Pythia's rotary fraction
    assert model.config._attn_implementation == "sdpa"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    a, b = model.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in b)
    d, n_layer = 32, 2
    closed_form = VOCAB * d + n_layer * (12 * d * d + 13 * d) + 2 * d
    assert model.num_parameters() == direct.num_parameters() == closed_form == 41856


RELOAD = (
    NO_PROJECT
    + """
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
ids = torch.load(ids_file)
assert tok(sys.stdin.read(), return_tensors="pt").input_ids.tolist() == ids.tolist()
with torch.no_grad():
    torch.save(model(ids).logits, out_file)
print(type(model).__name__)
"""
)


def test_export_is_a_plain_folder_that_reloads_in_a_fresh_process_with_identical_logits(reference, tmp_path):
    out, _ = reference
    hf = out / "hf"
    assert not [p.name for p in hf.iterdir() if p.suffix == ".py"]  # no code to trust
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "gpt_neox"
    assert "auto_map" not in config
    assert config["hyena_rtf_export"] == "gpt_neox"  # what marks the folder as ours
    own = Tokenizer.from_file(str(out / "checkpoints" / "step_00000010" / "tokenizer.json"))
    ids = torch.tensor([own.encode(PROMPT).ids])
    torch.save(ids, tmp_path / "ids.pt")
    p = subprocess.run(
        [sys.executable, "-c", RELOAD, str(hf), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        input=PROMPT,
        cwd=tmp_path,  # not the repository: nothing of the project on the path but what is installed
        env=child_env(threads=1),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "GPTNeoXForCausalLM"
    src, _ = model_from_checkpoint(str(out / "checkpoints" / "step_00000010"))
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), src(input_ids=ids).logits)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_py_export_replaces_its_own_gpt_neox_export_only(reference, tmp_path, capsys):
    """Our earlier export is replaced; a GPT-NeoX folder another tool wrote (every file name one an
    export writes, but no marker) and our export with a file added are refused, untouched."""
    out, _ = reference
    target = tmp_path / "hf"
    assert train.main(["export", str(out), str(target)]) == 0
    assert train.main(["export", str(out), str(target)]) == 0  # ours: replaced
    theirs = tmp_path / "pythia"
    GPTNeoXForCausalLM(expected_config()).save_pretrained(theirs)
    hf_tokenizer(out / "checkpoints" / "step_00000010" / "tokenizer.json").save_pretrained(theirs)
    (target / "notes.py").write_text("mine")
    capsys.readouterr()
    for folder, says in ((theirs, "is not a"), (target, "did not write (notes.py)")):
        before = snapshot(folder)
        assert train.main(["export", str(out), str(folder)]) == 2
        err = error_line(capsys.readouterr().err)
        assert says in err, err
        assert "--overwrite" in err, err
        assert snapshot(folder) == before


@pytest.mark.slow  # an end-to-end command: run once, under the newest transformers
def test_evaluate_lm_scores_the_export_and_recurrent_mode_agrees(reference, corpus, tmp_path):
    """evaluate_lm.py on the GPT-NeoX export, in parallel and KV-cache (recurrent) mode: the same
    300 validation tokens scored, perplexity between 1 and the vocabulary size, the two modes equal
    within 1e-5 relative (float32 logits of a full forward and of cached single-token steps differ
    by rounding, ~1e-6 relative; 300 summed NLLs keep that order)."""
    out, _ = reference
    results = {}
    for mode in ("parallel", "recurrent"):
        path = tmp_path / f"{mode}.json"
        run_cmd(
            [sys.executable, "evaluate_lm.py", str(out / "hf"), "--data", str(corpus), "--max-tokens", "300"]
            + ["--context-length", "64", "--mode", mode, "--output", str(path)],
            threads=1,
        )
        results[mode] = json.loads(path.read_text())
    par, rec = results["parallel"], results["recurrent"]
    assert par["model_type"] == "gpt_neox"
    assert par["parameters"] == 41856
    assert par["data"][0]["tokens"] == rec["data"][0]["tokens"] == 300
    assert 1 < par["data"][0]["perplexity"] < VOCAB
    assert rec["data"][0]["perplexity"] == pytest.approx(par["data"][0]["perplexity"], rel=1e-5)


def test_generate_py_decodes_the_export_greedily(reference):
    """generate.py on the export against greedy decoding by a full forward per token (no cache),
    cut at the first end-of-text token as generate.py stops there."""
    out, _ = reference
    hf = out / "hf"
    p = run_cmd(
        [sys.executable, "generate.py", str(hf), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0"],
        threads=1,
    )
    src, _ = model_from_checkpoint(str(out / "checkpoints" / "step_00000010"))
    tok = hf_tokenizer(hf / "tokenizer.json")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    new = naive_greedy(src, ids, 12)[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    assert p.stdout == PROMPT + tok.decode(new, skip_special_tokens=True) + "\n"


# ---- configuration errors: one line, the key named, exit status 2 ---------------------------------


@pytest.mark.parametrize("key, value", [("state_size", "4"), ("filter", "implicit"), ("attn_layers", "[1]")])
def test_a_hyena_only_key_on_the_command_line_is_refused_by_name(corpus, tmp_path, capsys, key, value):
    code = train.main([*NEOX, f"data.dir={corpus}", f"train.out_dir={tmp_path}", f"model.{key}={value}"])
    assert code == 2
    err = error_line(capsys.readouterr().err)
    assert err == (
        f"train.py: error: command-line override 'model.{key}={value}': model.{key} is a Hyena-RTF "
        "setting, which model.arch=gpt_neox does not use; remove it"
    )
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_hyena_only_key_in_the_yaml_that_chose_gpt_neox_is_refused(corpus, tmp_path, capsys):
    yaml = tmp_path / "neox.yaml"
    yaml.write_text("model:\n  arch: gpt_neox\n  multi_hyena_heads: 4\n")
    code = train.main(["--config", str(yaml), f"data.dir={corpus}", f"train.out_dir={tmp_path / 'run'}"])
    assert code == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"train.py: error: {yaml}: model.multi_hyena_heads is a Hyena-RTF setting"), err


def test_the_hyena_keys_of_a_hyena_yaml_are_cleared_when_the_command_line_picks_gpt_neox():
    """configs/default.yaml sets model.state_size; `python train.py model.arch=gpt_neox` must still
    train its Transformer, with the shared keys of the file kept."""
    cfg = load_config(str(train.DEFAULT_CONFIG), ["model.arch=gpt_neox"])
    assert cfg.model.state_size is None
    assert (cfg.model.d_model, cfg.model.n_layer, cfg.model.n_head) == (128, 4, 4)
    assert load_config(str(train.DEFAULT_CONFIG)).model.state_size == 16  # untouched for Hyena-RTF


def test_an_unknown_arch_lists_the_choices(corpus, tmp_path, capsys):
    code = train.main([*NEOX, f"data.dir={corpus}", f"train.out_dir={tmp_path}", "model.arch=mamba"])
    assert code == 2
    err = error_line(capsys.readouterr().err)
    assert err == (
        "train.py: error: command-line override 'model.arch=mamba': invalid value for 'model.arch': "
        "Invalid value 'mamba', expected one of ['hyena_rtf', 'gpt_neox']"
    )


def test_heads_that_do_not_divide_the_width_are_refused(corpus, tmp_path, capsys):
    code = train.main([*NEOX, f"data.dir={corpus}", f"train.out_dir={tmp_path}", "model.n_head=5"])
    assert code == 2
    err = error_line(capsys.readouterr().err)
    assert err == "train.py: error: invalid model configuration: d_model (32) must be divisible by n_head (5)"


def test_a_hyena_checkpoint_does_not_resume_as_gpt_neox(corpus, tmp_path, capsys):
    base = [*TINY, f"data.dir={corpus}", f"train.out_dir={tmp_path}"]
    with torch_threads(1):
        assert train.main([*base, "train.stop_after_steps=1"]) == 0
    capsys.readouterr()
    hyena_free = [o for o in base if not o.startswith("model.state_size=")]
    assert train.main([*hyena_free, "model.arch=gpt_neox", "model.n_head=4"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "it was trained with model.arch=hyena_rtf, this config gives gpt_neox" in err, err


@pytest.mark.slow  # a command's exit status: the same under every transformers release
def test_the_script_exits_with_status_2(corpus, tmp_path):
    """The exit status of the real command, not only main()'s return value."""
    p = subprocess.run(
        [sys.executable, "train.py", *NEOX, f"data.dir={corpus}", f"train.out_dir={tmp_path}", "model.filter=rtf"],
        cwd=REPO,
        env=child_env(threads=1),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 2
    assert "model.filter is a Hyena-RTF setting" in error_line(p.stderr)
