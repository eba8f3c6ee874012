"""Checkpoints that were not written as they are read: crafted pickles (they must not run), files
altered or truncated after the save (verified against the manifest before any load; resume falls
back to the newest intact checkpoint), and data that changed under a run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from support.train_utils import TINY, copy_of, error_line

import train
from data_prep.prepare import prepare
from training import checkpoint as ckpt
from training.metrics import read_metrics
from training.rng import load_rng, save_rng


def args(corpus, out_dir, *extra):
    return [*TINY, f"data.dir={corpus}", f"train.out_dir={out_dir}", *extra]


@pytest.fixture(scope="module")
def stopped_run(corpus, tmp_path_factory):
    """A run stopped as planned after step 4, with checkpoints at steps 2 and 4 (copy before changing)."""
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    assert train.main(args(corpus, out, "checkpoint.every=2", "train.stop_after_steps=4")) == 0
    return out


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    return copy_of(stopped_run, tmp_path)


def step_dir(run, step):
    return run / "checkpoints" / f"step_{step:08d}"


class Payload:
    """Unpickling this creates the marker file: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def forge_manifest(ckpt_dir):
    """What an attacker who can write the folder does: list the files as they are now."""
    files = {}
    for dirpath, _, names in os.walk(ckpt_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), ckpt_dir)
            if rel != "manifest.json":
                data = open(os.path.join(dirpath, n), "rb").read()
                files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt_dir / "manifest.json").write_text(json.dumps({"format": "hyena-rtf-checkpoint/1", "files": files}))


def one_error_line(capsys):
    return error_line(capsys.readouterr().err)


def test_rng_states_round_trip_without_pickle(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves numpy with a cached gaussian
    save_rng(str(tmp_path / "rng.pt"))
    first = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    load_rng(str(tmp_path / "rng.pt"))
    assert (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == first
    torch.load(tmp_path / "rng.pt", weights_only=True)  # plain tensors and scalars only


def test_a_crafted_rng_file_is_refused_without_running_it(corpus, run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    latest = step_dir(run_copy, 4)
    torch.save({"python": Payload(marker)}, latest / "rng_rank0.pt")
    forge_manifest(latest)  # so that only the loader stands between the file and the process
    assert train.main(args(corpus, run_copy)) == 2
    assert not marker.exists()
    assert "rng_rank0.pt: not a plain tensor file" in one_error_line(capsys)


def test_a_crafted_deepspeed_file_is_refused_before_deepspeed_loads_it(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    latest = step_dir(run_copy, 4)
    os.remove(latest / "model.pt")  # so that the export takes the DeepSpeed (ZeRO) path
    (latest / "deepspeed").mkdir()
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        torch.save({"optimizer_state_dict": Payload(marker)}, latest / "deepspeed" / name)
    assert train.main(["export", str(latest), str(tmp_path / "hf")]) == 2
    assert not marker.exists()
    assert "is not part of the checkpoint (not in manifest.json)" in one_error_line(capsys)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(corpus, run_copy, capsys):
    bad = step_dir(run_copy, 4) / "optimizer.pt"
    truncate(bad)
    assert train.main(args(corpus, run_copy, "train.stop_after_steps=5")) == 0
    err = capsys.readouterr().err  # the log
    assert f"[train] warning: skipping checkpoint {step_dir(run_copy, 4)}: {bad} has" in err
    assert "truncated" in err
    assert f"[train] resumed from {step_dir(run_copy, 2)} at step 2" in err
    assert ckpt.latest_checkpoint(run_copy / "checkpoints").endswith("step_00000005")


def test_export_of_a_truncated_or_missing_checkpoint_is_a_one_line_error(run_copy, tmp_path, capsys):
    bad = step_dir(run_copy, 4) / "model.pt"
    truncate(bad)
    assert train.main(["export", str(run_copy), str(tmp_path / "hf")]) == 2  # the run's latest: no silent fallback
    assert f"{bad} has" in one_error_line(capsys)
    assert train.main(["export", str(tmp_path / "nowhere"), str(tmp_path / "hf")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such checkpoint" in one_error_line(capsys)
    assert not (tmp_path / "hf").exists()


def test_plain_python_refuses_a_deepspeed_checkpoint_naming_the_launcher(corpus, run_copy, capsys):
    latest = step_dir(run_copy, 4)
    state = json.loads((latest / "trainer_state.json").read_text())
    (latest / "trainer_state.json").write_text(json.dumps({**state, "engine": "deepspeed"}))
    os.remove(latest / "model.pt")  # a ZeRO checkpoint has partitions under deepspeed/ instead
    (latest / "deepspeed").mkdir()
    (latest / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"partition")
    forge_manifest(latest)
    assert train.main(args(corpus, run_copy, "checkpoint.resume=" + str(latest))) == 2
    assert "written by the DeepSpeed engine; resume it under the deepspeed launcher" in one_error_line(capsys)


def test_resume_refuses_data_prepared_again_with_another_tokenizer_of_the_same_size(corpus, run_copy, tmp_path, capsys):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    other = tmp_path / "other_data"  # other sources: another 512-token BPE, other shards
    prepare(
        [str(stdlib / n) for n in ("argparse.py", "typing.py", "inspect.py", "pathlib.py")],
        other,
        vocab_size=512,
        val_fraction=0.1,
        text_chunk_bytes=8192,
        workers=1,
        verbose=False,
    )
    assert json.loads((other / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 512
    assert train.main([*TINY, f"data.dir={other}", f"train.out_dir={run_copy}"]) == 2
    err = one_error_line(capsys)
    assert f"cannot resume from {step_dir(run_copy, 4)}: the data in data.dir={other}" in err
    assert "the tokenizer file differs" in err
    assert "train split tokens" in err
    assert train.main(args(corpus, run_copy, "train.stop_after_steps=5")) == 0  # the original data still resumes


def test_the_advice_after_a_stop_resumes_a_run_that_branched_off_a_path(corpus, stopped_run, tmp_path, caplog):
    """A run started from checkpoint.resume=PATH and stopped (here by train.stop_after_steps) once
    said "rerun without it to resume": the same command then branched off PATH again, set the new
    checkpoint aside and trained its steps again. The advice now names checkpoint.resume=auto, and
    following it resumes where the run stopped."""
    branch = tmp_path / "branch"
    base = args(corpus, branch, f"checkpoint.resume={step_dir(stopped_run, 4)}", "checkpoint.every=2")
    with caplog.at_level("INFO"):
        assert train.main([*base, "train.stop_after_steps=6"]) == 0
    advice = [r.getMessage() for r in caplog.records if "stopped after step 6" in r.getMessage()]
    assert len(advice) == 1, advice
    assert (
        f"rerun without train.stop_after_steps and with checkpoint.resume=auto (not {step_dir(stopped_run, 4)})"
        in advice[0]
    )
    caplog.clear()
    with caplog.at_level("INFO"):  # as advised
        assert train.main([*base[:-2], "checkpoint.every=2", "checkpoint.resume=auto", "train.max_steps=8"]) == 0
    assert any("resumed from" in r.getMessage() and "step_00000006" in r.getMessage() for r in caplog.records)
    assert not [p for p in (branch / "checkpoints").iterdir() if ".abandoned" in p.name]


def test_a_checkpoints_path_that_is_a_file_is_refused_before_training(corpus, run_copy, capsys):
    """A file where the run folder's checkpoints folder belongs let every step train and failed at
    the first save (with checkpoint.every=500, 500 steps lost): now one line before the first step,
    and the file is kept."""
    import shutil

    shutil.rmtree(run_copy / "checkpoints")
    (run_copy / "checkpoints").write_text("mine")
    metrics = (run_copy / "metrics.jsonl").read_bytes()
    assert train.main(args(corpus, run_copy, "train.max_steps=6")) == 2
    err = one_error_line(capsys)
    assert f"{run_copy / 'checkpoints'} is not a folder, so no checkpoint could be saved" in err, err
    assert (run_copy / "checkpoints").read_text() == "mine"
    assert (run_copy / "metrics.jsonl").read_bytes() == metrics  # not one step trained


def test_a_rerun_with_fewer_steps_than_done_says_there_is_nothing_to_train(corpus, run_copy, caplog):
    """Rerunning a run stopped at step 4 with train.max_steps=3 trained nothing and said nothing."""
    with caplog.at_level("WARNING"):
        assert train.main(args(corpus, run_copy, "train.max_steps=3")) == 0
    said = [r.getMessage() for r in caplog.records if "nothing to train" in r.getMessage()]
    assert len(said) == 1 and "already at step 4, not below step 3" in said[0], said


def test_branching_off_an_older_checkpoint_sets_the_cut_metrics_aside(corpus, run_copy):
    """checkpoint.resume=PATH to step 2 of a run at step 4 cuts metrics.jsonl back to step 2 (the
    new line's records follow); the cut records of steps 3-4, the old line's, were lost. They
    are kept in metrics.set_aside.jsonl, byte for byte."""
    lines = (run_copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    later = [line for line in lines if json.loads(line)["step"] > 2]
    assert later, lines
    resume = f"checkpoint.resume={step_dir(run_copy, 2)}"
    assert train.main(args(corpus, run_copy, resume, "train.max_steps=3", "checkpoint.every=2")) == 0
    assert (run_copy / "metrics.set_aside.jsonl").read_text() == "".join(later)
    assert max(json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_resume_with_new_optimizer_values_trains_with_them(corpus, stopped_run, tmp_path, capsys):
    """After a loss spike one lowers optim.lr and resumes: the loaded optimizer state must not
    bring back the checkpoint's peak lrs, weight decay, betas or eps. Both resumed runs follow the
    same schedule, so the logged lrs of the changed one are the plain one's scaled by new / old
    peak, its losses differ, and each changed value is named in one log line."""
    plain, changed = copy_of(stopped_run, tmp_path / "a"), copy_of(stopped_run, tmp_path / "b")
    assert train.main(args(corpus, plain, "train.stop_after_steps=6")) == 0
    capsys.readouterr()
    new = ("optim.lr=1e-4", "optim.rtf_lr=1e-5", "optim.weight_decay=0.5", "optim.beta2=0.9", "optim.eps=1e-6")
    assert train.main(args(corpus, changed, "train.stop_after_steps=6", *new)) == 0
    err = capsys.readouterr().err
    for line in (
        "optim.lr: checkpoint 0.01 -> config 0.0001",
        "optim.rtf_lr: checkpoint 0.001 -> config 1e-05",
        "optim.weight_decay: checkpoint 0.1 -> config 0.5",
        "optim.beta2: checkpoint 0.95 -> config 0.9",
        "optim.eps: checkpoint 1e-08 -> config 1e-06",
    ):
        assert err.count(line) == 1, (line, err)
    a = [r for r in read_metrics(plain / "metrics.jsonl") if r["step"] > 4]
    b = [r for r in read_metrics(changed / "metrics.jsonl") if r["step"] > 4]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [5, 6]
    for ra, rb in zip(a, b):
        assert rb["lr"] == pytest.approx(ra["lr"] * 1e-4 / 1e-2, rel=1e-9)
        assert rb["rtf_lr"] == pytest.approx(ra["rtf_lr"] * 1e-5 / 1e-3, rel=1e-9)
    assert a[1]["loss"] != b[1]["loss"]
