"""Use existing pre-tokenized ``PREFIX.bin/.idx`` files (Megatron / GPT-NeoX layout, e.g. the
pre-tokenized Pile) for training without re-tokenizing or copying them.

``link_indexed`` writes a prepared directory whose manifest points at the files by absolute path,
plus the tokenizer.json, so that ``PackedDataset(DIR, split, seq_len)`` reads them. CLI::

    python -m data_prep.prepare --indexed-train pile_train_text_document \
        --indexed-val pile_val_text_document --tokenizer 20B_tokenizer.json --out DIR
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from utils import atomic

from .indexed import IndexedDataset, bin_path, idx_path
from .layout import FORMAT, KIND, TOKENIZER, TRAIN, VAL, replacing
from .manifest import Manifest, SplitInfo
from .tokenizer import TokenizerError, load_data_tokenizer


def link_indexed(
    out: str | os.PathLike,
    train_prefix: str,
    tokenizer: str,
    val_prefix: str | None = None,
    eos_token: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Makes ``out`` a prepared directory for existing pre-tokenized ``PREFIX.bin/.idx`` files
    (e.g. Megatron / GPT-NeoX Pile shards) without copying them: the manifest points at them by
    absolute path. Checks that they are readable and consistent and that the vocabulary fits
    their dtype, all before ``out`` is touched; ``out`` is then replaced as a whole, under the
    same rules as ``prepare`` (``layout.replacing``; ``overwrite`` for a foreign folder); it may
    not be, hold or lie inside the linked files or the tokenizer file (``atomic.check_apart``).
    Returns the manifest written, as its JSON object (``Manifest.to_dict``), as ``prepare`` does."""
    out = Path(out)
    linked = [p(prefix) for prefix in (train_prefix, val_prefix) if prefix is not None for p in (bin_path, idx_path)]
    atomic.check_apart(out, [*linked, *([tokenizer] if os.path.lexists(os.path.expanduser(tokenizer)) else [])])
    tok = load_data_tokenizer(tokenizer, eos_token)
    splits, dt = {}, None
    for name, prefix in ((TRAIN, train_prefix), (VAL, val_prefix)):
        if prefix is None:
            continue
        ds = IndexedDataset(prefix)
        if ds.dtype.kind not in "iu" or tok.vocab_size - 1 > np.iinfo(ds.dtype).max:
            raise TokenizerError(
                f"{prefix}: token dtype {ds.dtype} cannot hold the {tok.vocab_size}-token vocabulary of {tok.source}"
            )
        dt = ds.dtype
        splits[name] = SplitInfo(
            prefix=str(Path(prefix).resolve()),
            documents=ds.num_documents,
            sequences=ds.num_sequences,
            tokens=ds.num_tokens,
            bin_bytes=bin_path(prefix).stat().st_size,
            idx_bytes=idx_path(prefix).stat().st_size,
        )
    manifest = Manifest(
        format=FORMAT,
        corpus={"name": "linked indexed dataset"},
        tokenizer=tok.describe(),
        dtype=dt.name,
        splits=splits,
    )
    atomic.check_replaceable(out, kind=KIND, overwrite=overwrite)  # before the lock file is made beside it
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.locked(out), replacing(out, overwrite) as stage:
        atomic.write_text(stage / TOKENIZER, tok.json_text)
        manifest.write(stage)
    return manifest.to_dict()
