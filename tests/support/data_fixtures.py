"""Inputs and helpers shared by the data_prep tests (tests/test_data_*.py): small corpora, the
bad documents of every skip reason, a prepared folder made by the CLI, and what the CLI prints.

A plain module, not a test module, so that test files import from it and never from each other;
fixtures stay in the test files (thin wrappers around ``build_prepared``), which pytest then
finds without a plugin and ruff sees as ordinary definitions."""

import hashlib
import json
import os
import random
from pathlib import Path

import zstandard

from data_prep.prepare import PROG, main
from data_prep.tokenizer import train_bpe
from utils import atomic

ERROR = f"{PROG}: error: "  # how the CLI starts its one error line (utils.logs.error_exit)

# One bad JSON line per skip reason (readers.SKIP_REASONS; "blank_line" is not counted as bad).
BAD = {
    "invalid_json": b'{"text": "truncated line\n',
    "not_an_object": b'"just a string"\n',
    "missing_text": b'{"meta": {"pile_set_name": "Github"}}\n',
    "non_string_text": b'{"text": ["a", "list"]}\n',
    "invalid_utf8": b'{"text": "bad \xc3\x28 bytes"}\n',
    "empty_document": b'{"text": ""}\n',
}

_WORDS = [
    "the",
    "data",
    "model",
    "token",
    "shard",
    "über",
    "naïve",
    "🙂",
    "pile",
    "hyena",
    "\n",
    "  ",
    "filter",
    "rational",
    "transfer",
    "function",
    "42",
    "x=1;",
]


def jsonl(path, lines, zst=False) -> str:
    """Writes JSON lines (dicts are dumped, bytes written as they are), zstd-compressed when
    ``zst``; returns the path as a string, as the CLI takes it."""
    data = b"".join(x if isinstance(x, bytes) else json.dumps(x).encode() + b"\n" for x in lines)
    path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data) if zst else data)
    return str(path)


def corpus(n, seed=0) -> list[dict]:
    """``n`` Pile-style records of 5 to 120 random words (Unicode, blanks and newlines among
    them), each tagged with one of three Pile set names."""
    rng = random.Random(seed)
    return [
        {
            "text": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 120))),
            "meta": {"pile_set_name": rng.choice(["Pile-CC", "Github", "ArXiv"])},
        }
        for _ in range(n)
    ]


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, but for the lock file (it only serializes)
    and the ownership stamp (its random id differs from build to build by design); what two
    builds are compared by. Data-loss checks use ``checksums``, which skips nothing."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (".lock", atomic.OWNER)
    }


def checksums(root) -> dict[str, str]:
    """The SHA-256 of every file under ``root`` (hidden ones, stamps and locks included), by
    relative path, "folder" for every folder and where each link points: what "nothing was lost
    or changed" compares."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = f"link to {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "folder"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def beside(out) -> list[str]:
    """What is next to ``out`` in its folder, besides the inputs ``build_prepared`` makes."""
    return sorted(p.name for p in out.parent.iterdir() if p.name not in ("a.jsonl", "tok.json"))


def cli_args(inp, out, tok) -> list[str]:
    """The CLI arguments of a one-worker run without progress bar."""
    return ["--input", str(inp), "--tokenizer", str(tok), "--out", str(out), "--workers", "1", "--no-progress"]


def build_prepared(tmp_path):
    """A complete prepared directory ``tmp_path/out`` made by the CLI from 150 documents with a
    300-token BPE; returns (out, the arguments that made it, its ``snapshot``)."""
    inp = jsonl(tmp_path / "a.jsonl", corpus(150))
    (tmp_path / "tok.json").write_text(train_bpe([" ".join(d["text"] for d in corpus(50))], 300).json_text)
    args = cli_args(inp, tmp_path / "out", tmp_path / "tok.json")
    assert main(args) == 0
    return tmp_path / "out", args, snapshot(tmp_path / "out")


def one_error_line(capsys) -> str:
    """The CLI's stderr, checked to be exactly one error line without a traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(ERROR), err
    assert "Traceback" not in err[0], err
    return err[0]
