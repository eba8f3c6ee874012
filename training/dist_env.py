"""Where this process runs: the launcher, its rank among the processes, the engine and the device.

Read once at the start of a run from the launcher's environment variables; everything else that
depends on the number of processes (batch split, data slots, collectives) takes a `DistEnv`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from hyena_rtf.training.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "deepspeed" | "torchrun" | "none"


def detect_env() -> DistEnv:
    """Ranks from the launcher's environment variables.

    torchrun sets TORCHELASTIC_RUN_ID; DeepSpeed's launcher sets CROSS_RANK/LOCAL_SIZE next to
    RANK/WORLD_SIZE; a plain `python train.py` sets none of them (one process).
    """
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher = "deepspeed"
    else:
        launcher = "none" if world == 1 else "unknown"
    return DistEnv(rank, local_rank, world, launcher)


def choose_engine(requested: str, env: DistEnv) -> str:
    """auto: DeepSpeed under its launcher, DDP under torchrun, otherwise a single process."""
    if requested == "auto":
        if env.launcher == "deepspeed":
            return "deepspeed"
        if env.world_size > 1:
            return "ddp"
        return "single"
    if requested == "single" and env.world_size > 1:
        raise ConfigError(
            f"train.engine=single but the launcher started {env.world_size} processes; use ddp or deepspeed"
        )
    return requested


def choose_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_process_env() -> None:
    """A launcher-less process needs the rendezvous variables (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), or DeepSpeed goes looking for mpi4py to discover them."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
