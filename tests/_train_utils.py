"""Shared helpers of the tests/test_train_*.py files: a tiny prepared corpus, tiny-run overrides,
launching train.py in subprocesses, reading metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A tiny model and run (d_model 32, 2 layers, seq 64): every engine trains it in seconds on a CPU.
# global batch 8: one process accumulates 2 micro-batches of 4, two processes take one each.
TINY = [
    "model.d_model=32",
    "model.n_layer=2",
    "model.state_size=4",
    "data.seq_len=64",
    "data.eval_samples=16",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.max_steps=10",
    "train.device=cpu",
    "train.eval_every=5",
    "optim.lr=1e-2",
    "schedule.warmup_steps=2",
    "logging.log_every=1",
    "logging.progress_bar=false",
    "checkpoint.every=4",
    "checkpoint.export_at_end=false",
]


def make_corpus(data_dir: Path) -> Path:
    """A small prepared directory made by the real data_prep.prepare: ~400 KB of stdlib sources cut
    into 8 KB documents, a 512-token BPE, 10% of the documents held out for 'val'."""
    from data_prep.prepare import prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / n) for n in ("argparse.py", "typing.py", "inspect.py", "dataclasses.py")]
    prepare(files, data_dir, vocab_size=512, val_fraction=0.1, text_chunk_bytes=8192, workers=1, verbose=False)
    return data_dir


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run a block with n intra-op threads. The thread count changes the order of float reductions,
    so runs compared bit for bit must use the same count: module-scoped fixtures run before the
    per-test one-thread fixture of conftest.py, hence they pin it themselves."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int | None = None) -> dict:
    """Environment of a child process. threads: its OpenMP threads; default: as many as this
    process uses, because the thread count changes the order of float reductions, and a child
    compared bit for bit with an in-process run must add up in the same order."""
    import torch

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads or torch.get_num_threads())
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_cmd(cmd: list, timeout: int = 240, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run and return; on failure the assertion shows the tail of the output."""
    # A session of its own, so that a timeout kills the launcher *and* its rank processes.
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} timed out after {timeout} s:\n{out[-3000:]}\n{err[-5000:]}")
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def launcher_cmd(launcher: str, nproc: int) -> list:
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, "train.py"]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, "train.py"]
    return [sys.executable, "train.py"]
