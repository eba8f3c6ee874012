"""Multi-node runs need train.out_dir on a filesystem every node shares (training/dist_env.py,
`check_shared_out_dir`). Nodes are modelled on one machine by giving ranks different out_dir
folders: each rank is started by hand with the rendezvous variables a launcher sets, and a
different train.out_dir per pair of ranks (2 "nodes" of 2).
Every rank must refuse at start with the same one-line error and exit 2; every launch is bounded
by a timeout, so a rank left waiting in a collective fails the test instead of hanging it.

Also here: a rank that cannot resolve checkpoint.resume=PATH still enters find_resume's
all-reduce (a fake engine counts it), and so does a rank whose checkpoint checks fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.train_utils import REPO, TINY, child_env, error_line, free_port

from training.checkpoint import CheckpointError
from training.config import load_config
from training.dist_env import SHARED_CHECK_PREFIX, check_shared_out_dir
from training.resume import check_resume, find_resume

TIMEOUT_S = 150  # four processes starting on two cores take ~30 s; a hang would take forever


def launch_ranks(corpus: Path, out_dirs: list[Path]) -> list[subprocess.CompletedProcess]:
    """One train.py process per entry of out_dirs (rank r writes to out_dirs[r]), as a launcher
    would start them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); waits for all."""
    world, port = len(out_dirs), str(free_port())
    procs = []
    for rank, out in enumerate(out_dirs):
        env = child_env(threads=1)
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank % 2),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        cmd = [sys.executable, "train.py", *TINY, "train.engine=ddp", f"train.global_batch_size={4 * world}"]
        cmd += [f"data.dir={corpus}", f"train.out_dir={out}"]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"ranks still running after {TIMEOUT_S} s: a rank waits in a collective its peers never enter")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return done


def test_separate_out_dirs_are_refused_on_every_rank(corpus, tmp_path):
    """4 ranks as 2 nodes of 2 sharing a folder per node: every rank refuses, those whose peer on the
    same node shares their folder too (the 2-node, 1-rank case is this one with fewer ranks)."""
    world, per_node = 4, 2
    nodes = [tmp_path / f"node{n}" / "run" for n in range(world // per_node)]
    nodes[1].mkdir(parents=True)  # the other node's folder exists: it is just not rank 0's
    out_dirs = [nodes[r // per_node] for r in range(world)]
    results = launch_ranks(corpus, out_dirs)
    others = world - per_node
    for rank, p in enumerate(results):
        assert p.returncode == 2, f"rank {rank}: exit {p.returncode}\n{p.stderr[-3000:]}"
        line = error_line(p.stderr)
        assert f"train.out_dir '{out_dirs[rank]}'" in line
        assert f"{others} of {world} rank(s)" in line
        assert "filesystem all nodes share" in line
    # nothing of the check is left behind, and no rank trained or saved anything
    for node in nodes:
        assert not [n for n in os.listdir(node) if n.startswith(SHARED_CHECK_PREFIX)]
        assert not (node / "checkpoints").exists()


class FakeEngine:
    """The collective interface of an Engine, for one rank of `world`; all_reduce_sum returns
    `peers` (what the other ranks would add) plus this rank's values and records every call."""

    kind = "ddp"

    def __init__(self, rank: int, world: int, peers: list[float]):
        self.rank, self.world_size, self.peers, self.calls = rank, world, peers, []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values):
        self.calls.append(list(values))
        return [a + b for a, b in zip(values, self.peers)]


def test_a_folder_every_rank_sees_passes(tmp_path):
    """Ranks that share out_dir: the check passes and removes its file (rank 0's view only here:
    its own reads succeed, and the other rank adds nothing to the count of ranks missing it)."""
    eng = FakeEngine(0, 2, peers=[0.0, 0.0, 0.0])
    check_shared_out_dir(str(tmp_path), eng)
    assert len(eng.calls) == 2 and os.listdir(tmp_path) == []


def test_a_rank_that_cannot_resolve_the_resume_path_still_enters_the_collective(tmp_path):
    """checkpoint.resume=PATH that only rank 0 sees: rank 1 joins the all-reduce, then refuses
    (before, it raised before the collective rank 0 was waiting in)."""
    cfg = load_config(None, [*TINY, f"train.out_dir={tmp_path / 'run'}", f"checkpoint.resume={tmp_path / 'nowhere'}"])
    eng = FakeEngine(1, 2, peers=[2.0 + 4, 0.0])  # rank 0 chose step 4 of its folder
    with pytest.raises(CheckpointError, match="nowhere"):
        find_resume(cfg, str(tmp_path / "run" / "checkpoints"), eng, None)
    assert eng.calls == [[0.0, 1.0]]


def test_a_rank_that_cannot_read_the_checkpoint_still_enters_the_collective(tmp_path):
    """check_resume: the rank that cannot read the checkpoint joins the all-reduce and names
    itself; a rank whose own checks pass refuses too when a peer failed."""
    cfg = load_config(None, [*TINY, f"train.out_dir={tmp_path / 'run'}"])
    eng = FakeEngine(1, 2, peers=[0.0])
    with pytest.raises(CheckpointError, match="rank 1"):
        check_resume(cfg, str(tmp_path / "missing" / "step_00000004"), eng, 8, {})
    assert eng.calls == [[1.0]]


def test_a_rank_whose_checks_pass_refuses_with_a_failed_peer(tmp_path, monkeypatch):
    import training.resume as resume

    monkeypatch.setattr(resume.ckpt, "read_trainer_state", lambda p: {"step": 4})
    monkeypatch.setattr(resume.ckpt, "read_stamp", lambda p: {})
    monkeypatch.setattr(resume, "check_resume_compatible", lambda *a: None)
    monkeypatch.setattr(resume, "check_same_data", lambda *a: None)
    cfg = load_config(None, [*TINY, f"train.out_dir={tmp_path / 'run'}"])
    assert check_resume(cfg, str(tmp_path), FakeEngine(0, 2, peers=[0.0]), 8, {}) == ({"step": 4}, {})
    eng = FakeEngine(0, 2, peers=[1.0])
    with pytest.raises(CheckpointError, match="another rank"):
        check_resume(cfg, str(tmp_path), eng, 8, {})
    assert eng.calls == [[0.0]]
