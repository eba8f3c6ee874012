"""The tokenizing worker: what one process does with one chunk of records.

A worker gets its settings once (``init_worker``, the pool's initializer) and then chunks of
consecutive records (``Chunk``); for each it decodes and validates the records
(``readers.validate_record``), drops those outside the Pile-set filter, assigns every document
to a split and tokenizes it in pieces (``tokenizer.piece_spans``) with the end-of-document id
appended, and returns a ``ChunkResult``. ``writer.ShardBuilder`` runs it in worker processes, or
in the main process with one worker, and writes the results in order.

Split rule, by document and deterministic: a document goes to ``val`` when
``blake2b(text, key=seed)`` read as a fraction of 2**64 is below ``val_fraction`` (``is_val``):
it depends only on the text and the seed, so duplicates land in the same split. The train
document of smallest hash of each chunk is returned apart (``Held``; see ``writer.py`` for why).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from .readers import Kind, Record, validate_record
from .tokenizer import piece_spans

# Characters per encode_batch call: bounds the tokenizer's working memory (~150 MB for a
# byte-level BPE) while keeping batches large enough for its threads.
ENCODE_BATCH_CHARS = 1 << 20


def doc_hash(text_bytes: bytes, seed: int) -> int:
    """64-bit keyed hash of a document; the split and the held-back document depend on it."""
    key = (seed % (1 << 64)).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8, key=key).digest(), "little")


def is_val(h: int, val_fraction: float) -> bool:
    return h < val_fraction * float(1 << 64)


@dataclass(frozen=True)
class WorkerSettings:
    """What every tokenizing process needs, sent once to each (picklable: the tokenizer travels
    as its JSON text). ``piece_chars``: documents are tokenized in pieces of at most this many
    characters (``tokenizer.piece_spans``); ``pile_sets``: the set names kept (None: all)."""

    tokenizer_json: str
    eos_id: int
    dtype: str
    seed: int
    val_fraction: float
    pile_sets: tuple[str, ...] | None
    text_key: str
    piece_chars: int = 1 << 16


@dataclass(frozen=True)
class WorkerState:
    """The state of one tokenizing process: its settings and their parsed forms.

    Process-global (the module's ``_STATE``, set by ``init_worker``) because ``ProcessPoolExecutor``
    runs the initializer once in each worker process and then calls ``tokenize_chunk`` with
    nothing but its chunk: a global of the worker's process is the only place the initializer can
    leave the tokenizer for the tasks, and sending it with every chunk would parse a multi-MB JSON
    per chunk. With one worker the main process is the worker and holds the state itself."""

    settings: WorkerSettings
    tokenizer: Tokenizer
    encode: Callable  # the tokenizer's batch encoder (encode_batch_fast where it has one)
    dtype: np.dtype
    pile_sets: frozenset[str] | None


_STATE: WorkerState | None = None


def init_worker(settings: WorkerSettings, threads: int = 0) -> None:
    """Sets this process's ``WorkerState``. ``threads``: Rayon threads for batch encoding in
    this process (0: the library's default)."""
    global _STATE
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    if threads > 0:
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the thread pool first starts
    tok = Tokenizer.from_str(settings.tokenizer_json)
    # A document that contains the literal text "<|endoftext|>" must not get an end-of-document
    # id in the middle: only the id appended after each document marks a boundary.
    tok.encode_special_tokens = True
    _STATE = WorkerState(
        settings=settings,
        tokenizer=tok,
        encode=getattr(tok, "encode_batch_fast", tok.encode_batch),
        dtype=np.dtype(settings.dtype),
        pile_sets=frozenset(settings.pile_sets) if settings.pile_sets else None,
    )


def _state() -> WorkerState:
    if _STATE is None:
        raise RuntimeError("tokenize_chunk called in a process where init_worker has not run")
    return _STATE


class Part(NamedTuple):
    """The documents of one split from one chunk: ``tokens`` one flat array of the shard dtype,
    each document followed by the end-of-document id; ``lengths`` (int64) per document, that id
    included; ``text_bytes``: UTF-8 bytes of their text."""

    tokens: np.ndarray
    lengths: np.ndarray
    text_bytes: int


class Held(NamedTuple):
    """The train document with the smallest hash of a chunk, kept out of its ``train`` part."""

    hash: int
    tokens: np.ndarray  # its ids and the end-of-document id
    text_bytes: int


class Rejected(NamedTuple):
    """A record of the chunk that is no usable document (``readers.SKIP_REASONS``)."""

    index: int  # in the chunk
    reason: str
    message: str


@dataclass
class Chunk:
    """Consecutive records sent to a worker, by column (``readers.Record``'s fields). Columns,
    not a list of Records: three flat lists pickle several times faster than one NamedTuple per
    record (measured: 3 ms against 42 ms for 8,192 records of 120 bytes; plain tuples took 4 ms),
    and pickling runs in the main process for every chunk. The worker reads the kinds, payloads
    and set names; the main process, the sources and lines (for error messages and counts)."""

    sources: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    kinds: list[Kind] = field(default_factory=list)
    payloads: list = field(default_factory=list)
    set_names: list[str | None] = field(default_factory=list)

    def append(self, rec: Record) -> None:
        self.sources.append(rec.source)
        self.lines.append(rec.line)
        self.kinds.append(rec.kind)
        self.payloads.append(rec.payload)
        self.set_names.append(rec.set_name)

    def __len__(self) -> int:
        return len(self.kinds)


@dataclass(frozen=True)
class ChunkResult:
    """What a worker returns for one chunk. ``filtered``: indices of the documents dropped by the
    Pile-set filter."""

    rejected: list[Rejected]
    filtered: list[int]
    train: Part
    val: Part
    held: Held | None


def _encode(texts: list, w: WorkerState) -> list:
    """The token ids of each text (a numpy array of the shard dtype, no end-of-document id).

    Each text is tokenized in pieces (``piece_spans``), and the pieces are encoded in batches of
    about ``ENCODE_BATCH_CHARS`` characters whose ids are turned into numpy arrays at once, so
    that the tokenizer's working memory and the Python lists of ids stay bounded however long
    one document is; the arrays take 2 or 4 bytes per token."""
    parts = [[] for _ in texts]
    batch, owners, size = [], [], 0

    def flush():
        for j, enc in zip(owners, w.encode(batch, add_special_tokens=False)):
            parts[j].append(np.asarray(enc.ids, dtype=w.dtype))
        batch.clear()
        owners.clear()

    for j, text in enumerate(texts):
        for a, b in piece_spans(text, w.settings.piece_chars):
            batch.append(text if b - a == len(text) else text[a:b])
            owners.append(j)
            size += b - a
            if size >= ENCODE_BATCH_CHARS:
                flush()
                size = 0
    if batch:
        flush()
    return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]


def _with_eos(docs: list, w: WorkerState) -> np.ndarray:
    """One flat array: each document's ids followed by the end-of-document id."""
    eos = np.array([w.settings.eos_id], dtype=w.dtype)
    return np.concatenate([x for d in docs for x in (d, eos)]) if docs else np.zeros(0, w.dtype)


def tokenize_chunk(chunk: Chunk) -> ChunkResult:
    """Worker side: validates, filters, splits and tokenizes the records of one chunk."""
    w = _state()
    frac = w.settings.val_fraction
    rejected, filtered, texts, raw, hashes = [], [], [], [], []
    for i, record in enumerate(zip(chunk.kinds, chunk.payloads, chunk.set_names)):
        text, set_name, skip = validate_record(*record, w.settings.text_key)
        if skip is not None:
            rejected.append(Rejected(i, skip.reason, skip.message))
            continue
        if w.pile_sets is not None and set_name not in w.pile_sets:
            filtered.append(i)
            continue
        try:
            b = text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from JSON "\ud800" escapes
            rejected.append(Rejected(i, "invalid_utf8", f"text is not valid Unicode: {e}"))
            continue
        texts.append(text)
        raw.append(len(b))
        hashes.append(doc_hash(b, w.settings.seed))
        del b  # a copy of the whole document: not kept while tokenizing
    ids = _encode(texts, w)
    val_flags = [is_val(h, frac) for h in hashes]
    held_i = None
    if frac > 0:
        train_idx = [j for j, v in enumerate(val_flags) if not v]
        if train_idx:
            held_i = min(train_idx, key=lambda j: hashes[j])

    def part(want_val: bool) -> Part:
        sel = [j for j in range(len(ids)) if val_flags[j] == want_val and j != held_i]
        return Part(
            _with_eos([ids[j] for j in sel], w),
            np.array([len(ids[j]) + 1 for j in sel], dtype=np.int64),
            sum(raw[j] for j in sel),
        )

    held = None if held_i is None else Held(hashes[held_i], _with_eos([ids[held_i]], w), raw[held_i])
    return ChunkResult(rejected, filtered, part(want_val=False), part(want_val=True), held)
