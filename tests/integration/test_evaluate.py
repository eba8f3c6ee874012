"""Tests for evaluate_lm.py: numbers against naive references, window semantics, recurrent mode, LAMBADA,
token shards, CLI, lm-evaluation-harness agreement.

Every model-dependent test takes the `model_dir` fixture, parametrized over MODEL_BUILDERS (a tiny
random Hugging Face GPT-NeoX and our exported Hyena-RTF); another model is one more entry: a
function that saves a tiny model + tokenizer into the folder it is given.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.helpers import load_script, run_child
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

pytestmark = pytest.mark.hf  # CI runs these under every supported transformers release

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
EOT = "<|endoftext|>"

ev = load_script("evaluate_lm.py")


# ----------------------------------------------------------------------------- data and models

WORDS = (
    "the model reads long text and scores every token once café naïve über 日本語 😀 "
    "rational transfer function hyena filter state decode prefill window stride byte"
).split()


def make_documents(seed=0, lengths=(10, 30, 50)):
    """A few documents of pseudo-text with multi-byte characters (bytes != characters)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=n)) + "." for n in lengths]


def tiny_tokenizer():
    """Byte-level BPE trained on the spot (every byte representable, so any text encodes)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(make_documents(seed=1, lengths=(300,) * 20), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT)


def save_gpt_neox(path, tokenizer, seed=0, **sizes):
    """Random GPT-NeoX; a large init (std 0.3) makes predictions depend strongly on the context,
    so a token scored with the wrong history or skipped changes the numbers visibly."""
    config = GPTNeoXConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 512,
            "initializer_range": 0.3,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **sizes,
        }
    )
    torch.manual_seed(seed)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_tiny_gpt_neox(path):
    save_gpt_neox(path, tiny_tokenizer())


def build_tiny_hyena_rtf(path):
    """Our model, exported the way train.py exports it; l_max 64 < the longest document, so
    scoring also runs past the trained length (the recurrence must still match the FFT form)."""
    from export.folder import save_hf_checkpoint
    from models.configuration_hyena_rtf import HyenaRTFConfig
    from models.modeling_hyena_rtf import HyenaRTFForCausalLM

    tokenizer_file = path / "source_tokenizer.json"
    tiny_tokenizer().backend_tokenizer.save(str(tokenizer_file))
    torch.manual_seed(0)
    config = HyenaRTFConfig(
        vocab_size=320, d_model=32, n_layer=3, l_max=64, state_size=4, n_head=4, attn_layers=[1], initializer_range=0.2
    )
    save_hf_checkpoint(HyenaRTFForCausalLM(config).eval(), tokenizer_file, path / "ckpt")
    for item in (path / "ckpt").iterdir():  # the fixture's folder is the checkpoint itself
        item.rename(path / item.name)
    tokenizer_file.unlink()
    (path / "ckpt").rmdir()


MODEL_BUILDERS = {"gpt_neox": build_tiny_gpt_neox, "hyena_rtf": build_tiny_hyena_rtf}

# Tiny models gain nothing from threads, and on a busy 2-core machine spinning threads make the
# suite several times slower.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", params=sorted(MODEL_BUILDERS))
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    MODEL_BUILDERS[request.param](path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same weights in float64, and the tokenizer, for naive references."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float64).eval()
    tokenizer = ev.load_tokenizer(model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_documents()), encoding="utf-8")
    return path


def run_eval(model_dir, *flags):
    """evaluate_lm.py in process, through its argument parser."""
    return ev.evaluate(ev.build_parser().parse_args([str(model_dir), *map(str, flags)]))


@torch.inference_mode()
def naive_nll(model, tokenizer, texts, context_length, stride):
    """Reference NLL, unbatched, float64, each prediction with exactly the history the
    sliding-window definition gives it, found from a closed formula rather than window_plan:
    prediction p (target sequence[p + 1]) is scored by the first window k with k*S + C > p, whose
    inputs start at k*S. Predictions sharing a start are read from one forward over
    sequence[k*S : last p + 1] (a causal model's logits at p see inputs <= p only)."""
    total, count = 0.0, 0
    for text in texts:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        sequence = [start] + tokenizer(text, add_special_tokens=False)["input_ids"]
        by_start = {}
        for p in range(len(sequence) - 1):
            k = 0 if p < context_length else (p - context_length) // stride + 1
            by_start.setdefault(k * stride, []).append(p)
        for begin, predictions in by_start.items():
            log_probs = torch.log_softmax(model(torch.tensor([sequence[begin : predictions[-1] + 1]])).logits[0], -1)
            for p in predictions:
                total += -log_probs[p - begin, sequence[p + 1]].item()
                count += 1
    return total, count


# ----------------------------------------------------------------------------- window semantics


def test_window_plan_example():
    # 10 predictions, C 4, S 2: windows start every 2; each scores what the previous did not reach.
    assert ev.window_plan(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert ev.window_plan(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert ev.window_plan(3, 8, 5) == [(0, 3, 3)]
    assert ev.window_plan(0, 8, 5) == []


@pytest.mark.parametrize("context_length", [1, 2, 5, 16])
def test_window_plan_scores_every_prediction_once(context_length):
    for stride in range(1, context_length + 1):
        for m in range(0, 40):
            scored = []
            for begin, end, n_score in ev.window_plan(m, context_length, stride):
                assert begin % stride == 0
                assert 1 <= n_score <= end - begin <= context_length
                for p in range(end - n_score, end):
                    # history = inputs begin..p; at least C - S + 1 once past the first window
                    assert p - begin + 1 >= min(p + 1, context_length - stride + 1)
                    scored.append(p)
            assert scored == list(range(m)), (m, context_length, stride)


def test_window_plan_rejects_bad_stride():
    for context_length, stride in [(4, 5), (4, 0)]:
        with pytest.raises(ev.EvalError, match="stride"):
            ev.window_plan(10, context_length, stride)


# ----------------------------------------------------------------------------- perplexity, bits per byte


@pytest.mark.parametrize(
    "context_length, stride, n_docs", [(512, 512, 3), (16, 16, 3), (16, 5, 3), (16, 1, 2), (7, 3, 3)]
)
def test_perplexity_and_bpb_match_naive_reference(model_dir, reference, docs_jsonl, context_length, stride, n_docs):
    texts = make_documents()[:n_docs]  # stride 1 is the slow case: fewer documents
    result = run_eval(
        model_dir,
        "--data",
        docs_jsonl,
        "--context-length",
        context_length,
        "--stride",
        stride,
        "--batch-size",
        4,
        "--max-documents",
        n_docs,
    )
    (data,) = result["data"]
    nll, count = naive_nll(*reference, texts, context_length, stride)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert n_bytes > sum(len(t) for t in texts)  # the multi-byte characters are there
    assert data["documents"] == n_docs
    assert data["tokens"] == count
    assert data["bytes"] == n_bytes
    assert data["nll_nats"] == pytest.approx(nll, rel=1e-6)
    assert data["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert data["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)


def test_reference_is_sensitive_to_history(reference):
    # Guards the test above: if the model ignored its context, wrong windows would go unnoticed.
    full, _ = naive_nll(*reference, make_documents(), 512, 512)
    short, _ = naive_nll(*reference, make_documents(), 4, 4)
    assert abs(full - short) > 0.01 * full


def test_readers_raw_text_and_zst(model_dir, docs_jsonl, tmp_path):
    import zstandard

    texts = make_documents()
    raw = tmp_path / "one.raw"
    raw.write_bytes("\r\n".join(texts).encode("utf-8"))  # \r\n must be kept: bytes = file size
    zst = tmp_path / "docs.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(docs_jsonl.read_bytes()))
    result = run_eval(model_dir, "--data", raw, zst, docs_jsonl, "--context-length", 32)
    raw_result, zst_result, jsonl_result = result["data"]
    assert raw_result["documents"] == 1
    assert raw_result["bytes"] == raw.stat().st_size
    assert {k: v for k, v in zst_result.items() if k != "path"} == {
        k: v for k, v in jsonl_result.items() if k != "path"
    }
    assert result["total"]["tokens"] == sum(d["tokens"] for d in result["data"])
    assert result["total"]["nll_nats"] == pytest.approx(sum(d["nll_nats"] for d in result["data"]), rel=1e-12)


def test_caps_keep_tokens_and_bytes_consistent(reference, docs_jsonl):
    _, tokenizer = reference
    texts = make_documents()
    docs = ev.text_documents(docs_jsonl, tokenizer, max_documents=2)
    assert len(docs) == 2
    cap = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"]) + 17
    docs = ev.text_documents(docs_jsonl, tokenizer, max_tokens=cap)
    assert len(docs) == 2
    assert 0 < sum(len(d.tokens) for d in docs) <= cap
    # The cut document is a prefix of the original text whose tokens are exactly what is scored.
    kept = tokenizer.decode(docs[1].tokens.tolist())
    assert texts[1].startswith(kept)
    assert len(kept) < len(texts[1])
    assert tokenizer(kept, add_special_tokens=False)["input_ids"] == docs[1].tokens.tolist()
    assert docs[1].n_bytes == len(kept.encode("utf-8"))


# ----------------------------------------------------------------------------- recurrent mode

RECURRENT_RTOL = 1e-5


@pytest.mark.parametrize("context_length, stride", [(512, 512), (16, 5)])
def test_recurrent_equals_parallel(model_dir, docs_jsonl, context_length, stride):
    """Same windows, token by token through the cache vs one forward, float32. Both paths do the
    same arithmetic in different orders (one query against cached keys vs the full causal
    product), so they differ only by float32 rounding (~1e-7 relative per operation); on the
    summed NLL we see ~5e-10 relative for GPT-NeoX and ~1e-8 for Hyena-RTF (FFT convolution vs
    state recurrence, a different algorithm). The tolerance, 1e-5, leaves room for longer and
    deeper models, and is tight enough for any real mistake: one lost or extra token of history
    moves the sum by more than 1e-3 relative here."""
    # A large batch: recurrent mode steps all windows of a batch together, one token at a time.
    flags = ["--data", docs_jsonl, "--context-length", context_length, "--stride", stride, "--batch-size", 64]
    parallel = run_eval(model_dir, *flags)["data"][0]
    recurrent = run_eval(model_dir, *flags, "--mode", "recurrent")["data"][0]
    assert recurrent["tokens"] == parallel["tokens"]
    assert recurrent["nll_nats"] == pytest.approx(parallel["nll_nats"], rel=RECURRENT_RTOL)
    assert recurrent["bits_per_byte"] == pytest.approx(parallel["bits_per_byte"], rel=RECURRENT_RTOL)


# ----------------------------------------------------------------------------- LAMBADA


@torch.inference_mode()
def naive_lambada(model, tokenizer, texts):
    nlls, hits, n_targets = [], [], 0
    for text in texts:
        context, word = text.rsplit(" ", 1)
        target = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        ids = tokenizer(context, add_special_tokens=False)["input_ids"] + target
        logits = model(torch.tensor([ids[:-1]])).logits[0, -len(target) :]
        log_probs = torch.log_softmax(logits, -1)
        nlls.append(-sum(log_probs[i, t].item() for i, t in enumerate(target)))
        hits.append(logits.argmax(-1).tolist() == target)
        n_targets += len(target)
    return {
        "accuracy": float(np.mean(hits)),
        "perplexity": math.exp(np.mean(nlls)),
        "token_perplexity": math.exp(sum(nlls) / n_targets),
        "target_tokens": n_targets,
    }


def save_successor_model(path):
    """A GPT-NeoX whose greedy prediction is known: words w0..w11 are single tokens (ids 1..12),
    the layers are switched off (output projections zeroed) and the head maps token i to i + 1,
    so after "... w3" the model says "w4" with near certainty."""
    vocab = [EOT] + [f"w{i}" for i in range(12)] + ["<unk>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, unk_token="<unk>")
    save_gpt_neox(path, tokenizer, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = GPTNeoXForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            for module in (layer.attention.dense, layer.mlp.dense_4h_to_h):
                module.weight.zero_()
                module.bias.zero_()
        model.get_input_embeddings().weight.copy_(torch.eye(len(vocab), 16))
        head = torch.zeros(len(vocab), 16)
        head[torch.arange(1, len(vocab)), torch.arange(0, len(vocab) - 1)] = 10.0
        model.get_output_embeddings().weight.copy_(head)
    model.save_pretrained(path)


def test_lambada_known_answer(tmp_path):
    save_successor_model(tmp_path / "model")
    lines = ["w1 w2 w3 w4", "w5 w6 w7", "w1 w2 w3 w9", "w0 w0 w0 w5", "w9 w10 w11"]
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    result = run_eval(tmp_path / "model", "--lambada", data, "--context-length", 8, "--batch-size", 2)["lambada"]
    assert result["examples"] == 5
    assert result["target_tokens"] == 5
    assert result["accuracy"] == pytest.approx(3 / 5)  # the 1st, 2nd and 5th lines continue the sequence
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float64).eval()
    expected = naive_lambada(model, ev.load_tokenizer(tmp_path / "model"), lines)
    for key in ("accuracy", "perplexity", "token_perplexity"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5)


def test_lambada_real_file_matches_naive(tmp_path):
    lambada, gpt2 = SHARED_DATA / "lambada_test.jsonl", SHARED_DATA / "gpt2_tokenizer.json"
    if not (lambada.is_file() and gpt2.is_file()):
        pytest.skip(f"needs {lambada} and {gpt2} (the shared real-data folder)")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(gpt2), bos_token=EOT, eos_token=EOT)
    save_gpt_neox(tmp_path, tokenizer)
    n = 6
    texts = [json.loads(line)["text"] for line in lambada.read_text(encoding="utf-8").splitlines()[:n]]
    result = run_eval(tmp_path, "--lambada", lambada, "--max-documents", n, "--context-length", 256)["lambada"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    expected = naive_lambada(model, tokenizer, texts)
    assert result["examples"] == n
    assert result["target_tokens"] == expected["target_tokens"]
    assert result["accuracy"] == expected["accuracy"]
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert result["token_perplexity"] == pytest.approx(expected["token_perplexity"], rel=1e-5)


# ----------------------------------------------------------------------------- token shards


def write_megatron_shard(folder, documents, tokenizer_json):
    """val.bin / val.idx in the Megatron MMapIndexedDataset layout (uint16, one sequence per
    document), with manifest.json and tokenizer.json beside them, as data_prep writes them."""
    tokens = np.concatenate(documents).astype(np.uint16)
    (folder / "val.bin").write_bytes(tokens.tobytes())
    sizes = np.array([len(d) for d in documents], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64) * 2]).astype(np.int64)
    header = b"MMIDIDX\x00\x00" + np.uint64(1).tobytes() + np.uint8(8).tobytes()  # 8 = uint16
    counts = np.uint64(len(documents)).tobytes() + np.uint64(len(documents) + 1).tobytes()
    doc_idx = np.arange(len(documents) + 1, dtype=np.int64)
    (folder / "val.idx").write_bytes(header + counts + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "manifest.json").write_text(json.dumps({"documents": len(documents)}))


def shard_case(model_dir, tmp_path):
    """Documents as data_prep stores them (tokens + end-of-document token) and the expected
    numbers: the EOD token is scored, and counts 0 bytes."""
    tokenizer = ev.load_tokenizer(model_dir)
    texts = make_documents(seed=3)
    documents = [
        np.array(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for t in texts
    ]
    write_megatron_shard(tmp_path, documents, tokenizer.backend_tokenizer.to_str())
    return texts, documents


def check_shard_result(result, texts, documents, model, start):
    (data,) = result["data"]
    assert data["documents"] == len(documents)
    assert data["tokens"] == sum(len(d) for d in documents)
    assert data["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    # Scoring the shard = scoring each text followed by its EOD token, after the start token.
    nll = 0.0
    with torch.inference_mode():
        for d in documents:
            sequence = torch.tensor([[start, *d]])
            nll += torch.nn.functional.cross_entropy(
                model(sequence[:, :-1]).logits[0], sequence[0, 1:], reduction="sum"
            ).item()
    assert data["nll_nats"] == pytest.approx(nll, rel=1e-6)


def install_stand_in_reader(monkeypatch, sequences, doc_idx=None):
    """Stands in for data_prep.indexed.MMapIndexedDataset with exactly the interface evaluate_lm.py
    uses; returns the list of path prefixes it was opened with."""
    opened = []

    class StandInDataset:
        def __init__(self, prefix):
            opened.append(prefix)
            self.doc_idx = np.arange(len(sequences) + 1) if doc_idx is None else doc_idx

        def __len__(self):
            return len(sequences)

        def __getitem__(self, i):
            return sequences[i]

    monkeypatch.setattr(ev, "MMapIndexedDataset", StandInDataset)
    return opened


def test_shard_input_through_reader_contract(model_dir, reference, tmp_path, monkeypatch):
    """evaluate_lm.py's side of the data_prep contract; each document is served as two sequences
    (exercises the doc_idx grouping)."""
    texts, documents = shard_case(model_dir, tmp_path)
    sequences = [part for d in documents for part in (d[: len(d) // 2], d[len(d) // 2 :])]
    opened = install_stand_in_reader(monkeypatch, sequences, doc_idx=np.arange(0, len(sequences) + 1, 2))
    result = run_eval(model_dir, "--data", tmp_path, "--context-length", 512)
    assert opened == [str(tmp_path / "val")]
    check_shard_result(result, texts, documents, reference[0], result["settings"]["start_token_id"])


def test_shard_max_tokens_cut_keeps_bytes_exact(model_dir, tmp_path, monkeypatch):
    """A cap that falls inside a multi-byte character backs off to the character's start, so the
    bytes counted are exactly those of the text the kept tokens encode."""
    tokenizer = ev.load_tokenizer(model_dir)
    text = "price € 5 ж"  # characters the tiny BPE never saw: one token per byte
    doc = np.array(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    write_megatron_shard(tmp_path, [doc], tokenizer.backend_tokenizer.to_str())
    install_stand_in_reader(monkeypatch, [doc])
    backed_off = 0
    for cap in range(1, len(doc) + 1):
        (document,) = ev.shard_documents(tmp_path, max_tokens=cap)
        kept = tokenizer.decode(document.tokens.tolist(), skip_special_tokens=True)
        assert len(document.tokens) <= cap
        assert document.tokens.tolist() == doc[: len(document.tokens)].tolist()
        assert text.startswith(kept)
        assert document.n_bytes == len(kept.encode("utf-8"))
        backed_off += len(document.tokens) < cap
    assert backed_off >= 2  # € is 3 bytes and ж 2: some caps fell inside them


def test_shard_input_with_data_prep_reader(model_dir, reference, tmp_path):
    texts, documents = shard_case(model_dir, tmp_path)
    result = run_eval(model_dir, "--data", tmp_path, "--context-length", 512)
    check_shard_result(result, texts, documents, reference[0], result["settings"]["start_token_id"])


def test_shard_prepared_by_data_prep(model_dir, reference, tmp_path):
    """End to end with the real pipeline: data_prep.prepare writes the shard folder, evaluate_lm.py
    scores its val split; tokens and bytes agree with data_prep's manifest."""
    from data_prep.indexed import MMapIndexedDataset
    from data_prep.prepare import prepare

    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_documents(seed=7, lengths=(8, 15, 25) * 6)))
    manifest = prepare(
        [str(source)],
        tmp_path / "prepared",
        tokenizer=str(model_dir / "tokenizer.json"),
        workers=1,
        val_fraction=0.3,
        verbose=False,
    )
    val = manifest["splits"]["val"]
    assert val["documents"] > 0
    result = run_eval(model_dir, "--data", tmp_path / "prepared", "--context-length", 512)
    (data,) = result["data"]
    assert (data["documents"], data["tokens"], data["bytes"]) == (val["documents"], val["tokens"], val["text_bytes"])
    dataset = MMapIndexedDataset(str(tmp_path / "prepared" / "val"))
    nll = 0.0
    with torch.inference_mode():
        for d in range(len(dataset.doc_idx) - 1):
            sequence = torch.tensor([[result["settings"]["start_token_id"], *dataset.document(d).tolist()]])
            logits = reference[0](sequence[:, :-1]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, sequence[0, 1:], reduction="sum").item()
    assert data["nll_nats"] == pytest.approx(nll, rel=1e-6)


# ----------------------------------------------------------------------------- command line


@pytest.mark.slow  # an end-to-end command: run once, under the newest transformers
def test_cli_end_to_end_writes_json(model_dir, docs_jsonl, tmp_path):
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_documents(seed=5)))
    out = tmp_path / "results" / "eval.json"
    command = [
        sys.executable,
        str(REPO / "evaluate_lm.py"),
        str(model_dir),
        "--data",
        str(docs_jsonl),
        "--lambada",
        str(lambada),
        "--context-length",
        "16",
        "--stride",
        "8",
        "--output",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=ONE_THREAD_ENV)
    assert done.returncode == 0, done.stderr
    for unwanted in ("deprecated", "[y/N]"):  # no cache-name deprecation, no custom-code prompt
        assert unwanted not in done.stderr, done.stderr
    assert "bits/byte" in done.stdout
    assert "LAMBADA 3 examples" in done.stdout
    saved = json.loads(out.read_text())
    in_process = run_eval(model_dir, *command[3:-2])
    assert saved["settings"] == in_process["settings"]
    assert saved["model"] == str(model_dir)
    for key in ("documents", "tokens", "bytes", "perplexity", "bits_per_byte"):
        assert saved["data"][0][key] == pytest.approx(in_process["data"][0][key], rel=1e-6)
    assert saved["lambada"]["accuracy"] == in_process["lambada"]["accuracy"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "MISSING.txt"], "MISSING.txt not found"),
        (["--context-length", "8", "--stride", "9", "--data", "DOCS"], "larger than --context-length"),
        (["--batch-size", "0", "--data", "DOCS"], "must be positive"),
        (["--context-length", "-3", "--data", "DOCS"], "must be positive"),
        (["--max-tokens", "x", "--data", "DOCS"], "not an integer"),
        (["--mode", "sideways", "--data", "DOCS"], "invalid choice"),
        ([], "nothing to evaluate"),
    ],
)
def test_bad_arguments_give_one_line_errors(model_dir, docs_jsonl, capsys, flags, message):
    flags = [str(docs_jsonl) if f == "DOCS" else f for f in flags]
    try:
        code = ev.main([str(model_dir), *flags])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code != 0, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err


def two_zstd_frames_cut_in_the_second() -> bytes:
    import zstandard

    frames = [
        zstandard.ZstdCompressor().compress((json.dumps({"text": t}) + "\n").encode() * 20)
        for t in ("first frame", "second frame")
    ]
    return frames[0] + frames[1][: len(frames[1]) // 2]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "fine"}\n{"text": broken\n', "bad.jsonl:2: invalid JSON"),
        ("bad.jsonl", b'{"text": "fine"}\n\n{"meta": 1}\n', "bad.jsonl:3: no 'text' field"),
        ("bad.txt", b"caf\xe9 latin-1", "bad.txt: invalid UTF-8"),
        ("cut.jsonl.zst", two_zstd_frames_cut_in_the_second(), "truncated zstd stream"),
        ("empty.txt", b"", "empty.txt: no document with a token to score"),
        ("blank.jsonl", b"\n\n", "blank.jsonl: no document with a token to score"),
        ("folder", None, "not a text or JSONL file, nor a data_prep folder"),
    ],
)
def test_bad_data_files_give_one_line_errors(model_dir, tmp_path, capsys, name, content, message):
    if content is None:
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_bytes(content)
    out = tmp_path / "results.json"
    code = ev.main([str(model_dir), "--data", str(tmp_path / name), "--context-length", "8", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # no NaN results, no half-scored file reported as done


def test_unloadable_models_give_one_line_errors(model_dir, docs_jsonl, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert ev.main([str(broken), "--data", str(docs_jsonl), "--context-length", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evaluate_lm.py: error: could not load the model from {broken}"), err
    assert "\n" not in err, err
    config = json.loads((model_dir / "config.json").read_text())
    if config["model_type"] == "hyena_rtf":
        (broken / "config.json").write_text(json.dumps({**config, "filter": "wavelet"}))
        assert ev.main([str(broken), "--data", str(docs_jsonl), "--context-length", "8"]) == 2
        err = capsys.readouterr().err.strip()
        assert "could not load the config from" in err, err
        assert "filter must be one of" in err, err
        assert "\n" not in err, err


@pytest.mark.slow  # a command's exit status: the same under every transformers release
def test_cli_missing_model_is_one_line_error(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "evaluate_lm.py"), str(tmp_path / "nope"), "--data", __file__],
        capture_output=True,
        text=True,
        timeout=60,
        env=ONE_THREAD_ENV,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"evaluate_lm.py: error: checkpoint folder not found: {tmp_path / 'nope'}"


def test_an_id_in_the_heads_padding_rows_is_refused():
    """Hyena-RTF pads its head to a multiple of 64 rows; ids vocab_size .. 63 past it have no logit
    (the logits are cut at vocab_size): refused like any foreign id (was an IndexError in the loss)."""
    from types import SimpleNamespace

    from models.configuration_hyena_rtf import HyenaRTFConfig
    from models.modeling_hyena_rtf import HyenaRTFForCausalLM

    config = HyenaRTFConfig(vocab_size=300, d_model=32, n_layer=1, l_max=64, state_size=4, n_head=4)
    model = HyenaRTFForCausalLM(config)
    assert model.get_output_embeddings().weight.shape[0] == 320  # the padding rows exist
    ok = [SimpleNamespace(tokens=np.array([5, 299]))]
    ev.check_vocabulary("x.jsonl", ok, model, config)
    with pytest.raises(ev.EvalError, match=r"x.jsonl: token ids beyond the model's vocabulary \(300\)"):
        ev.check_vocabulary("x.jsonl", [SimpleNamespace(tokens=np.array([5, 300]))], model, config)


def test_shard_with_other_vocabulary_is_refused(model_dir, tmp_path, monkeypatch):
    # Token ids the model cannot have produced: a shard made with another tokenizer.
    bad = 60000
    tokenizer = ev.load_tokenizer(model_dir)
    write_megatron_shard(tmp_path, [np.array([5, bad, 7])], tokenizer.backend_tokenizer.to_str())
    install_stand_in_reader(monkeypatch, [np.array([5, bad, 7])])
    with pytest.raises(ev.EvalError, match="beyond the model's vocabulary"):
        run_eval(model_dir, "--data", tmp_path, "--context-length", 8)


def test_shard_made_with_another_tokenizer_is_refused(model_dir, tmp_path, capsys):
    """A data_prep shard holds token ids of the tokenizer that made it. One of another, smaller
    tokenizer passes the vocabulary-range check, and was scored into a meaningless perplexity
    (exit 0): the shard's tokenizer.json must give every token the model tokenizer's id."""
    from data_prep.prepare import prepare

    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_documents(seed=7, lengths=(8, 15, 25) * 6)))
    prepare([str(source)], tmp_path / "other", vocab_size=300, workers=1, val_fraction=0.3, verbose=False)
    out = tmp_path / "results.json"
    for data in (tmp_path / "other", tmp_path / "other" / "val.bin"):  # the folder, and its shard named directly
        code = ev.main([str(model_dir), "--data", str(data), "--context-length", "8", "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"evaluate_lm.py: error: {data} was made with another tokenizer than the model's: "), err
        assert f"{tmp_path / 'other' / 'tokenizer.json'} gives " in err and f"the tokenizer of {model_dir} " in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()


@pytest.mark.parametrize("context_length, message", [(17, "--context-length 17 exceeds the 16 positions"), (16, None)])
def test_context_length_past_a_learned_position_table_is_refused(tmp_path, docs_jsonl, capsys, context_length, message):
    """GPT-2 looks positions up in a table of n_positions rows: a longer window was an IndexError
    traceback (exit 1). Models without such a table (GPT-NeoX's rotary positions, Hyena-RTF) run
    past their trained length in the other tests (--context-length 512 > Hyena-RTF's l_max 64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    code = ev.main([str(tmp_path / "gpt2"), "--data", str(docs_jsonl), "--context-length", str(context_length)])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        f"evaluate_lm.py: error: {message} of the model (n_positions in {tmp_path / 'gpt2'}/config.json: "
        "learned absolute positions); pass --context-length <= 16"
    )


# ----------------------------------------------------------------------------- lm-evaluation-harness

LM_EVAL_TASKS = """\
task: local_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{docs}"}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: bits_per_byte}}, {{metric: byte_perplexity}}]
---
task: local_lambada
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{lambada}"}}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' ' + text.split(' ')[-1]}}}}"
metric_list:
  - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""


@pytest.mark.slow  # an end-to-end command: run once, under the newest transformers
def test_lm_eval_harness_agrees(model_dir, docs_jsonl, tmp_path):
    """The model folder works as an lm-eval `hf` model, offline, on local task files, and lm-eval's
    numbers equal ours: bits per byte of documents shorter than the context (a single window, so
    both define the same history; for longer documents lm-eval's last window reaches back a full
    context, ours starts at the next stride), LAMBADA accuracy and perplexity (same convention).
    On the Hyena-RTF folder only: the scoring is the same code for every model (evaluation/scoring.py),
    so a second folder would cost half a minute of the suite and test nothing more."""
    if model_dir.name.startswith("gpt_neox"):
        pytest.skip("the harness comparison runs on the hyena_rtf folder (the scoring is model-agnostic)")
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_documents(seed=5)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for i, task in enumerate(LM_EVAL_TASKS.format(docs=docs_jsonl, lambada=lambada).split("---\n")):
        (tasks / f"task{i}.yaml").write_text(task)
    env = {**ONE_THREAD_ENV, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    # Run from the repository root, which `python -m` puts first on sys.path: no file or folder of
    # the project may shadow a package lm-eval imports (PyPI's `evaluate` among them).
    run_child(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model_dir},dtype=float32,max_length=512,trust_remote_code=True",
            "--tasks",
            "local_rolling,local_lambada",
            "--include_path",
            str(tasks),
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--output_path",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env=env,
        timeout=300,
    )
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]
    ours = run_eval(model_dir, "--data", docs_jsonl, "--lambada", lambada, "--context-length", 512)
    assert theirs["local_rolling"]["bits_per_byte,none"] == pytest.approx(ours["data"][0]["bits_per_byte"], rel=1e-5)
    assert theirs["local_lambada"]["acc,none"] == pytest.approx(ours["lambada"]["accuracy"])
    assert theirs["local_lambada"]["perplexity,none"] == pytest.approx(ours["lambada"]["perplexity"], rel=1e-5)


def test_an_output_that_cannot_be_written_is_refused_before_the_evaluation(tmp_path, monkeypatch, capsys):
    """--output naming a folder was found only after the whole evaluation ran (a traceback, exit 1):
    now one line, exit 2, and the evaluation never starts."""
    monkeypatch.setattr(ev, "evaluate", lambda args: pytest.fail("the evaluation ran"))
    (tmp_path / "results").mkdir()
    assert ev.main([str(tmp_path), "--data", str(tmp_path), "--output", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder" in err[0]


def test_output_replaces_its_own_report_and_nothing_else_without_overwrite(tmp_path, monkeypatch, capsys):
    """--output once replaced whatever file it named. A file that is not an earlier report of this
    program (its "kind" stamp) is refused before the evaluation, kept byte for byte, and replaced
    only with --overwrite; an earlier report is replaced without it."""
    results = {"kind": ev.REPORT_KIND, "data": []}
    ran = []
    monkeypatch.setattr(ev, "evaluate", lambda args: ran.append(1) or results)
    monkeypatch.setattr(ev, "format_table", lambda results: "table")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = tmp_path / "mine.json"
    for content in (b"important\n", b'{"kind": "another program"}'):
        out.write_bytes(content)
        args = [str(tmp_path / "model"), "--data", str(tmp_path / "d.txt"), "--output", str(out)]
        assert ev.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"evaluate_lm.py: error: --output {out} exists and is not an evaluate_lm.py report")
        assert "--overwrite" in err and "\n" not in err
        assert out.read_bytes() == content and not ran
    assert ev.main([*args, "--overwrite"]) == 0
    assert json.loads(out.read_text()) == results and len(ran) == 1
    assert ev.main(args) == 0  # its own report: replaced without --overwrite
    assert len(ran) == 2
    # A report from before the stamp (a rerun of scripts/main.sh finds runs/default/eval.json), known
    # by having exactly its fields, is ours too.
    fields = ("model", "model_type", "parameters", "versions", "settings", "data", "seconds")
    out.write_text(json.dumps(dict.fromkeys(fields, 0)))
    assert ev.main(args) == 0 and len(ran) == 3
    out.write_text(json.dumps(dict.fromkeys((*fields, "notes"), 0)))  # anything more: a user's file
    assert ev.main(args) == 2 and len(ran) == 3
