"""A rerun never costs the existing dataset: checks first, build beside the target, swap at the
end, and no folder replaced that data_prep did not write; the atomic-output module itself."""

import os
import stat

import pytest
import zstandard
from test_data_prepare import _corpus, _jsonl

from hyena_rtf.data_prep.prepare import main
from hyena_rtf.data_prep.tokenizer import train_bpe
from hyena_rtf.utils import atomic


def _snapshot(folder):
    """Every file under ``folder`` with its bytes (the lock file aside: it only serializes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _beside(out):
    """What is next to ``out`` in its folder, besides the inputs these tests make."""
    return sorted(p.name for p in out.parent.iterdir() if p.name not in ("a.jsonl", "tok.json"))


@pytest.fixture
def built(tmp_path):
    """A complete prepared directory made by the CLI, and the arguments that made it."""
    inp = _jsonl(tmp_path / "a.jsonl", _corpus(150))
    (tmp_path / "tok.json").write_text(train_bpe([" ".join(d["text"] for d in _corpus(50))], 300).json_text)
    args = [
        "--input",
        inp,
        "--tokenizer",
        str(tmp_path / "tok.json"),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(args) == 0
    return tmp_path / "out", args, _snapshot(tmp_path / "out")


def _corrupt_shard(path):
    blob = zstandard.ZstdCompressor().compress(b'{"text": "x"}\n' * 500)
    path.write_bytes(blob[:-7])
    return str(path)


@pytest.mark.parametrize(
    "case",
    ["mistyped tokenizer", "binary tokenizer", "corrupt extra shard", "missing extra input", "unknown eos token"],
)
def test_a_failed_rerun_keeps_the_existing_dataset(built, case, capsys):
    out, args, before = built
    args = list(args)
    if case == "mistyped tokenizer":
        args[3] = str(out.parent / "tok_typo.json")
    elif case == "binary tokenizer":
        (out.parent / "tok.bin").write_bytes(bytes(range(256)) * 4)
        args[3] = str(out.parent / "tok.bin")
    elif case == "corrupt extra shard":
        args[2:2] = [_corrupt_shard(out.parent / "b.jsonl.zst")]
    elif case == "missing extra input":
        args[2:2] = [str(out.parent / "missing.jsonl")]
    else:
        args += ["--eos-token", "<nope>"]
    capsys.readouterr()
    rc = main(args)
    assert _snapshot(out) == before  # every file still there, byte for byte
    assert not any(n.endswith(".partial") for n in _beside(out))  # and nothing left beside it
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err


def test_a_rebuild_swaps_the_new_dataset_in_and_leaves_nothing_behind(built, capsys):
    out, args, before = built
    assert main(args + ["--val-fraction", "0.2"]) == 0
    after = _snapshot(out)
    assert sorted(after) == sorted(before) and after["train.bin"] != before["train.bin"]
    assert _beside(out) == [".out.lock", "out"]


def test_refuses_a_folder_that_is_not_a_data_prep_output(built, capsys):
    _, args, _ = built
    mine = built[0].parent / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "tokenizer.json").write_text("{}")  # a name data_prep also writes: still not its
    args = [a if a != str(built[0]) else str(mine) for a in args]
    capsys.readouterr()
    rc = main(args)
    assert _snapshot(mine) == {"notes.txt": b"my notes", "tokenizer.json": b"{}"}
    err = capsys.readouterr().err
    assert rc == 2 and "is not a data_prep output" in err and "--overwrite" in err and str(mine) in err
    assert main(args + ["--overwrite"]) == 0
    assert (mine / "manifest.json").is_file() and not (mine / "notes.txt").exists()


def test_refuses_a_data_prep_output_holding_other_files(built, capsys):
    out, args, before = built
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    rc = main(args + ["--force"])
    assert _snapshot(out) == {**before, "notes.txt": b"mine"}
    assert rc == 2 and "also holds files it did not write (notes.txt)" in capsys.readouterr().err


def test_a_folder_left_by_an_old_interrupted_run_is_rebuilt(built):
    out, args, before = built
    leftover = out.parent / "left"
    leftover.mkdir()
    (leftover / ".lock").write_text("")
    (leftover / "train.bin.partial").write_bytes(b"x" * 10)
    assert main([a if a != str(out) else str(leftover) for a in args]) == 0
    assert _snapshot(leftover) == before


# ------------------------------------------------------------------------------ atomic module


def test_atomic_file_commits_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.AtomicFile(target, "w", encoding="utf-8") as af:
            af.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["f.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_write_errors_name_the_file(tmp_path, monkeypatch):
    real_open = open

    def full_disk(path, mode="r", *a, **kw):
        return real_open("/dev/full", "wb") if str(path).endswith(atomic.SUFFIX) else real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(OSError, match=r"No space left on device") as e:
        atomic.write_bytes(tmp_path / "big.bin", b"x" * 100_000)
    assert e.value.filename.startswith(str(tmp_path / ".big.bin."))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_replace_dir_swaps_or_keeps_the_old_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "d"
    target.mkdir()
    (target / "old").write_text("1")
    with pytest.raises(KeyError):
        with atomic.replace_dir(target) as stage:
            (stage / "new").write_text("2")
            raise KeyError("build failed")
    assert os.listdir(tmp_path) == ["d"] and os.listdir(target) == ["old"]
    with atomic.replace_dir(target) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".d.")
        (stage / "new").write_text("2")
    assert os.listdir(tmp_path) == ["d"] and os.listdir(target) == ["new"]
    with atomic.replace_dir(tmp_path / "fresh") as stage:
        (stage / "x").write_text("3")
    assert sorted(os.listdir(tmp_path)) == ["d", "fresh"]


def test_check_replaceable_and_remove_stale(tmp_path):
    kind = dict(marker="marker.json", kind="test output", owned=lambda n: n in ("marker.json", "a"))
    atomic.check_replaceable(tmp_path / "absent", **kind)
    (tmp_path / "empty").mkdir()
    atomic.check_replaceable(tmp_path / "empty", **kind)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "marker.json").write_text("{}")
    (ours / "a").write_text("")
    atomic.check_replaceable(ours, **kind)
    (ours / "b").write_text("")
    with pytest.raises(atomic.NotReplaceableError, match=r"also holds files it did not write \(b\)"):
        atomic.check_replaceable(ours, **kind)
    atomic.check_replaceable(ours, overwrite=True, **kind)
    (tmp_path / "file").write_text("")
    with pytest.raises(atomic.NotReplaceableError, match="not a folder"):
        atomic.check_replaceable(tmp_path / "file", overwrite=True, **kind)
    stale = [atomic.temp_path(ours), atomic.temp_path(ours)]
    stale[0].mkdir()
    stale[1].write_text("")
    (tmp_path / ".ours.notours.partial").write_text("")  # not of the form temp_path makes
    assert sorted(atomic.remove_stale(ours)) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == [".ours.notours.partial", "empty", "file", "ours"]
