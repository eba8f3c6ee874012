"""Training-side reader: packed samples from a prepared directory, and the batch sampler.

A prepared directory (``data_prep.prepare``; its files: ``layout.py``) holds ``manifest.json``,
``tokenizer.json`` and one ``PREFIX.bin/.idx`` pair per split (``indexed.py``). A split's tokens,
read as one flat stream (documents back to back, each ending in the end-of-document id), are cut
into samples of ``seq_len + 1`` tokens that overlap by one token, so that inputs ``x[:-1]`` and
targets ``x[1:]`` together cover every token::

    sample i = tokens[i * seq_len : i * seq_len + seq_len + 1]    num_samples = (T - 1) // seq_len

Batch order (``sample_indices``) is a pure function of (seed, step, rank, world_size,
batch_size): step s of the global stream takes positions ``[s * G, (s + 1) * G)``, G =
batch_size * world_size, of epoch ``e = s // (num_samples // G)``; rank r takes its contiguous
``batch_size`` positions; a position maps to a sample through a seed- and epoch-keyed
pseudo-random permutation (a Feistel network with cycle walking). That permutation is computed
per index in O(1) memory, so no shuffled index array of the whole corpus (1.5e8 samples for the
Pile at 2048 tokens) is ever built. Each epoch uses the first ``(num_samples // G) * G``
positions of its own permutation, so a step never straddles two epochs and the samples of one
step are all distinct: ranks never overlap. Resuming at step k is just calling it with step=k.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from utils.atomic import read_stamp

from .indexed import IndexedDataset
from .layout import KIND, MANIFEST
from .manifest import Manifest

_MASK64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 arrays (wrapping arithmetic is intended)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Image of ``positions`` (each in [0, n)) under a pseudo-random permutation of [0, n)
    determined by (seed, epoch). 4-round Feistel network on the smallest even-bit domain
    2**(2h) >= n; values that land outside [0, n) are encrypted again (cycle walking), which
    keeps it a bijection of [0, n). The domain is < 4n, so few walks are needed."""
    if n <= 1:
        return np.zeros_like(positions, dtype=np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence([seed & _MASK64, epoch]).generate_state(4, dtype=np.uint64)

    def enc(x):
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    y = enc(np.asarray(positions, dtype=np.uint64))
    out = y >= np.uint64(n)
    while out.any():
        y[out] = enc(y[out])
        out = y >= np.uint64(n)
    return y.astype(np.int64)


def sample_indices(num_samples: int, seed: int, step: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Indices of the per-rank batch for optimizer step `step` (pure function of its arguments;
    epochs reshuffle with a seed-derived permutation; ranks never overlap within a step; global
    batch = batch_size * world_size). Returns int64 array of shape (batch_size,)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or step < 0:
        raise ValueError(f"need batch_size >= 1 and step >= 0 (got {batch_size}, {step})")
    global_batch = batch_size * world_size
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"{num_samples} samples are fewer than one global batch of "
            f"{global_batch} (batch_size {batch_size} x world_size {world_size})"
        )
    epoch, in_epoch = divmod(step, steps_per_epoch)
    start = in_epoch * global_batch + rank * batch_size
    return permute(np.arange(start, start + batch_size, dtype=np.int64), num_samples, seed, epoch)


class PackedDataset:
    """Memory-mapped packed samples of seq_len + 1 tokens from one split of a prepared directory.

    Attributes: ``seq_len``, ``num_samples``, ``vocab_size`` (tokenizer vocabulary including
    added tokens), ``eos_id``, ``tokenizer_file`` (path of DIR/tokenizer.json), ``manifest``
    (``Manifest``), ``num_tokens``. ``self[i]`` is an int64 array of shape (seq_len + 1,). Picklable
    without copying data (DataLoader workers reopen the memory map).
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int):
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        hint = f"prepare it with: python -m data_prep.prepare --out {self.data_dir}"
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"prepared data directory {self.data_dir} does not exist; {hint}")
        mpath = self.data_dir / MANIFEST
        other = read_stamp(self.data_dir)
        if other is not None and other.get("kind") != KIND:  # data_prep would refuse to replace it: no hint
            raise FileNotFoundError(
                f"{self.data_dir} is a {other.get('kind')}, not a prepared dataset; name a data_prep folder"
            )
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{self.data_dir} has no {MANIFEST} (not prepared, or its preparation did not finish); {hint}"
            )
        self.manifest = Manifest.read(mpath)
        splits = self.manifest.splits
        if split not in splits:
            raise KeyError(f"{self.data_dir}: no split {split!r} in {MANIFEST} (available: {sorted(splits)})")
        self._split = splits[split]
        prefix = Path(self._split.prefix)
        self.prefix = prefix if prefix.is_absolute() else self.data_dir / prefix
        tok = self.manifest.tokenizer
        self.vocab_size = tok.vocab_size
        self.eos_id = tok.eos_id
        self.tokenizer_file = str(self.data_dir / tok.file)
        if not Path(self.tokenizer_file).is_file():
            raise FileNotFoundError(f"{self.data_dir}: tokenizer file {self.tokenizer_file} is missing")
        # The tokenizer must be the one the shards were made with: another one of the same size
        # would train and export a model whose tokenizer reads its tokens as other text.
        if hashlib.sha256(Path(self.tokenizer_file).read_bytes()).hexdigest() != tok.sha256:
            raise ValueError(
                f"{self.tokenizer_file} is not the tokenizer {MANIFEST} records (its SHA-256 differs): it was "
                "replaced or altered after the data was prepared; put the original back or prepare the data again"
            )
        # The pair must be the one the manifest describes (token count, file sizes): an index
        # copied from another dataset would otherwise train on the wrong tokens in silence.
        self._ds = IndexedDataset(self.prefix, expected=self._split, manifest=mpath)
        self.num_tokens = self._ds.num_tokens
        if self.num_tokens < self.seq_len + 1:
            larger = ", or a larger val_fraction" if split == "val" else ""
            raise ValueError(
                f"{self.data_dir} split {split!r} has {self.num_tokens} tokens, fewer "
                f"than the seq_len + 1 = {self.seq_len + 1} of one sample (use more "
                f"data, a shorter seq_len{larger})"
            )
        self.num_samples = (self.num_tokens - 1) // self.seq_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        if self._ds is None:  # reopened after pickling: the pair was verified when first opened
            self._ds = IndexedDataset(self.prefix, check_manifest=False, verify=False)
        start = i * self.seq_len
        return self._ds.tokens[start : start + self.seq_len + 1].astype(np.int64)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None  # a memmap would be pickled as a full copy of the data
        return state


def get_batch(
    dataset: PackedDataset, seed: int, step: int, rank: int, world_size: int, batch_size: int
) -> torch.Tensor:
    """LongTensor (batch_size, seq_len + 1): the samples ``sample_indices`` picks for this rank."""
    idx = sample_indices(dataset.num_samples, seed, step, rank, world_size, batch_size)
    return torch.from_numpy(np.stack([dataset[int(i)] for i in idx]))
