"""Where this process runs: the launcher, its rank among the processes, the engine and the device.

Read once at the start of a run from the launcher's environment variables; everything else that
depends on the number of processes (batch split, data slots, collectives) takes a `DistEnv`.

Three launch mistakes are refused at start, on every process, with one line (ConfigError, exit 2):

    plain `srun` of several tasks   SLURM starts the tasks but sets no WORLD_SIZE/RANK: each would
                                    train alone on the same out_dir. Ranks are not derived from the
                                    SLURM variables: a rendezvous also needs MASTER_ADDR/PORT and
                                    one device per task, which torchrun or DeepSpeed's launcher
                                    (one per node, under srun) set up and check themselves.
    more processes than GPUs        a node's processes (LOCAL_WORLD_SIZE / LOCAL_SIZE, or the
                                    LOCAL_RANK) exceed the CUDA devices this process sees.
    train.out_dir not shared        the processes do not all see the same train.out_dir
                                    (`check_shared_out_dir`): node-local folders would leave each
                                    node's checkpoint files where rank 0 never finds them.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass

import torch

from training.config import ConfigError


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
    check_not_bare_srun(env)
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


def check_not_bare_srun(env) -> None:
    """ConfigError when SLURM's srun started several tasks of train.py itself, without a launcher.

    srun sets SLURM_PROCID/SLURM_LOCALID for each task it starts (a batch script's own shell has
    no SLURM_LOCALID) and SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) to their number; a launcher sets
    WORLD_SIZE in its workers, so `srun ... torchrun ...` and `srun ... deepspeed ...` pass."""
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_LOCALID" not in env:
        return
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if not tasks.isdigit() or int(tasks) <= 1:
        return
    raise ConfigError(
        f"started by srun as task {env['SLURM_PROCID']} of {tasks} without a distributed launcher (no "
        f"WORLD_SIZE): every task would train alone. Start one launcher per node instead: "
        f"srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc_per_node=<GPUs per node> "
        f"--rdzv_backend=c10d --rdzv_endpoint=<first node>:29500 train.py ..., or DeepSpeed's launcher "
        f"with a hostfile (docs/distributed.md, Running on a cluster)"
    )


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


def local_world_size(local_rank: int = 0) -> int:
    """Processes the launcher started on this node: LOCAL_WORLD_SIZE (torchrun), LOCAL_SIZE
    (DeepSpeed's launcher), else at least local_rank + 1."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return max(int(value), local_rank + 1)
    return local_rank + 1


def choose_device(requested: str, local_rank: int) -> torch.device:
    """CPU, or CUDA device `local_rank` (one GPU per process). ConfigError, on every process of the
    node alike, when the node runs more processes than this process sees CUDA devices: the ranks
    past the last device would otherwise fail alone (invalid device ordinal) while the others wait
    for them."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    count, local = torch.cuda.device_count(), local_world_size(local_rank)
    if local > count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ConfigError(
            f"{local} processes on this node (LOCAL_RANK={local_rank}) but this process sees {count} CUDA "
            f"device(s){shown}: start at most one process per GPU (--nproc_per_node / --num_gpus <= {count}), "
            f"and do not restrict each process to one GPU"
        )
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


SHARED_CHECK_PREFIX = ".hyena-rtf-shared-check-"  # + the nonce in hex; removed by rank 0 at once
_SHARED_CHECK_READ_TRIES = 5  # a network filesystem may show a new file a moment late
_SHARED_CHECK_RETRY_S = 0.2


def check_shared_out_dir(out_dir: str, engine) -> None:
    """Collective (every rank of a multi-process run calls it; a no-op for one process).
    ConfigError, raised on EVERY rank, when some rank does not see the train.out_dir rank 0 sees.

    Checkpoints need one folder for all ranks: DeepSpeed writes one optimizer partition per rank
    into it, rank 0 lists and hashes them into the manifest and renames the folder, and on resume
    every rank must read the checkpoint rank 0 picked. With node-local folders the other nodes'
    partitions never reach the checkpoint, and their ranks find no checkpoint to resume.

    The check: rank 0 writes a file named after a random nonce into out_dir; one all-reduce hands
    every rank the nonce (and, since rank 0 contributes only after writing, orders the write
    before the reads); every rank reads the file back; a second all-reduce sums one flag per rank.
    A rank whose out_dir is another folder (another node's disk, a path that differs per node)
    finds no file, or one with another nonce. Both collectives run on every rank whatever it
    found, so no rank can be left waiting in one. `engine`: rank, world_size, is_main and
    all_reduce_sum, as training/engine.py's Engine has them.
    """
    world = engine.world_size
    if world <= 1:
        return
    nonce = 0
    if engine.is_main:
        nonce = 1 + secrets.randbelow(2**52 - 1)  # exact in the float64 of all_reduce_sum
        try:
            with open(_shared_check_path(out_dir, nonce), "w") as f:
                f.write(f"{nonce}\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            nonce = -1  # rank 0 could not write: every rank reports it below
    (shared_nonce,) = engine.all_reduce_sum([float(nonce)])
    seen = shared_nonce > 0 and _read_nonce(_shared_check_path(out_dir, int(shared_nonce))) == int(shared_nonce)
    missing = engine.all_reduce_sum([0.0 if seen or r != engine.rank else 1.0 for r in range(world)])
    if engine.is_main and shared_nonce > 0:
        try:
            os.unlink(_shared_check_path(out_dir, int(shared_nonce)))
        except OSError:
            pass
    others = [r for r, m in enumerate(missing) if m > 0]
    if others:
        listed = ", ".join(map(str, others[:8])) + (" ..." if len(others) > 8 else "")
        raise ConfigError(
            f"train.out_dir '{out_dir}' ({os.path.abspath(out_dir)} here) is not the same folder on every process: "
            f"{len(others)} of {world} rank(s) ({listed}) do not see the file rank 0 wrote into it; a run on several "
            f"nodes needs train.out_dir on a filesystem all nodes share (NFS, Lustre, ...), under the same path"
        )


def _shared_check_path(out_dir: str, nonce: int) -> str:
    return os.path.join(out_dir, f"{SHARED_CHECK_PREFIX}{nonce:x}")


def _read_nonce(path: str) -> int | None:
    """The nonce in `path`, None when it cannot be read (after a few short retries)."""
    for attempt in range(_SHARED_CHECK_READ_TRIES):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            if attempt + 1 < _SHARED_CHECK_READ_TRIES:
                time.sleep(_SHARED_CHECK_RETRY_S)
    return None
