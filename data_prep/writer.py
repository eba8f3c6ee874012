"""Parallel tokenization of a record stream into ``train`` and ``val`` token shards.

Flow: the main process reads records (``readers.py``), groups them into chunks of about
``chunk_bytes``, and hands the chunks to worker processes in order; each worker (``worker.py``)
decodes and validates its records, tokenizes the good documents and appends the
end-of-document id to each.
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
``fork``: the parent may hold tokenizer threads) and run ``ProcessPoolExecutor``, so a worker
that dies makes the run fail with ``BrokenProcessPool`` instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .indexed import IndexedWriter
from .layout import SPLITS, TRAIN, VAL, shard_prefix
from .readers import DocumentError
from .worker import Chunk, ChunkResult, Held, WorkerSettings, init_worker, tokenize_chunk


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
        self.settings = WorkerSettings(
            tokenizer_json=loaded_tok.json_text,
            eos_id=loaded_tok.eos_id,
            dtype=self.dtype.name,
            seed=seed,
            val_fraction=val_fraction,
            pile_sets=tuple(sorted(pile_sets)) if pile_sets else None,
            text_key=text_key,
            piece_chars=piece_chars,
        )
        self.skipped: dict[str, int] = {}
        self.filtered = 0
        self.records = 0
        self.text_bytes = dict.fromkeys(SPLITS, 0)
        self.src_skipped = [0] * len(sources)
        self.src_filtered = [0] * len(sources)
        self.held: Held | None = None
        self.t0 = time.time()

    # -- chunking ---------------------------------------------------------------------------
    def _chunks(self, records):
        """``Chunk``s of consecutive records, about ``chunk_bytes`` of payload (at most 8192)."""
        chunk, size = Chunk(), 0
        for rec in records:
            chunk.append(rec)
            size += len(rec.payload) if isinstance(rec.payload, (bytes, str)) else 64
            if size >= self.chunk_bytes or len(chunk) >= 8192:
                yield chunk
                chunk, size = Chunk(), 0
        if len(chunk):
            yield chunk

    # -- consuming results --------------------------------------------------------------------
    def _consume(self, res: ChunkResult, chunk: Chunk) -> None:
        for bad in res.rejected:
            si = chunk.sources[bad.index]
            if self.on_error == "fail":
                raise DocumentError(
                    f"{self.sources[si].path}:{chunk.lines[bad.index]}: {bad.message} "
                    f"(reason {bad.reason}; use on_error='skip' to skip such documents)"
                )
            self.skipped[bad.reason] = self.skipped.get(bad.reason, 0) + 1
            self.src_skipped[si] += 1
        for i in res.filtered:
            self.src_filtered[chunk.sources[i]] += 1
        self.filtered += len(res.filtered)
        self.records += len(chunk)
        for name, part in ((TRAIN, res.train), (VAL, res.val)):
            self.writers[name].add(part.tokens, part.lengths)
            self.text_bytes[name] += part.text_bytes
        if res.held is not None:
            if self.held is None or res.held.hash < self.held.hash:
                if self.held is not None:
                    self._write_held(TRAIN)
                self.held = res.held
            else:
                self.writers[TRAIN].add(res.held.tokens, [len(res.held.tokens)])
                self.text_bytes[TRAIN] += res.held.text_bytes
        if self.progress is not None:
            self._update_progress()

    def _write_held(self, split: str) -> None:
        self.writers[split].add(self.held.tokens, [len(self.held.tokens)])
        self.text_bytes[split] += self.held.text_bytes
        self.held = None

    def _update_progress(self) -> None:
        dt = max(time.time() - self.t0, 1e-9)
        docs = sum(w.num_docs for w in self.writers.values())
        toks = sum(w.num_tokens for w in self.writers.values())
        mb = sum(self.text_bytes.values()) / 1e6
        if self.byte_counter is not None:
            self.progress.update(self.byte_counter.bytes - self.progress.n)
        self.progress.set_postfix_str(
            f"{docs / dt:,.0f} docs/s, {mb / dt:.2f} MB/s, {toks / dt:,.0f} tok/s", refresh=False
        )

    # -- the run ------------------------------------------------------------------------------
    def run(self, records) -> dict:
        """Tokenizes everything and finalizes both shards; returns their descriptions.
        On any error the temporary files are removed and the error propagates."""
        self.writers = {s: IndexedWriter(self.out_dir / shard_prefix(s), self.dtype) for s in SPLITS}
        pool = None
        try:
            if self.workers <= 1:
                init_worker(self.settings)
                for chunk in self._chunks(records):
                    self._consume(tokenize_chunk(chunk), chunk)
            else:
                threads = max(1, available_cores() // self.workers)  # processes x threads = cores
                pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=init_worker,
                    initargs=(self.settings, threads),
                )
                # The chunks stay referenced here until consumed, as the pool keeps them anyway
                # until their result arrives: no extra memory.
                pending: deque = deque()
                for chunk in self._chunks(records):
                    pending.append((pool.submit(tokenize_chunk, chunk), chunk))
                    while len(pending) >= 2 * self.workers + 2:
                        fut, done = pending.popleft()
                        self._consume(fut.result(), done)
                while pending:
                    fut, done = pending.popleft()
                    self._consume(fut.result(), done)
            if self.held is not None:
                rest = self.writers[TRAIN].num_docs
                self._write_held(VAL if self.writers[VAL].num_docs == 0 and rest > 0 else TRAIN)
            return {s: w.finalize() | {"text_bytes": self.text_bytes[s]} for s, w in self.writers.items()}
        except BaseException:
            for w in self.writers.values():
                if not w.closed:
                    w.abort()
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
