"""Launch checks made at start (training/dist_env.py): a plain `srun` of several tasks, and more
processes on a node than GPUs, are refused with one line on every process; the launchers that set
the ranks pass. The environment and CUDA are faked: nothing here needs SLURM or a GPU."""

from __future__ import annotations

import sys

import pytest
import torch
from support.helpers import run_child
from support.train_utils import REPO, child_env, error_line

from training.config import ConfigError
from training.dist_env import choose_device, detect_env

LAUNCH_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "CROSS_RANK",
    "TORCHELASTIC_RUN_ID",
    "CUDA_VISIBLE_DEVICES",
)
SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for key in LAUNCH_VARS + SLURM_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def srun_task(procid: int, ntasks: int) -> dict:
    """What srun sets in each task it starts (the variables detect_env reads)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % 8),
    }


@pytest.mark.parametrize("procid", [0, 3, 7])
def test_plain_srun_of_several_tasks_is_refused_on_every_task(clean_env, procid):
    for k, v in srun_task(procid, 8).items():
        clean_env.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        detect_env()
    msg = str(e.value)
    assert "\n" not in msg
    assert f"srun as task {procid} of 8" in msg and "torchrun" in msg and "DeepSpeed" in msg


def test_launchers_under_srun_and_a_batch_shell_pass(clean_env):
    for k, v in srun_task(5, 8).items():
        clean_env.setenv(k, v)
    # srun ... torchrun: torchrun's worker has its own ranks.
    for k, v in {"WORLD_SIZE": "16", "RANK": "5", "LOCAL_RANK": "5", "TORCHELASTIC_RUN_ID": "x"}.items():
        clean_env.setenv(k, v)
    env = detect_env()
    assert (env.rank, env.world_size, env.launcher) == (5, 16, "torchrun")
    # The batch script itself (sbatch --ntasks=8, no srun): one shell, no SLURM_LOCALID.
    for key in LAUNCH_VARS + ("SLURM_LOCALID", "SLURM_STEP_NUM_TASKS"):
        clean_env.delenv(key, raising=False)
    clean_env.setenv("SLURM_PROCID", "0")
    assert detect_env().world_size == 1
    # srun of a single task.
    clean_env.setenv("SLURM_LOCALID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert detect_env().launcher == "none"


def test_plain_srun_exits_2_with_one_line(tmp_path):
    """train.py under a faked srun task: exit 2 and one `train.py: error:` line, before any data
    is read or the run lock is taken."""
    env = child_env(threads=1)
    for key in LAUNCH_VARS:
        env.pop(key, None)
    env.update(srun_task(1, 4))
    cmd = [sys.executable, "train.py", f"train.out_dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'none'}"]
    p = run_child(cmd, cwd=REPO, env=env, timeout=120, code=2)
    assert "srun as task 1 of 4" in error_line(p.stderr)
    assert not (tmp_path / "run").exists()


class FakeDevices:
    def __init__(self, count: int):
        self.count = count
        self.selected: list[int] = []

    def install(self, monkeypatch) -> FakeDevices:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "set_device", self.selected.append)
        return self


@pytest.mark.parametrize("local_rank", [0, 1])
def test_more_processes_on_a_node_than_visible_gpus_is_refused_on_every_rank(clean_env, local_rank):
    """8 processes per node, each restricted to one GPU: rank 0 would start and wait for ranks
    1..7, which fail alone on `set_device`; every rank refuses instead, before touching a device."""
    devices = FakeDevices(1).install(clean_env)
    clean_env.setenv("LOCAL_WORLD_SIZE", "8")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", str(local_rank))
    with pytest.raises(ConfigError, match=r"8 processes on this node .* sees 1 CUDA device\(s\) \(CUDA_VISIBLE"):
        choose_device("auto", local_rank)
    assert devices.selected == []


def test_one_process_per_visible_gpu_gets_its_own(clean_env):
    devices = FakeDevices(8).install(clean_env)
    clean_env.setenv("LOCAL_SIZE", "8")  # DeepSpeed's launcher
    assert choose_device("auto", 5) == torch.device("cuda", 5)
    assert devices.selected == [5]
    clean_env.delenv("LOCAL_SIZE")
    assert choose_device("cuda", 0) == torch.device("cuda", 0)  # one process, no launcher
    with pytest.raises(ConfigError, match="LOCAL_RANK=8"):
        choose_device("cuda", 8)  # no local size announced: the rank itself says 9 processes
