"""What a finished ``prepare`` build reports: its ``Manifest`` (from the shard writer's counts and
the sources as read), the lines logged after it, and the error of a build that wrote nothing."""

from __future__ import annotations

from .layout import FORMAT, MANIFEST, shard_prefix
from .manifest import DocumentCounts, Manifest, SourceInfo, SplitInfo


def build_manifest(settings: dict, corpus: dict, tok, token_dtype, splits: dict, builder, sources) -> Manifest:
    """The manifest of a build: ``tok`` a ``tokenizer.LoadedTokenizer``, ``splits`` what
    ``writer.ShardBuilder.run`` returned (one ``IndexedWriter.finalize`` dict plus text_bytes per
    split), ``builder`` that ShardBuilder (its counts), ``sources`` the ``readers.Source``s.
    No timestamps: the same inputs and settings give the same bytes."""
    src_list = []
    for i, s in enumerate(sources):
        skipped, filtered = builder.src_skipped[i], builder.src_filtered[i]
        src_list.append(
            SourceInfo(
                path=s.path,
                kind=s.kind,
                bytes=s.bytes,
                sha256=s.sha256 or None,
                records=s.records,
                skipped=skipped,
                filtered=filtered,
                documents=s.records - skipped - filtered,
                read=s.read,
                error=s.error,
            )
        )
    split_info = {name: SplitInfo(prefix=shard_prefix(name), **sp) for name, sp in splits.items()}
    return Manifest(
        format=FORMAT,
        corpus=corpus,
        settings=settings,
        tokenizer=tok.describe(),
        dtype=token_dtype.name,
        splits=split_info,
        documents=DocumentCounts(
            records=builder.records,
            written=sum(sp.documents for sp in split_info.values()),
            skipped=dict(sorted(builder.skipped.items())),
            skipped_total=sum(builder.skipped.values()),
            filtered_by_pile_set=builder.filtered,
        ),
        tokens=sum(sp.tokens for sp in split_info.values()),
        text_bytes=sum(sp.text_bytes for sp in split_info.values()),
        files_with_errors=sum(1 for s in sources if s.error),
        sources=src_list,
    )


def summary(out, m: Manifest, elapsed: float, t_write: float, workers: int) -> str:
    """The lines logged after a build: counts per split, what was skipped, the tokenizer."""
    mb = m.text_bytes / 1e6
    d, t = m.documents, m.tokenizer
    lines = [
        f"prepared {out} in {elapsed:.1f} s ({workers} workers; tokenize+write {t_write:.1f} s "
        f"= {mb / max(t_write, 1e-9):.2f} MB/s, {m.tokens / max(t_write, 1e-9):,.0f} tokens/s)"
    ]
    for name, sp in m.splits.items():
        lines.append(
            f"  {name:5s}: {sp.documents:,} documents, {sp.tokens:,} tokens "
            f"({sp.text_bytes / 1e6:.2f} MB text), {out / sp.prefix}.bin/.idx"
        )
    lines.append(
        f"  records {d.records:,}, written {d.written:,}, skipped "
        f"{d.skipped_total:,} {d.skipped or ''}, filtered {d.filtered_by_pile_set:,}"
    )
    lines.append(f"  tokenizer: {t.source} (vocab {t.vocab_size:,}, eos {t.eos_token!r} = {t.eos_id}), dtype {m.dtype}")
    if m.files_with_errors:
        lines.append(f"  {m.files_with_errors} unreadable file(s) skipped: see {MANIFEST}")
    return "\n".join(lines)


def nothing_written(m: Manifest, sources) -> str:
    """One line: which inputs gave no document, and why (counts by reason)."""
    names = [s.path for s in sources]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    d = m.documents
    why = [f"{n:,} {reason}" for reason, n in d.skipped.items()]
    if d.filtered_by_pile_set:
        why.append(f"{d.filtered_by_pile_set:,} not in --pile-set {m.settings['pile_sets']}")
    why += [f"unreadable {s.path} ({s.error})" for s in m.sources if s.error]
    return f"no documents written from {shown}: {d.records:,} records read, {'; '.join(why) if why else 'none usable'}"
