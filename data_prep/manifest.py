"""The manifest of a prepared directory (``DIR/manifest.json``) as typed dataclasses.

Both writers build a ``Manifest`` and write it with ``Manifest.write`` (``prepare.py`` for a
tokenized corpus, ``link.py`` for linked existing shards); every reader gets one from
``Manifest.read``, which checks every key and type and raises a one-line ``ManifestError`` naming
the file and the key, instead of a ``KeyError`` deep inside training.

On disk (keys sorted, ``layout.canonical_json``)::

    format      "hyena-rtf-data-prep/1"
    corpus      what was read ({"name": ...} and, for the default corpus, its identity)
    tokenizer   TokenizerInfo: source, file, sha256, vocab_size, eos_token, eos_id, trained_here
    dtype       token dtype of the shards ("uint16", "uint32", "int32")
    splits      {name: SplitInfo}: prefix (relative to DIR, or absolute for linked shards),
                documents, tokens, bin_bytes, idx_bytes, and those its writer knows: sequences
                (link), text_bytes, bin_sha256, idx_sha256 (prepare)
    settings, documents (DocumentCounts), tokens, text_bytes, files_with_errors,
    sources (SourceInfo per input)          prepare only; a linked folder has none of them

An optional field (default None) that is None is left out of the JSON, so the two writers' files
are byte for byte what they wrote before this module existed, and folders prepared before load.
A required field that is null (``SourceInfo.sha256`` of a file not read to its end) stays null.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import atomic

from .layout import FORMAT, MANIFEST, TOKENIZER, canonical_json


class ManifestError(ValueError):
    """A manifest.json that is not valid: names the file and the missing or mistyped key."""


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer of the shards. ``file``: its name in DIR; ``eos_id``: the id that ends
    every document; ``vocab_size`` counts added tokens."""

    source: str
    sha256: str
    vocab_size: int
    eos_token: str
    eos_id: int
    trained_here: bool
    file: str = TOKENIZER


@dataclass(frozen=True)
class SplitInfo:
    """One split's ``.bin``/``.idx`` pair and what it must contain (``indexed.py`` checks the
    counts and sizes against the files)."""

    prefix: str
    documents: int
    tokens: int
    bin_bytes: int
    idx_bytes: int
    sequences: int | None = None  # link: Megatron pairs may hold several sequences per document
    text_bytes: int | None = None  # prepare: UTF-8 bytes of the documents' text
    bin_sha256: str | None = None
    idx_sha256: str | None = None


@dataclass(frozen=True)
class DocumentCounts:
    """What happened to the records read: written, skipped (by reason) or filtered out."""

    records: int
    written: int
    skipped: dict[str, int]
    skipped_total: int
    filtered_by_pile_set: int


@dataclass(frozen=True)
class SourceInfo:
    """One input file as it was read. ``sha256`` is null for a file not read to its end;
    ``read``: "full", "partial (...)" or "no (cap)"."""

    path: str
    kind: str
    bytes: int
    sha256: str | None
    records: int
    skipped: int
    filtered: int
    documents: int
    read: str
    error: str | None


@dataclass(frozen=True)
class Manifest:
    """The whole manifest.json (see the module docstring for the fields)."""

    format: str
    corpus: dict[str, Any]
    tokenizer: TokenizerInfo
    dtype: str
    splits: dict[str, SplitInfo]
    settings: dict[str, Any] | None = None
    documents: DocumentCounts | None = None
    tokens: int | None = None
    text_bytes: int | None = None
    files_with_errors: int | None = None
    sources: list[SourceInfo] | None = None

    def to_dict(self) -> dict:
        """The JSON object, optional fields that are None left out."""
        return _to_json_value(self)

    def to_json(self) -> str:
        """The file's text: canonical JSON (same manifest, same bytes)."""
        return canonical_json(self.to_dict())

    def write(self, folder: str | os.PathLike) -> Path:
        """Writes ``folder/manifest.json`` atomically (never seen half-written); returns its path."""
        path = Path(folder) / MANIFEST
        atomic.write_text(path, self.to_json())
        return path

    @classmethod
    def from_dict(cls, obj, source: str | os.PathLike = MANIFEST) -> Manifest:
        """Checks and converts a parsed manifest; ManifestError names ``source`` and the key."""
        try:
            m = _from_json_value(cls, obj, "")
        except _BadKey as e:
            raise ManifestError(f"{source}: {e}") from None
        if m.format != FORMAT:
            raise ManifestError(f"{source}: format {m.format!r} is not {FORMAT!r} (not a manifest of this data_prep)")
        return m

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest:
        """The manifest in the file ``path`` (FileNotFoundError if there is none; ManifestError,
        one line naming the file, if it is not JSON or a key is missing or of the wrong type)."""
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path}: not a JSON file ({e})") from None
        return cls.from_dict(obj, path)


class _BadKey(Exception):
    """Raised inside the converter with the key path; ``Manifest.from_dict`` adds the file."""


_JSON_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number", dict: "an object"}


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, list):
        return "an array"
    return _JSON_NAMES.get(type(value), type(value).__name__)


# One call per dataclass type, not per object (a manifest lists every source file: 1,790 of them
# for the default corpus).
_hints = functools.cache(typing.get_type_hints)


def _key(where: str, name) -> str:
    return f"{where}.{name}" if where else str(name)


def _from_json_value(tp, value, where: str):
    """``value`` (parsed JSON) checked against the annotation ``tp`` and converted (dataclasses
    built from objects). ``where`` is the dotted key path used in the error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        (tp,) = (a for a in args if a is not type(None))
        return _from_json_value(tp, value, where)
    if tp is Any:
        return value
    want = origin or tp
    if dataclasses.is_dataclass(tp):
        want = dict
    if want is list:
        ok = isinstance(value, list)
    else:  # bool is an int subclass in Python, but true is not a count in JSON
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
        expected = "an array" if want is list else _JSON_NAMES[want]
        what = f"key {where!r}" if where else "the manifest"
        raise _BadKey(f"{what} is {_json_kind(value)}, expected {expected}")
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _from_json_value(hints[f.name], value[f.name], _key(where, f.name))
            elif f.default is dataclasses.MISSING:
                raise _BadKey(f"key {_key(where, f.name)!r} is missing")
        return tp(**kwargs)
    if want is dict and args:
        return {k: _from_json_value(args[1], v, _key(where, k)) for k, v in value.items()}
    if want is list and args:
        return [_from_json_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _to_json_value(value):
    """Dataclasses to JSON objects, recursively; optional fields (default None) that are None
    are left out, required ones are kept (as null)."""
    if dataclasses.is_dataclass(value):
        return {
            f.name: _to_json_value(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not (f.default is None and getattr(value, f.name) is None)
        }
    if isinstance(value, dict):
        return {k: _to_json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json_value(v) for v in value]
    return value
