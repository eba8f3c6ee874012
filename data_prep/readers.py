"""Corpus readers: turn input paths into a deterministic stream of raw records, in constant memory.

Supported inputs (``expand_inputs``):

* Pile shards ``*.jsonl.zst`` (The Pile's on-disk format: zstandard-compressed JSON lines
  ``{"text": str, "meta": {"pile_set_name": str, ...}}``), any number of frames per file;
* ``*.jsonl`` / ``*.json`` JSON lines (same fields, ``meta`` optional);
* Hugging Face ``datasets``: a folder written by ``save_to_disk`` (read with ``load_from_disk``;
  every split of a DatasetDict, in sorted order) or ``*.parquet`` / ``*.arrow`` files (read with
  ``load_dataset(..., streaming=True)``, which needs no cache and no network);
* anything else is plain UTF-8 text; folders are walked recursively in sorted order (hidden
  entries skipped) and each file is classified by its extension. Globs are expanded and sorted.

A ``Record`` is ``(source, line, kind, payload, set_name)``: the index of its ``Source``, where it
is in that source, what its payload holds (``Kind``), the payload, and the Pile set name where the
source gives one outside the payload:

* ``Kind.JSON_LINE``: payload is the raw bytes of one JSON line (parsed later, in a worker);
* ``Kind.TEXT``: payload is raw UTF-8 bytes of plain text (a whole file, or one chunk of it);
* ``Kind.DATASET_VALUE``: payload is the ``text`` value of a datasets row (any Python object).

``line`` is 1-based: the line number in a JSON-lines file, the chunk number in a text file, the
row number in a dataset. Readers only split and hash bytes; decoding and validation happen in
``validate_record`` (run in the worker processes) so that the main process stays cheap.

File-level problems (missing file, corrupt or truncated zstd stream, unreadable dataset, a NUL
byte in a plain-text file, a JSON line longer than ``MAX_JSON_LINE``) raise
``SourceError`` naming the file and, where known, the line. Memory is bounded for any input:
plain text is cut into bounded documents even where it has no newline or space (``_text_records``),
and binary data in a plain-text file (a NUL byte: /dev/zero, an image, UTF-16) is refused at the
first NUL.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import zstandard

from utils.logs import get_logger

log = get_logger("data_prep")

READ_BLOCK = 1 << 20
# The largest plain-text document a file given with text_chunk_bytes = 0 ("one document per
# file") is kept whole up to; a larger file is cut into documents of about this size (see
# ``_text_records``), so that no input, /dev/zero included, is ever held whole.
MAX_TEXT_DOCUMENT = 1 << 26
# The longest JSON line read: a JSON document must be parsed whole, so a longer line (or a
# stream that never ends its line) is a file-level error instead of unbounded memory.
MAX_JSON_LINE = 1 << 28
SKIP_REASONS = (
    "invalid_json",
    "not_an_object",
    "missing_text",
    "non_string_text",
    "invalid_utf8",
    "empty_document",
    "blank_line",
)


class Kind(str, Enum):
    """What a record's payload holds. A ``str`` enum whose members equal their one-letter values
    (``Kind.TEXT == "T"``), so that callers written against the letters keep working."""

    JSON_LINE = "J"
    TEXT = "T"
    DATASET_VALUE = "S"


class Record(NamedTuple):
    """One raw document as read, before decoding (see the module docstring)."""

    source: int  # index of its Source in the list being read
    line: int  # 1-based line, text chunk or dataset row
    kind: Kind
    payload: Any  # bytes for JSON_LINE and TEXT, any object for DATASET_VALUE
    set_name: str | None  # Pile set name given beside the payload (text and datasets sources)


class Skip(NamedTuple):
    """Why a record is not a usable document: a reason from ``SKIP_REASONS`` and a message."""

    reason: str
    message: str


class Validated(NamedTuple):
    """What ``validate_record`` makes of a record: ``text`` and ``set_name`` of a usable
    document (``skip`` None), or ``skip`` (text and set_name None)."""

    text: str | None
    set_name: str | None
    skip: Skip | None


class SourceError(RuntimeError):
    """An input file that cannot be read (as opposed to one bad document inside it)."""

    def __init__(self, path, line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")


class DocumentError(ValueError):
    """A bad document under ``on_error='fail'``: names the file, the line and the reason."""


@dataclass
class Source:
    """One input unit. ``kind``: zst | jsonl | text | hf_disk | hf_file. ``set_name`` tags plain
    text documents with a Pile set name (the embedded corpus uses "Github")."""

    path: str
    kind: str
    set_name: str | None = None
    # filled while reading, reported in the manifest
    bytes: int = 0
    sha256: str = ""
    records: int = 0
    error: str | None = None
    read: str = "no"  # full | partial (...) | no
    files: list = field(default_factory=list)  # hf_disk: the files that make up the folder


def classify(path: str) -> str:
    p = path.lower()
    if p.endswith(".jsonl.zst") or p.endswith(".json.zst") or p.endswith(".zst"):
        return "zst"
    if p.endswith(".jsonl") or p.endswith(".json"):
        return "jsonl"
    if p.endswith(".parquet") or p.endswith(".arrow"):
        return "hf_file"
    return "text"


def _is_hf_disk(d: Path) -> bool:
    return (d / "dataset_dict.json").is_file() or (d / "state.json").is_file()


def _walk(d: Path) -> list[Path]:
    """The regular files under folder `d` (hidden names and __pycache__ left out), sorted. Anything
    else os.walk lists as a file (a FIFO, a socket, a device) is skipped with a warning naming it:
    reading a FIFO nobody writes to blocks forever, and a device is not a document."""
    out, skipped = [], []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "__pycache__")
        for path in (Path(root) / f for f in sorted(files) if not f.startswith(".")):
            (out if path.is_file() else skipped).append(path)
    if skipped:
        shown = ", ".join(map(str, skipped[:3])) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        log.warning(f"skipping {len(skipped)} input(s) in {d} that are not regular files: {shown}")
    return sorted(out)


def expand_inputs(inputs: list[str]) -> list[Source]:
    """Resolve input paths, globs and folders into an ordered list of ``Source``s.

    Raises ``SourceError`` for a path that does not exist or a glob that matches nothing, since
    silently training on less data than asked for is the worse failure.
    """
    sources: list[Source] = []
    for spec in inputs:
        spec = os.path.expanduser(str(spec))
        if glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise SourceError(spec, None, "glob matches no file")
        else:
            if not os.path.exists(spec):
                raise SourceError(spec, None, "no such file or folder")
            matches = [spec]
        for m in matches:
            p = Path(m).resolve()
            if p.is_dir():
                if _is_hf_disk(p):
                    sources.append(Source(str(p), "hf_disk", files=[str(f) for f in _walk(p)]))
                else:
                    sources.extend(Source(str(f), classify(f.name)) for f in _walk(p))
            elif not p.is_file():  # a FIFO, socket or device named by the user: reading could block forever
                raise SourceError(m, None, "not a regular file or folder (a FIFO, socket or device)")
            else:
                sources.append(Source(str(p), classify(p.name)))
    return sources


class _Counter:
    """Bytes read from disk so far (the progress bar reads it)."""

    def __init__(self):
        self.bytes = 0


def _hashed_blocks(src: Source, counter: _Counter):
    """Yields the raw bytes of a file in blocks while hashing and counting them."""
    h = hashlib.sha256()
    n = 0
    try:
        with open(src.path, "rb") as f:
            while True:
                b = f.read(READ_BLOCK)
                if not b:
                    break
                h.update(b)
                n += len(b)
                counter.bytes += len(b)
                yield b
    except OSError as e:
        raise SourceError(src.path, None, f"cannot read: {e}") from e
    src.bytes, src.sha256 = n, h.hexdigest()


def _zst_blocks(src: Source, counter: _Counter, lines_so_far):
    """Decompressed blocks of a (possibly multi-frame) zstd file; detects truncation.

    ``ZstdDecompressor.stream_reader`` returns short data silently at a truncated frame, so the
    frames are driven by hand: a frame still open at end of file is an error.
    """
    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame = dctx.decompressobj(), False
    for block in _hashed_blocks(src, counter):
        while block:
            in_frame = True
            try:
                out = dobj.decompress(block)
            except zstandard.ZstdError as e:
                raise SourceError(src.path, lines_so_far() + 1, f"corrupt zstd stream: {e}") from e
            if out:
                yield out
            if dobj.eof:  # frame complete: the rest of the block starts the next frame
                block, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
            else:
                block = b""
    if in_frame:
        raise SourceError(src.path, lines_so_far() + 1, "truncated zstd stream (file ends inside a frame)")


def _check_text(src: Source, block: bytes, offset: int) -> None:
    """SourceError at the first NUL byte of plain text: no text file has one, and binary input
    (or /dev/zero, which never ends) must stop at once rather than be read as documents. (JSON
    lines are not checked: a raw NUL makes only its own line invalid JSON, skipped as such.)"""
    i = block.find(b"\0")
    if i >= 0:
        raise SourceError(src.path, None, f"binary data (a NUL byte at byte {offset + i}), not text")


def _lines(blocks, src: Source | None = None):
    """Splits byte blocks into lines (without the b"\\n"); a last line without newline counts.
    The pieces of a line longer than a block are joined once, at its end, so that a line of
    tens of MB costs one copy rather than one per block. A line longer than ``MAX_JSON_LINE``
    is a SourceError (for ``src``, once that many bytes are held: memory stays bounded)."""
    rest: list = []
    held = 0
    n = 0
    for b in blocks:
        if b"\n" not in b:
            rest.append(b)
            held += len(b)
            if held > MAX_JSON_LINE:
                raise SourceError(
                    src.path if src else "input",
                    n + 1,
                    f"line longer than {MAX_JSON_LINE >> 20} MiB: more than a JSON document this reader holds",
                )
            continue
        n += b.count(b"\n")
        parts = b.split(b"\n")
        if rest:
            rest.append(parts[0])
            parts[0] = b"".join(rest)
        rest = [parts.pop()]
        held = len(rest[0])
        yield from parts
    tail = b"".join(rest)
    if tail:
        yield tail


def _json_records(si: int, src: Source, counter: _Counter, zst: bool):
    state = {"line": 0}
    blocks = _zst_blocks(src, counter, lambda: state["line"]) if zst else _hashed_blocks(src, counter)
    for line in _lines(blocks, src):
        state["line"] += 1
        yield Record(si, state["line"], Kind.JSON_LINE, line, None)


def _char_start(data: bytes) -> int:
    """Where the last UTF-8 character of ``data`` starts if it is incomplete (cut off by a
    block boundary), else ``len(data)``: cutting there never splits a character."""
    j = len(data) - 1
    while j > 0 and len(data) - j < 4 and data[j] & 0xC0 == 0x80:
        j -= 1
    if j < 0:
        return 0
    lead = data[j]
    width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return j if j + width > len(data) else len(data)


def _split_long_line(piece: bytes) -> int:
    """Where to cut a run of ``piece`` that has no newline: just before the last space in its
    second half (the space stays with the words after it, as tokenizers group it), else, where
    no space comes (base64, a DNA sequence, /dev/zero-like data), at the end of the last whole
    UTF-8 character."""
    p = piece.rfind(b" ", len(piece) // 2)
    return p if p > 0 else _char_start(piece)


def _text_records(si: int, src: Source, counter: _Counter, chunk_bytes: int):
    """Plain text: documents of about ``chunk_bytes``, cut after a blank line (paragraph end),
    or after any line once past ``4 x chunk_bytes``, so that one huge file neither needs
    unbounded memory nor lands entirely in one split; ``chunk_bytes <= 0``: the whole file as one
    document, up to ``MAX_TEXT_DOCUMENT`` bytes. The documents of a file concatenate back to the
    exact file.

    Hard bound: a line is read at most ``hard`` bytes at a time (``4 x chunk_bytes``, or
    ``MAX_TEXT_DOCUMENT``), so no document exceeds ``2 x hard`` bytes, whatever the input. Text
    whose lines are all shorter than ``hard`` (256 KiB at the default 64 KiB: any prose or code)
    is cut exactly as without the bound. Only a longer line is cut inside: before its last space
    in the second half of the piece read, else (no space at all: base64, a DNA sequence) at a
    character boundary. Each cut adds one end-of-document token and can change the one or two
    tokens beside it, once per ``hard / 2`` bytes or more of such text: nothing else changes. A
    NUL byte is a SourceError (binary input)."""
    hard = 4 * chunk_bytes if chunk_bytes > 0 else MAX_TEXT_DOCUMENT
    soft = chunk_bytes if chunk_bytes > 0 else MAX_TEXT_DOCUMENT
    h, total, buf, size, n = hashlib.sha256(), 0, [], 0, 0
    try:
        with open(src.path, "rb") as f:
            while True:
                piece = f.readline(hard)  # a whole line, or the next ``hard`` bytes of a longer one
                if not piece:
                    break
                _check_text(src, piece, total)
                h.update(piece)
                total += len(piece)
                counter.bytes += len(piece)
                whole = piece.endswith(b"\n") or len(piece) < hard  # a partial read is exactly ``hard``
                if not whole:
                    cut = _split_long_line(piece)
                    if cut > 0:
                        buf.append(piece[:cut])
                        n += 1
                        yield Record(si, n, Kind.TEXT, b"".join(buf), src.set_name)
                        buf, size = [], 0
                        piece = piece[cut:]
                buf.append(piece)
                size += len(piece)
                if size >= soft and (not piece.strip() or size >= hard):
                    n += 1
                    yield Record(si, n, Kind.TEXT, b"".join(buf), src.set_name)
                    buf, size = [], 0
    except OSError as e:
        raise SourceError(src.path, None, f"cannot read: {e}") from e
    if buf:
        n += 1
        yield Record(si, n, Kind.TEXT, b"".join(buf), src.set_name)
    src.bytes, src.sha256 = total, h.hexdigest()


def _hf_records(si: int, src: Source, counter: _Counter, text_key: str):
    """Rows of a Hugging Face dataset; ``meta.pile_set_name`` is honoured when present."""
    try:
        # Imported here: datasets (pyarrow, pandas) takes seconds to import and only these
        # sources need it.
        import datasets

        if src.kind == "hf_disk":
            h, total = hashlib.sha256(), 0
            for f in src.files:  # checksum of the folder = its files, in sorted order
                with open(f, "rb") as fh:
                    for b in iter(lambda: fh.read(READ_BLOCK), b""):
                        h.update(b)
                        total += len(b)
            src.bytes, src.sha256 = total, h.hexdigest()
            ds = datasets.load_from_disk(src.path)
            parts = [ds[k] for k in sorted(ds.keys())] if isinstance(ds, datasets.DatasetDict) else [ds]
        else:
            for _ in _hashed_blocks(src, counter):
                pass
            builder = "parquet" if src.path.lower().endswith(".parquet") else "arrow"
            parts = [datasets.load_dataset(builder, data_files=[src.path], split="train", streaming=True)]
    except SourceError:
        raise
    except Exception as e:  # datasets raises many types for unreadable data
        raise SourceError(src.path, None, f"cannot open as a datasets dataset: {e}") from e
    row = 0
    for part in parts:
        if text_key not in (part.column_names or []):
            raise SourceError(src.path, None, f"dataset has no {text_key!r} column (columns: {part.column_names})")
        try:
            for ex in part:
                row += 1
                meta = ex.get("meta")
                set_name = meta.get("pile_set_name") if isinstance(meta, dict) else None
                yield Record(si, row, Kind.DATASET_VALUE, ex.get(text_key), set_name)
        except Exception as e:
            raise SourceError(src.path, row + 1, f"cannot read row: {e}") from e


def iter_records(
    si: int, src: Source, counter: _Counter | None = None, text_chunk_bytes: int = 0, text_key: str = "text"
):
    """All ``Record``s of one source, in file order."""
    counter = _Counter() if counter is None else counter
    if src.kind in ("zst", "jsonl"):
        yield from _json_records(si, src, counter, zst=src.kind == "zst")
    elif src.kind == "text":
        yield from _text_records(si, src, counter, text_chunk_bytes)
    elif src.kind in ("hf_disk", "hf_file"):
        yield from _hf_records(si, src, counter, text_key)
    else:
        raise SourceError(src.path, None, f"unknown source kind {src.kind}")


def validate_record(kind: Kind, payload, set_name, text_key: str = "text") -> Validated:
    """Decode and check one record's payload (``Record.kind``, ``.payload``, ``.set_name``): a
    ``Validated`` with the text of a usable document, or with the ``Skip`` that says why not."""
    if kind == Kind.JSON_LINE:
        if not payload.strip():
            return _skip("blank_line", "blank line")
        try:
            s = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return _skip("invalid_utf8", f"invalid UTF-8: {e}")
        try:
            obj = json.loads(s)
        except ValueError as e:
            return _skip("invalid_json", f"invalid JSON: {e}")
        if not isinstance(obj, dict):
            return _skip("not_an_object", f"JSON value is a {type(obj).__name__}, not an object")
        if text_key not in obj:
            return _skip("missing_text", f"no {text_key!r} field")
        text = obj[text_key]
        meta = obj.get("meta")
        set_name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    elif kind == Kind.TEXT:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return _skip("invalid_utf8", f"invalid UTF-8: {e}")
    else:
        text = payload
        if text is None:
            return _skip("missing_text", f"{text_key!r} is null")
    if not isinstance(text, str):
        return _skip("non_string_text", f"{text_key!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        return _skip("empty_document", "empty document")
    return Validated(text, set_name, None)


def _skip(reason: str, message: str) -> Validated:
    return Validated(None, None, Skip(reason, message))
