"""The up-to-date check of ``prepare``: ``DIR/stamp.json`` holds the fingerprint of the inputs
and settings a folder was built from, and a rerun with the same fingerprint on a complete,
unchanged folder has nothing to do.

    fingerprint = sha256(canonical_json({format, settings, files: [[path, size, mtime_ns], ...],
                                         tok: [path, size, mtime_ns] of a tokenizer file, or its spec}))

Input files are compared by path, size and modification time, not by content: hashing a corpus
of hundreds of GB on every rerun would cost as much as preparing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from utils import atomic

from .indexed import bin_path, idx_path
from .layout import FORMAT, MANIFEST, STAMP, TOKENIZER, canonical_json
from .manifest import Manifest


def _file_stat(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def fingerprint(settings: dict, sources, tok_spec: str | None) -> str:
    """The fingerprint (hex) of ``settings``, the ``readers.Source``s' files and the tokenizer
    spec (a file's stat when it names one, else the spec itself: a hub name)."""
    files = []
    for s in sources:
        files.extend(_file_stat(f) for f in (s.files or [s.path]))
    tok_id = None
    if tok_spec is not None:
        p = Path(os.path.expanduser(tok_spec))
        p = p / TOKENIZER if (p / TOKENIZER).is_file() else p
        tok_id = _file_stat(str(p.resolve())) if p.is_file() else tok_spec
    blob = canonical_json({"format": FORMAT, "settings": settings, "files": files, "tok": tok_id})
    return hashlib.sha256(blob.encode()).hexdigest()


def write_stamp(folder: Path, fp: str) -> None:
    atomic.write_text(folder / STAMP, canonical_json({"fingerprint": fp}))


def up_to_date(out: Path, fp: str) -> Manifest | None:
    """The manifest if DIR is complete and was built from exactly these inputs and settings (a
    missing, unreadable or invalid file means it is not: it is rebuilt)."""
    try:
        stamp = json.loads((out / STAMP).read_text())
        manifest = Manifest.read(out / MANIFEST)
    except (OSError, ValueError):  # ValueError: not JSON, or an invalid manifest (ManifestError)
        return None
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != fp:
        return None
    tok = out / manifest.tokenizer.file
    if not tok.is_file() or hashlib.sha256(tok.read_bytes()).hexdigest() != manifest.tokenizer.sha256:
        return None
    for sp in manifest.splits.values():
        prefix = out / sp.prefix
        for p, size in ((bin_path(prefix), sp.bin_bytes), (idx_path(prefix), sp.idx_bytes)):
            if not p.is_file() or p.stat().st_size != size:
                return None
    return manifest
