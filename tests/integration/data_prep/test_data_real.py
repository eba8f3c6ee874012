"""Real data: The Pile's own format (pile_sample.jsonl.zst) with the GPT-NeoX-20B tokenizer, and
the Tiny Shakespeare plain-text file. Reads ../shared/data (relative to the repository root)."""

import io
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_prep.dataset import PackedDataset, get_batch
from data_prep.indexed import IndexedDataset
from data_prep.prepare import prepare

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
PILE, TOK, SHAKES = DATA / "pile_sample.jsonl.zst", DATA / "20B_tokenizer.json", DATA / "tinyshakespeare_input.txt"
pytestmark = pytest.mark.skipif(
    not (PILE.is_file() and TOK.is_file() and SHAKES.is_file()),
    reason=f"real data files not found in {DATA.resolve()} "
    "(pile_sample.jsonl.zst, 20B_tokenizer.json, tinyshakespeare_input.txt)",
)


def _pile_docs():
    with open(PILE, "rb") as fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh)
        return [json.loads(line) for line in io.TextIOWrapper(reader, encoding="utf-8")]


def test_pile_sample_with_20b_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    m = prepare([str(PILE)], tmp_path / "pile", tokenizer=str(TOK), workers=2, val_fraction=0.05, verbose=False)
    docs = _pile_docs()
    assert len(docs) == 321
    t = m["tokenizer"]
    assert t["vocab_size"] == 50277
    assert t["eos_id"] == 0
    assert t["eos_token"] == "<|endoftext|>"
    assert t["sha256"].startswith("56ac4821")
    assert m["dtype"] == "uint16"
    assert (tmp_path / "pile" / "tokenizer.json").read_bytes() == TOK.read_bytes()
    assert m["documents"]["written"] == 321
    assert m["documents"]["skipped_total"] == 0
    src = m["sources"][0]
    assert src["bytes"] == PILE.stat().st_size
    assert src["records"] == 321
    # read back: every document decodes to its (NFC-normalized, as the tokenizer does) text
    tok = Tokenizer.from_file(str(TOK))
    texts = []
    for split in ("train", "val"):
        ds = IndexedDataset(tmp_path / "pile" / split)
        assert ds.dtype == np.uint16
        for i in range(len(ds)):
            ids = ds[i].tolist()
            assert ids[-1] == 0
            texts.append(tok.decode(ids[:-1], skip_special_tokens=False))
    assert sorted(texts) == sorted(unicodedata.normalize("NFC", d["text"]) for d in docs)
    # Pile-set filter on the real metadata
    sets = {d["meta"]["pile_set_name"] for d in docs}
    assert sets == {"Wikipedia (en)", "Gutenberg (PG-19)"}
    w = prepare(
        [str(PILE)], tmp_path / "wiki", tokenizer=str(TOK), workers=1, pile_sets=["Wikipedia (en)"], verbose=False
    )
    assert w["documents"]["written"] == 60
    assert w["documents"]["filtered_by_pile_set"] == 261
    # training reader on top
    ds = PackedDataset(tmp_path / "pile", "train", seq_len=256)
    b = get_batch(ds, seed=0, step=3, rank=0, world_size=2, batch_size=4)
    assert b.shape == (4, 257)
    assert int(b.max()) < ds.vocab_size


def test_tinyshakespeare_plain_text(tmp_path):
    m = prepare([str(SHAKES)], tmp_path / "s", tokenizer=str(TOK), workers=1, verbose=False)
    assert m["splits"]["val"]["documents"] >= 1
    assert m["text_bytes"] == SHAKES.stat().st_size  # chunks cover the whole file
    ds = PackedDataset(tmp_path / "s", "val", seq_len=128)
    assert ds.num_samples >= 1
