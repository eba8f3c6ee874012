"""The CLI's errors: one line on stderr naming the file, exit status 2, no traceback unless
HYENA_RTF_DEBUG=1; a run that would write no document is one of them."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from support.data_fixtures import BAD, ERROR, beside, build_prepared, cli_args, jsonl, one_error_line, snapshot

from data_prep.prepare import main
from data_prep.tokenizer import TokenizerError

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def built(tmp_path):
    """A complete prepared directory made by the CLI, the arguments that made it, its files."""
    return build_prepared(tmp_path)


@pytest.mark.parametrize("case", ["zstd wrapping garbage", "every record bad", "all filtered out"])
def test_no_document_written_is_an_error(built, case, capsys):
    tmp = built[0].parent
    tok, extra = tmp / "tok.json", []
    if case == "zstd wrapping garbage":
        rng = random.Random(0)
        inp = tmp / "garbage.jsonl.zst"
        inp.write_bytes(zstandard.ZstdCompressor().compress(bytes(rng.randrange(256) for _ in range(20000))))
        expect = r"\d+ records read, \d+ invalid_(utf8|json)"
    elif case == "every record bad":
        inp = jsonl(tmp / "bad.jsonl", list(BAD.values()))
        expect = (
            "6 records read, 1 empty_document; 1 invalid_json; 1 invalid_utf8; 1 missing_text; "
            "1 non_string_text; 1 not_an_object"
        )
    else:
        inp, extra = tmp / "a.jsonl", ["--pile-set", "Nope"]
        expect = r"150 records read, 150 not in --pile-set \['Nope'\]"
    capsys.readouterr()
    assert main(cli_args(inp, tmp / "empty", tok) + extra) == 2
    line = one_error_line(capsys)
    assert f"no documents written from {Path(inp).resolve()}" in line
    assert re.search(expect, line), line
    assert not (tmp / "empty").exists()
    assert not any(n.endswith(".partial") for n in beside(built[0]))


@pytest.mark.parametrize("cut", ["inside the header", "inside a block", "the last byte"])
def test_a_truncated_zstd_stream_is_an_error(built, cut, capsys):
    tmp = built[0].parent
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(
        b"".join(json.dumps({"text": f"doc {i} " * 20}).encode() + b"\n" for i in range(2000))
    )
    keep = {"inside the header": 3, "inside a block": len(blob) // 2, "the last byte": len(blob) - 1}[cut]
    (tmp / "t.jsonl.zst").write_bytes(blob[:keep])
    capsys.readouterr()
    assert main(cli_args(tmp / "t.jsonl.zst", tmp / "t", tmp / "tok.json")) == 2
    assert "t.jsonl.zst:" in one_error_line(capsys)
    assert not (tmp / "t").exists()


def test_a_binary_tokenizer_file_is_a_one_line_error(tmp_path):
    (tmp_path / "tok.bin").write_bytes(bytes(range(256)) * 16)
    (tmp_path / "a.txt").write_text("some text")
    r = subprocess.run(
        [sys.executable, "-m", "data_prep.prepare"]
        + cli_args(tmp_path / "a.txt", tmp_path / "out", tmp_path / "tok.bin"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [r.stderr.strip()], r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert f"{tmp_path / 'tok.bin'}: not a tokenizers JSON file (binary" in r.stderr


def test_debug_environment_variable_reraises(tmp_path, monkeypatch):
    (tmp_path / "tok.bin").write_bytes(bytes(range(256)) * 16)
    (tmp_path / "a.txt").write_text("some text")
    monkeypatch.setenv("HYENA_RTF_DEBUG", "1")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON file"):
        main(cli_args(tmp_path / "a.txt", tmp_path / "out", tmp_path / "tok.bin"))


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs (not writable, even by root)")
@pytest.mark.parametrize("out", ["/sys/hyena_rtf_test/out", "/sys/kernel/hyena_rtf_test"])
def test_a_read_only_output_disk_is_a_one_line_error(built, out, capsys):
    capsys.readouterr()
    assert main(cli_args(built[0].parent / "a.jsonl", out, built[0].parent / "tok.json")) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"{ERROR}/sys/"), line
    assert "not permitted" in line or "denied" in line, line


def test_a_full_output_disk_is_a_one_line_error_and_keeps_the_dataset(built, monkeypatch, capsys):
    out, args, before = built
    real_open = open

    def full_disk(path, mode="r", *a, **kw):  # the train shard's temporary file is on a full disk
        p = str(path)
        if "train.bin" in p and p.endswith(".partial"):
            return real_open("/dev/full", "wb")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", full_disk)
    capsys.readouterr()
    try:
        rc = main(args + ["--force"])
    finally:
        monkeypatch.undo()
        assert snapshot(out) == before
        assert not any(n.endswith(".partial") for n in beside(out))
    assert rc == 2
    line = one_error_line(capsys)
    assert "train.bin" in line, line
    assert line.endswith("No space left on device"), line
