"""Ownership by stamp, not by name; inputs are never outputs; bounded documents for any text.

Every data-loss case records the SHA-256 of every file that existed before (``checksums``, hidden
files included) and asserts that all of them are still there, unchanged, after the command.
"""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from support.data_fixtures import build_prepared, checksums, cli_args, corpus, jsonl, one_error_line
from support.helpers import tiny_model, train_tiny_tokenizer

from data_prep import readers
from data_prep.prepare import main
from export.folder import save_hf_checkpoint
from utils import atomic

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def built(tmp_path):
    return build_prepared(tmp_path)


def _args_with_out(args, out):
    return [str(out) if a == args[args.index("--out") + 1] else a for a in args]


# ------------------------------------------------------------------ 1. ownership by stamp


def test_prepare_keeps_a_folder_of_the_users_partial_files(built, capsys):
    """A folder whose entries all end in .partial is not the program's leftovers: refused, kept."""
    _, args, _ = built
    target = built[0].parent / "thesis"
    (target / "backup.partial").mkdir(parents=True)
    (target / "backup.partial" / "chapter1.tex").write_text("chapter one")
    (target / "thesis.tex.partial").write_text("\\documentclass{article}")
    before = checksums(target.parent)
    capsys.readouterr()
    assert main(_args_with_out(args, target)) == 2
    line = one_error_line(capsys)
    assert str(target) in line and "is not a data_prep output" in line, line
    assert checksums(target.parent) == before


def test_force_keeps_the_users_notes_partial_inside_a_dataset(built, capsys):
    out, args, _ = built
    (out / "notes.partial").write_text("my notes")
    before = checksums(out.parent)
    capsys.readouterr()
    assert main(args + ["--force"]) == 2
    line = one_error_line(capsys)
    assert "did not write (notes.partial)" in line, line
    assert checksums(out.parent) == before


def test_a_users_entries_named_like_staging_folders_are_kept(built):
    """The general rule on names the program did not generate: a file and a folder named exactly
    as a staging folder of --out (``.out.123-abcd1234.partial``), unstamped, survive a rebuild."""
    out, args, _ = built
    file_ = out.parent / ".out.123-abcd1234.partial"
    file_.write_text("mine")
    folder = out.parent / ".out.456-0123abcd.partial"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    mine = {p.name: checksums(p) if p.is_dir() else p.read_bytes() for p in (file_, folder)}
    assert main(args + ["--force"]) == 0
    assert {p.name: checksums(p) if p.is_dir() else p.read_bytes() for p in (file_, folder)} == mine


def test_a_dataset_is_stamped_with_the_files_it_wrote(built):
    out, _, _ = built
    stamp = json.loads((out / atomic.OWNER).read_text())
    assert stamp["kind"] == "data_prep output" and len(stamp["id"]) == 32
    assert sorted(stamp["files"]) == sorted(p.name for p in out.iterdir() if p.name != atomic.OWNER)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_a_reexport_keeps_the_users_finetune_py(tmp_path, tokenizer_file):
    """Any *.py in an earlier export used to count as the export's own: a re-export deleted it."""
    model = tiny_model(vocab=320)
    out = save_hf_checkpoint(model, tokenizer_file, tmp_path / "hf")
    (out / "finetune.py").write_text("import transformers  # my fine-tuning script\n")
    before = checksums(tmp_path)
    with pytest.raises(atomic.NotReplaceableError, match=r"did not write \(finetune\.py\)"):
        save_hf_checkpoint(model, tokenizer_file, out)
    assert checksums(tmp_path) == before
    (out / "finetune.py").unlink()
    save_hf_checkpoint(model, tokenizer_file, out)  # the export's own files alone: replaced


def test_an_export_keeps_a_folder_of_the_users_partial_files(tmp_path, tokenizer_file):
    target = tmp_path / "T"
    (target / "backup.partial").mkdir(parents=True)
    (target / "thesis.tex.partial").write_text("draft")
    beside = tmp_path / ".T.123-abcd1234.partial"  # named as a staging folder of T, not stamped
    beside.mkdir()
    (beside / "config.json").write_text("{}")
    before = checksums(tmp_path)
    with pytest.raises(atomic.NotReplaceableError, match="is not a Hugging Face export"):
        save_hf_checkpoint(tiny_model(vocab=320), tokenizer_file, target)
    assert checksums(tmp_path) == before
    fresh = save_hf_checkpoint(tiny_model(vocab=320), tokenizer_file, tmp_path / "U")
    assert (fresh / "config.json").is_file()
    assert {k: v for k, v in checksums(tmp_path).items() if not k.startswith(("U", ".U."))} == before


# ------------------------------------------------------------------ 2. inputs are never outputs


@pytest.mark.parametrize("where", ["the input folder", "inside it", "a link to it", "a folder holding an input"])
def test_out_apart_from_the_inputs(tmp_path, capsys, where):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    jsonl(corpus_dir / "a.jsonl", corpus(40))
    (tmp_path / "tok.json").write_text(Path(train_tiny_tokenizer(tmp_path / "tok.json")).read_text())
    (tmp_path / "link").symlink_to(corpus_dir)
    out = {
        "the input folder": corpus_dir,
        "inside it": corpus_dir / "prepared",
        "a link to it": tmp_path / "link",
        "a folder holding an input": tmp_path,
    }[where]
    before = checksums(tmp_path)
    capsys.readouterr()
    assert main(cli_args(corpus_dir, out, tmp_path / "tok.json") + ["--overwrite"]) == 2
    line = one_error_line(capsys)
    assert f"--out {out}" in line and "input" in line, line
    assert checksums(tmp_path) == before  # nothing read, nothing written, no lock file either


def test_an_export_may_not_replace_its_own_tokenizer(tmp_path, tokenizer_file):
    out = save_hf_checkpoint(tiny_model(vocab=320), tokenizer_file, tmp_path / "hf")
    before = checksums(tmp_path)
    with pytest.raises(atomic.NotReplaceableError, match="contains the input"):
        save_hf_checkpoint(tiny_model(vocab=320), out / "tokenizer.json", out)
    assert checksums(tmp_path) == before


# ------------------------------------------------------------------ 3. bounded documents


def test_text_without_spaces_is_cut_into_bounded_documents(tmp_path):
    """3 MB with no space and no newline (base64-like, with 2-byte characters among it) was one
    document held whole; now documents of at most 2 x 4 x chunk bytes, each valid UTF-8 (no
    character cut), that concatenate back to the file."""
    text = ("QUJDRGVmZ2g0NTY3" * 7 + "é") * 25_000
    path = tmp_path / "blob.txt"
    path.write_text(text, encoding="utf-8")
    src = readers.Source(str(path), "text")
    chunk = 1 << 14
    docs = [r.payload for r in readers.iter_records(0, src, text_chunk_bytes=chunk)]
    assert len(docs) > 20
    assert max(map(len, docs)) <= 2 * 4 * chunk
    assert b"".join(docs) == path.read_bytes()
    for d in docs:
        d.decode("utf-8")  # no character split between two documents


def test_prose_is_cut_exactly_as_before(tmp_path):
    """Lines shorter than the hard bound: the cut rule is the old one (after a blank line past
    chunk bytes, or after any line past 4 x chunk)."""
    lines = [f"line {i} of some prose\n" if i % 7 else "\n" for i in range(20_000)]
    path = tmp_path / "prose.txt"
    path.write_text("".join(lines))
    chunk = 4096
    expected, buf, size = [], [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= chunk and (not line.strip() or size >= 4 * chunk):
            expected.append(b"".join(buf))
            buf, size = [], 0
    expected += [b"".join(buf)] if buf else []
    got = [r.payload for r in readers.iter_records(0, readers.Source(str(path), "text"), text_chunk_bytes=chunk)]
    assert got == expected


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_is_one_line_in_bounded_memory(tmp_path):
    """--input /dev/zero grew until a MemoryError traceback; under a 3 GiB address-space limit it
    is now one line, exit 2, at once: a named input that is not a regular file (a device, a FIFO
    that might never end) is refused before it is read."""
    tok = train_tiny_tokenizer(tmp_path / "tok.json")
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "data_prep.prepare", "--input", "/dev/zero", "--tokenizer", tok]
    cmd += ["--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, preexec_fn=_limit_memory)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(err) == 1 and "/dev/zero: not a regular file" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_json_line_that_never_ends_is_an_error_not_unbounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_JSON_LINE", 4 << 20)  # 256 MiB in real runs
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    src = readers.Source(str(link), "jsonl")
    with pytest.raises(readers.SourceError, match="line longer than 4 MiB"):
        for _ in readers.iter_records(0, src):
            pass
