"""What a training run may delete, rename or continue: only what it stamped itself.

Each case plants what a user (or a disk fault) leaves in a run folder, runs train.py in this
process, and compares the SHA-256 of every file that was there before with what is there after.
Cases: pruning with a corrupt newer checkpoint (it is never what is kept), going back to an older
checkpoint (a branch: the old line is kept and reruns follow the branch), a plain rerun after the
run fell back past a bad checkpoint (it follows the line it continued, never the abandoned one),
folders under
checkpoints/ that the program did not stamp (never pruned; refused when in the way of a save),
and a train.out_dir the program did not create (refused, nothing touched).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from support.train_utils import TINY, copy_of, error_line

import train
from training import checkpoint as ckpt


def args(corpus, out_dir, *extra):
    return [*TINY, f"data.dir={corpus}", f"train.out_dir={out_dir}", *extra]


def checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below `folder` (hidden ones included), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def flip_a_byte(path: Path) -> bytes:
    """Alter one byte in the middle of `path` (same size: only the digest tells); returns the
    original bytes, to repair it later."""
    data = path.read_bytes()
    i = len(data) // 2
    path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    return data


@pytest.fixture(scope="module")
def six_steps(corpus, tmp_path_factory):
    """A run stopped after step 6 with checkpoints at steps 2, 4 and 6 (copy before changing)."""
    out = tmp_path_factory.mktemp("six") / "run"
    torch.set_num_threads(1)
    extra = ("checkpoint.every=2", "checkpoint.keep_last=3", "train.stop_after_steps=6")
    assert train.main(args(corpus, out, *extra)) == 0
    return out


@pytest.fixture
def run_copy(six_steps, tmp_path):
    return copy_of(six_steps, tmp_path)


# ---- 1. keep_last keeps the newest intact checkpoint, never a corrupt newer one ---------------


def test_keep_last_never_keeps_a_corrupt_checkpoint_in_place_of_the_intact_ones(corpus, run_copy, capsys):
    """Intact step 4, corrupt step 6: keep_last=1 resumes from 4 and saves 5; the pruning must
    keep 5 (the newest intact checkpoint of the line it continues), not the corrupt 6, so that
    the next run resumes from 5. The corrupt checkpoint itself stays as it was, for inspection."""
    flip_a_byte(step_dir(run_copy, 6) / "model.pt")
    corrupt = checksums(step_dir(run_copy, 6))
    extra = ("checkpoint.keep_last=1", "checkpoint.every=1", "train.stop_after_steps=5")
    assert train.main(args(corpus, run_copy, *extra)) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {step_dir(run_copy, 6)}" in err
    assert f"resumed from {step_dir(run_copy, 4)} at step 4" in err
    ckpt.verify_checkpoint(str(step_dir(run_copy, 5)))
    assert checksums(step_dir(run_copy, 6)) == corrupt
    assert train.main(args(corpus, run_copy, "checkpoint.keep_last=1", "train.stop_after_steps=6")) == 0
    assert f"resumed from {step_dir(run_copy, 5)} at step 5" in capsys.readouterr().err


# ---- 2. branching back is explicit; a rerun follows the line it continued ----------------------


@pytest.mark.parametrize("resume", ["older", "none"])
def test_branching_back_keeps_the_old_line_and_reruns_follow_the_branch(corpus, run_copy, capsys, resume):
    """Checkpoints 2, 4, 6; checkpoint.resume=step_2 (or none) with keep_last=1 branches off. The
    branch's checkpoints are its own line: pruning keeps its newest, never the old line's 6, and
    the old line's 4, which the branch saves again, is renamed aside, not overwritten or deleted.
    A plain rerun then continues the branch, not the abandoned step 6."""
    old_line = {step: checksums(step_dir(run_copy, step)) for step in (4, 6)}
    value = str(step_dir(run_copy, 2)) if resume == "older" else "none"
    extra = ("checkpoint.keep_last=1", "checkpoint.every=1", "train.stop_after_steps=4")
    assert train.main(args(corpus, run_copy, f"checkpoint.resume={value}", *extra)) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint.resume={value} branches off" in err
    assert str(step_dir(run_copy, 6)) in err  # the line it leaves, named
    assert checksums(step_dir(run_copy, 6)) == old_line[6]
    aside = [p for p in (run_copy / "checkpoints").iterdir() if p.name.startswith("step_00000004.abandoned-")]
    assert len(aside) == 1 and checksums(aside[0]) == old_line[4]
    ckpt.verify_checkpoint(str(step_dir(run_copy, 4)))  # the branch's own step 4, kept
    assert train.main(args(corpus, run_copy, "checkpoint.keep_last=1", "train.stop_after_steps=5")) == 0
    assert f"resumed from {step_dir(run_copy, 4)} at step 4" in capsys.readouterr().err
    assert checksums(step_dir(run_copy, 6)) == old_line[6]


def test_a_rerun_follows_the_line_it_continued_not_an_abandoned_checkpoint(corpus, run_copy, capsys):
    """Step 6 is corrupt, so a rerun continues from 4 and saves 5. Step 6 is then repaired (an
    interrupted copy finished, a flaky disk read again): the next plain rerun must still continue
    5, the newest checkpoint of the line the last run wrote, not jump back onto 6."""
    original = flip_a_byte(step_dir(run_copy, 6) / "model.pt")
    assert train.main(args(corpus, run_copy, "checkpoint.every=1", "train.stop_after_steps=5")) == 0
    (step_dir(run_copy, 6) / "model.pt").write_bytes(original)
    ckpt.verify_checkpoint(str(step_dir(run_copy, 6)))  # intact again, but abandoned
    capsys.readouterr()
    assert train.main(args(corpus, run_copy, "checkpoint.every=1", "train.stop_after_steps=7")) == 0
    assert f"resumed from {step_dir(run_copy, 5)} at step 5" in capsys.readouterr().err
    # step 6 of the abandoned line was in the way of the new step 6: moved aside, not deleted
    aside = [p for p in (run_copy / "checkpoints").iterdir() if p.name.startswith("step_00000006.abandoned-")]
    assert len(aside) == 1
    ckpt.verify_checkpoint(str(aside[0]))
    assert (aside[0] / "model.pt").read_bytes() == original


# ---- 3. a folder is a checkpoint of the run only if the run stamped it --------------------------


def test_folders_the_run_did_not_stamp_are_never_pruned_or_cleaned(corpus, run_copy, capsys):
    root = run_copy / "checkpoints"
    planted = root / "step_00000001"  # looks like a checkpoint, is the user's
    planted.mkdir()
    (planted / "trainer_state.json").write_text('{"step": 1}')
    (planted / "notes.txt").write_text("what I changed at step 1")
    (root / ".tmp-scratch").mkdir()  # named like a staging folder
    (root / ".tmp-scratch" / "data.csv").write_text("1,2,3")
    (root / ".trash-keep.txt").write_text("not rubbish")
    # the user's copy of a real checkpoint: the run's stamp inside, but not under a name the run gave
    shutil.copytree(root / "step_00000004", root / ".trash-backup-of-4")
    planted_names = ("step_00000001", ".tmp-scratch", ".trash-keep.txt", ".trash-backup-of-4")
    mine = {k: v for k, v in checksums(root).items() if k.split("/")[0] in planted_names}
    extra = ("checkpoint.keep_last=1", "checkpoint.every=1", "train.stop_after_steps=8")
    assert train.main(args(corpus, run_copy, *extra)) == 0
    after = checksums(root)
    assert {k: after.get(k) for k in mine} == mine
    assert f"{planted} is not a checkpoint of this run" in capsys.readouterr().err  # said, once per start
    own = sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and p != planted)
    assert own == ["step_00000008"]  # the run's own checkpoints were pruned as usual


def test_an_unstamped_folder_in_the_way_of_a_save_is_refused_before_any_step(corpus, run_copy, capsys):
    planted = step_dir(run_copy, 7)
    planted.mkdir()
    (planted / "trainer_state.json").write_text('{"step": 7}')
    (planted / "notes.txt").write_text("mine")
    before = checksums(run_copy)
    assert train.main(args(corpus, run_copy, "checkpoint.every=1")) == 2
    err = error_line(capsys.readouterr().err)
    assert str(planted) in err
    assert "not a checkpoint of this run" in err
    assert checksums(run_copy) == before


# ---- 4. train.out_dir: the program's own (stamped) or empty, never someone else's ---------------


def test_an_out_dir_the_program_did_not_create_is_refused_and_left_alone(corpus, tmp_path, capsys):
    mine = tmp_path / "experiment"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own config\n")
    (mine / "metrics.jsonl").write_text('{"my": "measurements"}\n')
    before = checksums(mine)
    assert train.main(args(corpus, mine, "train.stop_after_steps=1")) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"train.py: error: train.out_dir '{mine}'"), err
    assert "was not created by train.py" in err
    assert checksums(mine) == before
    assert sorted(os.listdir(mine)) == ["config.yaml", "metrics.jsonl"]  # not even a lock file


def test_an_empty_out_dir_is_used_and_stamped_and_a_rerun_resumes(corpus, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert train.main(args(corpus, out, "train.stop_after_steps=1")) == 0
    assert train.main(args(corpus, out, "train.stop_after_steps=2")) == 0
    assert f"resumed from {step_dir(out, 1)} at step 1" in capsys.readouterr().err


# ---- 5. inside a checkpoint, the run deletes only the files its manifest lists ------------------


def test_pruning_keeps_the_files_a_user_stored_inside_a_checkpoint(corpus, run_copy, capsys):
    """Notes and an evaluation folder stored in step 2: keep_last=3 prunes step 2 after step 8 is
    saved. The checkpoint's own files go, the user's stay where they were (same bytes), named in a
    warning; the folder no longer carries the run's stamp, so later runs leave it alone."""
    old = step_dir(run_copy, 2)
    (old / "NOTES.txt").write_text("my eval notes for step 2")
    (old / "my_eval").mkdir()
    (old / "my_eval" / "result.json").write_text('{"ppl": 1}')
    mine = {k: v for k, v in checksums(old).items() if k in ("NOTES.txt", "my_eval/result.json")}
    extra = ("checkpoint.every=2", "checkpoint.keep_last=3", "train.stop_after_steps=8")
    assert train.main(args(corpus, run_copy, *extra)) == 0
    err = capsys.readouterr().err
    assert checksums(old) == mine  # nothing of the checkpoint is left, all of the user's is
    assert f"warning: pruned checkpoint {old} but kept the folder" in err
    assert "(NOTES.txt, my_eval)" in err
    names = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    assert names == [old.name, "step_00000004", "step_00000006", "step_00000008"]
    assert train.main(args(corpus, run_copy, *extra[:2], "train.stop_after_steps=9")) == 0
    assert checksums(old) == mine
    assert f"{old} is not a checkpoint of this run" in capsys.readouterr().err


@pytest.mark.parametrize("added", ["eval.json", "my_eval/result.json"])
def test_a_user_file_in_the_newest_checkpoint_does_not_make_it_corrupt(corpus, run_copy, capsys, added):
    """A result stored in the newest checkpoint (evaluate_lm.py --output step_6/eval.json) cannot
    change what a resume loads: the run resumes from step 6, not from step 4 retraining steps."""
    (step_dir(run_copy, 6) / added).parent.mkdir(exist_ok=True)
    (step_dir(run_copy, 6) / added).write_text('{"ppl": 1}')
    assert train.main(args(corpus, run_copy, "train.stop_after_steps=7")) == 0
    err = capsys.readouterr().err
    assert f"resumed from {step_dir(run_copy, 6)} at step 6" in err
    assert "skipping checkpoint" not in err


@pytest.mark.parametrize("added", ["rng_rank1.pt", "extra.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_an_added_file_a_load_could_pick_up_still_makes_the_checkpoint_corrupt(corpus, run_copy, capsys, added):
    """Files a loader opens by name or glob (DeepSpeed loads every *_optim_states.pt of its folder)
    are refused when the manifest does not list them: the resume falls back, naming the file."""
    path = step_dir(run_copy, 6) / added
    path.parent.mkdir(exist_ok=True)
    torch.save({"x": torch.zeros(1)}, path)
    assert train.main(args(corpus, run_copy, "train.stop_after_steps=7")) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {step_dir(run_copy, 6)}: {path} is not part of the checkpoint" in err
    assert f"resumed from {step_dir(run_copy, 4)} at step 4" in err


def test_a_damaged_stamp_is_named_as_damaged_and_the_folder_left_alone(corpus, run_copy, capsys):
    """A truncated stamp.json in the run's newest checkpoint: refused (nothing proves it is the
    run's), but the message says the stamp is damaged, not that the folder is someone else's."""
    (step_dir(run_copy, 6) / "stamp.json").write_bytes(b"")
    before = checksums(run_copy)
    assert train.main(args(corpus, run_copy)) == 2
    err = error_line(capsys.readouterr().err)
    assert f"{step_dir(run_copy, 6) / 'stamp.json'} is unreadable or damaged" in err, err
    assert checksums(run_copy) == before
