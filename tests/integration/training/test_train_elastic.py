"""Interrupted and elastic resume under DeepSpeed (training/zero_elastic.py): one 10-step ZeRO 2 run
in four segments, 2 processes (steps 1-3), 2 again (steps 4-5: an interrupted run resumed as it
was), 1 (steps 6-7), 2 (steps 8-10), each resuming the checkpoint of the one before, must follow
the uninterrupted one-process run of the same global batch (8 = micro 4 x accumulation 2 x 1
process = micro 4 x 2 processes). ZeRO 1 resumes 2 -> 1 in test_train_distributed.py, on the
checkpoints of its 2-process run (one launch fewer).

What must continue: the step counter (the log, metrics.jsonl, trainer_state.json, DeepSpeed's own
global_steps and AdamW's step count), the tokens seen and the learning rate of both groups (equal
to the reference's exactly: pure functions of the step), and the data position: a step's sequences
are a function of the step alone (training/data.py), so the resumed step is the position, and the
losses after it only match the reference if each step trains on the reference's batch.

Tolerance: the same 2e-5 on the losses and 1e-4 relative on the gradient norms as the distributed
tests (see test_train_distributed.py). Measured (ZeRO 2 and ZeRO 1, lr 1e-2): the largest loss gap
over the 10 steps is 2.4e-7, for 2 -> 1 and 1 -> 2 processes alike (0 on most steps), gradient
norms within 2.3e-7 relative, eval losses within 2.4e-7. The re-partitioned state itself is
bit-exact (checked once by hand: 2-process ZeRO 1 and ZeRO 2 checkpoints loaded on 1 process
gather back to their zero_full_state.pt bit for bit; not in the suite, where DeepSpeed cannot be
started again in-process after another test closed its process group, and a subprocess would cost
~10 s more); what remains is the summation order of the 2-process steps. A real
fault is 500x over the tolerance: resuming 2 -> 1 at step 8 with the AdamW moments zeroed changed
the step-10 loss by 1.1e-2, with AdamW's step count reset by 1.2e-2 (measured).
"""

from __future__ import annotations

import json

import pytest
import torch
from support.train_utils import assert_close, assert_resized, curve, launch

from training import checkpoint as ckpt
from training.metrics import read_metrics
from training.resume import check_resume_compatible
from training.zero_elastic import FULL_STATE_FILE

pytestmark = pytest.mark.slow

TOKENS_PER_STEP = 8 * 64


def zero2_run(nproc, corpus, out, *extra):
    """The DeepSpeed engine, ZeRO 2, on nproc processes: `python train.py` for 1; torchrun for 2,
    which starts in two thirds of the time of DeepSpeed's launcher (runner, launch.py, then the
    ranks) on this CPU. Either launcher only starts the processes; test_train_distributed.py runs
    DeepSpeed's own."""
    launcher = "python" if nproc == 1 else "torchrun"
    return launch(launcher, corpus, out, "train.engine=deepspeed", "train.zero_stage=2", *extra, nproc=nproc)


def check_saved(out, step, world_size):
    """The checkpoint of `step` was saved by `world_size` processes and its manifest covers the
    full-state file (verified before anything is loaded)."""
    path = ckpt.latest_checkpoint(out / "checkpoints")
    assert path.endswith(f"step_{step:08d}")
    assert ckpt.read_trainer_state(path)["world_size"] == world_size
    with open(f"{path}/{ckpt.MANIFEST_FILE}") as f:
        assert FULL_STATE_FILE in json.load(f)["files"]


def test_zero2_checkpoints_resume_on_the_same_fewer_and_more_processes(corpus, reference, tmp_path):
    zero2_run(2, corpus, tmp_path, "train.stop_after_steps=3")
    check_saved(tmp_path, step=3, world_size=2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    p = zero2_run(2, corpus, tmp_path, "train.stop_after_steps=5")  # DeepSpeed's own partitions, as saved
    assert "resumed from" in p.stderr and "at step 3" in p.stderr and "different world size" not in p.stderr
    check_saved(tmp_path, step=5, world_size=2)
    assert_resized(zero2_run(1, corpus, tmp_path, "train.stop_after_steps=7"), step=5, saved_on=2, resumed_on=1)
    check_saved(tmp_path, step=7, world_size=1)
    assert_resized(zero2_run(2, corpus, tmp_path), step=7, saved_on=1, resumed_on=2)
    assert_close(curve(tmp_path), reference)  # steps, losses, grad norms, lr, tokens

    final = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    state = ckpt.read_trainer_state(final)
    assert (state["step"], state["tokens"], state["world_size"]) == (10, 10 * TOKENS_PER_STEP, 2)
    full = torch.load(f"{final}/{FULL_STATE_FILE}", weights_only=True)
    assert full["world_size"] == 2
    assert [float(g["step"]) for g in full["scalars"]] == [10.0] * len(full["groups"])  # AdamW's step count
    # DeepSpeed's own counters came through the resizes too (a file this test's run wrote)
    ds_state = torch.load(f"{final}/deepspeed/mp_rank_00_model_states.pt", weights_only=False)
    assert (ds_state["global_steps"], ds_state["global_samples"], ds_state["dp_world_size"]) == (10, 80, 2)


def test_deepspeed_checkpoint_without_full_state_refuses_another_world_size(tmp_path):
    """A DeepSpeed checkpoint from before zero_full_state.pt only resumes on its own world size:
    a one-line CheckpointError (train.py exit 2) instead of DeepSpeed's traceback."""
    state = {"engine": "deepspeed", "world_size": 2, "global_batch_size": 8, "seed": 1}
    with pytest.raises(ckpt.CheckpointError, match=r"saved by 2 and has no zero_full_state.pt.*resume it on 2 process"):
        check_resume_compatible(None, str(tmp_path), state, 8, "deepspeed", world_size=1)
