"""Smoke tests of the benchmarks of exact decoding (benchmarks/distill.py, benchmarks/recurrence_build.py,
benchmarks/against_baseline.py) at toy sizes, so that they cannot rot: every row is there, its
figures are finite and consistent with the report they come from. Nothing here asserts a timing."""

from __future__ import annotations

import json
import math

import pytest
from support.helpers import tiny_model, train_tiny_tokenizer

from benchmarks import against_baseline, recurrence_build
from benchmarks import distill as distill_bench
from export.folder import save_hf_checkpoint


def test_recurrence_build_has_a_row_per_layer(tmp_path):
    out = tmp_path / "rb.json"
    result = recurrence_build.main(["--layers", "tiny", "small", "--repeats", "1", "--out", str(out)])
    assert [r["layer"] for r in result["rows"]] == ["tiny", "small"]
    for r in result["rows"]:
        assert r["build_ms"] > 0 and r["recurrence_mb"] > 0
    assert json.loads(out.read_text())["rows"] == result["rows"] and out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_against_baseline_runs_both_trees_side_by_side(tmp_path, monkeypatch):
    """HEAD as the baseline: the worktree and the import shim work, and both results are kept."""
    monkeypatch.setattr(against_baseline, "RESULTS", tmp_path)
    command = ["python", "-m", "benchmarks.recurrence_build", "--layers", "tiny", "--repeats", "1"]
    assert against_baseline.main(["--baseline", "HEAD", "--name", "rb", "--", *command]) == 0
    (side,) = tmp_path.glob("rb_vs_*.json")
    results = json.loads(side.read_text())["results"]
    assert len(results) == 2 and all(r["rows"][0]["layer"] == "tiny" for r in results.values())


@pytest.mark.slow
def test_distill_benchmark_has_a_row_per_form_and_order(tmp_path):
    tokenizer = train_tiny_tokenizer(tmp_path / "tok.json")
    source = tmp_path / "src"
    save_hf_checkpoint(tiny_model(vocab=320, filter="implicit", implicit_order=8), tokenizer, source)
    text = tmp_path / "val.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    out = tmp_path / "d.json"
    argv = ["--source", str(source), "--data", str(text), "--orders", "2,4", "--steps", "5", "--max-tokens", "500"]
    distill_bench.main([*argv, "--new-tokens", "2", "--repeats", "1", "--prompt-length", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["form"], r["order"]) for r in result["rows"]] == [("modal", 2), ("modal", 4), ("rtf", 2), ("rtf", 4)]
    for r in result["rows"]:
        for key in ("memory_tap_error_median", "memory_tap_error_max", "kl_nats_per_token", "decode_ms_per_token"):
            assert math.isfinite(r[key]) and r[key] >= 0
        assert r["memory_tap_error_median"] <= r["memory_tap_error_max"]
        assert 0 <= r["top1_agreement"] <= 1 and r["recurrent_check"]["passed"] in (True, False)
    assert out.with_suffix(".png").stat().st_size > 0
