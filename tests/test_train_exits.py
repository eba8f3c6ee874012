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
