"""How a training run ends and refuses to start: the exit codes of a signal stop (143 / 130) and of a
planned stop (0). In-process through train.main, so each case costs a tiny run, not an interpreter."""

from __future__ import annotations

import os
import signal

import pytest

import train
from training import checkpoint as ckpt
from training import trainer as trainer_mod

from _train_utils import TINY, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "data")


def args(corpus, out_dir, *extra):
    return [*TINY, f"data.dir={corpus}", f"train.out_dir={out_dir}", *extra]


def signal_at_step(monkeypatch, signum, at_step):
    """Deliver `signum` to this process while step `at_step` (0-based) draws its batches, as a
    scheduler's pre-emption would in the middle of a step."""
    real = trainer_mod.step_micro_batches

    def batches(ds, seed, step, plan, rank):
        if step == at_step:
            os.kill(os.getpid(), signum)
        return real(ds, seed, step, plan, rank)

    monkeypatch.setattr(trainer_mod, "step_micro_batches", batches)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_then_exits_128_plus_signum(corpus, tmp_path, monkeypatch, capsys, signum, code):
    signal_at_step(monkeypatch, signum, at_step=2)
    assert train.main(args(corpus, tmp_path)) == code
    # the step in progress finished and was saved, nothing after it ran
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").endswith("step_00000003")
    assert f"stopped by {signal.Signals(signum).name}" in capsys.readouterr().out
    assert not (tmp_path / "hf").exists()


def test_a_planned_stop_exits_0(corpus, tmp_path):
    assert train.main(args(corpus, tmp_path, "train.stop_after_steps=2")) == 0
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").endswith("step_00000002")


def test_a_second_run_in_the_same_out_dir_fails_at_once_naming_the_holder(corpus, tmp_path, capsys):
    import socket

    from training.runlock import RunLock

    with RunLock(str(tmp_path)):  # a run in progress (this process, its own open file: a separate flock)
        assert train.main(args(corpus, tmp_path)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("train.py: error: train.out_dir") and len(err.splitlines()) == 1
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in err
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    # released at the end of the holder's run, finished or failed: the next run gets it
    assert train.main(args(corpus, tmp_path, "train.stop_after_steps=1")) == 0
    with RunLock(str(tmp_path)):
        pass
