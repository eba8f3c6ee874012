"""The records a ``prepare`` build reads: every source in order under the caps and the
file-error policy, and the texts the BPE is trained on.

Both passes over the corpus (BPE training, then tokenizing) go through ``records``, so they see
the same documents; ``train_texts`` applies the writer's own validation, Pile-set filter and
train/val split (``worker.is_val``), so that the BPE never learns from validation text.
"""

from __future__ import annotations

import os

from utils.logs import get_logger

from .readers import DocumentError, SourceError, iter_records, validate_record
from .tokenizer import piece_spans
from .worker import doc_hash, is_val

log = get_logger("data_prep")


def records(sources, counter, *, max_docs, max_bytes, on_file_error, text_chunk_bytes, text_key, verbose):
    """All records of all sources in order, honouring the caps and the file-error policy."""
    n_docs = n_bytes = 0
    for si, src in enumerate(sources):
        src.bytes, src.sha256, src.records, src.error = 0, "", 0, None
        src.read = "full"
        it = iter_records(si, src, counter, text_chunk_bytes, text_key)
        try:
            for rec in it:
                if (max_docs is not None and n_docs >= max_docs) or (max_bytes is not None and n_bytes >= max_bytes):
                    src.read = "partial (max_docs / max_bytes cap)"
                    it.close()
                    for rest in sources[si + 1 :]:
                        rest.read, rest.bytes, rest.sha256, rest.records, rest.error = "no (cap)", 0, "", 0, None
                    return
                n_docs += 1
                src.records += 1
                n_bytes += len(rec.payload) if isinstance(rec.payload, (bytes, str)) else 0
                yield rec
        except SourceError as e:
            if on_file_error == "fail":
                raise
            src.error, src.read = str(e), "partial (unreadable)"
            if verbose:
                log.info(f"skipping the rest of an unreadable file: {e}")
        if not src.sha256:  # not read to the end: size from the file system, no checksum
            src.bytes = os.path.getsize(src.path) if os.path.exists(src.path) else 0
            src.sha256 = None


def train_texts(records, *, seed, val_fraction, pile_sets, on_error, text_key, limit, sources, piece):
    """Documents for BPE training: the same validation as the writer, train split only, up to
    ``limit`` bytes of text in corpus order; in pieces, as the writer tokenizes them, so that one
    huge document does not need gigabytes (the trainer counts the same words either way)."""
    used = 0
    for rec in records:
        text, set_name, skip = validate_record(rec.kind, rec.payload, rec.set_name, text_key)
        if skip is not None:
            if on_error == "fail":
                raise DocumentError(f"{sources[rec.source].path}:{rec.line}: {skip.message} (reason {skip.reason})")
            continue
        if pile_sets and set_name not in pile_sets:
            continue
        try:
            b = text.encode("utf-8")
        except UnicodeEncodeError:
            continue
        if val_fraction > 0 and is_val(doc_hash(b, seed), val_fraction):
            continue
        for a, z in piece_spans(text, piece):
            yield text[a:z]
        used += len(b)
        if limit and used >= limit:
            return


def check_readable(sources) -> None:
    """Every input file can be opened for reading (a file that breaks later, e.g. a corrupt
    zstd stream, fails the build instead, which leaves the output untouched as well)."""
    for s in sources:
        for f in s.files or [s.path]:
            try:
                with open(f, "rb"):
                    pass
            except OSError as e:
                raise SourceError(f, None, f"cannot read: {e.strerror}") from e
