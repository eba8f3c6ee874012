"""Prepare a training directory: read a corpus, tokenize it in parallel, write token shards.

    python -m data_prep.prepare --input 'pile/train/*.jsonl.zst' --tokenizer 20B_tokenizer.json \\
        --out DIR --workers N
    python -m data_prep.prepare --out DIR        # embedded default corpus + a BPE trained on it

Output layout (``DIR``): ``layout.py``. The tokenizer is a given one copied byte for byte, or one
trained here; ``stamp.json`` is the fingerprint of inputs + settings, for the up-to-date check
(``stamp.py``). The manifest (``manifest.py``) holds token and document counts per split, skipped
documents by reason, documents dropped by the Pile-set filter, the tokenizer (source, sha256,
vocabulary size, end-of-document id), the token dtype, the settings, and every source file with
its size and sha256. It contains no timestamps, so the same inputs and settings give
byte-identical shards and manifest.

Rerunning with the same settings on a complete DIR returns the manifest at once (input files are
compared by path, size and mtime); anything else is rebuilt from scratch. A rebuild never puts
the existing DIR at risk: settings, inputs and the tokenizer are checked first, the new
directory is built in a staging folder beside DIR (``.DIR.<pid>-<hex>.partial``) and swapped in
only once complete (``atomic.py``), so a run that fails or is killed leaves DIR as it was (but
needs room for both while it runs). DIR is replaced only if it is absent, empty or a data_prep
output holding only the files it wrote, known by the stamp it wrote (``.hyena-rtf-output.json``:
a random id and every file's name and size; names decide nothing, see ``utils/atomic.py``);
anything else, e.g. a user's ``notes.partial`` inside it, is refused with one line naming it,
unless ``overwrite=True`` (``--overwrite``). DIR may never be an input, inside an input folder or
contain an input or the tokenizer file (after resolving symlinks), ``--overwrite`` or not: that is
refused before anything is read or written. Concurrent calls on one DIR are serialized with a
file lock beside it (``.DIR.lock``), so every rank of a distributed job may call ``prepare`` and
all but the first find it up to date.

Bad input: a bad document (invalid JSON, invalid UTF-8, missing or non-string text, empty) is
skipped and counted (``on_error="skip"``, default) or stops the run with its file and line
(``"fail"``); an unreadable file (missing, corrupt or truncated zstd, unreadable dataset) stops
the run (``on_file_error="fail"``, default) or is recorded in the manifest and skipped from where
it broke (``"skip"``). A run that would write no document at all (every record bad, or
filtered out) is an error naming the inputs and what was skipped, by reason.

Command-line errors (bad input, tokenizer, settings, an output folder that is read-only, full or
not data_prep's) are one line on stderr (``python -m data_prep.prepare: error: ...``,
``utils.logs``) and exit status 2; with ``HYENA_RTF_DEBUG=1`` they are raised with their traceback
instead. Progress goes to stderr as ``[data_prep] ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from utils import atomic
from utils.cli import OneLineParser, UsageError
from utils.logs import error_exit, get_logger, setup_logging

from . import default_corpus
from .indexed import TOKEN_DTYPES
from .layout import KIND, TOKENIZER, TRAIN, replacing
from .link import link_indexed
from .manifest import Manifest
from .readers import DocumentError, SourceError, _Counter, expand_inputs
from .report import build_manifest, nothing_written, summary
from .stamp import fingerprint, up_to_date, write_stamp
from .stream import check_readable, records, train_texts
from .tokenizer import TokenizerError, check_vocab_size, choose_dtype, load_data_tokenizer, train_bpe
from .writer import ShardBuilder, available_cores

PROG = "python -m data_prep.prepare"
DEFAULT_PIECE = 1 << 16  # characters per tokenizer call when text_chunk_bytes is 0
# Settings that the corpus pass for BPE training and the shard writer both take as they are.
_SPLIT_SETTINGS = ("seed", "val_fraction", "pile_sets", "text_key", "on_error")
# prepare() keywords given by the CLI flag of the same name, as they are.
_CLI_OPTIONS = (
    "vocab_size",
    "workers",
    "val_fraction",
    "seed",
    "on_error",
    "on_file_error",
    "max_docs",
    "max_bytes",
    "pile_sets",
    "dtype",
    "eos_token",
    "text_key",
    "text_chunk_bytes",
    "bpe_train_bytes",
    "chunk_bytes",
    "force",
    "overwrite",
)
log = get_logger("data_prep")


class NoDocumentsError(ValueError):
    """A run that would write no document: names the inputs and what was skipped, by reason."""


def default_workers() -> int:
    """Worker processes: one per 8 cores. Each tokenizes with cores / workers Rayon threads
    (`tokenizers`' own parallelism), which beats one single-threaded process per core: measured on
    2 cores with the 20B tokenizer, 1 process x 2 threads gave 5.1 MB/s, 2 processes x 1 thread
    2.95 MB/s (pickling and worker start-up cost more than they save). More processes keep the
    Python side (validation, hashing, flattening ids) from becoming the bottleneck on big machines."""
    return max(1, available_cores() // 8)


def _check_settings(
    on_error, on_file_error, val_fraction, dtype, text_chunk_bytes, chunk_bytes, max_docs, max_bytes
) -> None:
    """Raises ValueError naming the first bad setting (before anything is read or written)."""
    if on_error not in ("skip", "fail") or on_file_error not in ("skip", "fail"):
        raise ValueError("on_error and on_file_error must be 'skip' or 'fail'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if dtype != "auto" and dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(TOKEN_DTYPES)}, not {dtype!r}")
    for name, v in (
        ("text_chunk_bytes", text_chunk_bytes),
        ("chunk_bytes", chunk_bytes),
        ("max_docs", max_docs),
        ("max_bytes", max_bytes),
    ):
        if v is not None and v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def prepare(
    inputs: list[str] | None,
    out: str | os.PathLike,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    workers: int | None = None,
    val_fraction: float = 0.01,
    seed: int = 1234,
    on_error: str = "skip",
    on_file_error: str = "fail",
    max_docs: int | None = None,
    max_bytes: int | None = None,
    pile_sets: list[str] | None = None,
    dtype: str = "auto",
    eos_token: str | None = None,
    text_key: str = "text",
    text_chunk_bytes: int = 1 << 16,
    bpe_train_bytes: int | None = 100_000_000,
    chunk_bytes: int = 1 << 20,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    verbose: bool = True,
) -> dict:
    """Builds (or finds up to date) the prepared directory ``out``; returns its manifest.

    ``inputs``: paths, globs or folders (see readers.py); None or [] = embedded default corpus.
    ``tokenizer``: tokenizer.json / folder / hub name; None = train a byte-level BPE of
    ``vocab_size`` on at most ``bpe_train_bytes`` of the train split. ``max_docs`` /
    ``max_bytes`` cap the records / raw bytes read (in corpus order). ``text_chunk_bytes``:
    plain-text files are cut into documents of about this size (0 = one per file), and every
    document is tokenized in pieces of at most this many characters (``DEFAULT_PIECE`` when 0;
    see ``tokenizer.piece_spans``). ``force``: rebuild even if up to date; ``overwrite``:
    replace an ``out`` that is not a data_prep output. ``workers``, ``progress`` and
    ``verbose`` do not change the output; ``verbose`` logs progress and the summary to stderr
    (``utils.logs``, set up here as the CLI does, so that library callers see them too).

    Returns the manifest as its JSON object (``Manifest.to_dict``; ``Manifest.from_dict`` gives
    the typed one), the same whether DIR was built or found up to date.
    """
    if verbose:
        setup_logging()
    _check_settings(on_error, on_file_error, val_fraction, dtype, text_chunk_bytes, chunk_bytes, max_docs, max_bytes)
    workers = default_workers() if workers is None else max(1, int(workers))
    out = Path(out)
    inputs = [os.fspath(i) for i in inputs] if inputs else None
    tokenizer = os.fspath(tokenizer) if tokenizer is not None else None
    default = not inputs
    sources = default_corpus.default_sources() if default else expand_inputs(list(inputs))
    atomic.check_apart(out, _input_paths(inputs, sources, tokenizer))
    check_readable(sources)
    if default:
        text_chunk_bytes = 0  # one document per source file
    settings = {
        "inputs": "default" if default else inputs,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer is None else None,
        "bpe_train_bytes": bpe_train_bytes if tokenizer is None else None,
        "val_fraction": val_fraction,
        "seed": seed,
        "on_error": on_error,
        "on_file_error": on_file_error,
        "max_docs": max_docs,
        "max_bytes": max_bytes,
        "pile_sets": sorted(pile_sets) if pile_sets else None,
        "dtype": dtype,
        "eos_token": eos_token,
        "text_key": text_key,
        "text_chunk_bytes": text_chunk_bytes,
        "chunk_bytes": chunk_bytes,
    }
    fp = fingerprint(settings, sources, tokenizer)
    # A folder that is not ours is refused before even the lock file is made beside it (and
    # checked again under the lock, in ``replacing``: another run may have finished meanwhile).
    atomic.check_replaceable(out, kind=KIND, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.locked(out):
        if not force:
            manifest = up_to_date(out, fp)
            if manifest is not None:
                if verbose:
                    log.info(f"{out} is up to date ({manifest.splits[TRAIN].tokens:,} train tokens); nothing to do")
                return manifest.to_dict()
        if tokenizer is None:  # trained in _build; only its size can be checked now
            tok = None
            check_vocab_size(vocab_size)
        else:
            tok = load_data_tokenizer(tokenizer, eos_token)
            _token_dtype(tok, eos_token, dtype)
        t0 = time.time()
        with replacing(out, overwrite) as stage:
            manifest, t_write = _build(
                stage,
                sources,
                tok,
                settings,
                default,
                fp,
                workers=workers,
                progress=progress,
                verbose=verbose,
                piece=text_chunk_bytes or DEFAULT_PIECE,
            )
        if verbose:
            log.info(summary(out, manifest, time.time() - t0, t_write, workers))
        return manifest.to_dict()


def _input_paths(inputs, sources, tokenizer) -> list[str]:
    """Every path ``prepare`` reads: the input arguments that name a file or folder, each source
    file, and a local tokenizer; ``out`` must stay apart from all of them (``atomic.check_apart``:
    ``--out corpus`` would delete the corpus, ``--out corpus/prepared`` be read back as input)."""
    paths = [os.path.expanduser(i) for i in inputs or () if os.path.lexists(os.path.expanduser(i))]
    for s in sources:
        paths.append(s.path)
        paths.extend(s.files)
    if tokenizer is not None and os.path.lexists(os.path.expanduser(tokenizer)):
        paths.append(tokenizer)
    return paths


def _token_dtype(tok, eos_token, dtype):
    """The shard dtype for ``tok``; TokenizerError if it or its end-of-document token does not
    fit the settings."""
    if eos_token and tok.eos_token != eos_token:
        raise TokenizerError(f"eos_token {eos_token!r} given, tokenizer uses {tok.eos_token!r}")
    return choose_dtype(tok.vocab_size, dtype)


def _build(
    stage: Path, sources, tok, settings, default, fp, *, workers, progress, verbose, piece
) -> tuple[Manifest, float]:
    """Writes the whole prepared directory into ``stage``; returns the manifest and the seconds
    spent tokenizing and writing. Raises NoDocumentsError when no document would be written."""
    st = settings
    rec_args = dict(
        max_docs=st["max_docs"],
        max_bytes=st["max_bytes"],
        on_file_error=st["on_file_error"],
        text_chunk_bytes=st["text_chunk_bytes"],
        text_key=st["text_key"],
        verbose=verbose,
    )
    if tok is None:
        t0 = time.time()
        if verbose:
            log.info(f"training a byte-level BPE (vocab {st['vocab_size']}) on the corpus")
        texts = train_texts(
            records(sources, _Counter(), **rec_args),
            **{k: st[k] for k in _SPLIT_SETTINGS},
            limit=st["bpe_train_bytes"],
            sources=sources,
            piece=piece,
        )
        tok = train_bpe(texts, st["vocab_size"])
        if verbose:
            log.info(f"BPE trained in {time.time() - t0:.1f} s")
    token_dtype = _token_dtype(tok, st["eos_token"], st["dtype"])
    atomic.write_text(stage / TOKENIZER, tok.json_text)
    counter = _Counter()
    bar = None
    if progress:
        total = sum(os.path.getsize(f) for s in sources for f in (s.files or [s.path]))
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)
    builder = ShardBuilder(
        stage,
        token_dtype,
        tok,
        sources,
        workers=workers,
        **{k: st[k] for k in _SPLIT_SETTINGS},
        chunk_bytes=st["chunk_bytes"],
        piece_chars=piece,
        progress=bar,
        byte_counter=counter,
    )
    t1 = time.time()
    try:
        splits = builder.run(records(sources, counter, **rec_args))
    finally:
        if bar is not None:
            bar.close()
    t_write = time.time() - t1
    corpus = default_corpus.describe() if default else {"name": "inputs"}
    manifest = build_manifest(settings, corpus, tok, token_dtype, splits, builder, sources)
    if manifest.documents.written == 0:
        raise NoDocumentsError(nothing_written(manifest, sources))
    manifest.write(stage)
    write_stamp(stage, fp)
    return manifest, t_write


def _cli_error(e: BaseException) -> str:
    """What reports ``e``: an OSError as "file: reason", anything else as its message
    (``error_exit`` folds it to one line: tokenizers' messages can have newlines)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


# The flags that shape what tokenizing a corpus builds, by their argparse dest. Linking existing
# shards (--indexed-train/--indexed-val) reads only --tokenizer, --eos-token, --out and --overwrite,
# so any of these beside it would be silently ignored (--workers and --no-progress change nothing
# that is built, and --force: a link always rewrites, so those three are harmless and allowed).
_TOKENIZING_FLAGS = {
    "input": "--input",
    "vocab_size": "--vocab-size",
    "bpe_train_bytes": "--bpe-train-bytes",
    "val_fraction": "--val-fraction",
    "seed": "--seed",
    "on_error": "--on-error",
    "on_file_error": "--on-file-error",
    "max_docs": "--max-docs",
    "max_bytes": "--max-bytes",
    "pile_sets": "--pile-set",
    "dtype": "--dtype",
    "text_key": "--text-key",
    "text_chunk_bytes": "--text-chunk-bytes",
    "chunk_bytes": "--chunk-bytes",
}


def _check_indexed_flags(ap: argparse.ArgumentParser, argv, a: argparse.Namespace) -> None:
    """UsageError when --indexed-* is combined with a flag only tokenizing uses (`_TOKENIZING_FLAGS`),
    or --indexed-val comes without --indexed-train (which alone selects linking). The flags given
    are told from those left out by parsing again into a namespace that holds None for each of
    them (argparse fills in a default only where the namespace has no value), so that a value
    equal to its default counts as given too."""
    if not (a.indexed_train or a.indexed_val):
        return
    if not a.indexed_train:
        raise UsageError("--indexed-val needs --indexed-train (linking takes both splits' prefixes)")
    if not a.tokenizer:
        raise UsageError("--indexed-train needs --tokenizer")
    seen = ap.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(_TOKENIZING_FLAGS)))
    given = [flag for dest, flag in _TOKENIZING_FLAGS.items() if getattr(seen, dest) is not None]
    if given:
        raise UsageError(
            f"--indexed-train links existing token shards and tokenizes nothing, so {', '.join(given)} "
            "would be ignored; drop them, or drop --indexed-train/--indexed-val to tokenize the corpus"
        )


def main(argv=None) -> int:
    ap = OneLineParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--input",
        nargs="+",
        action="extend",
        default=[],
        help="files, globs or folders; none = the embedded Python-stdlib corpus",
    )
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
    ap.add_argument(
        "--pile-set",
        action="append",
        dest="pile_sets",
        help="keep only documents with this meta.pile_set_name (repeatable)",
    )
    ap.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32", "int32"))
    ap.add_argument("--eos-token")
    ap.add_argument("--text-key", default="text")
    ap.add_argument(
        "--text-chunk-bytes",
        type=int,
        default=1 << 16,
        help="plain text: document size; all text: characters per tokenizer call",
    )
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20, help="work unit sent to a worker")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--overwrite", action="store_true", help="replace an --out folder that is not a data_prep output")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--indexed-train", help="link existing PREFIX.bin/.idx instead of preparing")
    ap.add_argument("--indexed-val")
    try:
        a = ap.parse_args(argv)
        _check_indexed_flags(ap, argv, a)
    except UsageError as e:
        return error_exit(PROG, e)
    setup_logging()
    try:
        if a.indexed_train:
            link_indexed(a.out, a.indexed_train, a.tokenizer, a.indexed_val, a.eos_token, overwrite=a.overwrite)
            log.info(f"linked {a.indexed_train} into {a.out}")
            return 0
        options = {k: getattr(a, k) for k in _CLI_OPTIONS}
        prepare(a.input or None, a.out, a.tokenizer, progress=not a.no_progress, **options)
    except (SourceError, DocumentError, TokenizerError, ValueError, OSError, BrokenProcessPool) as e:
        # Bad input, tokenizer or settings, or an output folder that cannot be written (read-only,
        # full, not ours): the user's to fix, so one line and no traceback, unless debugging.
        # A worker that died is not, and keeps its own status, 1.
        if os.environ.get("HYENA_RTF_DEBUG") == "1":
            raise
        if isinstance(e, BrokenProcessPool):
            why = f"a tokenizer worker process died ({e}); {a.out} was not changed; rerun to rebuild"
            return error_exit(PROG, why, code=1)
        return error_exit(PROG, _cli_error(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
