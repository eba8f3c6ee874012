"""hf/streaming.py: incremental detokenization, against the one-shot decode of the whole sequence.

The reference is `tokenizer.decode(all ids, skip_special_tokens=True)`, what generate.py prints
for a finished row. What the streamer writes (end() included) must equal it exactly, on the real
byte-level BPE tokenizers of the shared data folder (skipped with a reason when absent) and on two
tokenizers built here whose decode of a concatenation is not the concatenation of the decodes:
WordPiece with space clean-up, and SentencePiece-style (first leading space stripped, byte
fallback). Id sequences: text with emoji, CJK and combining marks, single bytes of multi-byte
characters, runs of special and whitespace tokens, and random ids.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_prep.tokenizer import hf_tokenizer
from hf.streaming import CONTEXT, Streamer

pytestmark = pytest.mark.hf  # decode() is transformers' (its clean-up rules changed across 5.x)

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"
TEXT = "héllo wörld, 日本語の文章です。 😀🎉 👨‍👩‍👧 naïve café — “quotes” e\u0301 Ω≈ç √ ok\n\tdone"


def real_tokenizer(name: str):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared real tokenizers are not on this machine)")
    return hf_tokenizer(path)


class CountingTokenizer:
    """Delegates to a tokenizer and counts the ids each decode() call is handed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.handed = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.handed += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def stream(tokenizer, ids: list[int]) -> tuple[str, list[str]]:
    """(everything written, the text written after each put, end() last)."""
    out = io.StringIO()
    streamer = Streamer(tokenizer, out)
    after = []
    for i in ids:
        streamer.put(i)
        after.append(out.getvalue())
    streamer.end()
    return out.getvalue(), after


def byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's alphabet: the printable Latin-1 bytes stand for themselves, the 68 others
    for chr(256), chr(257), ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    alphabet = {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}
    assert set(alphabet.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return alphabet


def byte_tokens(tokenizer, text: str) -> list[int]:
    """The ids of the single-byte tokens of text's UTF-8 bytes: every multi-byte character split
    over several tokens."""
    alphabet = byte_alphabet()
    return tokenizer.convert_tokens_to_ids([alphabet[b] for b in text.encode()])


def sequences(tokenizer, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    specials = sorted(tokenizer.all_special_ids)
    words = tokenizer(TEXT)["input_ids"]
    spaces = tokenizer("a          b    \n\n  c")["input_ids"]
    out = [words, byte_tokens(tokenizer, TEXT), spaces * 5]
    out.append([t for w in words for t in (w, *rng.choices(specials, k=rng.randrange(3)))])  # specials in between
    out += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 200))] for _ in range(40)]
    mixed = words + byte_tokens(tokenizer, TEXT)
    out += [rng.sample(mixed, k=min(len(mixed), 60)) for _ in range(40)]  # shuffled bytes and pieces
    return out


@pytest.mark.parametrize("name", ["gpt2_tokenizer.json", "20B_tokenizer.json"])
def test_real_tokenizers_stream_exactly_the_full_decode(name):
    tokenizer = real_tokenizer(name)
    for ids in sequences(tokenizer):
        written, _ = stream(tokenizer, ids)
        assert written == tokenizer.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("name", ["gpt2_tokenizer.json", "20B_tokenizer.json"])
def test_text_is_written_as_soon_as_it_is_complete(name):
    """After each token, everything decodable so far is out, except an incomplete character: the
    text of the tokens so far, less at most its trailing U+FFFD (which end() then resolves)."""
    tokenizer = real_tokenizer(name)
    ids = tokenizer(TEXT)["input_ids"] + byte_tokens(tokenizer, TEXT)
    _, after = stream(tokenizer, ids)
    for n, written in enumerate(after, 1):
        so_far = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert written == so_far.rstrip("\ufffd"), (n, written, so_far)


@pytest.mark.parametrize("name", ["gpt2_tokenizer.json", "20B_tokenizer.json"])
def test_decode_work_per_token_does_not_grow_with_the_length(name):
    """The ids handed to tokenizer.decode per put() (the work): the same bound over the last 1000
    tokens of a 3000-token sequence as over the first 1000, and at most the window (2 CONTEXT + 1)
    plus the CONTEXT of a window move; the whole-text re-decode it replaces hands over n ids at the
    n-th token."""
    tokenizer = real_tokenizer(name)
    rng = random.Random(1)
    for ids in ([rng.randrange(len(tokenizer)) for _ in range(3000)], (tokenizer(TEXT * 60)["input_ids"])[:3000]):
        counting, handed = CountingTokenizer(tokenizer), []
        streamer = Streamer(counting, io.StringIO())
        for i in ids:
            before = counting.handed
            streamer.put(i)
            handed.append(counting.handed - before)
        assert max(handed[-1000:]) <= 3 * CONTEXT + 1
        assert max(handed[-1000:]) <= max(handed[:1000])


def wordpiece_with_cleanup() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer whose decode joins tokens with spaces, glues "##" pieces, and then
    removes spaces before punctuation and contractions, both in its decoder (cleanup=True) and in
    transformers (clean_up_tokenization_spaces=True): " n ' t" -> "n't" takes two chained rules."""
    words = ["[UNK]", "[SEP]", "do", "not", "n", "'", "t", ".", ",", "?", "!", "s", "m", "ve", "re", "a", "x"]
    words += ["##b", "##", "##'", "##s", "##t"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=True, unk_token="[UNK]", sep_token="[SEP]"
    )


def sentencepiece_with_byte_fallback() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer (Llama's decoder): "▁" is a space, the first leading space
    of the text is stripped, <0xNN> pieces are bytes, and a run of them that is not valid UTF-8
    renders as one U+FFFD per byte (so a later byte can turn characters back into U+FFFD)."""
    pieces = ["<unk>", "<s>", "▁", "▁hi", "hi", "▁x", "x", "▁▁", "."] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.mark.parametrize("build", [wordpiece_with_cleanup, sentencepiece_with_byte_fallback])
def test_tokenizers_whose_decode_is_not_concatenative_stream_exactly(build):
    tokenizer = build()
    rng = random.Random(2)
    first_bytes = tokenizer.convert_tokens_to_ids(["<0xF0>"]) if "<0xF0>" in tokenizer.get_vocab() else []
    utf8 = [f"<0x{b:02X}>" for b in TEXT.encode()]
    byte_ids = tokenizer.convert_tokens_to_ids(utf8) if first_bytes else []
    for trial in range(1500):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        if byte_ids and trial % 2:  # valid characters split into bytes, some pieces and specials mixed in
            ids = [b if rng.random() < 0.8 else rng.randrange(9) for b in byte_ids][: rng.randrange(1, 80)]
        written, _ = stream(tokenizer, ids)
        assert written == tokenizer.decode(ids, skip_special_tokens=True), tokenizer.convert_ids_to_tokens(ids)


def test_a_streamer_starts_afresh_after_end():
    tokenizer = sentencepiece_with_byte_fallback()
    out = io.StringIO()
    streamer = Streamer(tokenizer, out)
    ids = tokenizer.convert_tokens_to_ids(["▁hi", "<0xE6>", "<0x97>", "<0xA5>", "▁x"])
    for _ in range(2):
        for i in ids:
            streamer.put(i)
        streamer.end()
    assert out.getvalue() == 2 * tokenizer.decode(ids)
