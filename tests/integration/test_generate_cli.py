"""generate.py: end to end on exported tiny checkpoints (ours and a GPT-NeoX), and its errors.

Subprocess runs use an empty temporary HF_HOME and HF_HUB_OFFLINE=1. In-process tests drive
generate.py's own functions with an in-memory model (not loaded through trust_remote_code, which
would copy code into the user's HF cache from this process).
"""

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.helpers import assert_greedy, load_script, tiny_config, train_tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from data_prep.tokenizer import hf_tokenizer
from export.folder import save_hf_checkpoint
from models import RTF, HyenaRTFForCausalLM
from models.precision import cast_keeping_filters
from utils.logs import setup_logging

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "generate.py"
PROMPTS = ["The history of the city", "A", "In 1905, the physicist wrote three papers that"]
HEADER = re.compile(r"^==> prompt (\d+) sample (\d+) <==$", re.M)

pytestmark = pytest.mark.hf

gen = load_script("generate.py")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    tok = hf_tokenizer(tokenizer_file)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def ours(tmp_path_factory, tokenizer_file, tokenizer):
    """(model, checkpoint dir): a random hybrid Hyena-RTF with l_max 32, so decoding runs past it."""
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(tokenizer), n_layer=3, attn_layers=[1], initializer_range=0.2)
    model = HyenaRTFForCausalLM(cfg).eval()
    return model, save_hf_checkpoint(model, tokenizer_file, tmp_path_factory.mktemp("cli") / "ckpt")


def other_model(kind: str, vocab_size: int):
    """A random GPT-NeoX (rotary positions) or GPT-2 (learned absolute positions)."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, initializer_range=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "gpt_neox":
        return GPTNeoXForCausalLM(
            GPTNeoXConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=256,
                **common,
            )
        )
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common))


@pytest.fixture(scope="module", params=["gpt_neox", "gpt2"])
def other(request, tmp_path_factory, tokenizer):
    """(model, checkpoint dir) of a non-Hyena HF causal LM saved with the same tokenizer."""
    model = other_model(request.param, len(tokenizer)).eval()
    out = tmp_path_factory.mktemp(request.param) / "ckpt"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    hf_home = tmp_path_factory.mktemp("hf_home")
    e = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    e.pop("HF_MODULES_CACHE", None)
    return e


def cli(env, *args, timeout=240):
    """Run generate.py; stdout and stderr decoded as UTF-8 without newline translation (a random
    model may well generate a lone carriage return)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, timeout=timeout, cwd=REPO
    )
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


def greedy_texts(model, tokenizer, prompts, new, batch=False) -> list[str]:
    """Reference continuations from Hugging Face's generate(), cut at EOS (token 0)."""
    groups = [prompts] if batch else [[p] for p in prompts]
    texts = []
    for group in groups:
        enc = tokenizer(group, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new, do_sample=False, eos_token_id=0, pad_token_id=0)
        texts += [tokenizer.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True) for row in out]
    return texts


def blocks(stdout: str) -> list[tuple[int, int, str]]:
    """Parse the multi-output format into (prompt, sample, text) triples."""
    parts = HEADER.split(stdout)
    assert parts[0] == "", parts[0]
    return [
        (int(parts[i]), int(parts[i + 1]), parts[i + 2].removeprefix("\n").removesuffix("\n"))
        for i in range(1, len(parts), 3)
    ]


def assert_timings(stderr: str):
    for unwanted in ("Traceback", "deprecated", "[y/N]"):  # no cache-name deprecation, no custom-code prompt
        assert unwanted not in stderr, stderr
    assert re.search(r"time to first token [\d.]+ ms", stderr), stderr
    assert re.search(r"= [\d.]+ tokens/s", stderr), stderr


# ---- end to end, in a subprocess ---------------------------------------------------------------
def test_single_prompt_greedy(ours, tokenizer, env):
    model, ckpt = ours
    proc = cli(env, ckpt, "--prompt", PROMPTS[0], "--max-new-tokens", 40, "--temperature", 0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPTS[0] + greedy_texts(model, tokenizer, PROMPTS[:1], 40)[0] + "\n"
    assert_timings(proc.stderr)


def test_prompt_file_batches_with_left_padding(ours, tokenizer, env, tmp_path):
    model, ckpt = ours
    (tmp_path / "prompts.txt").write_text("\n".join([PROMPTS[0], "", PROMPTS[1], "   ", PROMPTS[2]]) + "\n")
    proc = cli(
        env,
        ckpt,
        "--prompt-file",
        tmp_path / "prompts.txt",
        "--num-samples",
        2,
        "--batch-size",
        4,
        "--temperature",
        0,
        "--max-new-tokens",
        30,
    )
    assert proc.returncode == 0, proc.stderr
    got = blocks(proc.stdout)
    assert [(i, j) for i, j, _ in got] == [(i, j) for i in (1, 2, 3) for j in (1, 2)]
    # Rows of different lengths were padded together (batches of 4 then 2) yet each continues
    # exactly as the prompt alone does.
    alone = greedy_texts(model, tokenizer, PROMPTS, 30)
    for i, _, text in got:
        assert text == PROMPTS[i - 1] + alone[i - 1]
    assert len(re.findall(r"^\[generate\] batch \d+: ", proc.stderr, re.M)) == 2
    assert_timings(proc.stderr)


def test_any_hf_causal_lm(other, tokenizer, env, tmp_path):
    model, ckpt = other
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]))
    proc = cli(env, ckpt, "--prompt-file", tmp_path / "p.txt", "--temperature", 0, "--max-new-tokens", 20)
    assert proc.returncode == 0, proc.stderr
    # Left padding is right for GPT-2's absolute positions only if positions skip the pads.
    alone = greedy_texts(model, tokenizer, PROMPTS[:2], 20)
    assert [t for _, _, t in blocks(proc.stdout)] == [p + r for p, r in zip(PROMPTS[:2], alone)]
    assert_timings(proc.stderr)


# ---- the decode loop, in process -----------------------------------------------------------------
@pytest.fixture
def args_for(ours):
    """Namespace for generate.py's functions, validated by its own parser."""
    _, ckpt = ours

    def build(*extra):
        return gen.parse_args([str(ckpt), "--prompt", "x", *map(str, extra)])[0]

    return build


def test_sampling_matches_generate_with_the_same_seed(ours, tokenizer, args_for):
    """generate.py's loop applies the same processors in the same order and draws the same random
    numbers as GenerationMixin, so one seed gives one text whichever does the decoding."""
    model, _ = ours
    args = args_for(
        "--temperature", 0.8, "--top-k", 50, "--top-p", 0.9, "--repetition-penalty", 1.3, "--max-new-tokens", 25
    )
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[2]]
    torch.manual_seed(7)
    ours_a, _ = gen.decode_batch(model, tokenizer, prompts, args)
    torch.manual_seed(7)
    ours_b, _ = gen.decode_batch(model, tokenizer, prompts, args)
    enc = tokenizer(PROMPTS[::2], return_tensors="pt", padding=True)
    torch.manual_seed(7)
    with torch.no_grad():
        ref = model.generate(
            **enc,
            do_sample=True,
            temperature=0.8,
            top_k=50,
            top_p=0.9,
            repetition_penalty=1.3,
            max_new_tokens=25,
            num_return_sequences=2,
            eos_token_id=0,
            pad_token_id=0,
        )
    ref = ref[:, enc["input_ids"].shape[1] :]
    assert torch.equal(ours_a, ours_b)
    assert torch.equal(ours_a, ref[:, : ours_a.shape[1]])
    assert len({tuple(r.tolist()) for r in ours_a}) == 4  # all samples differ, even for the same prompt


def test_greedy_loop_matches_generate_on_padded_batch(ours, tokenizer, args_for):
    model, _ = ours
    tokens, stats = gen.decode_batch(model, tokenizer, PROMPTS, args_for("--temperature", 0, "--max-new-tokens", 40))
    texts = [gen.continuation_text(tokenizer, row, [0]) for row in tokens]
    assert texts == greedy_texts(model, tokenizer, PROMPTS, 40, batch=True)
    assert stats["rows"] == 3
    assert stats["steps"] == tokens.shape[1]
    assert stats["ttft"] > 0


def test_repetition_penalty_gives_a_row_in_a_batch_what_its_prompt_alone_gets(ours, tokenizer, args_for):
    """Left pads (id 0, which is also end-of-text here) once counted as tokens of their row, so the
    penalty lowered end-of-text in padded rows only and a prompt's text depended on its batch. Each
    row must be greedy under the penalty for its own prompt, unpadded (assert_greedy), up to and
    including its end-of-text."""
    model, _ = ours
    args = args_for("--temperature", 0, "--max-new-tokens", 30, "--repetition-penalty", 1.8)
    tokens, _ = gen.decode_batch(model, tokenizer, PROMPTS, args)
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) > 1  # the batch is padded
    for prompt, row in zip(PROMPTS, tokens.tolist()):
        ids = tokenizer(prompt)["input_ids"]
        end = row.index(0) + 1 if 0 in row else len(row)
        assert_greedy(model, torch.tensor([ids + row[:end]]), len(ids), penalty=1.8)


def test_output_streams_token_by_token(ours, tokenizer, args_for, monkeypatch, capsys):
    """Each piece of text is written before the next forward call, not at the end."""
    model, _ = ours
    calls = []
    forward = model.forward

    @functools.wraps(forward)
    def counting_forward(*a, **k):
        calls.append(1)
        return forward(*a, **k)

    monkeypatch.setattr(model, "forward", counting_forward)
    monkeypatch.setattr(gen, "load", lambda *a: (model, tokenizer))

    class Recorder(io.StringIO):
        writes = []

        def write(self, s):
            self.writes.append((len(calls), s))
            return super().write(s)

    out = Recorder()
    args = args_for("--temperature", 0, "--max-new-tokens", 30)
    setup_logging()  # timings go to the log on stderr, as in the CLI
    texts = gen.run(args, [PROMPTS[0]], out=out)
    assert out.getvalue() == PROMPTS[0] + texts[0] + "\n"
    pieces = [(n, s) for n, s in out.writes[1:] if s != "\n"]  # after the prompt, before the newline
    assert len(pieces) >= 10
    assert pieces[0][0] == 1  # the first token was written right after the prefill
    assert [n for n, _ in pieces] == sorted({n for n, _ in pieces})  # one write per forward call, in order
    assert "".join(s for _, s in pieces) == texts[0]
    assert re.search(r"^\[generate\] total: \d+ tokens in [\d.]+ s = [\d.]+ tokens/s", capsys.readouterr().err, re.M)


def test_seeded_sampling_is_reproducible_and_outputs_are_labelled(ours, tokenizer, args_for, monkeypatch):
    model, _ = ours
    monkeypatch.setattr(gen, "load", lambda *a: (model, tokenizer))
    args = args_for("--temperature", 1.0, "--num-samples", 3, "--seed", 11, "--batch-size", 2, "--max-new-tokens", 12)
    outs = []
    for _ in range(2):
        out = io.StringIO()
        texts = gen.run(args, PROMPTS[:2], out=out)
        outs.append(out.getvalue())
    assert outs[0] == outs[1]
    got = blocks(outs[0])
    assert [(i, j) for i, j, _ in got] == [(i, j) for i in (1, 2) for j in (1, 2, 3)]
    assert [t for _, _, t in got] == [PROMPTS[i - 1] + texts[k] for k, (i, _, _) in enumerate(got)]
    assert len(set(texts[:3])) > 1  # samples of the same prompt differ


def test_half_precision_keeps_rtf_float32(ours, tokenizer, args_for):
    model, _ = ours
    half = HyenaRTFForCausalLM(model.config).eval()
    half.load_state_dict(model.state_dict())
    cast_keeping_filters(half, torch.bfloat16)
    rtf_params = {id(p) for m in half.modules() if isinstance(m, RTF) for p in m.parameters()}
    assert rtf_params
    for name, p in half.named_parameters():
        assert p.dtype == (torch.float32 if id(p) in rtf_params else torch.bfloat16), name
    assert torch.equal(half.model.layers[0].mixer.filter.a, model.model.layers[0].mixer.filter.a)
    tokens, _ = gen.decode_batch(half, tokenizer, PROMPTS[:2], args_for("--temperature", 0, "--max-new-tokens", 8))
    assert tokens.shape[0] == 2
    assert tokens.shape[1] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given when CUDA is missing")
def test_cuda_requested_without_cuda(ours):
    with pytest.raises(gen.UsageError, match="no CUDA device"):
        gen.load(str(ours[1]), "cuda", "float32")


# ---- errors --------------------------------------------------------------------------------------
def bad_cases(ckpt: Path, tmp: Path):
    (tmp / "empty_dir").mkdir()
    (tmp / "bad_json").mkdir()
    (tmp / "bad_json" / "config.json").write_text("{not json")
    (tmp / "blank.txt").write_text("\n   \n\n")
    (tmp / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    return [
        ([tmp / "nope", "--prompt", "hi"], "checkpoint folder not found"),
        ([tmp / "empty_dir", "--prompt", "hi"], "no config.json"),
        ([tmp / "bad_json", "--prompt", "hi"], "invalid"),
        ([ckpt, "--prompt", "hi", "--temperature", "-0.5"], "--temperature must be >= 0"),
        ([ckpt, "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
        ([ckpt, "--prompt", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        ([ckpt, "--prompt", "hi", "--top-k", "-1"], "--top-k must be >= 0"),
        ([ckpt, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        ([ckpt, "--prompt", "hi", "--num-samples", "0"], "--num-samples must be >= 1"),
        ([ckpt, "--prompt", "hi", "--temperature", "warm"], "invalid float value"),
        ([ckpt, "--prompt", "hi", "--dtype", "int8"], "invalid choice"),
        ([ckpt, "--prompt", "   "], "--prompt is empty"),
        ([ckpt, "--prompt-file", tmp / "blank.txt"], "has no non-empty line"),
        ([ckpt, "--prompt-file", tmp / "missing.txt"], "prompt file not found"),
        ([ckpt], "one of the arguments --prompt --prompt-file is required"),
        ([ckpt, "--prompt", "hi", "--prompt-file", tmp / "blank.txt"], "not allowed with"),
        ([ckpt, "--prompt-file", tmp / "binary.txt"], "is not UTF-8 text"),
        ([ckpt, "--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
        ([ckpt, "--prompt", "hi", "--temperature", "inf"], "--temperature must be a finite number"),
        ([ckpt, "--prompt", "hi", "--top-p", "nan"], "--top-p must be a finite number"),
        ([ckpt, "--prompt", "hi", "--repetition-penalty", "inf"], "--repetition-penalty must be a finite number"),
        ([ckpt, "--prompt", "abc\udcff"], "--prompt is not UTF-8 text"),  # what a shell's byte 0xff becomes
        ([ckpt, "--prompt", "hi", "--seed", str(10**20)], "--seed must be in [0, 2**63)"),
        ([ckpt, "--prompt", "hi", "--seed", "-1"], "--seed must be in [0, 2**63)"),
    ]


def test_a_prompt_file_holds_one_prompt_per_line_feed(ours, tmp_path):
    """Lines end at a line feed (CRLF too) and nowhere else: str.splitlines() also split at form
    feed, U+2028 and other characters that text and source code hold, making one prompt several.
    A UTF-8 byte-order mark is not part of the first prompt."""
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffimport os\r\na = 'x\u2028y'\nb = 1\x0cc = 2\n\n  \nlast".encode())
    _, prompts = gen.parse_args([str(ours[1]), "--prompt-file", str(path)])
    assert prompts == ["import os", "a = 'x\u2028y'", "b = 1\x0cc = 2", "last"]


@pytest.mark.slow  # a command's exit status: the same under every transformers release
def test_a_reader_that_goes_away_ends_the_command_quietly(ours, env):
    """`generate.py ... | head -c 20`: the pipe closes while tokens still stream; that was a
    BrokenPipeError traceback. Now no output on stderr but the timings, exit status 141 (as a
    shell reports a process ended by SIGPIPE)."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(ours[1]), "--prompt", "hi", "--max-new-tokens", "400", "--temperature", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout.read(2) == b"hi"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=240) == 141, err
    assert "Traceback" not in err and "Error" not in err, err


def test_bad_arguments_give_one_line_and_exit_2(ours, tmp_path, capsys, monkeypatch):
    """Every case through main() in this process (a subprocess each would cost an import of torch
    and transformers), and one through the real command line for the exit status."""
    monkeypatch.setattr(gen, "load", lambda *a: pytest.fail("a bad argument must fail before loading"))
    for argv, message in bad_cases(ours[1], tmp_path):
        assert gen.main([str(a) for a in argv]) == 2, argv
        out, err = capsys.readouterr()
        assert err.startswith("generate.py: error: "), (argv, err)
        assert err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
        assert out == ""


@pytest.mark.slow  # a command's exit status: the same under every transformers release
def test_bad_argument_exit_status_from_the_command_line(ours, env):
    proc = cli(env, ours[1], "--prompt", "hi", "--top-p", "0", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "generate.py: error: --top-p must be in (0, 1], got 0.0\n"
    assert proc.stdout == ""


@pytest.mark.slow  # a command's exit status: the same under every transformers release
def test_unloadable_checkpoint_gives_one_line_and_exit_2(ours, env, tmp_path):
    """A checkpoint folder that fails at load time (weights missing) still gives one line."""
    broken = tmp_path / "broken"
    shutil.copytree(ours[1], broken)
    (broken / "model.safetensors").unlink()
    proc = cli(env, broken, "--prompt", "hi")
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr
    assert "\n" not in err, err
    assert err.startswith(f"generate.py: error: could not load the model from {broken}"), err
    assert "model.safetensors" in err  # says what is missing
    assert proc.stdout == ""


@pytest.mark.parametrize("damage", ["filter weights removed", "n_layer lowered", "n_layer raised", "shape changed"])
def test_weights_that_do_not_match_the_config_are_refused_naming_them(ours, tmp_path, capsys, damage):
    """transformers only warns when a folder lacks weights its model has (they keep whatever memory
    was allocated: NaN or 1e28, found by hand giving perplexity 39,280 and exit 0) or has weights
    the model does not use (config.json's n_layer lowered: half the model ran, silently). The CLIs'
    loader (hf/loading.py, shared by generate.py, evaluate_lm.py and distill.py) refuses both, and
    a weight of another shape, in one line naming the keys."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged"
    shutil.copytree(ours[1], folder)
    config, weights = folder / "config.json", folder / "model.safetensors"
    state = load_file(weights)
    settings = json.loads(config.read_text())
    if damage == "filter weights removed":
        for name in ("a", "b", "h0"):
            del state[f"model.layers.2.mixer.filter.{name}"]
        expect = "has no weights for model.layers.2.mixer.filter.a, model.layers.2.mixer.filter.b, "
    elif damage == "n_layer lowered":
        settings["n_layer"] = 2
        expect = "has weights the model does not use: model.layers.2."
    elif damage == "n_layer raised":
        settings["n_layer"] = 4
        expect = "has no weights for model.layers.3."
    else:
        state["model.layers.0.mixer.filter.h0"] = torch.zeros(3)
        expect = "has weights of the wrong shape for model.layers.0.mixer.filter.h0"
    save_file(state, weights, metadata={"format": "pt"})
    config.write_text(json.dumps(settings))
    gen = load_script("generate.py")
    assert gen.main([str(folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith(f"generate.py: error: {folder} {expect}"), err


@pytest.mark.parametrize("damage", ["no tokenizer.json", "d_model a string", "state_size a fraction"])
def test_a_folder_without_a_tokenizer_or_with_a_mistyped_config_says_what_is_wrong(ours, tmp_path, capsys, damage):
    """A missing tokenizer.json read as "install sentencepiece or tiktoken"; "d_model": "128" in
    config.json as a failed tensor allocation naming no key."""
    folder = tmp_path / "damaged"
    shutil.copytree(ours[1], folder)
    settings = json.loads((folder / "config.json").read_text())
    if damage == "no tokenizer.json":
        (folder / "tokenizer.json").unlink()
        expect = f"{folder} has no tokenizer: no tokenizer.json"
    elif damage == "d_model a string":
        settings["d_model"] = str(settings["d_model"])
        expect = f"d_model must be an integer, got '{settings['d_model']}'"
    else:
        settings["state_size"] += 0.5
        expect = f"state_size must be an integer, got {settings['state_size']}"
    (folder / "config.json").write_text(json.dumps(settings))
    assert load_script("generate.py").main([str(folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expect in err, err


def test_a_tokenizer_larger_than_the_model_is_one_error_line(tokenizer_file, tmp_path, capsys):
    """A checkpoint whose tokenizer has more tokens than its model was an IndexError traceback."""
    model = HyenaRTFForCausalLM(tiny_config(vocab_size=40)).eval()
    ckpt = tmp_path / "ckpt"  # by hand: save_hf_checkpoint refuses to pair them
    model.save_pretrained(ckpt)
    shutil.copy(tokenizer_file, ckpt / "tokenizer.json")
    capsys.readouterr()  # the saving's own progress bar
    assert gen.main([str(ckpt), "--prompt", "the quick brown fox jumps", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not belong to its model" in err[-1], err


def test_a_prompt_past_a_learned_position_table_is_one_error_line_before_decoding(tokenizer, env, tmp_path, capsys):
    """GPT-2 looks positions up in a table of n_positions rows: prompt + --max-new-tokens past it was
    an IndexError traceback after part of the text had been streamed. Rotary GPT-NeoX has no
    table, so the same lengths decode."""
    folders = {}
    for kind in ("gpt2", "gpt_neox"):
        model = other_model(kind, len(tokenizer))
        model.config.update({"n_positions" if kind == "gpt2" else "max_position_embeddings": 16})
        model = type(model)(model.config).eval()  # the position table (GPT-2's wpe) sized by the config
        folders[kind] = tmp_path / kind
        model.save_pretrained(folders[kind])
        tokenizer.save_pretrained(folders[kind])
    prompt = "the cat sat on the mat"
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert n_prompt < 16
    too_many = 17 - n_prompt
    proc = cli(env, folders["gpt2"], "--prompt", prompt, "--temperature", 0, "--max-new-tokens", too_many)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""  # refused before the prompt is echoed and any token streamed
    assert proc.stderr == (
        f"generate.py: error: the prompt of {n_prompt} tokens + --max-new-tokens {too_many} exceeds the 16 "
        f"positions of the model (n_positions in {folders['gpt2'] / 'config.json'}: learned absolute positions); "
        "shorten the prompt or lower --max-new-tokens\n"
    )
    (tmp_path / "prompts.txt").write_text(f"a\n{prompt}\n")
    capsys.readouterr()  # the saving's own output
    prompt_file = ["--prompt-file", str(tmp_path / "prompts.txt")]
    assert gen.main([str(folders["gpt2"]), *prompt_file, "--max-new-tokens", "40"]) == 2
    err = capsys.readouterr().err
    assert f"error: prompt 2 of {n_prompt} tokens + --max-new-tokens 40 exceeds the 16" in err and err.count("\n") == 1
    fits = ["--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(16 - n_prompt)]
    assert gen.main([str(folders["gpt2"]), *fits]) == 0  # exactly fills the table
    assert gen.main([str(folders["gpt_neox"]), *fits[:-1], "40"]) == 0  # rotary: past 16 is fine
