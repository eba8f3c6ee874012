"""Corpus readers: Pile .jsonl.zst, .jsonl, plain text, folders, HF datasets; record validation."""

import json

import pytest
import zstandard

from data_prep import default_corpus
from data_prep.readers import Kind, SourceError, _Counter, expand_inputs, iter_records, validate_record


def _pile_lines(n, start=0):
    return [
        json.dumps(
            {
                "text": f"document {i} " + "words " * (i % 7 + 1),
                "meta": {"pile_set_name": "Pile-CC" if i % 2 else "Github"},
            }
        ).encode()
        + b"\n"
        for i in range(start, start + n)
    ]


def _records(path, **kw):
    srcs = expand_inputs([str(path)])
    out = []
    for si, s in enumerate(srcs):
        out.extend(iter_records(si, s, _Counter(), **kw))
    return srcs, out


def test_pile_zst_multi_frame_and_checksum(tmp_path):
    lines = _pile_lines(50)
    p = tmp_path / "00.jsonl.zst"
    c = zstandard.ZstdCompressor(write_checksum=True)
    # two frames, the boundary in the middle of a line: frames are byte streams, not records
    blob = b"".join(lines)
    p.write_bytes(c.compress(blob[:1001]) + c.compress(blob[1001:]))
    srcs, recs = _records(p)
    assert srcs[0].kind == "zst"
    assert [r.payload + b"\n" for r in recs] == lines
    assert [r.line for r in recs] == list(range(1, 51))
    assert {(r.source, r.kind, r.set_name) for r in recs} == {(0, Kind.JSON_LINE, None)}
    assert srcs[0].bytes == p.stat().st_size
    assert len(srcs[0].sha256) == 64


def test_truncated_and_corrupt_zst_are_file_errors(tmp_path):
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(b"".join(_pile_lines(3000)))
    trunc = tmp_path / "trunc.jsonl.zst"
    trunc.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SourceError, match=r"trunc\.jsonl\.zst:\d+: truncated zstd stream"):
        _records(trunc)
    bad = bytearray(blob)
    bad[len(bad) // 2 : len(bad) // 2 + 64] = bytes(64)
    corrupt = tmp_path / "corrupt.jsonl.zst"
    corrupt.write_bytes(bytes(bad))
    with pytest.raises(SourceError, match=r"corrupt\.jsonl\.zst:\d+: corrupt zstd stream"):
        _records(corrupt)
    notzst = tmp_path / "plain.jsonl.zst"
    notzst.write_bytes(b'{"text": "not compressed"}\n')
    with pytest.raises(SourceError, match="plain.jsonl.zst:1: corrupt zstd stream"):
        _records(notzst)


def test_plain_text_chunks_concatenate_to_the_file(tmp_path):
    paras = [f"line {j} of paragraph {i}\n" * 30 for i in range(40) for j in [0]]
    text = "\n".join(paras)  # blank lines between paragraphs
    p = tmp_path / "book.txt"
    p.write_text(text)
    _, whole = _records(p, text_chunk_bytes=0)
    assert len(whole) == 1
    assert whole[0].payload == text.encode()
    _, recs = _records(p, text_chunk_bytes=2000)
    assert len(recs) > 5
    assert b"".join(r.payload for r in recs) == text.encode()
    assert [r.line for r in recs] == list(range(1, len(recs) + 1))  # chunk numbers
    assert {r.kind for r in recs} == {Kind.TEXT}
    for r in recs[:-1]:  # cut after a blank line: every chunk but the last ends a paragraph
        assert r.payload.endswith(b"\n\n")
        assert len(r.payload) >= 2000


def test_folder_glob_order_and_missing_inputs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.jsonl").write_bytes(b"".join(_pile_lines(2)))
    (tmp_path / "d" / ".hidden").write_text("x")
    srcs = expand_inputs([str(tmp_path / "d")])
    assert [(s.path.split("/d/")[1], s.kind) for s in srcs] == [("b.txt", "text"), ("sub/a.jsonl", "jsonl")]
    assert len(expand_inputs([str(tmp_path / "d" / "**" / "*.jsonl")])) == 1
    with pytest.raises(SourceError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(SourceError, match="glob matches no file"):
        expand_inputs([str(tmp_path / "*.zst")])


def test_hf_datasets_load_from_disk_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {
            "text": ["first doc", "second doc", None],
            "meta": [{"pile_set_name": "A"}, {"pile_set_name": "B"}, {"pile_set_name": "A"}],
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    srcs, recs = _records(tmp_path / "saved")
    assert srcs[0].kind == "hf_disk"
    assert len(srcs[0].sha256) == 64
    assert [(r.line, r.kind, r.payload, r.set_name) for r in recs] == [
        (1, Kind.DATASET_VALUE, "first doc", "A"),
        (2, Kind.DATASET_VALUE, "second doc", "B"),
        (3, Kind.DATASET_VALUE, None, "A"),
    ]
    ds.to_parquet(str(tmp_path / "x.parquet"))
    srcs, recs = _records(tmp_path / "x.parquet")
    assert srcs[0].kind == "hf_file"
    assert [r.payload for r in recs] == ["first doc", "second doc", None]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(SourceError, match="no 'text' column"):
        _records(tmp_path / "nocol")


@pytest.mark.parametrize(
    "kind,payload,reason",
    [
        (Kind.JSON_LINE, b'{"text": "ok", "meta": {"pile_set_name": "X"}}', None),
        (Kind.JSON_LINE, b'{"text": "cut', "invalid_json"),
        (Kind.JSON_LINE, b"[1, 2]", "not_an_object"),
        (Kind.JSON_LINE, b'{"meta": {}}', "missing_text"),
        (Kind.JSON_LINE, b'{"text": 5}', "non_string_text"),
        (Kind.JSON_LINE, b'{"text": "\xff\xfe"}', "invalid_utf8"),
        (Kind.JSON_LINE, b'{"text": "  \\n "}', "empty_document"),
        (Kind.JSON_LINE, b"   ", "blank_line"),
        (Kind.TEXT, b"caf\xe9", "invalid_utf8"),
        (Kind.TEXT, b"", "empty_document"),
        (Kind.DATASET_VALUE, None, "missing_text"),
        (Kind.DATASET_VALUE, ["a"], "non_string_text"),
    ],
)
def test_validate_record(kind, payload, reason):
    result = validate_record(kind, payload, None)
    if reason is None:
        assert result == ("ok", "X", None)
    else:
        assert result.text is None
        assert result.skip.reason == reason


def test_the_one_letter_kinds_still_work():
    """Callers outside data_prep (evaluate_lm.py) compare a record's kind with its letter."""
    line = b'{"text": "ok", "meta": {"pile_set_name": "X"}}'
    assert validate_record("J", line, None) == validate_record(Kind.JSON_LINE, line, None)
    assert [k.value for k in Kind] == ["J", "T", "S"]


def test_default_corpus_is_the_stdlib_sources():
    files = default_corpus.stdlib_files()
    rel = [p.relative_to(default_corpus.stdlib_root()).as_posix() for p in files]
    assert len(files) > 500
    assert rel == sorted(rel)
    assert "json/decoder.py" in rel
    assert all(r.endswith(".py") for r in rel)
    assert not any("site-packages" in r or "__pycache__" in r for r in rel)
    srcs = default_corpus.default_sources()
    assert {s.set_name for s in srcs} == {"Github"}
    assert {s.kind for s in srcs} == {"text"}


def test_default_corpus_exports_as_pile_shard(tmp_path, monkeypatch):
    few = default_corpus.stdlib_files()[:5]
    monkeypatch.setattr(default_corpus, "stdlib_files", lambda: few)
    n = default_corpus.write_pile_shard(tmp_path / "stdlib.jsonl.zst")
    _, recs = _records(tmp_path / "stdlib.jsonl.zst")
    assert n == len(recs) == 5
    first = json.loads(recs[0].payload)
    assert first["meta"]["pile_set_name"] == "Github"
    assert first["text"] == few[0].read_text()
