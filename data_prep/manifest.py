"""What makes a folder a prepared directory: the manifest's format id and the names data_prep
writes, and the rule for replacing one.

Both ways of making a prepared directory (``prepare.py``: tokenize a corpus; ``link.py``: point
at existing token shards) write this layout and replace an existing folder only when it is one
of theirs; this module is what they share, so that neither has to import the other.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from hyena_rtf.utils import atomic

from . import default_corpus

FORMAT = "hyena-rtf-data-prep/1"
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
# Everything a prepared directory can hold; ".lock" and "*.partial" only in folders left by
# versions that built inside the target (the lock and the temporaries now live beside it).
NAMES = frozenset(
    {MANIFEST, "stamp.json", "tokenizer.json", ".lock"} | {f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")}
)


def is_manifest(path: Path) -> bool:
    """Whether ``path`` is a manifest written by some version of data_prep."""
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


def describe(settings, default, tok, token_dtype, splits, builder, sources) -> dict:
    """The manifest of a finished build (``writer.ShardBuilder`` counts, ``readers.Source``s).
    No timestamps: the same inputs and settings give the same bytes."""
    src_list = []
    for i, s in enumerate(sources):
        skipped, filtered = builder.src_skipped[i], builder.src_filtered[i]
        src_list.append(
            {
                "path": s.path,
                "kind": s.kind,
                "bytes": s.bytes,
                "sha256": s.sha256 or None,
                "records": s.records,
                "skipped": skipped,
                "filtered": filtered,
                "documents": s.records - skipped - filtered,
                "read": s.read,
                "error": s.error,
            }
        )
    written = sum(sp["documents"] for sp in splits.values())
    return {
        "format": FORMAT,
        "corpus": default_corpus.describe() if default else {"name": "inputs"},
        "settings": settings,
        "tokenizer": tok.describe(),
        "dtype": token_dtype.name,
        "splits": {name: {"prefix": name, **sp} for name, sp in splits.items()},
        "documents": {
            "records": builder.records,
            "written": written,
            "skipped": dict(sorted(builder.skipped.items())),
            "skipped_total": sum(builder.skipped.values()),
            "filtered_by_pile_set": builder.filtered,
        },
        "tokens": sum(sp["tokens"] for sp in splits.values()),
        "text_bytes": sum(sp["text_bytes"] for sp in splits.values()),
        "files_with_errors": sum(1 for s in sources if s.error),
        "sources": src_list,
    }


def summary(out, m: dict, elapsed: float, t_write: float, workers: int) -> str:
    """The lines printed after a build: counts per split, what was skipped, the tokenizer."""
    mb = m["text_bytes"] / 1e6
    d = m["documents"]
    lines = [
        f"prepared {out} in {elapsed:.1f} s ({workers} workers; tokenize+write {t_write:.1f} s "
        f"= {mb / max(t_write, 1e-9):.2f} MB/s, {m['tokens'] / max(t_write, 1e-9):,.0f} tokens/s)"
    ]
    for name, sp in m["splits"].items():
        lines.append(
            f"  {name:5s}: {sp['documents']:,} documents, {sp['tokens']:,} tokens "
            f"({sp['text_bytes'] / 1e6:.2f} MB text), {out / name}.bin/.idx"
        )
    lines.append(
        f"  records {d['records']:,}, written {d['written']:,}, skipped "
        f"{d['skipped_total']:,} {d['skipped'] or ''}, filtered {d['filtered_by_pile_set']:,}"
    )
    lines.append(
        f"  tokenizer: {m['tokenizer']['source']} (vocab {m['tokenizer']['vocab_size']:,}, "
        f"eos {m['tokenizer']['eos_token']!r} = {m['tokenizer']['eos_id']}), dtype {m['dtype']}"
    )
    if m["files_with_errors"]:
        lines.append(f"  {m['files_with_errors']} unreadable file(s) skipped: see manifest.json")
    return "\n".join(lines)


def nothing_written(m: dict, sources) -> str:
    """One line: which inputs gave no document, and why (counts by reason)."""
    names = [s.path for s in sources]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    d = m["documents"]
    why = [f"{n:,} {reason}" for reason, n in d["skipped"].items()]
    if d["filtered_by_pile_set"]:
        why.append(f"{d['filtered_by_pile_set']:,} not in --pile-set {m['settings']['pile_sets']}")
    why += [f"unreadable {s['path']} ({s['error']})" for s in m["sources"] if s["error"]]
    return (
        f"no documents written from {shown}: {d['records']:,} records read, {'; '.join(why) if why else 'none usable'}"
    )
