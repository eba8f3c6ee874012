"""Long documents are tokenized in bounded pieces: one huge JSON document needs little memory,
and the tokens are those of the whole document, for JSON and plain text alike."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.indexed import IndexedDataset
from data_prep.prepare import prepare
from data_prep.tokenizer import piece_spans, train_bpe

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / ".." / "shared" / "data"
WORDS = [
    "the",
    "Über",
    "naïve",
    "🙂",
    "x=1;",
    "\n",
    "  ",
    "\t",
    "42",
    "e\u0301",
    "東京",
    "don't",
    "it's",
    "\n\n",
    "(a)",
    "—",
    "’s",
    "<|endoftext|>",
    "   \n ",
]


def _text(n_words, seed=0):
    return " ".join(random.Random(seed).choices(WORDS, k=n_words))


# Peak memory of a prepare() run on one document, measured in a fresh process: the tokenizer's
# memory is Rust's, which tracemalloc does not see, and ru_maxrss would include the high-water
# mark of this (forking) test process; VmHWM starts afresh at exec.
_MEASURE = """
import json, sys, tokenizers
from data_prep.prepare import prepare
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
d = sys.argv[1]
base = hwm()
prepare([d + "/big.jsonl"], d + "/out", tokenizer=d + "/tok.json", workers=1, verbose=False)
print(json.dumps([base, hwm()]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_one_huge_json_document_needs_little_memory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = [f"w{i}" for i in range(5000)]
    block = " ".join(random.Random(0).choices(vocab, k=200_000))  # ~1 MB, repeated
    text = " ".join([block] * 24)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    # A word-level tokenizer keeps the test fast; the memory at stake is the same per token.
    tok = Tokenizer(
        models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(vocab)}}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tok.json"))
    doc_mb = len(text) / 2**20
    r = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    base, peak = (kb / 1024 for kb in json.loads(r.stdout))
    # The JSON line, its decoded text and the token ids are each at most the document's size,
    # plus one batch of pieces in the tokenizer; tokenizing the whole document at once took
    # ~70 bytes per byte here (1.9 GB; ~150 and 7.7 GB for 50 MB with the GPT-NeoX tokenizer).
    assert peak - base < 6 * doc_mb + 100, f"{doc_mb:.0f} MB document: peak {peak:.0f} MB, base {base:.0f} MB"
    ds = IndexedDataset(tmp_path / "out" / "train")
    assert ds.num_documents == 1
    assert ds.num_tokens == 24 * 200_000 + 1


def _tokenizers():
    """Tokenizers of the usual families (byte-level BPE, Metaspace, whitespace, BERT)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    sample = [_text(20_000, seed=1)]

    def trained(model, pre, trainer, norm=None):
        t = Tokenizer(model)
        t.pre_tokenizer = pre
        if norm is not None:
            t.normalizer = norm
        t.train_from_iterator(sample, trainer=trainer)
        return t

    out = {"trained byte-level BPE": train_bpe(sample, 400).tok}
    for scheme in ("always", "first"):
        out[f"Metaspace BPE ({scheme})"] = trained(
            models.BPE(unk_token="[UNK]"),
            pre_tokenizers.Metaspace(prepend_scheme=scheme),
            trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False),
        )
    out["WordLevel on whitespace"] = trained(
        models.WordLevel(unk_token="[UNK]"),
        pre_tokenizers.WhitespaceSplit(),
        trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False),
    )
    out["BERT WordPiece"] = trained(
        models.WordPiece(unk_token="[UNK]"),
        pre_tokenizers.BertPreTokenizer(),
        trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False),
        normalizers.BertNormalizer(),
    )
    for name in ("20B_tokenizer.json", "gpt2_tokenizer.json"):
        if (DATA / name).is_file():
            out[name] = Tokenizer.from_file(str(DATA / name))
    return out


def test_piece_spans_cut_before_single_spaces_or_at_the_size():
    text = _text(30_000)
    for size in (50, 257, 4096):
        spans = list(piece_spans(text, size))
        assert "".join(text[a:b] for a, b in spans) == text
        assert spans[0][0] == 0
        assert all(b - a <= size for a, b in spans)
        assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))  # each piece starts where the last ended

        def cuttable(i):  # just before " " between two non-blanks
            return text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace()

        for a, b in spans[:-1]:  # the last such point of the piece's second half, else the size
            best = max((i for i in range(a + size // 2 + 1, a + size) if cuttable(i)), default=a + size)
            assert b == best, (size, a, b)
    # no single space in the second half of a piece: cut at exactly the size (documented)
    assert list(piece_spans("a" * 2500, 1000)) == [(0, 1000), (1000, 2000), (2000, 2500)]
    assert list(piece_spans("ab " * 10, 30)) == [(0, 30)]


@pytest.mark.integration  # seconds: outside the unit tier
def test_pieces_give_the_tokens_of_the_whole_text_for_common_tokenizers():
    text = _text(40_000, seed=2)
    for name, tok in _tokenizers().items():
        whole = tok.encode(text, add_special_tokens=False).ids
        for size in (257, 4096):
            cut = [i for a, b in piece_spans(text, size) for i in tok.encode(text[a:b], add_special_tokens=False).ids]
            assert cut == whole, (name, size)


def test_json_and_plain_text_documents_tokenized_in_pieces_match_whole_tokenization(tmp_path):
    text = _text(60_000, seed=3)  # ~300 KB: many pieces, still cheap to tokenize whole
    tok = train_bpe([text[:100_000]], 400)
    (tmp_path / "tok.json").write_text(tok.json_text)
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "doc.txt").write_text(text)
    tok.tok.encode_special_tokens = True  # as the writer does: "<|endoftext|>" is plain text
    expect = tok.tok.encode(text, add_special_tokens=False).ids + [tok.eos_id]
    for inp, chunk in (("doc.jsonl", 1000), ("doc.txt", 0)):  # 0: the whole file is one document
        m = prepare(
            [str(tmp_path / inp)],
            tmp_path / inp.replace(".", "_"),
            tokenizer=str(tmp_path / "tok.json"),
            workers=1,
            val_fraction=0.0,
            text_chunk_bytes=chunk,
            verbose=False,
        )
        assert m["documents"]["written"] == 1
        assert IndexedDataset(tmp_path / inp.replace(".", "_") / "train")[0].tolist() == expect, inp
