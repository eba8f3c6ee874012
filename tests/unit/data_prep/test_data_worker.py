"""The tokenizing worker: its one process-global state, set by init_worker, and the named
result of a chunk (what was rejected or filtered, each split's tokens, the held-back document)."""

import pytest

from data_prep import worker
from data_prep.readers import Kind, Record
from data_prep.tokenizer import train_bpe
from data_prep.worker import Chunk, Rejected, WorkerSettings, doc_hash, init_worker, is_val, tokenize_chunk

SEED = 6  # puts 2 of the 6 TEXTS into a 40% validation split
TEXTS = ["some words", "to learn", "words", "more words to learn", "learn some", "to words"]


@pytest.fixture
def as_worker(monkeypatch):
    """This process as a worker; the module's state and the environment restored afterwards."""
    monkeypatch.setattr(worker, "_STATE", None)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    tok = train_bpe([" ".join(TEXTS) * 30], 300)

    def start(**kw):
        settings = dict(seed=SEED, val_fraction=0.0, pile_sets=None, text_key="text") | kw
        init_worker(WorkerSettings(tok.json_text, tok.eos_id, "uint16", **settings))
        return tok

    return start


def _chunk(*records):
    chunk = Chunk()
    for rec in records:
        chunk.append(rec)
    return chunk


def _ids(tok, text):
    return tok.tok.encode(text, add_special_tokens=False).ids


def test_a_chunk_needs_the_worker_state(monkeypatch):
    monkeypatch.setattr(worker, "_STATE", None)
    with pytest.raises(RuntimeError, match="init_worker has not run"):
        tokenize_chunk(Chunk())


def test_rejected_filtered_and_written_documents(as_worker):
    tok = as_worker(pile_sets=("A",))
    eos = tok.eos_id
    chunk = _chunk(
        Record(0, 1, Kind.JSON_LINE, b'{"text": "some words", "meta": {"pile_set_name": "A"}}', None),
        Record(0, 2, Kind.JSON_LINE, b'{"text": 5}', None),
        Record(1, 1, Kind.TEXT, b"to learn", "B"),
        Record(1, 2, Kind.TEXT, b"words", "A"),
    )
    assert chunk.sources == [0, 0, 1, 1]
    assert chunk.lines == [1, 2, 1, 2]
    res = tokenize_chunk(chunk)
    assert res.rejected == [Rejected(1, "non_string_text", "'text' is a int, not a string")]
    assert res.filtered == [2]
    first, second = _ids(tok, "some words"), _ids(tok, "words")
    assert res.train.tokens.tolist() == first + [eos] + second + [eos]
    assert res.train.lengths.tolist() == [len(first) + 1, len(second) + 1]
    assert res.train.text_bytes == len("some words") + len("words")
    assert res.val.lengths.tolist() == []
    assert res.held is None  # no validation split: nothing to hold back for it


def test_the_train_document_of_smallest_hash_is_held_back(as_worker):
    tok = as_worker(val_fraction=0.4)
    res = tokenize_chunk(_chunk(*(Record(0, i + 1, Kind.TEXT, t.encode(), None) for i, t in enumerate(TEXTS))))
    hashes = {t: doc_hash(t.encode(), SEED) for t in TEXTS}
    train = [t for t in TEXTS if not is_val(hashes[t], 0.4)]
    assert len(train) == 4
    held = min(train, key=hashes.get)
    assert res.held.hash == hashes[held]
    assert res.held.tokens.tolist() == _ids(tok, held) + [tok.eos_id]
    assert res.held.text_bytes == len(held)
    in_val = [t for t in TEXTS if is_val(hashes[t], 0.4)]
    assert res.val.lengths.tolist() == [len(_ids(tok, t)) + 1 for t in in_val]
    assert res.train.lengths.tolist() == [len(_ids(tok, t)) + 1 for t in train if t != held]
