"""Parallel tokenization of a record stream into ``train`` and ``val`` token shards.

Flow: the main process reads records (``readers.py``), groups them into chunks of about
``chunk_bytes``, and hands the chunks to worker processes in order; each worker decodes and
validates its records, tokenizes the good documents and appends the end-of-document id to each.
A long document is tokenized in pieces (``tokenizer.piece_spans``; same tokens as in one go,
see there for the exceptions), so that one huge document does not need gigabytes.
Results are consumed strictly in submission order, so the shards are byte-identical for any
number of workers. At most ``2 * workers + 2`` chunks are in flight, which bounds memory however
large the corpus is.

Train/validation split, by document and deterministic: a document goes to ``val`` when
``blake2b(text, key=seed)`` read as a fraction of 2**64 is below ``val_fraction``. It depends only
on the text and the seed (duplicates land in the same split). So that small corpora still get a
validation set, the train document with the smallest hash is held back while writing; at the end
it goes to ``val`` if ``val`` would otherwise be empty (and ``train`` keeps at least one
document), else to ``train``.

Each process batch-encodes with ``tokenizers``' own Rayon threads (processes x threads = cores;
with one worker everything runs in the main process). Workers are started with ``spawn`` (not
``fork``: the parent may hold tokenizer threads) and run ``ProcessPoolExecutor``, so a worker that dies
makes the run fail with ``BrokenProcessPool``
instead of hanging.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .indexed import IndexedWriter
from .readers import DocumentError, validate_record
from .tokenizer import piece_spans

_W: dict = {}  # per-process worker state, set by init_worker
# Characters per encode_batch call: bounds the tokenizer's working memory (~150 MB for a
# byte-level BPE) while keeping batches large enough for its threads.
ENCODE_BATCH_CHARS = 1 << 20


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def doc_hash(text_bytes: bytes, seed: int) -> int:
    """64-bit keyed hash of a document; the split and the held-back document depend on it."""
    key = (seed % (1 << 64)).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8, key=key).digest(), "little")


def is_val(h: int, val_fraction: float) -> bool:
    return h < val_fraction * float(1 << 64)


def init_worker(
    tok_json: str,
    eos_id: int,
    dtype: str,
    seed: int,
    val_fraction: float,
    pile_sets,
    text_key: str,
    piece_chars: int = 1 << 16,
    threads: int = 0,
) -> None:
    """piece_chars: documents are tokenized in pieces of at most this many characters
    (``tokenizer.piece_spans``); threads: Rayon threads for batch encoding in this process
    (0: the library's default)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    if threads > 0:
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the thread pool first starts
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    # A document that contains the literal text "<|endoftext|>" must not get an end-of-document
    # id in the middle: only the id appended after each document marks a boundary.
    tok.encode_special_tokens = True
    _W.update(
        tok=tok,
        encode=getattr(tok, "encode_batch_fast", tok.encode_batch),
        eos=eos_id,
        dtype=np.dtype(dtype),
        seed=seed,
        frac=val_fraction,
        sets=frozenset(pile_sets) if pile_sets else None,
        key=text_key,
        piece=piece_chars,
    )


def _encode(texts: list) -> list:
    """The token ids of each text (a numpy array of the shard dtype, no end-of-document id).

    Each text is tokenized in pieces (``piece_spans``), and the pieces are encoded in batches of
    about ``ENCODE_BATCH_CHARS`` characters whose ids are turned into numpy arrays at once, so
    that the tokenizer's working memory and the Python lists of ids stay bounded however long
    one document is; the arrays take 2 or 4 bytes per token."""
    w = _W
    parts = [[] for _ in texts]
    batch, owners, size = [], [], 0

    def flush():
        for j, enc in zip(owners, w["encode"](batch, add_special_tokens=False)):
            parts[j].append(np.asarray(enc.ids, dtype=w["dtype"]))
        batch.clear()
        owners.clear()

    for j, text in enumerate(texts):
        for a, b in piece_spans(text, w["piece"]):
            batch.append(text if b - a == len(text) else text[a:b])
            owners.append(j)
            size += b - a
            if size >= ENCODE_BATCH_CHARS:
                flush()
                size = 0
    if batch:
        flush()
    return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]


def _with_eos(docs: list) -> np.ndarray:
    """One flat array: each document's ids followed by the end-of-document id."""
    eos = np.array([_W["eos"]], dtype=_W["dtype"])
    return np.concatenate([x for d in docs for x in (d, eos)]) if docs else np.zeros(0, _W["dtype"])


def tokenize_chunk(items: list) -> dict:
    """Worker side. ``items``: ``(kind, payload, set_name)`` records. Returns

    * ``bad``: ``[(i, reason, message)]`` for records that are not usable documents;
    * ``filtered``: indices of documents dropped by the Pile-set filter;
    * ``train`` / ``val``: ``(tokens, lengths, text_bytes)``; tokens is one flat array of the
      shard dtype, each document followed by the end-of-document id; lengths include that id;
    * ``held``: ``(hash, tokens, text_bytes)`` of the train document with the smallest hash (not
      included in ``train``), or None.
    """
    w = _W
    bad, filtered, texts, raw, hashes = [], [], [], [], []
    for i, (kind, payload, set_name) in enumerate(items):
        text, set_name, err = validate_record(kind, payload, set_name, w["key"])
        if err is not None:
            bad.append((i, err[0], err[1]))
            continue
        if w["sets"] is not None and set_name not in w["sets"]:
            filtered.append(i)
            continue
        try:
            b = text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from JSON "\ud800" escapes
            bad.append((i, "invalid_utf8", f"text is not valid Unicode: {e}"))
            continue
        texts.append(text)
        raw.append(len(b))
        hashes.append(doc_hash(b, w["seed"]))
        del b  # a copy of the whole document: not kept while tokenizing
    ids = _encode(texts)
    val_flags = [is_val(h, w["frac"]) for h in hashes]
    held_i = None
    if w["frac"] > 0:
        train_idx = [j for j, v in enumerate(val_flags) if not v]
        if train_idx:
            held_i = min(train_idx, key=lambda j: hashes[j])
    out = {"bad": bad, "filtered": filtered, "held": None}
    for name, want_val in (("train", False), ("val", True)):
        sel = [j for j in range(len(ids)) if val_flags[j] == want_val and j != held_i]
        out[name] = (
            _with_eos([ids[j] for j in sel]),
            np.array([len(ids[j]) + 1 for j in sel], dtype=np.int64),
            sum(raw[j] for j in sel),
        )
    if held_i is not None:
        out["held"] = (hashes[held_i], _with_eos([ids[held_i]]), raw[held_i])
    return out


class ShardBuilder:
    """Main side: feeds chunks to the workers in order and writes ``out_dir/{train,val}``.

    ``sources``: the ``readers.Source`` list (for error messages and per-source counts);
    ``on_error``: "skip" counts bad documents by reason, "fail" raises ``DocumentError`` naming
    the file and line of the first one. ``progress``: a tqdm bar or None.
    """

    def __init__(
        self,
        out_dir,
        dtype,
        loaded_tok,
        sources,
        *,
        workers: int,
        seed: int,
        val_fraction: float,
        pile_sets,
        text_key: str,
        on_error: str,
        chunk_bytes: int = 1 << 20,
        piece_chars: int = 1 << 16,
        progress=None,
        byte_counter=None,
    ):
        self.out_dir = Path(out_dir)
        self.dtype = np.dtype(dtype)
        self.sources = sources
        self.workers = workers
        self.on_error = on_error
        self.chunk_bytes = chunk_bytes
        self.progress = progress
        self.byte_counter = byte_counter
        self.init_args = (
            loaded_tok.json_text,
            loaded_tok.eos_id,
            self.dtype.name,
            seed,
            val_fraction,
            sorted(pile_sets) if pile_sets else None,
            text_key,
            piece_chars,
        )
        self.skipped: dict[str, int] = {}
        self.filtered = 0
        self.records = 0
        self.text_bytes = {"train": 0, "val": 0}
        self.src_skipped = [0] * len(sources)
        self.src_filtered = [0] * len(sources)
        self.held = None
        self.t0 = time.time()

    # -- chunking ---------------------------------------------------------------------------
    def _chunks(self, records):
        items, where, size = [], [], 0
        for si, line, kind, payload, set_name in records:
            items.append((kind, payload, set_name))
            where.append((si, line))
            size += len(payload) if isinstance(payload, (bytes, str)) else 64
            if size >= self.chunk_bytes or len(items) >= 8192:
                yield items, where
                items, where, size = [], [], 0
        if items:
            yield items, where

    # -- consuming results --------------------------------------------------------------------
    def _consume(self, res: dict, where: list) -> None:
        for i, reason, msg in res["bad"]:
            si, line = where[i]
            if self.on_error == "fail":
                raise DocumentError(
                    f"{self.sources[si].path}:{line}: {msg} "
                    f"(reason {reason}; use on_error='skip' to skip such documents)"
                )
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            self.src_skipped[si] += 1
        for i in res["filtered"]:
            self.src_filtered[where[i][0]] += 1
        self.filtered += len(res["filtered"])
        self.records += len(where)
        for name in ("train", "val"):
            toks, lens, nbytes = res[name]
            self.writers[name].add(toks, lens)
            self.text_bytes[name] += nbytes
        if res["held"] is not None:
            h, toks, nbytes = res["held"]
            if self.held is None or h < self.held[0]:
                if self.held is not None:
                    self._write_held("train")
                self.held = res["held"]
            else:
                self.writers["train"].add(toks, [len(toks)])
                self.text_bytes["train"] += nbytes
        if self.progress is not None:
            self._update_progress()

    def _write_held(self, split: str) -> None:
        _, toks, nbytes = self.held
        self.writers[split].add(toks, [len(toks)])
        self.text_bytes[split] += nbytes
        self.held = None

    def _update_progress(self) -> None:
        dt = max(time.time() - self.t0, 1e-9)
        docs = self.writers["train"].num_docs + self.writers["val"].num_docs
        toks = self.writers["train"].num_tokens + self.writers["val"].num_tokens
        mb = (self.text_bytes["train"] + self.text_bytes["val"]) / 1e6
        if self.byte_counter is not None:
            self.progress.update(self.byte_counter.bytes - self.progress.n)
        self.progress.set_postfix_str(
            f"{docs / dt:,.0f} docs/s, {mb / dt:.2f} MB/s, {toks / dt:,.0f} tok/s", refresh=False
        )

    # -- the run ------------------------------------------------------------------------------
    def run(self, records) -> dict:
        """Tokenizes everything and finalizes both shards; returns their descriptions.
        On any error the temporary files are removed and the error propagates."""
        self.writers = {s: IndexedWriter(self.out_dir / s, self.dtype) for s in ("train", "val")}
        pool = None
        try:
            if self.workers <= 1:
                init_worker(*self.init_args)
                for items, where in self._chunks(records):
                    self._consume(tokenize_chunk(items), where)
            else:
                threads = max(1, available_cores() // self.workers)  # processes x threads = cores
                pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=init_worker,
                    initargs=(*self.init_args, threads),
                )
                pending: deque = deque()
                for items, where in self._chunks(records):
                    pending.append((pool.submit(tokenize_chunk, items), where))
                    while len(pending) >= 2 * self.workers + 2:
                        fut, w = pending.popleft()
                        self._consume(fut.result(), w)
                while pending:
                    fut, w = pending.popleft()
                    self._consume(fut.result(), w)
            if self.held is not None:
                rest = self.writers["train"].num_docs
                self._write_held("val" if self.writers["val"].num_docs == 0 and rest > 0 else "train")
            return {s: w.finalize() | {"text_bytes": self.text_bytes[s]} for s, w in self.writers.items()}
        except BaseException:
            for w in self.writers.values():
                if not w.closed:
                    w.abort()
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
