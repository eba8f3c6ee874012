"""The CLI refuses flags it would ignore and inputs it cannot read: --indexed-* (linking existing
shards) beside the flags only tokenizing uses, and FIFOs, which block a reader forever."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.data_fixtures import corpus, jsonl, one_error_line

from data_prep.prepare import main
from data_prep.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--input", "X.jsonl", "--vocab-size", "999", "--max-docs", "1"], "--input, --vocab-size, --max-docs"),
        (["--val-fraction", "0.01"], "--val-fraction"),  # the default value, given: still ignored
        (["--pile-set", "Github", "--dtype", "uint32"], "--pile-set, --dtype"),
    ],
)
def test_indexed_with_a_tokenizing_flag_is_a_usage_error(tmp_path, capsys, extra, named):
    """Linking reads only --tokenizer, --eos-token, --out and --overwrite: the run exited 0 and
    "linked" the shards, silently dropping the corpus and settings given."""
    argv = ["--indexed-train", str(tmp_path / "shard"), "--tokenizer", str(tmp_path / "tok.json")]
    assert main([*argv, "--out", str(tmp_path / "out"), *extra]) == 2
    line = one_error_line(capsys)
    assert f"--indexed-train links existing token shards and tokenizes nothing, so {named} would be ignored" in line
    assert list(tmp_path.iterdir()) == []


def test_indexed_val_alone_is_a_usage_error(tmp_path, capsys):
    """--indexed-val without --indexed-train was ignored: a corpus was tokenized instead."""
    assert main(["--indexed-val", str(tmp_path / "val"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--indexed-val needs --indexed-train" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def run_cli(*args, cwd):
    """The command, with a timeout: a reader blocked on a FIFO fails the test instead of hanging it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "data_prep.prepare", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_an_input_folder_is_skipped_and_a_named_one_refused(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    jsonl(folder / "a.jsonl", corpus(40))
    os.mkfifo(folder / "b.jsonl")  # sorts after a.jsonl: read once a.jsonl is done, and nobody writes to it
    (tmp_path / "tok.json").write_text(train_bpe([" ".join(d["text"] for d in corpus(20))], 300).json_text)
    common = ["--tokenizer", tmp_path / "tok.json", "--workers", 1, "--no-progress"]
    done = run_cli("--input", folder, "--out", tmp_path / "out", *common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"skipping 1 input(s) in {folder} that are not regular files: {folder / 'b.jsonl'}" in done.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()

    done = run_cli("--input", folder / "b.jsonl", "--out", tmp_path / "out2", *common, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"python -m data_prep.prepare: error: {folder / 'b.jsonl'}: not a regular file or folder "
        "(a FIFO, socket or device)"
    ]
    assert not (tmp_path / "out2").exists()
