"""The layout of a prepared directory: the names of its files, the manifest's format id, the JSON
text they are written in, and the rule for replacing one.

    DIR/manifest.json       the Manifest (manifest.py), written last: the marker of a complete DIR
    DIR/stamp.json          {"fingerprint": sha256 of the inputs and settings} (prepare.py only)
    DIR/tokenizer.json      the tokenizer the shards were made with
    DIR/train.bin/.idx      one Megatron indexed-dataset pair per split (indexed.py); a folder made
    DIR/val.bin/.idx        by link.py has none: its manifest names the linked pairs by path

Both ways of making a prepared directory (``prepare.py``: tokenize a corpus; ``link.py``: point at
existing token shards) write this layout and replace an existing folder only when it is one of
theirs. This module is what they and the readers (``dataset.py``, ``indexed.py``) share; it
imports nothing of data_prep, so that any of them can import it without a cycle.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from hyena_rtf.utils import atomic

FORMAT = "hyena-rtf-data-prep/1"
MANIFEST = "manifest.json"
STAMP = "stamp.json"
TOKENIZER = "tokenizer.json"
TRAIN, VAL = "train", "val"
SPLITS = (TRAIN, VAL)
# Everything a prepared directory can hold; ".lock" and "*.partial" only in folders left by
# versions that built inside the target (the lock and the temporaries now live beside it).
NAMES = frozenset({MANIFEST, STAMP, TOKENIZER, ".lock"} | {f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")})


def shard_prefix(split: str) -> str:
    """The prefix, relative to DIR, of the ``.bin``/``.idx`` pair that ``prepare`` writes for
    ``split``: the split's own name (``DIR/train.bin``, ``DIR/train.idx``)."""
    return split


def canonical_json(obj) -> str:
    """Stable JSON text (sorted keys, fixed separators) for manifests and fingerprints: the same
    content always gives the same bytes, so that reruns give byte-identical folders."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def is_manifest(path: Path) -> bool:
    """Whether ``path`` is a manifest written by some version of data_prep (any ``/N`` of the
    format id: a folder of an older version may be replaced too)."""
    try:
        fmt = json.loads(path.read_text(encoding="utf-8")).get("format", "")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(fmt, str) and fmt.startswith(FORMAT.split("/")[0] + "/")


def _owned(name: str) -> bool:
    return name in NAMES or name.endswith(atomic.SUFFIX)


@contextmanager
def replacing(out: str | os.PathLike, overwrite: bool = False):
    """Yields a staging folder that replaces ``out`` when the block succeeds (``atomic``) and is
    removed when it fails, ``out`` being untouched until then. Refuses first, unless
    ``overwrite``, an ``out`` that is neither empty nor a prepared directory, or that holds files
    data_prep does not write (they would go with it). Call it holding ``atomic.locked(out)``."""
    atomic.check_replaceable(
        out, marker=MANIFEST, kind="data_prep output", is_kind=is_manifest, owned=_owned, overwrite=overwrite
    )
    atomic.remove_stale(out)
    with atomic.replace_dir(out) as stage:
        yield stage
