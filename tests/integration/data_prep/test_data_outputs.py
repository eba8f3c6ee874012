"""A rerun never costs the existing dataset: checks first, build beside the target, swap at the
end, and no folder replaced that data_prep did not write; the atomic-output module itself."""

import os
import shutil
import stat

import pytest
import zstandard
from support.data_fixtures import ERROR, beside, build_prepared, checksums, one_error_line, snapshot

from data_prep.prepare import main
from utils import atomic


@pytest.fixture
def built(tmp_path):
    """A complete prepared directory made by the CLI, the arguments that made it, its files."""
    return build_prepared(tmp_path)


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
    assert snapshot(out) == before  # every file still there, byte for byte
    assert not any(n.endswith(".partial") for n in beside(out))  # and nothing left beside it
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(ERROR), err


def test_a_rebuild_swaps_the_new_dataset_in_and_leaves_nothing_behind(built, capsys):
    out, args, before = built
    assert main(args + ["--val-fraction", "0.2"]) == 0
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    assert after["train.bin"] != before["train.bin"]
    assert beside(out) == [".out.lock", "out"]


def test_refuses_a_folder_that_is_not_a_data_prep_output(built, capsys):
    _, args, before = built
    mine = built[0].parent / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "tokenizer.json").write_text("{}")  # a name data_prep also writes: still not its
    args = [a if a != str(built[0]) else str(mine) for a in args]
    capsys.readouterr()
    rc = main(args)
    assert snapshot(mine) == {"notes.txt": b"my notes", "tokenizer.json": b"{}"}
    err = capsys.readouterr().err
    assert rc == 2
    assert "is not a data_prep output" in err
    assert "--overwrite" in err
    assert str(mine) in err
    assert main(args + ["--overwrite"]) == 0
    assert snapshot(mine) == before  # the same files as a build into a fresh folder; notes.txt gone


def test_refuses_a_data_prep_output_holding_other_files(built, capsys):
    out, args, before = built
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    rc = main(args + ["--force"])
    assert snapshot(out) == {**before, "notes.txt": b"mine"}
    assert rc == 2
    assert "also holds files it did not write (notes.txt)" in capsys.readouterr().err


def test_an_unstamped_folder_of_partial_files_is_the_users(built, capsys):
    """Names decide nothing: a folder holding only a ``.lock`` and ``*.partial`` entries (what
    old versions left inside a target) has no stamp, so it is the user's, refused and kept."""
    out, args, _ = built
    leftover = out.parent / "left"
    leftover.mkdir()
    (leftover / ".lock").write_text("")
    (leftover / "train.bin.partial").write_bytes(b"x" * 10)
    before = checksums(leftover)
    capsys.readouterr()
    assert main([a if a != str(out) else str(leftover) for a in args]) == 2
    assert "is not a data_prep output" in one_error_line(capsys)
    assert checksums(leftover) == before


# ------------------------------------------------------------------------------ atomic module


def test_atomic_file_commits_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.AtomicFile(target, "w", encoding="utf-8") as af:
            af.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]
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
        with atomic.replace_dir(target, "test output") as stage:
            (stage / "new").write_text("2")
            raise KeyError("build failed")
    assert os.listdir(tmp_path) == ["d"]
    assert os.listdir(target) == ["old"]
    with atomic.replace_dir(target, "test output") as stage:
        assert stage.parent == tmp_path
        assert stage.name.startswith(".d.")
        (stage / "new").write_text("2")
    assert os.listdir(tmp_path) == ["d"]
    assert sorted(os.listdir(target)) == sorted([atomic.OWNER, "new"])
    with atomic.replace_dir(target, "test output") as stage:  # now replacing a stamped folder
        (stage / "newer").write_text("3")
    assert os.listdir(tmp_path) == ["d"]
    assert sorted(os.listdir(target)) == sorted([atomic.OWNER, "newer"])
    with atomic.replace_dir(tmp_path / "fresh", "test output") as stage:
        (stage / "x").write_text("3")
    assert sorted(os.listdir(tmp_path)) == ["d", "fresh"]


def test_check_replaceable_and_remove_stale(tmp_path):
    kind = "test output"
    atomic.check_replaceable(tmp_path / "absent", kind=kind)
    (tmp_path / "empty").mkdir()
    atomic.check_replaceable(tmp_path / "empty", kind=kind)
    ours = tmp_path / "ours"
    with atomic.replace_dir(ours, kind) as stage:
        (stage / "a").write_text("1")
    assert atomic.stamped_files(ours, kind) == ["a"]
    atomic.check_replaceable(ours, kind=kind)
    with pytest.raises(atomic.NotReplaceableError, match="is not a other kind"):
        atomic.check_replaceable(ours, kind="other kind")
    (ours / "a").write_text("changed")  # a listed name whose file changed since: not the program's
    with pytest.raises(atomic.NotReplaceableError, match=r"also holds files it did not write \(a\)"):
        atomic.check_replaceable(ours, kind=kind)
    (ours / "a").write_text("1")
    (ours / "b").write_text("")
    with pytest.raises(atomic.NotReplaceableError, match=r"also holds files it did not write \(b\)"):
        atomic.check_replaceable(ours, kind=kind)
    atomic.check_replaceable(ours, kind=kind, also_owned=("b",))
    atomic.check_replaceable(ours, overwrite=True, kind=kind)
    (tmp_path / "file").write_text("")
    with pytest.raises(atomic.NotReplaceableError, match="not a folder"):
        atomic.check_replaceable(tmp_path / "file", overwrite=True, kind=kind)
    # A killed build's staging folder is stamped with its own name from the start, so it is cleared.
    with pytest.raises(KeyboardInterrupt):
        with atomic.replace_dir(ours, kind) as stage:
            (stage / "half").write_text("x")
            shutil.copytree(stage, tmp_path / "copy")  # what a kill -9 leaves (no clean-up runs)
            raise KeyboardInterrupt
    killed = tmp_path / stage.name
    (tmp_path / "copy").rename(killed)
    assert atomic.remove_stale(ours, kind) == [killed]
    assert not killed.exists()
