"""Interrupted runs of the CLI: killing the whole job, or one worker of its pool, mid-way leaves no
complete-looking output (the run builds in a staging folder beside it), and the rerun succeeds
with the same result as an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.tokenizer import train_bpe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc"),
]
ROOT = Path(__file__).resolve().parents[3]
FINAL = ["manifest.json", "train.bin", "train.idx", "val.bin", "val.idx"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupt")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)] + ["the", "a", "of", "\n"]
    with open(d / "big.jsonl", "w") as f:
        for _ in range(4500):  # ~4.5 MB: several seconds of tokenizing on 2 cores
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=180))}) + "\n")
    tok = train_bpe([" ".join(rng.choices(words, k=5000)) for _ in range(20)], 2000)
    (d / "tok.json").write_text(tok.json_text)
    return d


def _cmd(d, out):
    return [
        sys.executable,
        "-m",
        "data_prep.prepare",
        "--input",
        str(d / "big.jsonl"),
        "--tokenizer",
        str(d / "tok.json"),
        "--out",
        str(out),
        "--workers",
        "2",
        "--chunk-bytes",
        "65536",
        "--no-progress",
    ]


def _start_and_wait_mid_way(d, out):
    """The CLI building ``out``, once it is writing the train shard (in a session of its own,
    so that the whole job can be killed at once)."""
    proc = subprocess.Popen(
        _cmd(d, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    _wait_for_partial_output(out, proc)
    return proc


def _staging(out):
    """The staging folders of runs building ``out`` (atomic.replace_dir names them so)."""
    return list(out.parent.glob(f".{out.name}.*.partial"))


def _wait_for_partial_output(out, proc, timeout=60):
    """Until the shard being written has data: the run is then mid-way."""
    t = time.time()
    while time.time() - t < timeout:
        shards = [p for d in _staging(out) for p in d.glob(".train.bin.*.partial")]
        if any(p.stat().st_size > 100_000 for p in shards if p.exists()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("the run never started writing")


def _children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _assert_nothing_complete(out):
    present = [n for n in FINAL if (out / n).exists()]
    assert present == [], f"complete-looking output left behind: {present}"


def _rerun_matches_reference(d, out, ref):
    r = subprocess.run(_cmd(d, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(out.glob("*.partial"))
    assert not _staging(out)  # the killed run's leftovers too
    for n in FINAL:
        assert (out / n).read_bytes() == (ref / n).read_bytes(), n


@pytest.fixture(scope="module")
def reference(job):
    r = subprocess.run(_cmd(job, job / "ref"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return job / "ref"


def test_killing_the_job_mid_way(job, reference):
    out = job / "killed"
    proc = _start_and_wait_mid_way(job, out)
    os.killpg(proc.pid, signal.SIGKILL)  # main process and its worker pool at once
    proc.wait(timeout=30)
    _assert_nothing_complete(out)
    assert _staging(out)  # it really was cut mid-way
    _rerun_matches_reference(job, out, reference)


def test_killing_a_pool_worker_mid_way(job, reference):
    out = job / "worker_killed"
    proc = _start_and_wait_mid_way(job, out)
    workers = [c for c in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert workers, "no worker process found"
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"worker process died" in err
    _assert_nothing_complete(out)
    assert not _staging(out)  # the main process cleaned up after itself
    _rerun_matches_reference(job, out, reference)
