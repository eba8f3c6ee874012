"""generate.py --compile: the static, compiled decode step (models/static_decode.py) behind the CLI.

The reference is generate.py without the flag (the eager recurrent cache), whose own agreement with
transformers' generate() tests/integration/test_generate_cli.py checks. In-process runs compile with a counting
eager backend (fast, and it counts the graphs); one run in a fresh process uses the default
inductor backend.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from support.helpers import REPO, counting_backend, load_script, slow_poles, tiny_model, train_tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from data_prep.tokenizer import hf_tokenizer
from export.folder import save_hf_checkpoint
from models import static_decode

gen = load_script("generate.py")
REAL_RUN = gen.run  # run_generate replaces gen.run by a wrapper around this

PROMPTS = ["the cat sat on a mat", "a", "def return class import for in if else while print self value"]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_file):
    """(model, tokenizer, checkpoint folder) of a random hybrid MultiHyena model, l_max 32."""
    tokenizer = hf_tokenizer(tokenizer_file)
    tokenizer.padding_side = "left"
    model = slow_poles(tiny_model(attn_layers=[1], vocab=len(tokenizer), multi_hyena_heads=8, n_layer=3))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer, save_hf_checkpoint(model, tokenizer_file, tmp_path_factory.mktemp("cli") / "ckpt")


def run_generate(monkeypatch, model, tokenizer, ckpt, *argv) -> tuple[int, str, list[str]]:
    """generate.py's main() on an in-memory model: (exit status, stdout, texts)."""
    monkeypatch.setattr(gen, "load", lambda *a: (model, tokenizer))
    texts, out = [], io.StringIO()
    monkeypatch.setattr(gen, "run", lambda args, prompts: texts.extend(REAL_RUN(args, prompts, out=out)))
    return gen.main([str(ckpt), *map(str, argv)]), out.getvalue(), texts


@pytest.mark.hf
@pytest.mark.parametrize("extra", [["--temperature", 0], ["--temperature", 0.9, "--top-k", 30, "--seed", 3]])
def test_generate_cli_compile_gives_the_same_output(exported, tmp_path, monkeypatch, extra):
    """generate.py --compile (the compiled static step; the eager backend here, inductor in the
    subprocess test below) writes what it writes without the flag: greedy and seeded sampling, a
    prompt file decoded in left-padded batches of 2 (the last one smaller), and one compiled graph
    per batch size."""
    model, tokenizer, ckpt = exported
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    argv = ["--prompt-file", tmp_path / "p.txt", "--batch-size", 2, "--max-new-tokens", 30, *extra]
    graphs = []
    monkeypatch.setattr(static_decode, "compile_options", lambda device: {"backend": counting_backend(graphs)})
    plain = run_generate(monkeypatch, model, tokenizer, ckpt, *argv)
    compiled = run_generate(monkeypatch, model, tokenizer, ckpt, *argv, "--compile")
    assert plain[0] == compiled[0] == 0
    assert compiled[1] == plain[1]
    assert compiled[2] == plain[2] and len(plain[2]) == 3
    assert len(graphs) == 2  # batch sizes 2 and 1


@pytest.mark.hf
def test_generate_cli_compile_refuses_other_models_in_one_line(exported, monkeypatch, capsys):
    _, tokenizer, ckpt = exported
    implicit = tiny_model(filter="implicit", implicit_order=16, vocab=len(tokenizer))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=len(tokenizer)))
    for model, message in [
        (implicit, "--compile: layer 0 uses the implicit filter, whose decoding state grows with the context"),
        (gpt2, "--compile: GPT2LMHeadModel has no static decode step (only Hyena-RTF causal LMs"),
    ]:
        status, out, _ = run_generate(monkeypatch, model.eval(), tokenizer, ckpt, "--prompt", "the", "--compile")
        err = capsys.readouterr().err
        assert status == 2
        assert err.startswith(f"generate.py: error: {message}") and err.count("\n") == 1, err
        assert out == ""


@pytest.mark.slow
def test_generate_cli_compile_with_inductor_in_a_fresh_process(exported, tmp_path):
    """The real thing, once: generate.py --compile in its own process, torch.compile's default
    inductor backend (C++ on the CPU; about a minute to compile here), the same stdout as without
    --compile."""
    _, _, ckpt = exported
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_MODULES_CACHE", None)
    argv = [sys.executable, str(REPO / "generate.py"), str(ckpt), "--prompt", PROMPTS[0], "--temperature", "0"]
    argv += ["--max-new-tokens", "40"]
    plain = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    compiled = subprocess.run([*argv, "--compile"], env=env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == plain.stdout
    assert "compiled static step" in compiled.stderr
