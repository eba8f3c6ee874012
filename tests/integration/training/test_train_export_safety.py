"""Exporting never destroys what the export did not write.

Each case runs `train.py export` (or a training run with an export at the end) the way a careless
user would, and checks both the one-line error (exit code 2) and that every file that was there
before is still there, byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.train_utils import REPO, TINY, error_line, torch_threads

import train
from training.config import load_config
from training.trainer import run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    """A 4-step run folder with one checkpoint and metrics, no export."""
    out = tmp_path_factory.mktemp("run")
    with torch_threads(1):
        run(
            load_config(
                None, [*TINY, f"data.dir={corpus}", f"train.out_dir={out}", "train.max_steps=4", "train.eval_every=4"]
            )
        )
    return corpus, out


def export(capsys, *args) -> tuple[int, str]:
    code = train.main(["export", *map(str, args)])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("source", ["run folder", "checkpoints folder", "checkpoint"])
@pytest.mark.parametrize(
    "where", ["the run itself", "a folder holding the run", "inside its checkpoints", "onto its checkpoint"]
)
def test_export_onto_the_run_is_refused_and_the_run_survives(trained_run, capsys, source, where):
    """However the source is named (train.py export accepts the three forms), the run's
    checkpoints are protected: `RUN/checkpoints` given as the source once let --overwrite replace
    a checkpoint by an export."""
    _, out = trained_run
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    src = {"run folder": out, "checkpoints folder": out / "checkpoints", "checkpoint": checkpoint}[source]
    target = {
        "the run itself": out,
        "a folder holding the run": out.parent,
        "inside its checkpoints": out / "checkpoints" / "hf",
        "onto its checkpoint": checkpoint,
    }[where]
    before = snapshot(out)
    for extra in ((), ("--overwrite",)):  # --overwrite does not lift this refusal
        code, err = export(capsys, src, target, *extra)
        assert code == 2
        assert err == error_line(err)  # the one line on stderr
        assert err.startswith("train.py: error: export folder"), err
    assert snapshot(out) == before


def test_export_into_a_folder_with_other_files_keeps_them(trained_run, tmp_path, capsys):
    _, out = trained_run
    home = tmp_path / "models"
    (home / "other_model").mkdir(parents=True)
    (home / "other_model" / "weights.bin").write_bytes(b"\x00" * 100)
    (home / "notes.txt").write_text("mine")
    before = snapshot(home)
    code, err = export(capsys, out, home)
    assert code == 2
    assert "is not empty" in err, err
    assert "--overwrite" in err, err
    assert snapshot(home) == before


def test_export_onto_a_file_keeps_the_file(trained_run, tmp_path, capsys):
    _, out = trained_run
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"precious")
    code, err = export(capsys, out, target)
    assert code == 2
    assert "is not a folder" in err, err
    assert target.read_bytes() == b"precious"


def test_an_earlier_export_is_replaced_but_not_one_holding_foreign_files(trained_run, tmp_path, capsys):
    _, out = trained_run
    hf = tmp_path / "hf"
    assert export(capsys, out, hf)[0] == 0
    first = snapshot(hf)
    assert export(capsys, out, hf)[0] == 0  # an export of ours: replaced
    assert snapshot(hf).keys() == first.keys()
    (hf / "my_eval_results.txt").write_text("keep me")
    code, err = export(capsys, out, hf)
    assert code == 2
    assert "did not write" in err, err
    assert "my_eval_results.txt" in err, err
    assert (hf / "my_eval_results.txt").read_text() == "keep me"
    assert export(capsys, out, hf, "--overwrite")[0] == 0  # asked for: replaced whole
    assert not (hf / "my_eval_results.txt").exists()
    assert (hf / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_an_export_beside_the_checkpoints_is_fine(trained_run, capsys):
    _, out = trained_run
    assert export(capsys, out, out / "hf_on_demand")[0] == 0
    assert json.loads((out / "hf_on_demand" / "config.json").read_text())["model_type"] == "hyena_rtf"


def test_a_run_inside_a_folder_named_checkpoints_trains_and_exports(corpus, tmp_path, capsys):
    """Which folder holds a run's checkpoints is read from what is on disk, not from folder names:
    a run at .../checkpoints/run1 (a user's folder that happens to be called so) trains with its
    end-of-run export to run1/hf, which a name test once refused before training."""
    out = tmp_path / "checkpoints" / "run1"
    args = [*TINY, f"data.dir={corpus}", f"train.out_dir={out}", "train.max_steps=2", "train.eval_every=2"]
    with torch_threads(1):
        assert train.main(["--config", str(train.DEFAULT_CONFIG), *args, "checkpoint.export_at_end=true"]) == 0
    assert (out / "hf" / "config.json").is_file()
    assert export(capsys, out, tmp_path / "checkpoints" / "run1_hf")[0] == 0


def test_export_dir_equal_to_out_dir_fails_before_training(trained_run, tmp_path, capsys):
    corpus, _ = trained_run
    out = tmp_path / "run2"
    code = train.main(
        [
            "--config",
            str(train.DEFAULT_CONFIG),
            *TINY,
            f"data.dir={corpus}",
            f"train.out_dir={out}",
            "checkpoint.export_at_end=true",
            f"checkpoint.export_dir={out}",
        ]
    )
    assert code == 2
    assert error_line(capsys.readouterr().err).startswith("train.py: error: checkpoint.export_dir:")
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()
    assert not os.path.exists(out) or set(os.listdir(out)) <= {".run.lock"}


def test_a_full_disk_during_train_py_export_is_one_line_and_keeps_the_earlier_export(
    trained_run, tmp_path, capsys, monkeypatch
):
    """An OSError while writing the export was a traceback (exit 1): now one line naming the
    folder, exit 2, and the earlier export is still there, file for file."""
    import errno

    import export.folder as hf_export

    _, out = trained_run
    hf = tmp_path / "hf"
    assert export(capsys, out, hf)[0] == 0
    before = snapshot(tmp_path)

    def full_disk(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hf_export, "with_user_umask", full_disk)
    code, err = export(capsys, out, hf)
    assert code == 2
    assert "Traceback" not in err, err  # (transformers' own progress bar may come before the line)
    last = err.splitlines()[-1]
    assert last == f"train.py: error: cannot write the export {hf}: No space left on device", err
    assert snapshot(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_a_real_write_failure_of_the_weights_is_one_line_and_keeps_the_earlier_export(trained_run, tmp_path):
    """The weights themselves failing to write, for real: the export runs in a process whose files
    may not grow past 100 kB (RLIMIT_FSIZE, SIGXFSZ ignored, so write() fails with EFBIG as it would
    with ENOSPC on a full disk). safetensors reports that as its own SafetensorError, not an
    OSError, which was a traceback (exit 1); now one line naming the folder, exit 2, and the earlier
    export is still there, file for file."""
    import resource
    import signal
    import subprocess
    import sys

    _, out = trained_run
    hf = tmp_path / "hf"
    limit = 100_000
    command = [sys.executable, "train.py", "export", str(out), str(hf)]
    assert subprocess.run(command, cwd=REPO, capture_output=True).returncode == 0
    before = snapshot(tmp_path)
    sizes = {f.name: f.stat().st_size for f in hf.iterdir()}
    assert sizes.pop("model.safetensors") > limit > max(sizes.values())  # the limit cuts the weights alone

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, preexec_fn=small_files)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: cannot write the export {hf}: "), last
    assert "File too large" in last, last
    assert snapshot(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


@pytest.mark.parametrize(
    "raised, code, message",
    [
        (KeyboardInterrupt(), 130, "interrupted: {hf} left as it was"),
        (FileNotFoundError(2, "No such file or directory"), 2, "reading {run}: [Errno 2] No such file or directory"),
    ],
)
def test_ctrl_c_or_a_checkpoint_pruned_during_train_py_export_is_one_line(
    trained_run, tmp_path, capsys, monkeypatch, raised, code, message
):
    """Both were tracebacks (exit 1): a Ctrl-C while the weights are read, and a checkpoint file that
    a running job pruned between the manifest check and the read. Now one line with the documented
    code (130: interrupted, 2: the input), and the earlier export stays as it was."""
    import export.from_training as train_export

    _, out = trained_run
    hf = tmp_path / "hf"
    assert export(capsys, out, hf)[0] == 0
    before = snapshot(tmp_path)

    def interrupted(*_a, **_k):
        raise raised

    monkeypatch.setattr(train_export.ckpt, "load_fp32_state_dict", interrupted)
    got, err = export(capsys, out, hf)
    assert (got, err) == (code, "train.py: error: " + message.format(hf=hf, run=out))
    assert snapshot(tmp_path) == before


def test_a_refused_export_dir_names_what_is_there_and_no_flag_train_py_lacks(trained_run, tmp_path, capsys):
    """checkpoint.export_dir naming a prepared dataset: the refusal said the folder had no stamp
    while listing the stamp among its files, and advised --overwrite, which train.py does not take.
    It now says which kind of output the folder is, and how to go on."""
    corpus, _ = trained_run
    out = tmp_path / "run"
    code = train.main(
        [
            *TINY,
            f"data.dir={corpus}",
            f"train.out_dir={out}",
            "checkpoint.export_at_end=true",
            f"checkpoint.export_dir={corpus}",
        ]
    )
    assert code == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"train.py: error: checkpoint.export_dir: {corpus} is not empty"), err
    assert "(it is a " in err and "no stamp" not in err, err
    assert "--overwrite" not in err and "set checkpoint.export_dir to another folder" in err, err
