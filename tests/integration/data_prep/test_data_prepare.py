"""prepare(): round trip, bad input policy, dtype choice, determinism, up-to-date detection."""

import json

import numpy as np
import pytest
import zstandard
from support.data_fixtures import BAD, corpus, jsonl
from tokenizers import Tokenizer, models, pre_tokenizers

from data_prep.indexed import IndexedDataset
from data_prep.prepare import prepare
from data_prep.readers import DocumentError, SourceError
from data_prep.tokenizer import TokenizerError

GOOD = [
    "Hello world.\nA second line.",
    "Ünïcödé: café, naïve, 東京, emoji 🙂, tabs\tand  spaces",
    "literal <|endoftext|> inside a document",
    "   leading spaces and trailing newline\n",
    "x" * 3000,
    "def f(x):\n    return x + 1\n",
]


def _all_docs(out):
    """Every written document as a token list, over both splits."""
    docs = []
    for split in ("train", "val"):
        ds = IndexedDataset(out / split)
        docs.extend(ds[i].tolist() for i in range(len(ds)))
    return docs


def test_round_trip_with_trained_bpe(tmp_path):
    docs = [{"text": t} for t in GOOD] + corpus(60)
    inp = jsonl(tmp_path / "c.jsonl.zst", docs, zst=True)
    m = prepare([inp], tmp_path / "out", vocab_size=400, workers=1, val_fraction=0.2, verbose=False)
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    eos = m["tokenizer"]["eos_id"]
    assert m["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert eos == 0
    assert m["dtype"] == "uint16"
    assert m["documents"]["written"] == len(docs)
    assert m["splits"]["val"]["documents"] > 0
    assert m["splits"]["train"]["documents"] > 0
    decoded = []
    for ids in _all_docs(tmp_path / "out"):
        assert ids[-1] == eos
        assert eos not in ids[:-1]  # the literal "<|endoftext|>" is plain text
        decoded.append(tok.decode(ids[:-1], skip_special_tokens=False))
    assert sorted(decoded) == sorted(d["text"] for d in docs)
    total = sum(len(x) for x in _all_docs(tmp_path / "out"))
    assert m["tokens"] == total == m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    assert len(m["sources"][0]["sha256"]) == 64
    assert m["sources"][0]["documents"] == len(docs)


def test_bad_documents_are_skipped_and_counted(tmp_path):
    lines = (
        [{"text": "good one"}] + list(BAD.values()) + [b'{"text": "lone \\ud800 surrogate"}\n', {"text": "good two"}]
    )
    inp = jsonl(tmp_path / "bad.jsonl", lines)
    m = prepare([inp], tmp_path / "out", vocab_size=300, workers=1, val_fraction=0.0, verbose=False)
    expect = {k: 1 for k in BAD}
    expect["invalid_utf8"] = 2
    assert m["documents"]["skipped"] == expect
    assert m["documents"]["written"] == 2
    assert m["sources"][0]["skipped"] == 7


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_document_fails_with_file_and_line(tmp_path, reason):
    inp = jsonl(tmp_path / "bad.jsonl", [{"text": "good"}, BAD[reason], {"text": "good"}])
    with pytest.raises(DocumentError, match=rf"bad\.jsonl:2: .*reason {reason}"):
        prepare([inp], tmp_path / "out", tokenizer=None, vocab_size=300, workers=1, on_error="fail", verbose=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unreadable_files_fail_by_default_or_are_recorded(tmp_path):
    jsonl(tmp_path / "a.jsonl.zst", corpus(20), zst=True)
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(
        b"".join(json.dumps(d).encode() + b"\n" for d in corpus(2000, seed=1))
    )
    (tmp_path / "b.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SourceError, match="b.jsonl.zst:.*truncated zstd"):
        prepare([str(tmp_path / "*.jsonl.zst")], tmp_path / "out", vocab_size=300, workers=1, verbose=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.partial"))
    m = prepare(
        [str(tmp_path / "*.jsonl.zst")],
        tmp_path / "out",
        vocab_size=300,
        workers=1,
        on_file_error="skip",
        verbose=False,
    )
    a, b = m["sources"]
    assert a["path"] == str((tmp_path / "a.jsonl.zst").resolve())
    assert a["error"] is None
    assert "truncated zstd" in b["error"]
    assert b["read"] == "partial (unreadable)"
    assert m["files_with_errors"] == 1
    assert 0 < b["documents"] < 2000  # lines before the cut kept
    assert m["documents"]["written"] == 20 + b["documents"]


def _wordlevel_tokenizer(path, n):
    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    vocab.update({f"w{i}": i + 2 for i in range(n - 2)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return str(path)


def test_vocabulary_must_fit_the_token_dtype(tmp_path):
    tok = _wordlevel_tokenizer(tmp_path / "big.json", 70000)
    inp = jsonl(tmp_path / "c.jsonl", [{"text": "w1 w69997 w65536 nope"}, {"text": "w3"}])
    with pytest.raises(TokenizerError, match="70000 tokens does not fit uint16"):
        prepare([inp], tmp_path / "o16", tokenizer=tok, dtype="uint16", workers=1, verbose=False)
    m = prepare([inp], tmp_path / "o32", tokenizer=tok, workers=1, val_fraction=0.0, verbose=False)
    assert m["dtype"] == "uint32"
    ds = IndexedDataset(tmp_path / "o32" / "train")
    assert ds.dtype == np.uint32
    assert ds[0].tolist() == [3, 69999, 65538, 1, 0]


def test_determinism_across_runs_and_worker_counts(tmp_path):
    inp = [jsonl(tmp_path / "a.jsonl.zst", corpus(300), zst=True), jsonl(tmp_path / "b.jsonl", corpus(200, seed=2))]
    kw = dict(vocab_size=500, val_fraction=0.1, verbose=False, chunk_bytes=4096)
    prepare(inp, tmp_path / "w1", workers=1, **kw)
    prepare(inp, tmp_path / "w2", workers=2, **kw)
    names = ["manifest.json", "tokenizer.json", "train.bin", "train.idx", "val.bin", "val.idx"]
    for n in names:
        assert (tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes(), n
    prepare(inp, tmp_path / "w1", workers=2, force=True, **kw)  # a full rebuild in place
    for n in names:
        assert (tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes(), n
    other = prepare(inp, tmp_path / "s2", workers=1, seed=99, **kw)  # the seed moves the split
    assert (
        other["splits"]["val"]["bin_sha256"]
        != json.loads((tmp_path / "w1" / "manifest.json").read_text())["splits"]["val"]["bin_sha256"]
    )


def test_up_to_date_detection_and_rebuild(tmp_path, capsys):
    inp = jsonl(tmp_path / "a.jsonl", corpus(100))
    kw = dict(vocab_size=400, workers=1, verbose=True)
    m1 = prepare([inp], tmp_path / "out", **kw)
    capsys.readouterr()
    mtime = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    assert prepare([inp], tmp_path / "out", **kw) == m1
    assert "up to date" in capsys.readouterr().err
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == mtime
    # other settings: rebuilt
    m2 = prepare([inp], tmp_path / "out", **{**kw, "vocab_size": 350})
    assert m2["tokenizer"]["vocab_size"] <= 350
    assert "up to date" not in capsys.readouterr().err
    # an incomplete directory (shard missing) is rebuilt, and comes back identical
    (tmp_path / "out" / "val.idx").unlink()
    assert prepare([inp], tmp_path / "out", **{**kw, "vocab_size": 350}) == m2
    # a changed input is noticed
    jsonl(tmp_path / "a.jsonl", corpus(101))
    m3 = prepare([inp], tmp_path / "out", **{**kw, "vocab_size": 350})
    assert m3["documents"]["records"] == 101


def test_pile_set_filter_caps_and_text_inputs(tmp_path):
    docs = corpus(200)
    inp = jsonl(tmp_path / "a.jsonl", docs)
    m = prepare([inp], tmp_path / "f", vocab_size=300, workers=1, pile_sets=["Github"], verbose=False)
    n_gh = sum(d["meta"]["pile_set_name"] == "Github" for d in docs)
    assert m["documents"]["written"] == n_gh
    assert m["documents"]["filtered_by_pile_set"] == 200 - n_gh
    m = prepare([inp], tmp_path / "c", vocab_size=300, workers=1, max_docs=50, verbose=False)
    assert m["documents"]["records"] == 50
    assert m["sources"][0]["read"].startswith("partial")
    (tmp_path / "t.txt").write_text("\n\n".join(f"paragraph {i} " * 40 for i in range(60)))
    m = prepare(
        [str(tmp_path / "t.txt")],
        tmp_path / "t",
        vocab_size=300,
        workers=1,
        text_chunk_bytes=1000,
        val_fraction=0.01,
        verbose=False,
    )
    # a single small text file still gets a validation document
    assert m["splits"]["val"]["documents"] >= 1
    assert m["splits"]["train"]["documents"] > 10


def test_default_corpus_prepare_small(tmp_path):
    m = prepare(None, tmp_path / "d", vocab_size=512, workers=2, max_bytes=400_000, verbose=False)
    assert m["corpus"]["name"] == "python-stdlib"
    assert m["settings"]["inputs"] == "default"
    assert m["splits"]["train"]["tokens"] > 50_000
    assert m["sources"][0]["read"] == "full"
    assert m["sources"][-1]["read"] == "no (cap)"
