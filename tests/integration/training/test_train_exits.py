"""How a training run ends and refuses to start: the exit codes of a signal stop (143 / 130) and of a
planned stop (0), the run lock, and the one-line errors (exit 2) of bad settings and data.
In-process through train.main, so each case costs a tiny run, not an interpreter."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket

import numpy as np
import pytest
from support.train_utils import TINY, error_line

import train
from training import checkpoint as ckpt
from training import trainer as trainer_mod
from training.preemption import Interrupted, StopRequest, deferred
from training.runlock import RunLock, claim_run_dir


def args(corpus, out_dir, *extra):
    return [*TINY, f"data.dir={corpus}", f"train.out_dir={out_dir}", *extra]


def signal_at_step(monkeypatch, signum, at_step):
    """Deliver `signum` to this process at the start of step `at_step` (0-based), in the main
    thread, as a scheduler's pre-emption would in the middle of a step. (The batches themselves are
    drawn a step ahead by the prefetch thread, so the hook is the check of the step's batch.)"""
    real = trainer_mod.check_token_ids

    def check(batches, ds, what):
        if what == f"the batch of step {at_step + 1}":
            os.kill(os.getpid(), signum)
        return real(batches, ds, what)

    monkeypatch.setattr(trainer_mod, "check_token_ids", check)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_then_exits_128_plus_signum(corpus, tmp_path, monkeypatch, capsys, signum, code):
    signal_at_step(monkeypatch, signum, at_step=2)
    assert train.main(args(corpus, tmp_path)) == code
    # the step in progress finished and was saved, nothing after it ran
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").endswith("step_00000003")
    assert f"[train] stopped by {signal.Signals(signum).name}" in capsys.readouterr().err  # the log
    assert not (tmp_path / "hf").exists()


def test_a_planned_stop_exits_0(corpus, tmp_path):
    assert train.main(args(corpus, tmp_path, "train.stop_after_steps=2")) == 0
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").endswith("step_00000002")


def test_a_second_run_in_the_same_out_dir_fails_at_once_naming_the_holder(corpus, tmp_path, capsys):
    claim_run_dir(str(tmp_path))  # a run in progress: it stamped the folder, then locked it
    with RunLock(str(tmp_path)):  # (this process, its own open file: a separate flock)
        assert train.main(args(corpus, tmp_path)) == 2
        err = capsys.readouterr().err.strip()
        assert err == error_line(err)  # before any log line
        assert err.startswith("train.py: error: train.out_dir")
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in err
        assert not (tmp_path / "metrics.jsonl").exists()
        assert not (tmp_path / "checkpoints").exists()
    # released at the end of the holder's run, finished or failed: the next run gets it
    assert train.main(args(corpus, tmp_path, "train.stop_after_steps=1")) == 0
    with RunLock(str(tmp_path)):
        pass


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.seq_len=4", "model.l_max=64"], "data.seq_len=4 must be greater than model.state_size=4"),
        (["data.eval_samples=0"], "'data.eval_samples': 0 (must be >= 1)"),
        (["train.seed=-1"], "'train.seed': -1 (must be in [0, 2**32 - 1])"),
        (["train.max_nonfinite_steps=0"], "'train.max_nonfinite_steps': 0 (must be >= 1"),
        (
            ["train.engine=deepspeed", "train.deepspeed.zero_optimization.stage=3"],
            "train.deepspeed.zero_optimization.stage=3 is not allowed",
        ),
        (["checkpoint.resume={tmp}/nowhere"], "checkpoint.resume={tmp}/nowhere: no such checkpoint"),
        (["train.out_dir={tmp}/a_file"], "train.out_dir '{tmp}/a_file' is an existing file"),
    ],
)
def test_usage_errors_are_one_line_naming_the_key_with_exit_2(corpus, tmp_path, capsys, overrides, expected):
    (tmp_path / "a_file").write_text("")
    extra = [o.format(tmp=tmp_path) for o in overrides]
    assert train.main(args(corpus, tmp_path / "run", *extra)) == 2
    assert expected.format(tmp=tmp_path) in error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_hyena_rtf_debug_adds_the_traceback(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HYENA_RTF_DEBUG", "1")
    assert train.main(args(corpus, tmp_path, "train.seed=-1")) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().endswith("(must be in [0, 2**32 - 1])")


def test_out_of_vocabulary_token_ids_are_a_data_error(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    train_bin = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    train_bin[:] = 600  # ids of a 600+-token tokenizer, data prepared for a 512-token one
    train_bin.flush()
    del train_bin
    assert train.main([*TINY, f"data.dir={data}", f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "the batch of step 1 of the 'train' split" in err
    assert "token id 600, outside the tokenizer's vocabulary of 512" in err


def test_an_unwritable_out_dir_is_a_one_line_error(corpus, capsys):
    # /sys refuses new entries even to root, unlike a chmod'ed folder
    assert train.main(args(corpus, "/sys/kernel/hyena_rtf_test_run")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "train.py: error: train.out_dir '/sys/kernel/hyena_rtf_test_run' cannot be created or written: "
        "Operation not permitted"
    ), err


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    """The second save (step 8) hits ENOSPC while writing its RNG file: one line naming the
    checkpoint, exit 2, the partial folder removed, step 4's checkpoint intact and resumable."""
    real, saves = ckpt.save_rng, []

    def save_rng(path):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path)

    monkeypatch.setattr(ckpt, "save_rng", save_rng)
    assert train.main(args(corpus, tmp_path)) == 2
    step8 = tmp_path / "checkpoints" / "step_00000008"
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"train.py: error: cannot write checkpoint {step8}: No space left on device"), err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000004"]
    ckpt.verify_checkpoint(str(tmp_path / "checkpoints" / "step_00000004"))
    monkeypatch.setattr(ckpt, "save_rng", real)
    assert train.main(args(corpus, tmp_path)) == 0  # resumes from step 4 and finishes


LONG = "a" * 300  # one path component past NAME_MAX (255 bytes)


@pytest.mark.parametrize(
    "key, extra",
    [
        ("train.out_dir", ["checkpoint.export_at_end=true", "train.out_dir={tmp}/" + LONG + "/run"]),
        ("checkpoint.export_dir", ["checkpoint.export_at_end=true", "checkpoint.export_dir={tmp}/" + LONG]),
    ],
)
def test_a_path_component_longer_than_name_max_is_one_line_naming_the_key(corpus, tmp_path, capsys, key, extra):
    overrides = [e.format(tmp=tmp_path) for e in extra]
    assert train.main(args(corpus, tmp_path / "run", *overrides)) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"train.py: error: {key}"), err
    assert "255" in err
    assert os.listdir(tmp_path) == []  # before any work: not even the run folder


def test_a_second_ctrl_c_during_a_checkpoint_save_stops_at_once_with_one_line(corpus, tmp_path, monkeypatch, capsys):
    """Ctrl-C in step 5 asks for a checkpoint at step 5; a second Ctrl-C while it is being written
    stops at once: exit 130, one log line and no traceback, the partial save left in its staging
    folder, which the next start removes before resuming from step 4."""
    real_check, real = trainer_mod.check_token_ids, ckpt.save_rng
    signal_at_step(monkeypatch, signal.SIGINT, at_step=4)

    def save_rng(path):
        if "step_00000005" in path:
            os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
        real(path)

    monkeypatch.setattr(ckpt, "save_rng", save_rng)
    assert train.main(args(corpus, tmp_path)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "second SIGINT" in line]
    assert len(lines) == 1 and "step 5" in lines[0] and "step_00000004" in lines[0], err[-2000:]
    root = tmp_path / "checkpoints"
    assert ".tmp-step_00000005" in os.listdir(root)
    assert ckpt.latest_checkpoint(root).endswith("step_00000004")
    monkeypatch.setattr(ckpt, "save_rng", real)
    monkeypatch.setattr(trainer_mod, "check_token_ids", real_check)
    assert train.main(args(corpus, tmp_path, "train.stop_after_steps=6")) == 0
    assert f"resumed from {root / 'step_00000004'} at step 4" in capsys.readouterr().err
    assert ".tmp-step_00000005" not in os.listdir(root)


def test_a_second_signal_inside_a_deferred_block_takes_effect_at_its_end():
    """The steps of a save that must not be cut (stamping the staging folder, the renames that
    publish a checkpoint) run in `deferred()`: a second signal there stops the run only after them."""
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, the run goes on
        assert stop.signum == signal.SIGINT
        finished = False
        with pytest.raises(Interrupted) as raised:
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished = True
        assert finished and raised.value.signum == signal.SIGTERM
        with pytest.raises(Interrupted):  # outside the block: at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
