"""benchmarks/gpu_suite.sh, the one command a lent GPU runs, keeps working on the CPU: its new
stages run at toy sizes in the dry run, and `--only` picks stages by name."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from support.train_utils import REPO, child_env


def suite(*args: str, out: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = child_env(threads=1)
    env["OUT_DIR"] = str(out)
    return subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_unknown_stage_or_argument_exits_2_before_any_work(tmp_path):
    p = suite("--dry-run", "--only", "train_mfu,nonsense", out=tmp_path)
    assert p.returncode == 2 and "unknown stage 'nonsense'" in p.stderr
    p = suite("--fast", out=tmp_path)
    assert p.returncode == 2 and "unknown argument '--fast'" in p.stderr
    assert not list(tmp_path.iterdir())


def test_dry_run_of_the_bf16_vendor_stage_writes_its_rows(tmp_path):
    """The torch.fft path with bfloat16 inputs is measured on any device; the vendor kernels say
    why they are not (here: not importable, or CUDA needed)."""
    p = suite("--dry-run", "--only", "vendor_fftconv_bf16", out=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (path,) = tmp_path.glob("vendor_fftconv_bf16_cpu_*.json")
    rows = json.loads(path.read_text())["rows"]
    ours = [r for r in rows if r["kernel"] == "models.fftconv"]
    assert [r["length"] for r in ours] == [64, 128]
    assert all(r["status"] == "ok" and r["input_dtype"] == "bfloat16" and r["error"] < 1e-2 for r in ours)
    assert all(r["status"] == "not available" and r["reason"] for r in rows if r["kernel"] != "models.fftconv")
