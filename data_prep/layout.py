"""The layout of a prepared directory: the names of its files, the manifest's format id, the JSON
text they are written in, and the rule for replacing one.

    DIR/manifest.json       the Manifest (manifest.py), written last: the marker of a complete DIR
    DIR/stamp.json          {"fingerprint": sha256 of the inputs and settings} (prepare.py only)
    DIR/tokenizer.json      the tokenizer the shards were made with
    DIR/train.bin/.idx      one Megatron indexed-dataset pair per split (indexed.py); a folder made
    DIR/val.bin/.idx        by link.py has none: its manifest names the linked pairs by path
    DIR/.hyena-rtf-output.json  the stamp (utils/atomic.py): what makes DIR data_prep's to replace

Both ways of making a prepared directory (``prepare.py``: tokenize a corpus; ``link.py``: point at
existing token shards) write this layout and replace an existing folder only when its stamp says
it is one of theirs and it holds nothing but the files the stamp lists (``replacing``).
This module is what they and the readers (``dataset.py``, ``indexed.py``) share; it
imports nothing of data_prep, so that any of them can import it without a cycle.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

from utils import atomic

FORMAT = "hyena-rtf-data-prep/1"
MANIFEST = "manifest.json"
STAMP = "stamp.json"
TOKENIZER = "tokenizer.json"
TRAIN, VAL = "train", "val"
SPLITS = (TRAIN, VAL)
# What the stamp of a prepared directory calls it (utils/atomic.py).
KIND = "data_prep output"


def shard_prefix(split: str) -> str:
    """The prefix, relative to DIR, of the ``.bin``/``.idx`` pair that ``prepare`` writes for
    ``split``: the split's own name (``DIR/train.bin``, ``DIR/train.idx``)."""
    return split


def canonical_json(obj) -> str:
    """Stable JSON text (sorted keys, fixed separators) for manifests and fingerprints: the same
    content always gives the same bytes, so that reruns give byte-identical folders."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


@contextmanager
def replacing(out: str | os.PathLike, overwrite: bool = False):
    """Yields a staging folder that replaces ``out`` when the block succeeds (``atomic``) and is
    removed when it fails, ``out`` being untouched until then. Refuses first (one line), unless
    ``overwrite``: an ``out`` that is neither absent, empty nor stamped as a data_prep output,
    or one that holds anything its stamp does not list (a user's ``notes.partial`` is kept, and
    the run refuses: names decide nothing); and, whatever ``overwrite`` says, an ``out`` that
    cannot be written. Stale staging folders of killed runs, known by their stamps, are cleared.
    Call it holding ``atomic.locked(out)``, with the inputs already checked apart from ``out``
    (``atomic.check_apart``)."""
    atomic.check_replaceable(out, kind=KIND, overwrite=overwrite)
    atomic.check_writable(out, "data_prep output")
    atomic.remove_stale(out, KIND)
    with atomic.replace_dir(out, KIND) as stage:
        yield stage
