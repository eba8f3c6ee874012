"""One error contract for export, distill.py and evaluate_lm.py: outputs checked before the long
work, an OSError (full disk, read-only folder) or Ctrl-C during the final write is one line naming
the path (exit 2; Ctrl-C 130), and the previous output is left as it was."""

import errno
import json
import os

import pytest
from support.data_fixtures import checksums
from support.helpers import load_script, tiny_model, train_tiny_tokenizer

import export.folder as hf_export
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
