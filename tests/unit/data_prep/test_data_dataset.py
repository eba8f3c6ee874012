"""Training reader: PackedDataset, sample_indices (no overlap, exact resume, reshuffle), get_batch."""

import json
import pickle

import numpy as np
import pytest
import torch

from data_prep.dataset import PackedDataset, get_batch, permute, sample_indices
from data_prep.indexed import IndexedDataset
from data_prep.prepare import prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    lines = [json.dumps({"text": f"doc {i}: " + "lorem ipsum dolor sit amet " * (i % 9 + 1)}) for i in range(400)]
    (d / "in.jsonl").write_text("\n".join(lines) + "\n")
    prepare([str(d / "in.jsonl")], d / "out", vocab_size=300, workers=1, val_fraction=0.05, verbose=False)
    return d / "out"


def test_packed_samples(prepared):
    ds = PackedDataset(prepared, "train", seq_len=32)
    flat = IndexedDataset(prepared / "train").tokens
    assert ds.num_samples == (len(flat) - 1) // 32 == len(ds)
    assert ds.vocab_size == ds.manifest.tokenizer.vocab_size
    assert ds.eos_id == 0
    assert ds.tokenizer_file.endswith("tokenizer.json")
    for i in (0, 1, ds.num_samples - 1):
        x = ds[i]
        assert x.dtype == np.int64
        assert x.shape == (33,)
        np.testing.assert_array_equal(x, flat[i * 32 : i * 32 + 33])
    np.testing.assert_array_equal(ds[0][-1:], ds[1][:1])  # one token of overlap
    with pytest.raises(IndexError):
        ds[ds.num_samples]
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 100_000
    assert np.array_equal(clone[5], ds[5])
    val = PackedDataset(prepared, "val", seq_len=8)
    assert val.num_samples > 0


def test_clear_errors(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PackedDataset(tmp_path / "nope", "train", 8)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        PackedDataset(tmp_path, "train", 8)
    with pytest.raises(KeyError, match=r"no split 'test'.*\['train', 'val'\]"):
        PackedDataset(prepared, "test", 8)
    n = PackedDataset(prepared, "val", 8).num_tokens
    with pytest.raises(ValueError, match=rf"{n} tokens, fewer than the seq_len \+ 1"):
        PackedDataset(prepared, "val", n)


def test_a_tokenizer_other_than_the_recorded_one_is_refused(prepared, tmp_path):
    """tokenizer.json replaced after preparation (another tokenizer of the same size, or one edited
    by hand) trained and exported a model whose tokenizer read its tokens as other text: the file's
    SHA-256 must be the manifest's."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    tok = copy / "tokenizer.json"
    text = tok.read_text()
    assert '"doc"' in text
    tok.write_text(text.replace('"doc"', '"DOC"', 1))  # one vocabulary entry renamed: same size
    with pytest.raises(ValueError, match=r"tokenizer.json is not the tokenizer manifest.json records"):
        PackedDataset(copy, "train", 8)
    shutil.copy(prepared / "tokenizer.json", tok)
    assert PackedDataset(copy, "train", 8).num_samples > 0


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 100, 1000, 4097):
        p = permute(np.arange(n), n, seed=5, epoch=0)
        assert sorted(p.tolist()) == list(range(n))
    a, b = permute(np.arange(1000), 1000, 5, 0), permute(np.arange(1000), 1000, 5, 1)
    c = permute(np.arange(1000), 1000, 6, 0)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_ranks_never_overlap_and_each_epoch_is_a_permutation():
    n, bs, ws = 1003, 4, 3
    spe = n // (bs * ws)
    for epoch in range(3):
        seen = []
        for step in range(epoch * spe, (epoch + 1) * spe):
            batches = [sample_indices(n, 7, step, r, ws, bs) for r in range(ws)]
            step_idx = np.concatenate(batches)
            assert len(set(step_idx.tolist())) == bs * ws  # no overlap across ranks
            seen.extend(step_idx.tolist())
        assert len(seen) == len(set(seen)) == spe * bs * ws  # no repeats within an epoch
        assert all(0 <= i < n for i in seen)
        if epoch == 0:
            first = seen
    assert seen != first  # epochs reshuffle


def test_resume_reproduces_the_uninterrupted_run():
    n, seed = 500, 11
    uninterrupted = [sample_indices(n, seed, s, 1, 2, 8) for s in range(200)]
    resumed = [sample_indices(n, seed, s, 1, 2, 8) for s in range(120, 200)]  # fresh "process"
    for a, b in zip(uninterrupted[120:], resumed):
        np.testing.assert_array_equal(a, b)
    # a different world size partitions the same global batch
    g = np.concatenate([sample_indices(n, seed, 3, r, 2, 8) for r in range(2)])
    g4 = np.concatenate([sample_indices(n, seed, 3, r, 4, 4) for r in range(4)])
    np.testing.assert_array_equal(g, g4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        sample_indices(10, 0, 0, 0, 4, 4)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        sample_indices(100, 0, 0, 2, 2, 4)


def test_get_batch(prepared):
    ds = PackedDataset(prepared, "train", seq_len=16)
    b = get_batch(ds, seed=3, step=4, rank=1, world_size=2, batch_size=5)
    assert b.dtype == torch.long
    assert b.shape == (5, 17)
    idx = sample_indices(ds.num_samples, 3, 4, 1, 2, 5)
    np.testing.assert_array_equal(b.numpy(), np.stack([ds[i] for i in idx]))
    assert torch.equal(b, get_batch(ds, 3, 4, 1, 2, 5))
