"""One error contract for export, distill.py and evaluate_lm.py: outputs checked before the long
work, an OSError (full disk, read-only folder) or Ctrl-C during the final write is one line naming
the path (exit 2; Ctrl-C 130), and the previous output is left as it was."""

import errno
import json
import os
import stat

import pytest
from support.data_fixtures import checksums, cli_args, corpus, jsonl, one_error_line
from support.helpers import load_script, tiny_model, train_tiny_tokenizer

import export.folder as hf_export
from data_prep.prepare import main as prepare_main
from export.folder import save_hf_checkpoint
from utils import atomic

ev = load_script("evaluate_lm.py")
distill = load_script("distill.py")
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # chmod restricts nothing for root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tok = train_tiny_tokenizer(root / "tokenizer.json")
    return save_hf_checkpoint(tiny_model(vocab=320), tok, root / "ckpt"), tok


def _one_line(capsys, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def _full_disk(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------- export


def test_a_full_disk_during_an_export_is_one_line_and_keeps_the_earlier_one(ckpt, tmp_path, monkeypatch):
    _, tok = ckpt
    out = save_hf_checkpoint(tiny_model(vocab=320), tok, tmp_path / "hf")
    before = checksums(tmp_path)
    monkeypatch.setattr(hf_export, "with_user_umask", _full_disk)
    with pytest.raises(atomic.OutputError) as e:
        save_hf_checkpoint(tiny_model(vocab=320, seed=1), tok, out)
    assert str(e.value) == f"cannot write the export {out}: No space left on device"
    assert isinstance(e.value, atomic.NotReplaceableError)  # what train.py reports as exit 2
    assert checksums(tmp_path) == before  # the earlier export whole, no staging folder left


def test_ctrl_c_during_an_export_keeps_the_earlier_one(ckpt, tmp_path, monkeypatch):
    _, tok = ckpt
    out = save_hf_checkpoint(tiny_model(vocab=320), tok, tmp_path / "hf")
    before = checksums(tmp_path)

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_export, "with_user_umask", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_hf_checkpoint(tiny_model(vocab=320, seed=1), tok, out)
    assert checksums(tmp_path) == before


@pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_the_export(ckpt, tmp_path):
    _, tok = ckpt
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        with pytest.raises(atomic.OutputError, match="is not writable"):
            hf_export.check_export_target(tmp_path / "ro" / "hf")
    finally:
        os.chmod(tmp_path / "ro", 0o755)


# ----------------------------------------------------------------------------- distill.py


def test_distill_out_holding_the_checkpoint_is_refused_before_the_fit(ckpt, capsys, monkeypatch):
    """`distill.py ROOT/ckpt ROOT --overwrite` replaced ROOT, the checkpoint with it."""
    source, _ = ckpt
    before = checksums(source.parent)
    monkeypatch.setattr(distill, "distill_checkpoint", lambda opts: pytest.fail("the fit ran"))
    assert distill.main([str(source), str(source.parent), "--order", "2", "--overwrite"]) == 2
    assert "contains the input" in _one_line(capsys, "distill.py")
    assert checksums(source.parent) == before


@pytest.mark.parametrize("error", ["full disk", "ctrl-c"])
def test_distill_write_errors_are_one_line(ckpt, tmp_path, capsys, monkeypatch, error):
    source, _ = ckpt
    target = tmp_path / "out" / "model.safetensors"

    def fail(opts):
        if error == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(distill, "distill_checkpoint", fail)
    code = distill.main([str(source), str(tmp_path / "out"), "--order", "2"])
    line = _one_line(capsys, "distill.py")
    if error == "ctrl-c":
        assert code == 130 and "interrupted" in line, line
    else:
        assert code == 2 and f"{target}: No space left on device" in line, line


# ----------------------------------------------------------------------------- evaluate_lm.py


def test_evaluate_output_equal_to_its_data_is_refused_before_the_evaluation(ckpt, tmp_path, capsys, monkeypatch):
    source, _ = ckpt
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    before = checksums(tmp_path)
    monkeypatch.setattr(ev, "evaluate", lambda args: pytest.fail("the evaluation ran"))
    assert ev.main([str(source), "--data", str(data), "--output", str(data)]) == 2
    assert "--output" in _one_line(capsys, "evaluate_lm.py")
    assert checksums(tmp_path) == before


def test_evaluate_ctrl_c_while_writing_is_one_line_exit_130(ckpt, tmp_path, capsys, monkeypatch):
    source, _ = ckpt
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    monkeypatch.setattr(ev, "evaluate", lambda args: {"model": str(source), "settings": {}, "data": []})

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "write_text", interrupted)
    assert ev.main([str(source), "--data", str(data), "--output", str(tmp_path / "r.json")]) == 130
    assert "interrupted" in _one_line(capsys, "evaluate_lm.py")
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------- what is never an output


@pytest.mark.parametrize("out", ["", ".", ".."])
def test_an_output_folder_that_is_empty_or_holds_the_working_folder_is_refused(
    ckpt, tmp_path, capsys, monkeypatch, out
):
    """`--out "$UNSET"` is `--out ""`, which resolves to the current folder: with --overwrite the
    three folder-writing commands replaced the user's working folder. An empty path, the current
    folder and a folder that contains it are refused, --overwrite or not, before any work, and
    every file stays as it was."""
    source, tok = ckpt
    work = tmp_path / "projects" / "work"  # ".." is projects/, which holds no input
    work.mkdir(parents=True)
    (work / "thesis.txt").write_text("precious")
    docs = jsonl(tmp_path / "docs.jsonl", corpus(20))
    monkeypatch.chdir(work)
    before = checksums(tmp_path)
    with pytest.raises(atomic.NotReplaceableError, match="empty|current folder"):
        save_hf_checkpoint(tiny_model(vocab=320), tok, out, overwrite=True)
    assert prepare_main([*cli_args(docs, out, tok), "--overwrite"]) == 2
    line = one_error_line(capsys)
    assert "empty" in line or "current folder" in line, line
    monkeypatch.setattr(distill, "distill_checkpoint", lambda opts: pytest.fail("the fit ran"))
    assert distill.main([str(source), out, "--order", "2", "--overwrite"]) == 2
    line = _one_line(capsys, "distill.py")
    assert "empty" in line or "current folder" in line, line
    assert checksums(tmp_path) == before


def test_a_file_output_never_takes_the_place_of_a_device_or_a_folder(ckpt, tmp_path, capsys, monkeypatch):
    """`--output /dev/null --overwrite` (root) replaced the device with a regular file, and an
    output named through a symlink replaced the link. A FIFO (a device stands for any non-regular
    file) and a folder are refused in one line whatever --overwrite says, and stay what they
    were; a symlink to a file is written through: the link stays and its file gets the report."""
    source, _ = ckpt
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    monkeypatch.setattr(ev, "evaluate", lambda args: pytest.fail("the evaluation ran"))
    fifo, folder = tmp_path / "fifo", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    for target in (fifo, folder):
        assert ev.main([str(source), "--data", str(data), "--output", str(target), "--overwrite"]) == 2
        assert str(target) in _one_line(capsys, "evaluate_lm.py")
        monkeypatch.setattr(distill, "distill_checkpoint", lambda opts: pytest.fail("the fit ran"))
        out = ["--report", str(target), "--overwrite"]
        assert distill.main([str(source), str(tmp_path / "d"), "--order", "2", *out]) == 2
        assert str(target) in _one_line(capsys, "distill.py")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir() and not os.listdir(folder)
    monkeypatch.setattr(ev, "evaluate", lambda args: {"model": str(source), "settings": {}, "data": []})
    real = tmp_path / "reports" / "r.json"
    real.parent.mkdir()
    real.write_text("{}")
    (tmp_path / "link.json").symlink_to(real)
    assert ev.main([str(source), "--data", str(data), "--output", str(tmp_path / "link.json"), "--overwrite"]) == 0
    assert (tmp_path / "link.json").is_symlink() and json.loads(real.read_text())["model"] == str(source)
    with pytest.raises(atomic.OutputError, match="empty"):
        atomic.write_text("", "x")
