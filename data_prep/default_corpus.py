"""The embedded default corpus: the Python standard library's own source, available offline.

What is included: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, recursively,
excluding ``site-packages`` / ``dist-packages`` (third-party code, different on every machine)
and ``__pycache__``. The ``test`` package is included: it is ordinary Python source and about
60% of the ~31 MB (CPython 3.11: 1,790 files). Non-``.py`` files (test data, C headers) are not.
Each file is one document, tagged like a Pile document with ``pile_set_name = "Github"``.
Files that are not valid UTF-8 (a few tests deliberately use other encodings) and empty files
(many ``__init__.py``) are skipped and counted in the manifest like any other bad document.

The order is the sorted relative path, so the corpus is the same on every run of one Python.
``write_pile_shard`` exports it in The Pile's own format (``*.jsonl.zst``)::

    python -m data_prep.default_corpus stdlib.jsonl.zst
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

import zstandard

from utils import atomic
from utils.logs import get_logger, setup_logging

from .readers import Source

log = get_logger("data_prep")

SET_NAME = "Github"
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files() -> list[Path]:
    """The included files, sorted by path relative to the stdlib root."""
    root = stdlib_root()
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS)
        out.extend(Path(dirpath) / f for f in files if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def default_sources() -> list[Source]:
    """The corpus as reader sources: one plain-text document per file, set name "Github"."""
    files = stdlib_files()
    if not files:
        raise RuntimeError(f"no Python source found under {stdlib_root()}; pass --input")
    return [Source(str(p), "text", set_name=SET_NAME) for p in files]


def describe() -> dict:
    """Identity of the corpus, recorded in the manifest."""
    return {
        "name": "python-stdlib",
        "python": sys.version.split()[0],
        "root": str(stdlib_root()),
        "pile_set_name": SET_NAME,
    }


def write_pile_shard(path: str | os.PathLike) -> int:
    """Writes the corpus as Pile-format JSON lines, zstd-compressed; returns documents written
    (files that are not UTF-8 are left out)."""
    root = stdlib_root()
    n = 0
    # The zstd writer must not close the file: AtomicFile flushes, fsyncs and renames it after.
    with (
        atomic.AtomicFile(path) as af,
        zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(af.file, closefd=False) as w,
    ):
        for p in stdlib_files():
            try:
                text = p.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            rec = {"text": text, "meta": {"pile_set_name": SET_NAME, "path": p.relative_to(root).as_posix()}}
            w.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
            n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export the embedded default corpus as a Pile shard.")
    ap.add_argument("out", help="output .jsonl.zst path")
    a = ap.parse_args(argv)
    setup_logging()
    log.info(f"wrote {write_pile_shard(a.out)} documents to {a.out}")


if __name__ == "__main__":
    main()
