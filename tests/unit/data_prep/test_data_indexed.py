"""The Megatron / GPT-NeoX .bin/.idx layout: writer, reader, and files written by hand to the spec."""

import struct

import numpy as np
import pytest

from data_prep.dataset import PackedDataset
from data_prep.indexed import IndexedDataset, IndexedWriter, IndexFormatError, MMapIndexedDataset
from data_prep.link import link_indexed
from data_prep.tokenizer import TokenizerError, train_bpe


def _write_megatron_by_hand(prefix, seqs, doc_starts, dtype=np.int32, code=4):
    """Independent encoder of the public layout (not using data_prep.indexed)."""
    sizes = np.array([len(s) for s in seqs], dtype="<i4")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype("<i8") * itemsize
    doc_idx = np.array(doc_starts + [len(seqs)], dtype="<i8")
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        for s in seqs:
            f.write(np.asarray(s, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())


def test_writer_layout_and_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n).astype(np.uint16) for n in (5, 1, 17, 3)]
    w = IndexedWriter(tmp_path / "x", np.uint16)
    w.add(np.concatenate(docs[:2]), [5, 1])
    w.add(np.concatenate(docs[2:]), [17, 3])
    # nothing under a final name before finalize
    assert not (tmp_path / "x.bin").exists()
    assert not (tmp_path / "x.idx").exists()
    info = w.finalize()
    assert info["documents"] == 4
    assert info["tokens"] == 26
    raw = (tmp_path / "x.idx").read_bytes()
    magic, version, code, n_seq, n_doc = struct.unpack("<9sQBQQ", raw[:34])
    assert (magic, version, code, n_seq, n_doc) == (b"MMIDIDX\x00\x00", 1, 8, 4, 5)
    sizes = np.frombuffer(raw[34 : 34 + 16], "<i4")
    pointers = np.frombuffer(raw[50 : 50 + 32], "<i8")
    doc_idx = np.frombuffer(raw[82:], "<i8")
    assert sizes.tolist() == [5, 1, 17, 3]
    assert pointers.tolist() == [0, 10, 12, 46]
    assert doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert (tmp_path / "x.bin").stat().st_size == 26 * 2
    ds = IndexedDataset(tmp_path / "x")
    assert ds.dtype == np.uint16
    assert len(ds) == 4
    assert ds.num_tokens == 26
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds.document(i), d)
    assert not list(tmp_path.glob("*.partial"))


def test_reads_hand_written_megatron_files_with_multi_sequence_documents(tmp_path):
    seqs = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [70000, 11]]
    _write_megatron_by_hand(tmp_path / "meg", seqs, [0, 2, 3])  # docs: seqs 0-1, 2, 3-4
    ds = IndexedDataset(tmp_path / "meg")
    assert ds.dtype == np.int32
    assert ds.num_sequences == 5
    assert ds.num_documents == 3
    assert ds[4].tolist() == [70000, 11]
    assert ds.document(0).tolist() == [1, 2, 3, 4, 5]
    assert ds.document(2).tolist() == [7, 8, 9, 10, 70000, 11]
    assert ds.tokens.tolist() == sum(seqs, [])
    # the Megatron name, which evaluate_lm.py uses, reads the same files
    assert MMapIndexedDataset(tmp_path / "meg").document(2).tolist() == [7, 8, 9, 10, 70000, 11]


def test_link_existing_indexed_files_for_training(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok = train_bpe(["hello world, some text to learn from. " * 20], 300)
    (tok_dir / "tokenizer.json").write_text(tok.json_text)
    seqs = [list(range(i, i + 50)) for i in range(0, 250, 50)]
    _write_megatron_by_hand(tmp_path / "pile_train", seqs, list(range(5)), np.uint16, 8)
    m = link_indexed(tmp_path / "linked", str(tmp_path / "pile_train"), str(tok_dir))
    assert m["splits"]["train"]["tokens"] == 250
    ds = PackedDataset(tmp_path / "linked", "train", seq_len=16)
    assert ds.num_samples == (250 - 1) // 16
    assert ds.vocab_size == tok.vocab_size
    assert ds.eos_id == 0
    np.testing.assert_array_equal(ds[2], np.arange(32, 49))
    with pytest.raises(KeyError, match="no split 'val'"):
        PackedDataset(tmp_path / "linked", "val", seq_len=16)
    # a uint8 shard cannot cannot hold the vocabulary
    _write_megatron_by_hand(tmp_path / "small", [[1, 2]], [0], np.uint8, 1)
    with pytest.raises(TokenizerError, match="cannot hold"):
        link_indexed(tmp_path / "linked2", str(tmp_path / "small"), str(tok_dir))


def test_reader_rejects_broken_files(tmp_path):
    _write_megatron_by_hand(tmp_path / "a", [[1, 2, 3], [4]], [0, 1])
    idx = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(idx[:-8])
    with pytest.raises(IndexFormatError, match="truncated or corrupt"):
        IndexedDataset(tmp_path / "a")
    (tmp_path / "a.idx").write_bytes(b"NOTANIDX!" + idx[9:])
    with pytest.raises(IndexFormatError, match="not an MMIDIDX"):
        IndexedDataset(tmp_path / "a")
    (tmp_path / "a.idx").write_bytes(idx)
    (tmp_path / "a.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-4])
    with pytest.raises(IndexFormatError, match="truncated .bin"):
        IndexedDataset(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="missing"):
        IndexedDataset(tmp_path / "nothing")


def test_aborted_writer_leaves_nothing(tmp_path):
    w = IndexedWriter(tmp_path / "y", np.uint32)
    w.add(np.arange(10), [4, 6])
    w.abort()
    assert list(tmp_path.iterdir()) == []


def _pair(prefix, seqs, dtype=np.uint16, code=8):
    _write_megatron_by_hand(prefix, seqs, list(range(len(seqs))), dtype, code)


def test_an_index_of_another_dataset_is_rejected(tmp_path):
    _pair(tmp_path / "big", [list(range(i, i + 40)) for i in range(0, 4000, 40)])
    _pair(tmp_path / "small", [[1, 2, 3], [4, 5]])
    (tmp_path / "big.idx").write_bytes((tmp_path / "small.idx").read_bytes())
    with pytest.raises(IndexFormatError) as e:
        IndexedDataset(tmp_path / "big")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "big.idx") in msg
    assert str(tmp_path / "big.bin") in msg
    assert "describes 5 uint16 tokens = 10 bytes, the .bin has 8000 bytes" in msg


@pytest.mark.parametrize(
    "damage", ["pointers out of order", "negative size", "doc_idx decreasing", "doc_idx not ending at S"]
)
def test_inconsistent_offsets_sizes_or_doc_idx_are_rejected(tmp_path, damage):
    """Totals still add up (the .bin size matches), so only the full scan can see these."""
    _pair(tmp_path / "a", [[1, 2], [3, 4, 5], [6], [7, 8]])
    raw = bytearray((tmp_path / "a.idx").read_bytes())
    sizes, ptrs, docs = 34, 34 + 16, 34 + 16 + 32
    if damage == "pointers out of order":  # sequences 1 and 2 swapped in the pointers
        raw[ptrs + 8 : ptrs + 24] = raw[ptrs + 16 : ptrs + 24] + raw[ptrs + 8 : ptrs + 16]
    elif damage == "negative size":  # sizes 3, 1 -> 5, -1: same total, same last pointer
        raw[sizes + 4 : sizes + 12] = struct.pack("<ii", 5, -1)
    elif damage == "doc_idx decreasing":
        raw[docs + 8 : docs + 24] = struct.pack("<qq", 2, 1)
    else:
        raw[-8:] = struct.pack("<q", 3)
    (tmp_path / "a.idx").write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match=r"corrupt index") as e:
        IndexedDataset(tmp_path / "a")
    assert str(tmp_path / "a.idx") in str(e.value)
    assert str(tmp_path / "a.bin") in str(e.value)


def test_a_pair_that_disagrees_with_its_manifest_is_rejected(tmp_path):
    """Consistent files that are not the ones the manifest describes (another dataset's pair
    copied in): the token count and file sizes must match the manifest's."""
    from data_prep.prepare import prepare

    (tmp_path / "a.jsonl").write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(30)))
    (tmp_path / "b.jsonl").write_text("".join(f'{{"text": "other {i} words here"}}\n' for i in range(60)))
    for name in "ab":
        prepare(
            [str(tmp_path / f"{name}.jsonl")],
            tmp_path / name,
            vocab_size=300,
            workers=1,
            val_fraction=0.0,
            verbose=False,
        )
    for ext in ("bin", "idx"):
        (tmp_path / "a" / f"train.{ext}").write_bytes((tmp_path / "b" / f"train.{ext}").read_bytes())
    for opened in (
        lambda: IndexedDataset(tmp_path / "a" / "train"),
        lambda: PackedDataset(tmp_path / "a", "train", seq_len=8),
    ):
        with pytest.raises(IndexFormatError, match=r"do not match .*manifest\.json: tokens \d+ \(manifest: \d+\)"):
            opened()
    assert IndexedDataset(tmp_path / "b" / "train").num_documents == 60
