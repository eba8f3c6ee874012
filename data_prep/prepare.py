"""Prepare a training directory: read a corpus, tokenize it in parallel, write token shards.

    python -m data_prep.prepare --input 'pile/train/*.jsonl.zst' --tokenizer 20B_tokenizer.json \\
        --out DIR --workers N
    python -m data_prep.prepare --out DIR        # embedded default corpus + a BPE trained on it

Output layout (``DIR``)::

    manifest.json       written last, atomically: the marker of a complete directory
    stamp.json          fingerprint of inputs + settings, for the up-to-date check
    tokenizer.json      the tokenizer used (given one copied byte for byte, or trained here)
    train.bin/.idx      Megatron / GPT-NeoX indexed dataset (see indexed.py)
    val.bin/.idx

The manifest holds token and document counts per split, skipped documents by reason, documents
dropped by the Pile-set filter, the tokenizer (source, sha256, vocabulary size, end-of-document
id), the token dtype, the settings, and every source file with its size and sha256. It contains
no timestamps, so the same inputs and settings give byte-identical shards and manifest.

Rerunning with the same settings on a complete DIR returns the manifest at once (input files are
compared by path, size and mtime); anything else, including a DIR left by an interrupted run,
is rebuilt from scratch. Concurrent calls on one DIR are serialized with a file lock, so every
rank of a distributed job may call ``prepare`` and all but the first find it up to date.

Bad input: a bad document (invalid JSON, invalid UTF-8, missing or non-string text, empty) is
skipped and counted (``on_error="skip"``, default) or stops the run with its file and line
(``"fail"``); an unreadable file (missing, corrupt or truncated zstd, unreadable dataset) stops
the run (``on_file_error="fail"``, default) or is recorded in the manifest and skipped from where
it broke (``"skip"``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

from . import default_corpus
from .indexed import bin_path, idx_path
from .readers import DocumentError, SourceError, _Counter, expand_inputs, iter_records, validate_record
from .tokenizer import TokenizerError, canonical_json, choose_dtype, load_tokenizer, train_bpe
from .writer import ShardBuilder, available_cores, doc_hash, is_val

FORMAT = "hyena-rtf-data-prep/1"
SPLITS = ("train", "val")


def default_workers() -> int:
    """Worker processes: one per 8 cores. Each tokenizes with cores / workers Rayon threads
    (`tokenizers`' own parallelism), which beats one single-threaded process per core: measured on
    2 cores with the 20B tokenizer, 1 process x 2 threads gave 5.1 MB/s, 2 processes x 1 thread
    2.95 MB/s (pickling and worker start-up cost more than they save). More processes keep the
    Python side (validation, hashing, flattening ids) from becoming the bottleneck on big machines."""
    return max(1, available_cores() // 8)


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[data_prep] {msg}", file=sys.stderr, flush=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = Path(f"{path}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def _dir_lock(out: Path):
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): callers must not prepare one DIR concurrently
        yield
        return
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _file_stat(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _fingerprint(settings: dict, sources, tok_spec: str | None) -> str:
    files = []
    for s in sources:
        files.extend(_file_stat(f) for f in (s.files or [s.path]))
    tok_id = None
    if tok_spec is not None:
        p = Path(os.path.expanduser(tok_spec))
        p = p / "tokenizer.json" if (p / "tokenizer.json").is_file() else p
        tok_id = _file_stat(str(p.resolve())) if p.is_file() else tok_spec
    blob = canonical_json({"format": FORMAT, "settings": settings, "files": files, "tok": tok_id})
    return hashlib.sha256(blob.encode()).hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> dict | None:
    """The manifest if DIR is complete and was built from exactly these inputs and settings."""
    try:
        stamp = json.loads((out / "stamp.json").read_text())
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("fingerprint") != fingerprint or manifest.get("format") != FORMAT:
        return None
    tok = out / "tokenizer.json"
    if not tok.is_file() or hashlib.sha256(tok.read_bytes()).hexdigest() != manifest["tokenizer"]["sha256"]:
        return None
    for name, sp in manifest["splits"].items():
        prefix = out / sp["prefix"]
        for p, key in ((bin_path(prefix), "bin_bytes"), (idx_path(prefix), "idx_bytes")):
            if not p.is_file() or p.stat().st_size != sp[key]:
                return None
    return manifest


def _clean(out: Path) -> None:
    """Removes everything a previous (possibly interrupted) run may have left, manifest first,
    so that no old manifest can ever describe new shards."""
    for name in ("manifest.json", "stamp.json"):
        (out / name).unlink(missing_ok=True)
    for s in SPLITS:
        bin_path(out / s).unlink(missing_ok=True)
        idx_path(out / s).unlink(missing_ok=True)
    (out / "tokenizer.json").unlink(missing_ok=True)
    for p in out.glob("*.partial"):
        p.unlink()


def _records(sources, counter, *, max_docs, max_bytes, on_file_error, text_chunk_bytes, text_key,
             verbose):
    """All records of all sources in order, honouring the caps and the file-error policy."""
    n_docs = n_bytes = 0
    for si, src in enumerate(sources):
        src.bytes, src.sha256, src.records, src.error = 0, "", 0, None
        src.read = "full"
        it = iter_records(si, src, counter, text_chunk_bytes, text_key)
        try:
            for rec in it:
                if (max_docs is not None and n_docs >= max_docs) or \
                   (max_bytes is not None and n_bytes >= max_bytes):
                    src.read = "partial (max_docs / max_bytes cap)"
                    it.close()
                    for rest in sources[si + 1:]:
                        rest.read, rest.bytes, rest.sha256, rest.records, rest.error = "no (cap)", 0, "", 0, None
                    return
                n_docs += 1
                src.records += 1
                n_bytes += len(rec[3]) if isinstance(rec[3], (bytes, str)) else 0
                yield rec
        except SourceError as e:
            if on_file_error == "fail":
                raise
            src.error, src.read = str(e), "partial (unreadable)"
            _log(verbose, f"skipping the rest of an unreadable file: {e}")
        if not src.sha256:  # not read to the end: size from the file system, no checksum
            src.bytes = os.path.getsize(src.path) if os.path.exists(src.path) else 0
            src.sha256 = None


def _train_texts(records, *, seed, val_fraction, pile_sets, on_error, text_key, limit, sources):
    """Documents for BPE training: the same validation as the writer, train split only, up to
    ``limit`` bytes of text in corpus order."""
    used = 0
    for si, line, kind, payload, set_name in records:
        text, set_name, err = validate_record(kind, payload, set_name, text_key)
        if err is not None:
            if on_error == "fail":
                raise DocumentError(f"{sources[si].path}:{line}: {err[1]} (reason {err[0]})")
            continue
        if pile_sets and set_name not in pile_sets:
            continue
        try:
            b = text.encode("utf-8")
        except UnicodeEncodeError:
            continue
        if val_fraction > 0 and is_val(doc_hash(b, seed), val_fraction):
            continue
        yield text
        used += len(b)
        if limit and used >= limit:
            return


def prepare(inputs: list[str] | None, out: str | os.PathLike, tokenizer: str | None = None,
            vocab_size: int = 8192, workers: int | None = None, val_fraction: float = 0.01,
            seed: int = 1234, on_error: str = "skip", on_file_error: str = "fail",
            max_docs: int | None = None, max_bytes: int | None = None,
            pile_sets: list[str] | None = None, dtype: str = "auto", eos_token: str | None = None,
            text_key: str = "text", text_chunk_bytes: int = 1 << 16,
            bpe_train_bytes: int | None = 100_000_000, chunk_bytes: int = 1 << 20,
            force: bool = False, progress: bool = False, verbose: bool = True) -> dict:
    """Builds (or finds up to date) the prepared directory ``out``; returns its manifest.

    ``inputs``: paths, globs or folders (see readers.py); None or [] = embedded default corpus.
    ``tokenizer``: tokenizer.json / folder / hub name; None = train a byte-level BPE of
    ``vocab_size`` on at most ``bpe_train_bytes`` of the train split. ``max_docs`` /
    ``max_bytes`` cap the records / raw bytes read (in corpus order). ``text_chunk_bytes``:
    plain-text files are cut into documents of about this size (0 = one per file).
    ``workers``, ``progress`` and ``verbose`` do not change the output.
    """
    if on_error not in ("skip", "fail") or on_file_error not in ("skip", "fail"):
        raise ValueError("on_error and on_file_error must be 'skip' or 'fail'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    workers = default_workers() if workers is None else max(1, int(workers))
    out = Path(out)
    inputs = [os.fspath(i) for i in inputs] if inputs else None
    tokenizer = os.fspath(tokenizer) if tokenizer is not None else None
    default = not inputs
    sources = default_corpus.default_sources() if default else expand_inputs(list(inputs))
    if default:
        text_chunk_bytes = 0  # one document per source file
    settings = {
        "inputs": "default" if default else inputs,
        "tokenizer": tokenizer, "vocab_size": vocab_size if tokenizer is None else None,
        "bpe_train_bytes": bpe_train_bytes if tokenizer is None else None,
        "val_fraction": val_fraction, "seed": seed, "on_error": on_error,
        "on_file_error": on_file_error, "max_docs": max_docs, "max_bytes": max_bytes,
        "pile_sets": sorted(pile_sets) if pile_sets else None, "dtype": dtype,
        "eos_token": eos_token, "text_key": text_key, "text_chunk_bytes": text_chunk_bytes,
        "chunk_bytes": chunk_bytes,
    }
    fingerprint = _fingerprint(settings, sources, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    with _dir_lock(out):
        if not force:
            manifest = _up_to_date(out, fingerprint)
            if manifest is not None:
                _log(verbose, f"{out} is up to date ({manifest['splits']['train']['tokens']:,} "
                              "train tokens); nothing to do")
                return manifest
        _clean(out)
        t0 = time.time()
        rec_args = dict(max_docs=max_docs, max_bytes=max_bytes, on_file_error=on_file_error,
                        text_chunk_bytes=text_chunk_bytes, text_key=text_key, verbose=verbose)
        if tokenizer is None:
            _log(verbose, f"training a byte-level BPE (vocab {vocab_size}) on the corpus")
            texts = _train_texts(_records(sources, _Counter(), **rec_args), seed=seed,
                                 val_fraction=val_fraction, pile_sets=pile_sets, on_error=on_error,
                                 text_key=text_key, limit=bpe_train_bytes, sources=sources)
            tok = train_bpe(texts, vocab_size)
            _log(verbose, f"BPE trained in {time.time() - t0:.1f} s")
        else:
            tok = load_tokenizer(tokenizer, eos_token)
        if eos_token and tok.eos_token != eos_token:
            raise TokenizerError(f"eos_token {eos_token!r} given, tokenizer uses {tok.eos_token!r}")
        token_dtype = choose_dtype(tok.vocab_size, dtype)
        _atomic_write(out / "tokenizer.json", tok.json_text)
        counter = _Counter()
        bar = None
        if progress:
            from tqdm import tqdm
            total = sum(os.path.getsize(f) for s in sources for f in (s.files or [s.path]))
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)
        builder = ShardBuilder(out, token_dtype, tok, sources, workers=workers, seed=seed,
                               val_fraction=val_fraction, pile_sets=pile_sets, text_key=text_key,
                               on_error=on_error, chunk_bytes=chunk_bytes, progress=bar,
                               byte_counter=counter)
        t1 = time.time()
        try:
            splits = builder.run(_records(sources, counter, **rec_args))
        finally:
            if bar is not None:
                bar.close()
        t_write = time.time() - t1
        manifest = _manifest(settings, default, tok, token_dtype, splits, builder, sources)
        _atomic_write(out / "manifest.json", canonical_json(manifest))
        _atomic_write(out / "stamp.json", canonical_json({"fingerprint": fingerprint}))
        _summary(verbose, out, manifest, time.time() - t0, t_write, workers)
        return manifest


def _manifest(settings, default, tok, token_dtype, splits, builder, sources) -> dict:
    src_list = []
    for i, s in enumerate(sources):
        skipped, filtered = builder.src_skipped[i], builder.src_filtered[i]
        src_list.append({"path": s.path, "kind": s.kind, "bytes": s.bytes, "sha256": s.sha256 or None,
                         "records": s.records, "skipped": skipped, "filtered": filtered,
                         "documents": s.records - skipped - filtered,
                         "read": s.read, "error": s.error})
    written = sum(sp["documents"] for sp in splits.values())
    return {
        "format": FORMAT,
        "corpus": default_corpus.describe() if default else {"name": "inputs"},
        "settings": settings,
        "tokenizer": tok.describe(),
        "dtype": token_dtype.name,
        "splits": {name: {"prefix": name, **sp} for name, sp in splits.items()},
        "documents": {"records": builder.records, "written": written,
                      "skipped": dict(sorted(builder.skipped.items())),
                      "skipped_total": sum(builder.skipped.values()),
                      "filtered_by_pile_set": builder.filtered},
        "tokens": sum(sp["tokens"] for sp in splits.values()),
        "text_bytes": sum(sp["text_bytes"] for sp in splits.values()),
        "files_with_errors": sum(1 for s in sources if s.error),
        "sources": src_list,
    }


def _summary(verbose, out, m, elapsed, t_write, workers) -> None:
    if not verbose:
        return
    mb = m["text_bytes"] / 1e6
    d = m["documents"]
    lines = [f"prepared {out} in {elapsed:.1f} s ({workers} workers; tokenize+write {t_write:.1f} s "
             f"= {mb / max(t_write, 1e-9):.2f} MB/s, {m['tokens'] / max(t_write, 1e-9):,.0f} tokens/s)"]
    for name, sp in m["splits"].items():
        lines.append(f"  {name:5s}: {sp['documents']:,} documents, {sp['tokens']:,} tokens "
                     f"({sp['text_bytes'] / 1e6:.2f} MB text), {out / name}.bin/.idx")
    lines.append(f"  records {d['records']:,}, written {d['written']:,}, skipped "
                 f"{d['skipped_total']:,} {d['skipped'] or ''}, filtered {d['filtered_by_pile_set']:,}")
    lines.append(f"  tokenizer: {m['tokenizer']['source']} (vocab {m['tokenizer']['vocab_size']:,}, "
                 f"eos {m['tokenizer']['eos_token']!r} = {m['tokenizer']['eos_id']}), dtype {m['dtype']}")
    if m["files_with_errors"]:
        lines.append(f"  {m['files_with_errors']} unreadable file(s) skipped: see manifest.json")
    _log(True, "\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--input", nargs="+", action="extend", default=[],
                    help="files, globs or folders; none = the embedded Python-stdlib corpus")
    ap.add_argument("--tokenizer", help="tokenizer.json, folder or hub name; none = train a BPE")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--vocab-size", type=int, default=8192, help="for the trained BPE")
    ap.add_argument("--bpe-train-bytes", type=int, default=100_000_000)
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="bad documents")
    ap.add_argument("--on-file-error", choices=("skip", "fail"), default="fail", help="unreadable files")
    ap.add_argument("--max-docs", type=int)
    ap.add_argument("--max-bytes", type=int)
    ap.add_argument("--pile-set", action="append", dest="pile_sets",
                    help="keep only documents with this meta.pile_set_name (repeatable)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32", "int32"))
    ap.add_argument("--eos-token")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--text-chunk-bytes", type=int, default=1 << 16)
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20, help="work unit sent to a worker")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--indexed-train", help="link existing PREFIX.bin/.idx instead of preparing")
    ap.add_argument("--indexed-val")
    a = ap.parse_args(argv)
    try:
        if a.indexed_train:
            if not a.tokenizer:
                ap.error("--indexed-train needs --tokenizer")
            from .link import link_indexed
            link_indexed(a.out, a.indexed_train, a.tokenizer, a.indexed_val, a.eos_token)
            _log(True, f"linked {a.indexed_train} into {a.out}")
            return 0
        prepare(a.input or None, a.out, a.tokenizer, vocab_size=a.vocab_size, workers=a.workers,
                val_fraction=a.val_fraction, seed=a.seed, on_error=a.on_error,
                on_file_error=a.on_file_error, max_docs=a.max_docs, max_bytes=a.max_bytes,
                pile_sets=a.pile_sets, dtype=a.dtype, eos_token=a.eos_token, text_key=a.text_key,
                text_chunk_bytes=a.text_chunk_bytes, bpe_train_bytes=a.bpe_train_bytes,
                chunk_bytes=a.chunk_bytes, force=a.force, progress=not a.no_progress)
    except (SourceError, DocumentError, TokenizerError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool as e:
        print(f"error: a tokenizer worker process died ({e}); no shard or manifest was written "
              f"under final names in {a.out}; rerun to rebuild", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
