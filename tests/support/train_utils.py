"""Shared helpers of the tests/test_train_*.py files: a tiny prepared corpus, tiny-run overrides,
launching train.py in subprocesses, reading metrics."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from data_prep.prepare import prepare
from models.configuration_hyena_rtf import HyenaRTFConfig
from models.modeling_hyena_rtf import HyenaRTFForCausalLM
from training.config import load_config, resolve_batch
from training.dist_env import detect_env
from training.engine import DeepSpeedEngine, deepspeed_config
from training.metrics import read_metrics
from training.optim import make_optimizer, param_groups
from training.trainer import run

REPO = Path(__file__).resolve().parents[2]
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
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / n) for n in ("argparse.py", "typing.py", "inspect.py", "dataclasses.py")]
    prepare(files, data_dir, vocab_size=512, val_fraction=0.1, text_chunk_bytes=8192, workers=1, verbose=False)
    return data_dir


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run a block with n intra-op threads. The thread count changes the order of float reductions,
    so runs compared bit for bit must use the same count: module-scoped fixtures run before the
    per-test one-thread fixture of conftest.py, hence they pin it themselves."""
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
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads or torch.get_num_threads())
    env["HF_HUB_OFFLINE"] = "1"
    return env


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...), read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [child for child, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def run_cmd(cmd: list, timeout: int = 240, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run and return; on failure the assertion shows the tail of the output."""
    # A session of its own, so that a timeout kills the launcher *and* its rank processes.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env(threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own, so the launcher's group is not enough:
        # a rank left alive holds the output pipes open and the reads below would never end.
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(
            f"{' '.join(map(str, cmd))} timed out after {timeout} s:\n{out[-3000:]}\n{err[-5000:]}"
        ) from None
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert p.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    )
    return p


def launcher_cmd(launcher: str, nproc: int) -> list:
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, "train.py"]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, "train.py"]
    return [sys.executable, "train.py"]


# Loss and gradient-norm tolerances of runs compared with the one-process reference; measured and
# justified in the docstrings of test_train_distributed.py and test_train_elastic.py.
LOSS_ATOL = 2e-5
NORM_RTOL = 1e-4


def run_one_thread(cfg) -> dict:
    """train's `run` at one thread, as the tests themselves run (conftest.py); its summary."""
    with torch_threads(1):
        return run(cfg)


def assert_learned(steps: list[int], losses: list[float], n: int = 10) -> None:
    """A run logged every step 1..n and its loss fell by more than 0.3 nats."""
    assert steps == list(range(1, n + 1))
    assert losses[-1] < losses[0] - 0.3


def assert_same_run(out: Path, ref: Path, step: int = 10) -> None:
    """A resumed run `out` ended where the uninterrupted `ref` did: the same logged steps, losses and
    gradient norms bit for bit, the same evaluations, and the same weights at `step`."""

    def logged(run_dir: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl")]

    assert logged(out) == logged(ref)
    assert read_metrics(out / "metrics.jsonl", "eval") == read_metrics(ref / "metrics.jsonl", "eval")
    a = torch.load(out / f"checkpoints/step_{step:08d}/model.pt")
    b = torch.load(ref / f"checkpoints/step_{step:08d}/model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of a module-scoped run folder (tmp_path/run), for a test that damages it."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def reference_curve(corpus: Path, out: Path) -> dict:
    """The uninterrupted one-process run (micro 4 x accumulation 2, 10 steps) the others must follow."""
    with torch_threads(1):
        run(load_config(None, [*TINY, f"data.dir={corpus}", f"train.out_dir={out}"]))
    return curve(out)


def curve(out) -> dict:
    """Per logged step: step, loss, grad norm, lr of both groups, tokens seen; and the eval losses."""
    recs = read_metrics(os.path.join(out, "metrics.jsonl"))
    got = {k: [r[k] for r in recs] for k in ("step", "loss", "grad_norm", "lr", "rtf_lr", "tokens")}
    got["val"] = [r["val_loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl"), "eval")]
    return got


def assert_close(got: dict, ref: dict) -> None:
    """`got` follows the reference: same steps, schedule and token count exactly (pure functions of
    the step), losses within LOSS_ATOL, gradient norms within NORM_RTOL."""
    assert got["step"] == ref["step"] == list(range(1, 11))
    gaps = [abs(a - b) for a, b in zip(got["loss"], ref["loss"])]
    assert max(gaps) < LOSS_ATOL, f"loss gaps {gaps}"
    for a, b in zip(got["grad_norm"], ref["grad_norm"]):
        assert a == pytest.approx(b, rel=NORM_RTOL)
    assert got["val"] == pytest.approx(ref["val"], abs=LOSS_ATOL)
    assert (got["lr"], got["rtf_lr"], got["tokens"]) == (ref["lr"], ref["rtf_lr"], ref["tokens"])
    assert ref["loss"][-1] < ref["loss"][0] - 0.3  # the curve being matched actually moves


def assert_resized(p: subprocess.CompletedProcess, step: int, saved_on: int, resumed_on: int) -> None:
    """The run `p` resumed at `step` on resumed_on processes a checkpoint saved by saved_on, and
    said so in its log (stderr)."""
    assert f"| {resumed_on} process(es)" in p.stderr
    expected = f"at step {step} with a different world size: saved by {saved_on} process(es), resumed on {resumed_on}"
    assert expected in p.stderr, p.stderr[-2000:]


def error_line(stderr: str) -> str:
    """The error of a failed train.py: its last line of stderr, the only one that starts with
    `train.py: error: `; every line before it is a log line (`[component] ...`), so no traceback."""
    lines = stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("train.py: error: "), lines
    assert all(line.startswith("[") for line in lines[:-1]), lines
    return lines[-1]


def launch(launcher: str, corpus: Path, out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """A TINY run of train.py under `launcher` (deepspeed, torchrun: nproc processes; python: one)."""
    if launcher != "python" and not (BIN / launcher).exists():
        pytest.fail(f"{BIN / launcher} not found: the dev install provides it")
    return run_cmd(
        [*launcher_cmd(launcher, nproc), *TINY, f"data.dir={corpus}", f"train.out_dir={out}", *extra], threads=1
    )


def in_process_deepspeed(monkeypatch, precision: str = "fp32", zero_stage: int = 1, seed: int = 0):
    """A one-rank DeepSpeedEngine in this process around the tiny model (vocabulary 512, no
    launcher), its AdamW groups as train.py builds them. The rendezvous variables go through
    monkeypatch, so no later subprocess inherits them; close() the last engine to leave the group."""
    rendezvous = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    for k, v in rendezvous.items():
        monkeypatch.setenv(k, v)
    plan = resolve_batch(load_config(None, [*TINY, f"train.precision={precision}"]).train, 1)
    torch.manual_seed(seed)
    model = HyenaRTFForCausalLM(HyenaRTFConfig(vocab_size=512, d_model=32, n_layer=2, l_max=64, state_size=4))
    opt = make_optimizer(param_groups(model, 1e-3, 1e-3, 0.1), betas=(0.9, 0.95), eps=1e-8)
    return DeepSpeedEngine(
        model,
        opt,
        plan,
        torch.device("cpu"),
        precision,
        detect_env(),
        deepspeed_config(plan, zero_stage, precision, 1.0, {}),
    )
